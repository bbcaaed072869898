"""MLflow tracking against a local file store (no Ray): nesting, per-epoch metrics, resume."""

import json

import pytest

pytest.importorskip("mlflow")

from stpp_ray.config import Config  # noqa: E402
from stpp_ray.tracking import NullTracker, Tracker, TrackingError, flat_params, make_tracker, scalar_metrics  # noqa: E402


def _cfg(tmp_path, **tracking) -> Config:
    return Config.model_validate({"run": {"output_dir": str(tmp_path / "run")},
                                  "tracking": {"mlflow_uri": f"file://{tmp_path / 'mlruns'}", **tracking}})


def _write_epochs(stage_dir, epochs):
    stage_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"stage": "teacher", "epoch": e, "loss": 1.0 / e, "lr": 0.01, "val_miou": 0.1 * e,
                         "images_per_s": 50.0, "started_at": 1.8e9 + e, "val_iou": [0.1, None]}) for e in epochs]
    (stage_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


def test_params_are_flat_strings_and_metrics_only_finite_numbers():
    assert flat_params({"a": {"b": 1, "c": [1, 2]}, "d": "x", "e": {}}) == {"a.b": "1", "a.c": "[1, 2]", "d": "x", "e": "{}"}
    assert scalar_metrics({"epoch": 3, "loss": 0.5, "ok": True, "val_iou": [1.0], "nan": float("nan"),
                           "stage": "t", "steps": 4}) == {"loss": 0.5, "steps": 4.0}


def test_off_by_default():
    assert isinstance(make_tracker(Config(), "runs/x"), NullTracker)


def test_stage_runs_nest_under_the_run_and_a_rerun_logs_each_epoch_once(tmp_path):
    cfg = _cfg(tmp_path, experiment="unit", run_name="my-run")
    run_dir = tmp_path / "run"
    stage_dir = run_dir / "teacher"
    tracker = Tracker(cfg, run_dir)
    follower = tracker.stage_started("teacher", stage_dir)
    _write_epochs(stage_dir, [1, 2])
    follower.stop()  # the driver was killed here: epochs 1-2 logged, the stage never finished
    rerun = Tracker(cfg, run_dir)
    assert rerun.run_id == tracker.run_id
    _write_epochs(stage_dir, [1, 2, 3])  # resumed after epoch 2, as Ray Train does
    rerun.stage_finished(rerun.stage_started("teacher", stage_dir), {"miou": 0.3, "wall_s": 5.0})
    rerun.finish([], {"final_miou": 0.3})

    client = tracker.client
    parent = client.get_run(tracker.run_id)
    assert parent.info.run_name == "my-run" and parent.info.status == "FINISHED"
    assert parent.data.params["train.epochs"] == str(cfg.train.epochs) and parent.data.metrics["final_miou"] == 0.3
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{tracker.run_id}'")
    assert [c.info.run_name for c in children] == ["teacher"]
    child = children[0]
    history = client.get_metric_history(child.info.run_id, "val_miou")
    assert [(m.step, m.value) for m in history] == [(1, 0.1), (2, 0.2), (3, pytest.approx(0.3))]
    assert child.data.metrics["result.miou"] == 0.3 and child.info.status == "FINISHED"
    assert "val_iou" not in child.data.metrics


def test_a_changed_config_starts_a_new_run(tmp_path):
    first = Tracker(_cfg(tmp_path), tmp_path / "run")
    changed = _cfg(tmp_path)
    changed.train.epochs += 1
    assert Tracker(changed, tmp_path / "run").run_id != first.run_id


def test_an_unusable_store_is_one_line_naming_the_uri(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the store's directory should be")
    cfg = Config.model_validate({"tracking": {"mlflow_uri": f"file://{blocker}"}})
    with pytest.raises(TrackingError, match="tracking.mlflow_uri 'file://.*not_a_dir'") as err:
        Tracker(cfg, tmp_path / "run")
    assert "\n" not in str(err.value)


def test_uris_lose_their_password_in_messages():
    from stpp_ray.tracking import redacted

    assert redacted("https://alice:s3cret@mlflow.example.com/") == "https://***@mlflow.example.com/"
    assert redacted("file:///abs/mlruns") == "file:///abs/mlruns"
