import os

import pytest

os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (2 CPUs) shared by all integration tests."""
    import ray

    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory):
    """The smoke config's tiny demo dataset, generated once per session."""
    from stpp_ray.config import load_config
    from stpp_ray.demo_data import ensure_demo_dataset

    root = tmp_path_factory.mktemp("smoke_data")
    d = load_config(SMOKE).data
    ensure_demo_dataset(root, seed=d.demo_seed, num_train=d.demo_num_train, num_val=d.demo_num_val,
                        image_size=d.demo_image_size)
    return root


SMOKE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "smoke.yaml")


def smoke_config(root, out, *overrides):
    from stpp_ray.config import load_config

    return load_config(SMOKE, [f"data.root={root}", f"run.output_dir={out}", *overrides])
