"""The smoke pipeline end to end on the shared local Ray: ST++, resume, config changes, ST.

The ST++ run keeps its dataset and run directory in the session's S3 bucket (conftest.py's
`s3_store`); the same run on local disk is `tests/test_cluster_faults.py`'s killed driver."""

import json
from pathlib import Path

import pytest
from pyarrow import fs as pafs

from stpp_ray.datasets import read_split
from stpp_ray.orchestration.pipeline import Pipeline
from stpp_ray.pseudo_labels import read_table
from stpp_ray.storage import BucketPath

from tests.helpers import injected_fault, smoke_config

pytestmark = pytest.mark.ray


def parquet_ids(directory):
    return read_table(directory, ["image_id"]).column("image_id").to_pylist()


def mtime(obj: BucketPath):
    return obj.fs.get_file_info(obj.fs_path).mtime


def epoch1_checkpoint(out: BucketPath) -> list[str]:
    """student1's Ray Train checkpoint of epoch 1 in the bucket (its files)."""
    return sorted(f for f in out.files_under() if f.startswith("ray_train/student1-") and "/epoch_0001/" in f)


def test_max_images_uses_the_first_ids_of_each_split_and_needs_only_their_files(tmp_path):
    """A VOC data set whose split lists name 30 ids each, of which only the first 16 have files."""
    from stpp_ray.config import load_config
    from stpp_ray.datasets import DatasetError

    from tests.helpers.layout_data import write_image, write_mask

    root = tmp_path / "voc"
    lists = {role: [f"200{year}_{i:06d}" for i in range(30)] for year, role in enumerate(("labeled", "unlabeled", "val"))}
    for role, ids in lists.items():
        (root / "lists").mkdir(parents=True, exist_ok=True)
        (root / "lists" / f"{role}.txt").write_text("\n".join(ids) + "\n")
        for image_id in ids[:16]:
            write_image("voc", root, image_id)
            if role != "unlabeled":
                write_mask("voc", root, image_id, 21)
    base = ["data.layout=voc", f"data.root={root}", "data.labeled_split=lists/labeled.txt",
            "data.unlabeled_split=lists/unlabeled.txt", "data.val_split=lists/val.txt", "train.batch_size=16",
            f"run.output_dir={tmp_path / 'run'}"]
    pipeline = Pipeline(load_config(None, base + ["data.max_images=16"]))
    pipeline.prepare_data()
    for role, samples in (("labeled", pipeline.labeled), ("unlabeled", pipeline.unlabeled), ("val", pipeline.val)):
        assert [s.image_id for s in samples] == lists[role][:16], role
        assert read_split(root, tmp_path / "run" / "subset_splits" / f"{role}.txt") == lists[role][:16]
    with pytest.raises(DatasetError, match="missing image file"):
        Pipeline(load_config(None, base)).prepare_data()  # every id of the lists
    with pytest.raises(ValueError, match="8 labeled images are fewer than one global batch.*data.max_images=8"):
        Pipeline(load_config(None, base + ["data.max_images=8"])).prepare_data()


def test_a_changed_max_images_retrains_the_teacher_and_everything_after_it():
    from stpp_ray.config import load_config
    from stpp_ray.methods.self_training import shared_fingerprint, teacher_fingerprint

    a, b = (load_config(None, [f"data.max_images={n}"]) for n in (16, 32))
    assert teacher_fingerprint(a) != teacher_fingerprint(b)
    assert shared_fingerprint(a) != shared_fingerprint(b)  # the labeling pass chains from the teacher's


@pytest.fixture(scope="module")
def interrupted_then_resumed(ray_local, s3_store, smoke_data, tmp_path_factory):
    """An ST++ run with its data and run directory in the bucket, killed in student1 (no
    restarts allowed), then rerun with the same config; DataLoader worker processes read the
    images from the bucket too (forkserver, stage_setup.py)."""
    root = BucketPath(f"s3://{s3_store.bucket}/pipeline/data")
    out = BucketPath(f"s3://{s3_store.bucket}/pipeline/run")
    pafs.copy_files(str(smoke_data), root.fs_path, destination_filesystem=root.fs)
    mlruns = tmp_path_factory.mktemp("stpp") / "mlruns"
    cfg = smoke_config(root, out, "data.demo=false", "train.max_failures=0", "train.loader_workers=1",
                       f"tracking.mlflow_uri=file://{mlruns}")
    with pytest.raises(Exception), injected_fault("student1", 2):
        Pipeline(cfg).run()
    first = {
        "teacher_mtime": mtime(out / "teacher" / "final.pt"),
        "label_files": sorted(p.name for p in (out / "pseudo_labels" / "teacher").glob("*.parquet")),
        "student1_epoch1": epoch1_checkpoint(out),
        "student1_metrics": (out / "student1" / "metrics.jsonl").read_text().splitlines(),
    }
    assert first["student1_epoch1"], "student1 had checkpointed epoch 1 to the bucket before the crash"
    report = Pipeline(cfg).run()
    return cfg, out, first, report


def test_resume_skips_finished_stages_and_continues_the_interrupted_one(interrupted_then_resumed):
    cfg, out, first, report = interrupted_then_resumed
    reused = {s["name"]: s["reused"] for s in report["stages"]}
    assert reused == {"check_data": True, "teacher": True, "label_teacher": True, "select": True,
                      "student1": False, "label_student1": False, "student2": False}
    assert mtime(out / "teacher" / "final.pt") == first["teacher_mtime"]
    assert sorted(p.name for p in (out / "pseudo_labels" / "teacher").glob("*.parquet")) == first["label_files"]
    lines = (out / "student1" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert first["student1_metrics"] == lines[:1], "student1 epoch 1 was retrained, not resumed from the bucket"
    fault_time = mtime(out / "student1" / ".fault_injected")
    assert epoch1_checkpoint(out) == first["student1_epoch1"]
    assert all(mtime(out / f) < fault_time for f in first["student1_epoch1"]), "student1 epoch 1 was retrained"


def test_every_output_of_a_bucket_run_is_in_the_bucket(interrupted_then_resumed):
    cfg, out, _, report = interrupted_then_resumed
    files = out.files_under()
    for name in ("manifest.json", "report.md", "selection.json", "teacher/final.pt", "teacher/best.pt",
                 "teacher/checkpoints/epoch_001.pt", "teacher/checkpoints/epoch_002.pt", "student2/final.pt",
                 "mlflow_run.json", "student2/metrics.jsonl", "pseudo_labels_grid.png"):
        assert name in files, name
    assert json.loads((out / "manifest.json").read_text())["stages"].keys() == {s["name"] for s in report["stages"]}
    assert not any(".partial" in f or f.endswith(".tmp") for f in files)
    assert not Path("s3:").exists(), "a URI was taken for a local path"


def test_every_unlabeled_image_is_labeled_exactly_once(interrupted_then_resumed, smoke_data):
    cfg, out, _, _ = interrupted_then_resumed
    unlabeled = read_split(smoke_data, cfg.data.unlabeled_split)
    ids = parquet_ids(out / "pseudo_labels" / "teacher")
    assert sorted(ids) == sorted(unlabeled)
    selection = json.loads((out / "selection.json").read_text())
    assert sorted(selection["reliable"] + selection["unreliable"]) == sorted(unlabeled)
    assert len(selection["reliable"]) == int(cfg.selection.reliable_fraction * len(unlabeled))
    assert sorted(parquet_ids(out / "pseudo_labels" / "student1")) == sorted(selection["unreliable"])


def test_report_and_pictures(interrupted_then_resumed):
    cfg, out, _, report = interrupted_then_resumed
    saved = json.loads((out / "report.json").read_text())
    assert saved["method"] == "stpp" and saved["status"] == "complete"
    assert 0 <= saved["final"]["miou"] <= 1 and 0 <= saved["teacher"]["miou"] <= 1
    assert saved["final"]["stage"] == "student2"
    assert saved["config"]["selection"]["reliable_fraction"] == cfg.selection.reliable_fraction
    assert all({"name", "wall_s"} <= set(s) for s in saved["stages"])
    assert sum(b["count"] for b in saved["selection"]["histogram"]) == saved["selection"]["reliable"] + saved["selection"]["unreliable"]
    for pic in ("stability_histogram.png", "pseudo_labels_grid.png", "per_class_iou.png"):
        assert (out / pic).stat().st_size > 1000
    assert "student2" in (out / "report.md").read_text()
    assert any(f.startswith("teacher/tensorboard/events.out.tfevents") for f in out.files_under())


def test_mlflow_holds_each_stage_once_with_the_epochs_of_metrics_jsonl(interrupted_then_resumed):
    """The killed run and its rerun make one MLflow run with one nested run per stage."""
    from mlflow.tracking import MlflowClient

    cfg, out, _, report = interrupted_then_resumed
    client = MlflowClient(cfg.tracking.mlflow_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    parents = client.search_runs([experiment.experiment_id], "tags.`stpp_ray.output_dir` = '%s'" % out)
    assert [(p.info.run_name, p.info.status) for p in parents] == [("run", "FINISHED")]
    parent = parents[0]
    assert parent.data.params["selection.reliable_fraction"] == str(cfg.selection.reliable_fraction)
    assert parent.data.metrics["final_miou"] == pytest.approx(report["final"]["miou"])
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == sorted(s["name"] for s in report["stages"])
    assert {c.info.status for c in children} == {"FINISHED"}
    by_name = {c.info.run_name: c.info.run_id for c in children}
    for stage in ("teacher", "student1", "student2"):
        records = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        for key in ("loss", "lr", "images_per_s", "val_miou"):
            logged = [(m.step, m.value) for m in client.get_metric_history(by_name[stage], key)]
            assert logged == [(r["epoch"], pytest.approx(r[key])) for r in records if key in r], (stage, key)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.json", "report.md", "stability_histogram.png", "per_class_iou.png"} <= artifacts


def test_changed_config_recomputes_what_depends_on_it(interrupted_then_resumed):
    cfg, out, _, _ = interrupted_then_resumed
    changed = smoke_config(cfg.data.root, out, "data.demo=false", "train.max_failures=0",
                           "selection.reliable_fraction=0.25")
    report = Pipeline(changed).run()
    reused = {s["name"]: s["reused"] for s in report["stages"]}
    assert reused["teacher"] and reused["label_teacher"]
    assert not any(reused[s] for s in ("select", "student1", "label_student1", "student2"))
    selection = json.loads((out / "selection.json").read_text())
    n = len(selection["reliable"]) + len(selection["unreliable"])
    assert len(selection["reliable"]) == int(0.25 * n)
    assert report["config"]["selection"]["reliable_fraction"] == 0.25


def test_st_method_in_the_same_run_directory_reuses_the_teacher(interrupted_then_resumed):
    cfg, out, _, _ = interrupted_then_resumed
    st = smoke_config(cfg.data.root, out, "data.demo=false", "method=st")
    report = Pipeline(st).run()
    reused = {s["name"]: s["reused"] for s in report["stages"]}
    assert reused["teacher"] and not reused["label_teacher"] and not reused["student"]
    assert report["final"]["stage"] == "student"
    import math
    table = read_table(out / "pseudo_labels" / "teacher", ["stability"])
    assert all(math.isnan(s) for s in table.column("stability").to_pylist()), "ST does not score"
