"""Sweeps: the shared-teacher scoring, the search space, results; a tiny sweep on the local Ray."""

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stpp_ray.config import Config, SweepConfig, checkpoint_epochs, load_config, parse_override
from stpp_ray.labeling import Labeler
from stpp_ray.pseudo_labels import SCHEMA, PseudoLabelError, scores
from stpp_ray.selection import select_reliable
from stpp_ray.stability import batched_checkpoint_ious, stability_for_checkpoints, stability_of_rows, stability_score
from stpp_ray.orchestration.sweep import (K_KEY, R_KEY, SweepError, best_trial, check_space, checkpoint_counts, compute_summary,
                                 grid_cells, override_args, render_markdown, touches_shared, trial_label)

from tests.helpers import SMOKE, smoke_config, write_checkpoints, write_random_images

ARCH = {"name": "deeplabv3plus", "backbone": "tiny", "output_stride": 8, "aspp_channels": 8, "num_classes": 4}
EPOCHS = 12
COUNTS = (2, 3, 4)


# ---- K from stored per-checkpoint IoUs == K from scratch ------------------------------------

def test_stability_for_any_k_from_the_union_equals_scoring_those_k_checkpoints():
    rng = np.random.default_rng(0)
    union = sorted({e for k in COUNTS for e in checkpoint_epochs(EPOCHS, k)})
    preds = {e: torch.from_numpy(rng.integers(0, 4, (5, 16, 16))) for e in union}
    # Later checkpoints agree more with the final one, as in training.
    for e in union[:-1]:
        keep = torch.from_numpy(rng.random((5, 16, 16)) < e / EPOCHS)
        preds[e] = torch.where(keep, preds[union[-1]], preds[e])
    ious = batched_checkpoint_ious(torch.stack([preds[e] for e in union]), 4)  # images x (len(union) - 1)
    for k in COUNTS:
        epochs = checkpoint_epochs(EPOCHS, k)
        for image in range(5):
            stored = dict(zip(union[:-1], ious[image].tolist()))
            scratch = stability_score([preds[e][image].numpy() for e in epochs], 4)
            assert stability_for_checkpoints(stored, epochs) == pytest.approx(scratch, abs=1e-12)


def test_stability_for_checkpoints_refuses_a_k_the_teacher_did_not_save():
    with pytest.raises(KeyError, match=r"\[4, 8\] \(stored: \[6\]\)"):
        stability_for_checkpoints({6: 0.5}, [4, 8, 12])
    assert math.isnan(stability_for_checkpoints({}, [12]))


@pytest.fixture(scope="module")
def union_labeling(tmp_path_factory):
    """Checkpoints at the union of K = 2, 3, 4 over 12 epochs and six random images."""
    d = tmp_path_factory.mktemp("sweep_ckpts")
    union = sorted({e for k in COUNTS for e in checkpoint_epochs(EPOCHS, k)})
    paths = dict(zip(union, write_checkpoints(d, union, ARCH, perturb=lambda m: m.classifier.bias.copy_(torch.randn(4)))))
    rows = write_random_images(d, [f"u{i}.png" for i in range(6)], (24, 24), seed=1)
    batch = {"image_id": np.array([r[0] for r in rows]), "image_path": np.array([r[1] for r in rows])}
    ordered = [paths[e] for e in union]
    out = Labeler(ordered, ordered[-1], num_threads=1)(batch)
    shards = d / "shards"
    shards.mkdir()
    pq.write_table(pa.Table.from_pydict(out, schema=SCHEMA), shards / "part-0.parquet")
    return paths, batch, shards


@pytest.mark.parametrize("k", COUNTS)
def test_selection_from_one_union_labeling_equals_labeling_with_those_k_checkpoints(union_labeling, k):
    paths, batch, shards = union_labeling
    epochs = checkpoint_epochs(EPOCHS, k)
    own = [paths[e] for e in epochs]
    scratch = Labeler(own, own[-1], num_threads=1)(batch)
    expected = dict(zip(scratch["image_id"], scratch["stability"]))
    table = scores(shards, epochs)
    stored = dict(zip(table.column("image_id").to_pylist(), table.column("score").to_pylist()))
    assert stored.keys() == expected.keys()
    for image_id in expected:
        assert stored[image_id] == pytest.approx(expected[image_id], abs=1e-12)
    for r in (0.34, 0.5, 0.67):
        assert select_reliable(table, r).reliable == select_reliable(expected, r).reliable


def test_scores_name_the_missing_checkpoint(union_labeling):
    _, _, shards = union_labeling
    with pytest.raises(PseudoLabelError, match="K=3"):
        scores(shards, [5, 7, 12])


# ---- the search space -------------------------------------------------------------------------

def smoke_raw(**sweep):
    raw = {"method": "stpp", "train": {"epochs": 4}, "sweep": sweep}
    return raw, SweepConfig(**sweep)


def test_space_checks_name_the_key_before_anything_runs():
    cases = [
        ({"params": {}}, "empty"),
        ({"params": {R_KEY: []}}, "empty list"),
        ({"params": {R_KEY: {"uniform": [0.1, 0.9]}}}, "sweep.search=random"),
        ({"params": {R_KEY: [0.5, 0.0]}}, "selection.reliable_fraction"),
        ({"params": {K_KEY: [2, 9]}}, "num_checkpoints"),
        ({"params": {K_KEY: [2.5]}}, "integers"),
        ({"params": {"train.nope": [1]}}, "unknown key"),
        ({"params": {"run.output_dir": ["a"]}}, "cannot be swept"),
        ({"params": {"sweep.num_samples": [2]}}, "cannot be swept"),
        ({"params": {R_KEY: {"uniform": [0.9, 0.1]}}, "search": "random"}, "low < high"),
        ({"params": {K_KEY: {"randint": [2.0, 4.0]}}, "search": "random"}, "integer"),
    ]
    for sweep, message in cases:
        raw, parsed = smoke_raw(**sweep)
        with pytest.raises(SweepError, match=message):
            check_space(raw, parsed)
    raw, parsed = smoke_raw(params={R_KEY: [0.5]})
    raw["method"] = "st"
    with pytest.raises(SweepError, match="only matter for method stpp"):
        check_space(raw, parsed)


def test_valid_spaces_pass_and_give_the_checkpoint_counts():
    raw, parsed = smoke_raw(params={R_KEY: [0.3, 0.5], K_KEY: [4, 2]})
    check_space(raw, parsed)
    assert checkpoint_counts(parsed) == [2, 4]
    raw, parsed = smoke_raw(params={R_KEY: {"uniform": [0.2, 0.8]}, K_KEY: {"randint": [2, 5]}}, search="random")
    check_space(raw, parsed)
    assert checkpoint_counts(parsed) == [2, 3, 4]
    assert checkpoint_counts(SweepConfig(params={R_KEY: [0.5]})) == []


def test_which_keys_need_their_own_teacher():
    assert not touches_shared([R_KEY, K_KEY, "train.student_epochs", "ray.num_workers"])
    assert touches_shared(["train.lr"]) and touches_shared(["model.backbone"]) and touches_shared(["model"])
    assert touches_shared(["data.crop_size"]) and touches_shared(["label.tta"])


def test_override_args_round_trip_through_the_cli_parser():
    params = {R_KEY: 0.3, K_KEY: 4, "label.tta": True, "label.tta_scales": [0.5, 1.0], "model.backbone": "tiny"}
    parsed = dict(parse_override(a) for a in override_args(params))
    assert parsed == params
    assert trial_label({R_KEY: 0.3333333, K_KEY: 4}) == "K=4_R=0.3333"


def test_best_trial_grid_cells_and_markdown():
    trials = [
        {"name": "a", "params": {R_KEY: 0.3, K_KEY: 2}, "status": "completed", "final_miou": 0.4, "stage_s": 10.0,
         "shared_dir": "s", "wall_s": 12.0},
        {"name": "b", "params": {R_KEY: 0.5, K_KEY: 2}, "status": "completed", "final_miou": 0.6, "stage_s": 10.0,
         "shared_dir": "s", "wall_s": 12.0},
        {"name": "c", "params": {R_KEY: 0.5, K_KEY: 3}, "status": "failed", "error": "ValueError: boom",
         "wall_s": None},
    ]
    assert best_trial(trials, "final_miou", "max")["name"] == "b"
    assert best_trial(trials, "final_miou", "min")["name"] == "a"
    rs, ks, cells = grid_cells(trials, "final_miou")
    assert rs == [0.3, 0.5] and ks == [2, 3] and cells == [[0.4, 0.6], [None, None]]
    shared = [{"dir": "s", "teacher_trained": True, "teacher_s": 100.0, "label_s": 20.0, "check_s": 1.0}]
    compute = compute_summary(shared, trials)
    assert compute == {"shared_s": 121.0, "trials_s": 20.0, "total_s": 141.0, "naive_estimate_s": 262.0}
    md = render_markdown({"config_path": "jobs/x.yaml", "search": "grid", "metric": "final_miou", "mode": "max",
                          "trials": trials, "counts": "2 completed, 1 failed", "teacher_trainings": 1,
                          "shared": shared, "best": {**trials[1], "command": "stpp-ray run -c jobs/x.yaml"},
                          "compute": compute, "wall_s": 150.0, "heatmap": "sweep_heatmap.png"})
    assert "teacher trainings: **1**" in md and "failed: ValueError: boom" in md
    assert "stpp-ray run -c jobs/x.yaml" in md and "262 s" in md and "60.00" in md


def test_sweep_demo_config_is_a_three_by_three_grid_of_r_and_k():
    cfg = load_config(SMOKE.replace("smoke.yaml", "sweep_demo.yaml"))
    assert cfg.sweep.search == "grid" and set(cfg.sweep.params) == {R_KEY, K_KEY}
    assert len(cfg.sweep.params[R_KEY]) == 3 and len(cfg.sweep.params[K_KEY]) == 3


# ---- tiny sweeps on the shared local Ray -------------------------------------------------------

def _write(path, cfg_overrides, root, out):
    cfg = smoke_config(root, out, *cfg_overrides)
    path.write_text(json.dumps(cfg.model_dump()))  # JSON is YAML
    return str(path)


@pytest.fixture(scope="module")
def two_trial_sweep(ray_local, smoke_data, tmp_path_factory):
    from stpp_ray.cluster.tune import run_sweep

    d = tmp_path_factory.mktemp("sweep")
    config = _write(d / "sweep.yaml", ["train.epochs=3", "train.student_epochs=1", "train.eval_interval=0",
                                        "sweep.params={selection.reliable_fraction: [0.5], "
                                        "selection.num_checkpoints: [2, 3]}", "sweep.max_concurrent_trials=2", "sweep.trial_cpus=0",
                                        "sweep.trial_memory_mib=512",
                                        f"tracking.mlflow_uri=file://{d / 'mlruns'}"], smoke_data, d / "run")
    first = run_sweep(config, [])
    again = run_sweep(config, [])  # a finished sweep run again: nothing is retrained
    return first, again, d / "run"


@pytest.mark.ray
def test_two_trial_sweep_trains_one_teacher_and_every_trial(two_trial_sweep):
    summary, _, sweep_dir = two_trial_sweep
    assert summary["teacher_trainings"] == 1
    assert [t["status"] for t in summary["trials"]] == ["completed", "completed"]
    assert {t["params"][K_KEY] for t in summary["trials"]} == {2, 3}
    shared = list((sweep_dir / "shared").iterdir())
    teacher_dir = next(p for p in shared if p.is_dir()) / "teacher" / "checkpoints"
    # K=2 over 3 epochs: epochs 1, 3; K=3: 1, 2, 3.
    assert sorted(p.name for p in teacher_dir.iterdir()) == [f"epoch_{e:03d}.pt" for e in (1, 2, 3)]
    for trial in summary["trials"]:
        run_dir = sweep_dir / "trials" / trial["name"]
        report = json.loads((run_dir / "report.json").read_text())
        reused = {s["name"]: s["reused"] for s in report["stages"]}
        assert reused["teacher"] and reused["label_teacher"]  # trained by the sweep's driver, not the trial
        assert 0 <= trial["final_miou"] <= 1 and trial["stage_s"] > 0
        k = trial["params"][K_KEY]
        parquet = next(p for p in shared if p.is_dir()) / "pseudo_labels" / "teacher"
        expected = select_reliable(scores(parquet, checkpoint_epochs(3, k)), 0.5)
        selection = json.loads((run_dir / "selection.json").read_text())
        assert selection["reliable"] == expected.reliable
    md = (sweep_dir / "sweep.md").read_text()
    assert all(f"| {t['name']} |" in md for t in summary["trials"]) and "teacher trainings: **1**" in md
    assert (sweep_dir / "sweep_heatmap.png").stat().st_size > 0
    assert summary["best"]["command"].startswith("stpp-ray run -c ")
    assert summary["compute"]["naive_estimate_s"] > summary["compute"]["total_s"]
    # sweep.trial_cpus=0 on the test cluster (two 1-CPU nodes): the two trials ran at once.
    spans = []
    for trial in summary["trials"]:
        last = json.loads((sweep_dir / "tune" / trial["name"] / "result.json").read_text().splitlines()[-1])
        spans.append((last["timestamp"] - last["time_total_s"], last["timestamp"]))
    assert max(start for start, _ in spans) < min(end for _, end in spans), spans


@pytest.mark.ray
def test_rerunning_a_finished_sweep_keeps_its_trials(two_trial_sweep):
    first, again, _ = two_trial_sweep
    assert again["teacher_trainings"] == 1
    assert [(t["name"], t["final_miou"]) for t in again["trials"]] == [(t["name"], t["final_miou"]) for t in first["trials"]]
    assert again["wall_s"] < first["wall_s"] / 2


@pytest.mark.ray
def test_mlflow_nests_the_shared_stages_and_each_trial_under_the_sweep_once(two_trial_sweep):
    from mlflow.tracking import MlflowClient

    summary, _, sweep_dir = two_trial_sweep
    client = MlflowClient(f"file://{sweep_dir.parent / 'mlruns'}")
    experiment = client.get_experiment_by_name("stpp_ray").experiment_id
    runs = client.search_runs([experiment])
    parent_of = {r.info.run_id: r.data.tags.get("mlflow.parentRunId") for r in runs}
    by_id = {r.info.run_id: r for r in runs}
    (sweep,) = [r for r in runs if parent_of[r.info.run_id] is None]
    assert sweep.info.run_name == "run" and sweep.info.status == "FINISHED"
    assert sweep.data.metrics["best_final_miou"] == pytest.approx(summary["best"]["final_miou"])
    assert "sweep.md" in {a.path for a in client.list_artifacts(sweep.info.run_id)}
    nested = sorted(r.info.run_name for r in runs if parent_of[r.info.run_id] == sweep.info.run_id)
    shared_name = next(p.name for p in (sweep_dir / "shared").iterdir() if p.is_dir())
    assert nested == sorted([shared_name, *(t["name"] for t in summary["trials"])])  # the rerun added none
    for run in runs:
        parent = by_id.get(parent_of[run.info.run_id])
        if parent is not None and parent.info.run_name == shared_name:
            assert run.info.run_name in {"check_data", "teacher", "label_teacher"}
        if parent is not None and parent.info.run_name in {t["name"] for t in summary["trials"]}:
            assert run.info.run_name not in {"teacher", "label_teacher"}  # the trials reused them
    teacher = next(r for r in runs if r.info.run_name == "teacher")
    assert len(client.get_metric_history(teacher.info.run_id, "loss")) == 3


@pytest.mark.ray
def test_changed_sweep_config_in_the_same_directory_is_refused(two_trial_sweep):
    from stpp_ray.cluster.tune import run_sweep

    _, _, sweep_dir = two_trial_sweep
    config = sweep_dir.parent / "sweep.yaml"
    with pytest.raises(SweepError, match="another configuration"):
        run_sweep(str(config), ["train.lr=0.02"])


@pytest.mark.ray
def test_a_failed_trial_is_reported_and_the_others_finish(ray_local, smoke_data, tmp_path):
    from stpp_ray.cluster.tune import run_sweep

    # 4 labeled images: a global batch of 8 cannot be formed, which only the trial finds out.
    config = _write(tmp_path / "sweep.yaml", ["method=supervised", "train.epochs=1", "selection.num_checkpoints=1",
                                              "sweep.params={train.batch_size: [4, 8]}"],
                    smoke_data, tmp_path / "run")
    summary = run_sweep(config, [])
    by_batch = {t["params"]["train.batch_size"]: t for t in summary["trials"]}
    assert by_batch[4]["status"] == "completed" and by_batch[4]["final_miou"] is not None
    assert by_batch[8]["status"] == "failed"
    assert "fewer than one global batch" in by_batch[8]["error"]
    assert summary["best"]["params"] == {"train.batch_size": 4}
    assert summary["teacher_trainings"] == 1
    md = (tmp_path / "run" / "sweep.md").read_text()
    assert "failed:" in md


def test_optuna_is_told_final_results_only_and_suggests_from_the_space():
    """Ray's OptunaSearch behind `FinalResultSearcher`: the students' reports along the way
    (no `final_miou`) are ignored, a trial's final result is Optuna's objective, and a trial
    stopped early counts as pruned. Seeded: the same suggestions each time."""
    pytest.importorskip("optuna")
    from stpp_ray.cluster.tune import _search_alg, _tune_space

    cfg = Config.model_validate({"sweep": {"search": "optuna", "num_samples": 4, "params": {
        "train.lr": {"loguniform": [1e-4, 1e-1]}, "semi.confidence_threshold": {"uniform": [0.8, 0.99]},
        R_KEY: [0.3, 0.5]}}})

    def run(seed_cfg):
        searcher = _search_alg(seed_cfg)
        assert searcher.set_search_properties(None, None, {"params": _tune_space(seed_cfg.sweep.params, "optuna")})
        suggested = []
        for i in range(3):
            params = searcher.suggest(f"t{i}")["params"]
            assert 1e-4 <= params["train.lr"] <= 1e-1 and 0.8 <= params["semi.confidence_threshold"] <= 0.99
            assert params[R_KEY] in (0.3, 0.5)
            searcher.on_trial_result(f"t{i}", {"val_miou": 0.1, "training_iteration": 1})
            searcher.on_trial_complete(f"t{i}", {"final_miou": 0.1 * i} if i < 2 else {"val_miou": 0.2})
            suggested.append(params)
        return searcher, suggested

    searcher, first = run(cfg)
    study = searcher.searcher.inner._ot_study
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert [t.value for t in study.trials[:2]] == [0.0, 0.1]
    assert run(cfg)[1] == first
    assert searcher.max_concurrent == cfg.sweep.max_concurrent_trials


@pytest.mark.ray
def test_an_optuna_sweep_of_a_continuous_r_shares_one_teacher(ray_local, smoke_data, tmp_path):
    pytest.importorskip("optuna")
    from stpp_ray.cluster.tune import run_sweep

    config = _write(tmp_path / "sweep.yaml", ["train.epochs=2", "train.student_epochs=1", "train.eval_interval=0",
                                              "selection.num_checkpoints=1", "sweep.search=optuna", "sweep.num_samples=1",
                                              "sweep.params={selection.reliable_fraction: {uniform: [0.3, 0.7]}}"],
                    smoke_data, tmp_path / "run")
    summary = run_sweep(config, [])  # one trial: the test above covers Optuna across trials
    (trial,) = summary["trials"]
    assert trial["status"] == "completed" and 0.3 <= trial["params"][R_KEY] <= 0.7
    assert trial["params"][R_KEY] not in (0.3, 0.5, 0.7)  # drawn from the interval, not a grid
    selection = json.loads((tmp_path / "run" / "trials" / trial["name"] / "selection.json").read_text())
    total = len(selection["reliable"]) + len(selection["unreliable"])
    assert len(selection["reliable"]) == int(trial["params"][R_KEY] * total)
    assert set(selection["scores"].values()) == {None}  # K = 1: no score, ranked by id
    report = (tmp_path / "run" / "trials" / trial["name"] / "report.md").read_text()
    assert "no reliable image has a stability score (K = 1 scores none)" in report
    assert summary["teacher_trainings"] == 1 and summary["search"] == "optuna"


def test_stability_of_many_rows_equals_each_row_on_its_own():
    """`stability_of_rows` (the select stage, a shard at a time) is `stability_for_checkpoints`
    of each row, to the last bit: the ranking's ties must not move."""
    rng = np.random.default_rng(3)
    stored = [rng.permutation([1, 2, 4, 6, 9, 11])[: rng.integers(3, 7)] for _ in range(200)]
    rows = [{int(e): float(v) for e, v in zip(at, rng.random(len(at)))} for at in stored]
    offsets = np.cumsum([0] + [len(r) for r in rows])
    ious = np.array([v for r in rows for v in r.values()])
    at = np.array([e for r in rows for e in r])
    for epochs in ([12], [2, 12], [1, 2, 12]):
        covered = [i for i, r in enumerate(rows) if all(e in r for e in epochs[:-1])]
        sub = np.cumsum([0] + [len(rows[i]) for i in covered])
        got = stability_of_rows(np.concatenate([list(rows[i].values()) for i in covered]),
                                np.concatenate([list(rows[i]) for i in covered]), sub, epochs)
        want = [stability_for_checkpoints(rows[i], epochs) for i in covered]
        np.testing.assert_array_equal(got, want)
    with pytest.raises(KeyError) as err:
        stability_of_rows(ious, at, offsets, [1, 2, 4, 6, 9, 11, 12])
    image = err.value.args[0]
    assert not all(e in rows[image] for e in (1, 2, 4, 6, 9, 11)) and all(
        all(e in rows[i] for e in (1, 2, 4, 6, 9, 11)) for i in range(image))
