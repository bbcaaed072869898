import os

import pytest

os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Nodes of ray.cluster_utils.Cluster otherwise advertise this machine's external address,
# which is not reachable here; with this, every node and driver uses 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def ray_cluster():
    """A 3-node Ray cluster on this machine shared by all integration tests: a head that
    runs no tasks (0 CPUs, as on a real cluster) and two worker nodes with 1 CPU each, so
    Train workers and labeling actors land on different nodes. All nodes see the same
    filesystem, as a real cluster sees its shared storage."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "node_ip_address": "127.0.0.1",
    })
    workers = [cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", object_store_memory=300 * 1024 * 1024)
               for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1")  # the nodes listen on loopback only
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def ray_local(ray_cluster):
    """The connected `ray` module (2 CPUs in all, spread over two worker nodes)."""
    import ray

    return ray


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory):
    """The smoke config's tiny demo dataset, generated once per session."""
    from stpp_ray.config import load_config
    from stpp_ray.demo_data import ensure_demo_dataset
    from tests.helpers import SMOKE

    root = tmp_path_factory.mktemp("smoke_data")
    d = load_config(SMOKE).data
    ensure_demo_dataset(root, seed=d.demo_seed, num_train=d.demo_num_train, num_val=d.demo_num_val,
                        image_size=d.demo_image_size)
    return root


def pytest_collection_modifyitems(items):
    """Tests that remove nodes or kill drivers run last, after those that share the cluster intact."""
    items.sort(key=lambda item: "test_cluster_faults" in item.nodeid)
