"""How stpp-ray connects to Ray (no Ray started: ray.init is replaced)."""

from __future__ import annotations

import ray

from stpp_ray.cluster import session as ray_session
from stpp_ray.config import load_config


def _init_kwargs(monkeypatch, overrides=(), env=None) -> dict:
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    ray_session.init_ray(load_config(None, list(overrides)))
    (kwargs,) = calls
    return kwargs


def test_a_local_instance_is_new_even_when_another_ray_runs_here(monkeypatch):
    # ray.init() without an address joins a Ray started by `ray start` on this machine and
    # then refuses num_cpus; "local" always starts a new instance.
    kwargs = _init_kwargs(monkeypatch, ["ray.local_num_cpus=3"])
    assert kwargs["address"] == "local" and kwargs["num_cpus"] == 3
    assert kwargs["dashboard_host"] == "127.0.0.1"


def test_a_named_cluster_is_joined_without_declaring_resources(monkeypatch):
    for overrides, env in [(["ray.address=ray://head:10001"], None), ((), {"RAY_ADDRESS": "http://127.0.0.1:8265"})]:
        kwargs = _init_kwargs(monkeypatch, overrides, env)
        assert kwargs["address"] in ("ray://head:10001", "http://127.0.0.1:8265")
        assert "num_cpus" not in kwargs
