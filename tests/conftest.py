import os
import socket
import subprocess
import sys
import time
import urllib.request
from types import SimpleNamespace

import pytest

os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Nodes of ray.cluster_utils.Cluster otherwise advertise this machine's external address,
# which is not reachable here; with this, every node and driver uses 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory):
    """A local S3 API (moto's server) on 127.0.0.1 that checks credentials, shared by the session,
    with one bucket. Its endpoint and an IAM user's keys go into os.environ before the Ray
    cluster starts (ray_cluster needs this fixture), so every Ray process finds them the way
    it finds AWS_* variables on a cloud cluster."""
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("s3") / "moto.log", "w")
    # Requests after the first 3 (the IAM user's creation below) must be signed by a known key.
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"moto's S3 server did not start (log: {log.name})") from None
            time.sleep(0.1)
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                       aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
    iam.create_user(UserName="tests")
    iam.put_user_policy(UserName="tests", PolicyName="all", PolicyDocument=(
        '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}'))
    key = iam.create_access_key(UserName="tests")["AccessKey"]
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=key["AccessKeyId"],
                      AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"], AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true")
    boto3.client("s3").create_bucket(Bucket="stpp-tests")
    yield SimpleNamespace(endpoint=endpoint, bucket="stpp-tests")
    server.terminate()
    server.wait(timeout=30)
    log.close()


@pytest.fixture(scope="session")
def ray_cluster(s3_store):
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


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
    """Tests that remove nodes or kill drivers run last, after those that share the cluster intact.
    Every test that needs the Ray cluster, through any fixture, is marked `ray`, so that
    `make test-fast` (`-m "not (ray or multiprocess) or smoke"`) starts Ray for its one smoke pipeline only."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
    items.sort(key=lambda item: "test_cluster_faults" in item.nodeid)
