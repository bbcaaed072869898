"""The other methods end to end on the shared local Ray: UniMatch on two workers, DMT's phases, an online stage resumed."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from stpp_ray.weights import load_model
from stpp_ray.training import item_data
from stpp_ray.orchestration.pipeline import Pipeline
from stpp_ray.methods.dmt import read_curriculum_items
from stpp_ray.pseudo_labels import read_pseudo_items

from tests.helpers import injected_fault, smoke_config

pytestmark = pytest.mark.ray


def test_unimatch_trains_online_on_two_workers(ray_local, smoke_data, tmp_path):
    out = tmp_path / "run"
    cfg = smoke_config(smoke_data, out, "method=unimatch", "ray.num_workers=2", "semi.epochs=2")
    report = Pipeline(cfg).run()
    assert [s["name"] for s in report["stages"]] == ["check_data", "online"]
    assert report["method"] == "unimatch" and report["final"]["stage"] == report["teacher"]["stage"] == "online"
    assert 0 <= report["final"]["miou"] <= 1
    records = [json.loads(line) for line in (out / "online" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    # 60 unlabeled images at a global batch of 4: 15 steps of 4 labeled + 4 unlabeled images.
    assert all(r["train_seconds"] * r["images_per_s"] == pytest.approx(15 * 8) for r in records)
    assert all({"loss_x", "loss_s1", "loss_s2", "loss_fp"} <= r.keys() for r in records)
    assert not (out / "pseudo_labels").exists(), "online pseudo-labels need no Parquet"
    model, blob = load_model(out / "online" / "final.pt")
    assert blob["meta"]["stage"] == "online" and blob["meta"]["epoch"] == 2


def test_dmt_fine_tunes_two_models_on_each_others_labels(ray_local, smoke_data, tmp_path):
    out = tmp_path / "run"
    cfg = smoke_config(smoke_data, out, "method=dmt", "semi.dmt_ratios=[0.5,1.0]", "semi.dmt_phase_epochs=1")
    report = Pipeline(cfg).run()
    assert [s["name"] for s in report["stages"]] == [
        "check_data", "teacher", "teacher_b", "dmt_label_teacher", "dmt_label_teacher_b", "dmt_a1", "dmt_b1",
        "dmt_label_dmt_b1", "dmt_a2"]
    assert report["final"]["stage"] == "dmt_a2" and report["teacher"]["stage"] == "teacher"
    a, _ = load_model(out / "teacher" / "final.pt")
    b, _ = load_model(out / "teacher_b" / "final.pt")
    assert any(not torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values())), \
        "model B is another initialisation"
    # Phase 1 keeps the most confident half of each class of B's labels (ties at the level kept).
    labels = out / "pseudo_labels" / "dmt_label_teacher_b"
    ids = pq.read_table(labels, columns=["image_id"]).column("image_id").to_pylist()
    items, levels = read_curriculum_items(read_pseudo_items(labels, ids), 0.5, cfg.data.num_classes)
    ignored = np.mean([np.mean(item_data(item, "voc")[1] == 255) for item in items])
    assert 0 < ignored <= 0.5 and len(levels) == cfg.data.num_classes


def test_resumed_online_stage_equals_an_uninterrupted_one(ray_local, smoke_data, tmp_path):
    """U2PL with its contrastive term on 2 workers, a worker killed in epoch 3: the restart from
    epoch 2's checkpoint (student, optimiser, EMA teacher and the memory banks filled in epoch 2)
    repeats exactly what the uninterrupted run does."""
    from stpp_ray.cluster.train import FAULT_MARKER

    args = ["method=u2pl", "ray.num_workers=2", "semi.epochs=3", "semi.u2pl_warmup_epochs=1", "train.max_failures=1",
            "train.checkpoint_interval=1"]
    faulted, clean = tmp_path / "faulted", tmp_path / "clean"
    with injected_fault("online", 3):
        Pipeline(smoke_config(smoke_data, faulted, *args)).run()
    Pipeline(smoke_config(smoke_data, clean, *args)).run()
    fault_time = (faulted / "online" / FAULT_MARKER).stat().st_mtime
    epoch2 = next((faulted / "ray_train").glob("online-*/epoch_0002"))
    assert epoch2.stat().st_mtime < fault_time, "epoch 2 was not trained again after the restart"
    state = torch.load(epoch2 / "state.pt", weights_only=True)
    assert sum(len(q) for q in state["method_state"]["queues"]) > 0, "the checkpoint holds the filled memory banks"
    records = [json.loads(line) for line in (faulted / "online" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3] and records[2]["loss_c"] > 0
    a, _ = load_model(faulted / "online" / "final.pt")
    b, _ = load_model(clean / "online" / "final.pt")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x.float(), y.float(), atol=1e-6), name
