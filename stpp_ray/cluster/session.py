"""Connecting to Ray: an existing cluster (address / RAY_ADDRESS / inside a job) or a new local instance."""

from __future__ import annotations

import os

import ray

from ..config import Config


def init_ray(cfg: Config, extra_cpus: int = 0) -> None:
    """Join the configured cluster, or start a local instance bound to loopback.

    `extra_cpus`: logical CPUs added to a local instance for processes that mostly wait
    (a sweep's trial drivers), so that they do not take the cores the workers need."""
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        # Inside `ray job submit` or on a cluster: resources are the cluster's, not ours to declare.
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(
        # "local": a new instance even when another Ray runs on this machine (ray.init()
        # would join that one, and then refuse num_cpus).
        address="local",
        num_cpus=(cfg.ray.local_num_cpus or os.cpu_count()) + extra_cpus,
        include_dashboard=True,  # hosts the state API that Ray Train and Tune query
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",  # a local instance listens on loopback only
        log_to_driver=True,
    )
