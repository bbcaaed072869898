"""Ray Train integration: a tiny 2-worker teacher that survives a killed worker."""

import json
from pathlib import Path

import pytest
import torch

from stpp_ray.weights import load_model
from stpp_ray.orchestration.pipeline import Pipeline
from stpp_ray.cluster.train import FAULT_MARKER

from tests.helpers import injected_fault, smoke_config

pytestmark = pytest.mark.ray


def test_two_worker_teacher_resumes_after_a_killed_worker(ray_local, smoke_data, tmp_path):
    cfg = smoke_config(smoke_data, tmp_path / "run", "method=supervised", "ray.num_workers=2",
                       "train.epochs=3", "selection.num_checkpoints=3", "train.max_failures=1")
    with injected_fault("teacher", 2):
        report = Pipeline(cfg).run()

    stage_dir = tmp_path / "run" / "teacher"
    assert (stage_dir / FAULT_MARKER).exists(), "the fault was not injected"
    epochs = [json.loads(line)["epoch"] for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3], "each epoch is recorded once"
    fault_time = (stage_dir / FAULT_MARKER).stat().st_mtime
    assert (stage_dir / "checkpoints" / "epoch_001.pt").stat().st_mtime < fault_time, "epoch 1 was retrained"
    assert (stage_dir / "checkpoints" / "epoch_002.pt").stat().st_mtime > fault_time
    for e in (1, 2, 3):
        model, blob = load_model(stage_dir / "checkpoints" / f"epoch_{e:03d}.pt")
        assert blob["meta"]["epoch"] == e
    final, _ = load_model(stage_dir / "final.pt")
    last, _ = load_model(stage_dir / "checkpoints" / "epoch_003.pt")
    for a, b in zip(final.state_dict().values(), last.state_dict().values()):
        assert torch.equal(a, b)
    assert report["method"] == "supervised"
    assert 0.0 <= report["teacher"]["miou"] <= 1.0
    assert report["final"]["miou"] == report["teacher"]["miou"]
    assert [s["name"] for s in report["stages"]] == ["check_data", "teacher"]


def test_resumed_teacher_equals_an_uninterrupted_one(ray_local, smoke_data, tmp_path):
    """Nothing lost, nothing changed: a restart from the checkpoint repeats the same training."""
    faulted = tmp_path / "faulted"
    args = ["method=supervised", "ray.num_workers=2", "train.epochs=3", "selection.num_checkpoints=1",
            "train.max_failures=1"]
    with injected_fault("teacher", 3):
        Pipeline(smoke_config(smoke_data, faulted, *args)).run()
    clean = tmp_path / "clean"
    Pipeline(smoke_config(smoke_data, clean, *args)).run()
    assert (faulted / "teacher" / FAULT_MARKER).exists()
    a, _ = load_model(faulted / "teacher" / "final.pt")
    b, _ = load_model(clean / "teacher" / "final.pt")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x.float(), y.float(), atol=1e-6), name


def test_a_worker_killed_while_the_group_starts_is_survived(ray_local, smoke_data, tmp_path, capfd):
    """One Train worker of a 2-worker teacher SIGKILLed while the group starts (in run_train_fn):
    Ray Train's FailurePolicy RAISEs that controller error and leaks the attempt's controller and
    placement group, so the pipeline frees them and restarts the stage itself; the run completes."""
    import os
    import signal
    import threading
    import time

    out = tmp_path / "run"
    cfg = smoke_config(smoke_data, out, "method=supervised", "ray.num_workers=2", "train.epochs=2",
                       "selection.num_checkpoints=1", "train.max_failures=1")
    killed: dict = {}

    def train_workers() -> list[int]:
        pids = []
        for proc in Path("/proc").iterdir():
            try:
                # Ray titles a worker by the method it runs: run_train_fn unpickles the train
                # function (importing stpp_ray and torch), and a death there is what Ray RAISEs.
                if proc.name.isdigit() and b"RayTrainWorker.run_train_fn" in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:  # the process ended meanwhile
                pass
        return pids

    def kill_the_first_train_worker():
        deadline = time.time() + 180
        while time.time() < deadline and not killed:
            for pid in train_workers():
                killed["before_any_epoch"] = not (out / "teacher" / "metrics.jsonl").exists()
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid
                break
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_first_train_worker)
    killer.start()
    report = Pipeline(cfg).run()
    killer.join()
    assert killed.get("before_any_epoch"), f"no Train worker was killed before its first epoch: {killed}"
    assert "[teacher] Ray Train gave up after losing a worker" in capfd.readouterr().out
    epochs = [json.loads(line)["epoch"] for line in (out / "teacher" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2] and 0.0 <= report["teacher"]["miou"] <= 1.0
