"""Faults on the multi-node test cluster: a worker node lost during labeling, a node lost under
an elastic teacher, a driver killed mid-run (last: Ray's autoscaling coordinator keeps a killed
driver's resource requests for 180 s, which an elastic group started after it would wait out)."""

import json
import threading
import time
from pathlib import Path

import pytest

from stpp_ray.config import Config
from stpp_ray.pseudo_labels import read_table
from tests.helpers import write_checkpoints, write_random_images

ARCH = {"name": "deeplabv3plus", "backbone": "resnet18", "output_stride": 8, "aspp_channels": 16, "num_classes": 4}


def _labeler_nodes(ray) -> set[str]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
    return {a.node_id for a in actors if "ArrowLabeler" in (a.class_name or "")}


@pytest.mark.ray
def test_labeling_completes_exactly_once_when_a_worker_node_is_removed(ray_cluster, tmp_path):
    import ray

    from stpp_ray.cluster.label import run_labeling

    cluster, _ = ray_cluster
    extra = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", object_store_memory=300 * 1024 * 1024)
    cluster.wait_for_nodes()
    # Slow enough per batch (ResNet-18 at 96 px, K = 3, one image per batch) that the node
    # is removed while most of the pool is still to be labeled.
    paths = write_checkpoints(tmp_path, (1, 2, 3), ARCH)
    images = write_random_images(tmp_path, [f"u{i:03d}.png" for i in range(120)], (96, 96), seed=0)
    # Three 1-CPU actors from the start: one on each worker node, the extra one included.
    cfg = Config.model_validate({"label": {"batch_size": 1, "rows_per_file": 8, "min_actors": 3, "max_actors": 3}})
    out = tmp_path / "pseudo"
    result: dict = {}

    def label():
        try:
            result["stats"] = run_labeling(cfg, images, paths, paths[-1], out, ARCH)
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            result["error"] = err

    worker = threading.Thread(target=label)
    worker.start()
    extra_id = extra.node_id
    deadline = time.time() + 120
    while extra_id not in _labeler_nodes(ray) and worker.is_alive() and time.time() < deadline:
        time.sleep(0.5)
    assert worker.is_alive(), "labeling finished before any actor ran on the extra node"
    time.sleep(2)  # let that actor take batches
    assert worker.is_alive(), "labeling finished before the node could be removed"
    cluster.remove_node(extra, allow_graceful=False)
    removed_at = time.time()
    worker.join(timeout=300)
    assert not worker.is_alive(), "labeling did not finish after the node was removed"
    assert "error" not in result, result.get("error")
    ids = read_table(out, ["image_id"]).column("image_id").to_pylist()
    assert sorted(ids) == sorted(i for i, _ in images)  # every image exactly once
    print(f"labeling finished {time.time() - removed_at:.1f} s after the node was removed; "
          f"{result['stats']['wall_s']:.1f} s in all")


def _wait_until_train_can_reserve(num_workers: int, timeout_s: float = 240) -> None:
    """An elastic group starts with as many workers as Ray's autoscaling coordinator reserves for
    it at once, and the coordinator keeps a killed driver's requests for 180 s (none in this
    file's order; a test run on its own after the driver-kill test would wait here). Probe it as Ray Train's elastic policy does, with 1-CPU workers, until `num_workers` fit.
    Internal API (Ray 2.58, `ray.train.v2._internal.execution.scaling_policy`): tests only."""
    import ray
    from ray.train import ScalingConfig
    from ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client import (
        TrainAutoscalingCoordinatorClient,
    )

    probe = "stpp-ray-test-probe"
    client = TrainAutoscalingCoordinatorClient(probe)
    scaling = ScalingConfig(num_workers=(1, num_workers), resources_per_worker={"CPU": 1})
    deadline, reserved = time.time() + timeout_s, []
    try:
        while time.time() < deadline:
            client.send_resource_request(scaling, num_workers)
            reserved = ray.get(client._autoscaling_coordinator.get_reserved_resources.remote(probe))
            if sum(int(r.get("CPU", 0)) for r in reserved) >= num_workers:
                return
            time.sleep(2)
    finally:
        client.cancel_resource_request()
    raise AssertionError(f"Ray's autoscaling coordinator reserves only {reserved} after {timeout_s:.0f} s")


@pytest.mark.ray
def test_elastic_teacher_shrinks_to_one_worker_when_a_node_is_removed(ray_cluster, smoke_data, tmp_path):
    """`ray.num_workers: [1, 2]`: a teacher on 2 workers on the 2 worker nodes; one node is
    removed mid-training; Ray Train restarts the group on the 1 worker that fits, from the
    last checkpoint, and the stage ends with the weights of an uninterrupted 2-worker run
    (UniMatch's head, which has no dropout: dropout masks are drawn per worker). The removed
    node is replaced afterwards for the tests that follow."""
    import torch
    from ray.util.state import list_actors

    from stpp_ray.orchestration.pipeline import Pipeline
    from stpp_ray.weights import load_model
    from tests.helpers import smoke_config

    cluster, workers = ray_cluster
    args = ["method=supervised", "ray.num_workers=[1, 2]", "train.epochs=6", "train.checkpoint_interval=1",
            "selection.num_checkpoints=1", "model.head=unimatch", "train.max_failures=2"]
    elastic = tmp_path / "elastic"
    result: dict = {}
    _wait_until_train_can_reserve(2)

    def train():
        try:
            result["report"] = Pipeline(smoke_config(smoke_data, elastic, *args)).run()
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            result["error"] = err

    runner = threading.Thread(target=train)
    runner.start()
    deadline = time.time() + 300
    while runner.is_alive() and time.time() < deadline and not list((elastic / "ray_train").glob("teacher-*/epoch_0002")):
        time.sleep(0.2)
    assert runner.is_alive(), f"the stage ended before a node could be removed: {result}"
    nodes = {a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
             if a.class_name == "RayTrainWorker"}
    victim = next(n for n in workers if n.node_id in nodes)
    cluster.remove_node(victim, allow_graceful=False)
    runner.join(timeout=400)
    replacement = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", object_store_memory=300 * 1024 * 1024)
    workers[workers.index(victim)] = replacement
    cluster.wait_for_nodes()
    assert not runner.is_alive() and "error" not in result, result.get("error")
    records = [json.loads(line) for line in (elastic / "teacher" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5, 6]
    # metrics.jsonl, not the controller's log line: Ray streams actor logs to the driver
    # asynchronously, and CI once read the capture before that line had come.
    # The node goes once epoch 2's checkpoint is written; whether the controller had registered
    # it by then decides whether epoch 2 is trained again on 1 worker (seen in a suite run).
    workers = [r["workers"] for r in records]
    assert workers[0] == 2 and workers[-1] == 1, workers
    # The Ray Train controller's own log shows the resize.
    run_name = next((elastic / "ray_train").glob("teacher-*")).name
    started = [line for f in (Path(cluster.head_node.get_logs_dir_path()) / "train").glob("ray-train-app-controller-*.log")
               for line in f.read_text().splitlines()
               if "Started training worker group of size" in line and f'"run_name": "{run_name}"' in line]
    assert any("of size 2" in line for line in started) and "of size 1" in started[-1], started

    fixed = tmp_path / "fixed"
    uninterrupted = Pipeline(smoke_config(smoke_data, fixed, *[a.replace("[1, 2]", "2") for a in args])).run()
    # One worker sums the batch in another order than two. Measured after 4 more epochs: the
    # same val mIoU to every digit, parameters within 1e-3, BatchNorm statistics within 1e-2.
    assert abs(result["report"]["teacher"]["miou"] - uninterrupted["teacher"]["miou"]) < 1e-3
    a, _ = load_model(elastic / "teacher" / "final.pt")
    b, _ = load_model(fixed / "teacher" / "final.pt")
    expected = b.state_dict()
    for name, x in a.named_parameters():
        assert torch.allclose(x, expected[name], rtol=1e-2, atol=5e-3), name
    for name, x in a.named_buffers():
        assert torch.allclose(x.float(), expected[name].float(), rtol=2e-2, atol=2e-2), name


@pytest.mark.ray
def test_driver_killed_mid_run_and_the_same_command_completes(ray_cluster, smoke_data, tmp_path):
    """`stpp-ray run` SIGKILLed during the student: rerun reuses teacher and labeling."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from tests.helpers import SMOKE

    cluster, _ = ray_cluster
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "stpp_ray", "run", "-c", SMOKE, "method=st", f"data.root={smoke_data}",
           f"run.output_dir={out}", f"ray.address={cluster.address}", "train.epochs=2", "train.student_epochs=3"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        manifest = out / "manifest.json"
        deadline = time.time() + 400
        while time.time() < deadline and first.poll() is None:
            stages = json.loads(manifest.read_text())["stages"] if manifest.exists() else {}
            if "label_teacher" in stages and list((out / "ray_train").glob("student-*/epoch_0002")):
                break  # the student's second epoch checkpoint is written, so its first is registered
            time.sleep(0.5)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        killed_at = time.time()
        first.send_signal(signal.SIGKILL)
        first.wait()
    before = json.loads(manifest.read_text())["stages"]
    assert "student" not in before
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert "stage 'teacher' already done" in log and "stage 'label_teacher' already done" in log
    after = json.loads(manifest.read_text())["stages"]
    for name in ("check_data", "teacher", "label_teacher"):
        assert after[name]["finished_at"] == before[name]["finished_at"]
    assert after["student"]["result"]["epochs"] == 3
    assert "[student] resuming after epoch" in log
    print(f"rerun finished {time.time() - killed_at:.1f} s after the kill")
