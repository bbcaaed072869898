"""Ray Tune glue: `stpp-ray sweep`, trials that share one teacher and its labeling pass.

The driver trains the shared teacher first (saving the checkpoints of every K in the
search space) and labels the unlabeled pool once, storing each image's IoU against the
final checkpoint for every saved checkpoint. Each Tune trial is a function that runs
the rest of the ST++ pipeline (selection for its R and K from the stored IoUs, the
students) in its own run directory, its students' Ray Train reports forwarded to Tune
by `TuneReportCallback`. Keys that change the teacher can be swept too: trials then
train the teacher they need once per distinct config, under a file lock.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from pathlib import Path

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher
from ray.tune.search.basic_variant import BasicVariantGenerator

from ..config import Config, config_from_dict, load_raw, set_dotted
from ..methods import get_method
from ..orchestration.pipeline import Pipeline
from ..files import write_json_atomic
from ..storage import require_local
from ..plots import sweep_heatmap
from ..tracking import make_tracker
from .session import init_ray
from ..orchestration.sweep import (K_KEY, SweepError, best_trial, check_space, checkpoint_counts, compute_summary, grid_cells,
                    render_markdown, run_command, shared_summary, touches_shared, trial_label)


def _absolute_paths(raw: dict) -> dict:
    """Trials run in other working directories: make the config's own paths absolute."""
    raw = copy.deepcopy(raw)
    data = raw.setdefault("data", {})
    data["root"] = str(Path(data.get("root", Config().data.root)).resolve())
    run = raw.setdefault("run", {})
    run["output_dir"] = str(Path(run.get("output_dir", Config().run.output_dir)).resolve())
    pretrained = raw.get("model", {}).get("pretrained")
    if pretrained and pretrained not in ("none", "imagenet") and Path(pretrained).exists():
        raw["model"]["pretrained"] = str(Path(pretrained).resolve())
    return raw


def _tune_space(params: dict, search: str) -> dict:
    space = {}
    for key, spec in params.items():
        if isinstance(spec, list):
            space[key] = tune.grid_search(spec) if search == "grid" else tune.choice(spec)
            continue
        (kind, (lo, hi)), = spec.items()
        space[key] = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[kind](lo, hi)
    return space


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _trial_name(trial) -> str:
    index = trial.trial_id.rsplit("_", 1)[-1]
    return f"{index}_{trial_label(trial.config['params'])}"


def _stage_seconds(report: dict) -> float:
    """Seconds of this trial's own stages (not the shared ones it reused)."""
    shared = get_method(report["method"]).shared_stages
    return sum(s.get("wall_s") or 0.0 for s in report.get("stages", [])
               if not s.get("reused") and s["name"] not in shared)


def sweep_trial(config: dict, base_raw: dict, sweep_dir: str, tracking_parent: str | None = None) -> None:
    """One Tune trial: the ST++ pipeline of one point of the search space, sharing the teacher."""
    params = {k: _plain(v) for k, v in config["params"].items()}
    name = tune.get_context().get_trial_name()  # Ray Tune: this trial's name (from _trial_name)
    raw = copy.deepcopy(base_raw)
    for key, value in params.items():
        set_dotted(raw, key, value)
    run_dir = Path(sweep_dir) / "trials" / name
    set_dotted(raw, "run.output_dir", str(run_dir))
    cfg = config_from_dict(raw, f"trial {name}")
    start = time.perf_counter()
    pipeline = Pipeline(cfg, shared_root=Path(sweep_dir) / "shared", tracking_parent=tracking_parent,
                        train_callbacks=lambda: [TuneReportCallback()])  # Ray Tune: students' reports reach Tune
    report = pipeline.run()
    final = report["final"]
    best = next((s.get("best_miou") for s in report["stages"] if s["name"] == final.get("stage")), None)
    tune.report({  # Ray Tune: the trial's result
        "final_miou": final.get("miou"), "best_miou": best, "teacher_miou": report["teacher"].get("miou"),
        "trial_wall_s": time.perf_counter() - start, "stage_s": _stage_seconds(report),
        "shared_dir": pipeline.shared_dir.name, "run_dir": str(run_dir),
    })


def _sweep_fingerprint(raw: dict) -> str:
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _guard_sweep_dir(sweep_dir: Path, raw: dict) -> None:
    """One sweep directory holds one sweep: refuse to mix a changed config into it."""
    marker = sweep_dir / "sweep_config.json"
    fp = _sweep_fingerprint(raw)
    if marker.exists():
        previous = json.loads(marker.read_text())
        if previous.get("fingerprint") != fp:
            raise SweepError(f"{sweep_dir} holds a sweep of another configuration (see {marker}); "
                             f"set run.output_dir to a new directory, or delete that one")
        return
    sweep_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"fingerprint": fp, "config": raw}, indent=2, default=str))


def _scheduler(cfg: Config):
    if cfg.sweep.scheduler == "none":
        return None
    # Each student reports at its checkpoint epochs; the trial adds one final report.
    reports = 2 * math.ceil(cfg.stage_epochs("student") / cfg.train.checkpoint_interval) + 1
    return ASHAScheduler(time_attr="training_iteration", metric="val_miou", mode=cfg.sweep.mode, max_t=reports,
                         grace_period=min(cfg.sweep.asha_grace_period, reports),
                         reduction_factor=cfg.sweep.asha_reduction_factor)


class FinalResultSearcher(Searcher):
    """Optuna told only each trial's final result. The students' reports along the way (for ASHA)
    lack `sweep.metric`, which Ray's OptunaSearch would index and Tune's metric check refuse."""

    def __init__(self, inner: Searcher):
        super().__init__()  # no metric: Tune checks none in the students' reports
        self.inner = inner

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.inner.set_search_properties(self.inner.metric, self.inner.mode, config, **spec)

    def suggest(self, trial_id: str):
        return self.inner.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        # Stopped by ASHA (no final metric): Optuna records it as pruned.
        self.inner.on_trial_complete(trial_id, result if result and self.inner.metric in result else None, error)

    def save(self, checkpoint_path: str) -> None:
        self.inner.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.inner.restore(checkpoint_path)


def _search_alg(cfg: Config) -> Searcher:
    # Ray Tune ignores TuneConfig.max_concurrent_trials once a search_alg is given.
    if cfg.sweep.search != "optuna":
        return BasicVariantGenerator(max_concurrent=cfg.sweep.max_concurrent_trials, random_state=cfg.run.seed)
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    optuna = OptunaSearch(metric=cfg.sweep.metric, mode=cfg.sweep.mode, seed=cfg.run.seed)  # TPE, seeded
    return ConcurrencyLimiter(FinalResultSearcher(optuna), max_concurrent=cfg.sweep.max_concurrent_trials)


def check_optuna(cfg: Config) -> None:
    """`sweep.search: optuna` needs Optuna: say so before any teacher is trained."""
    if cfg.sweep.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise SweepError("sweep.search is 'optuna' but Optuna is not installed: pip install 'stpp_ray[tune]'") from None


def _error_text(error) -> str:
    cause = getattr(error, "cause", None) or error
    text = f"{type(cause).__name__}: {cause}".strip()
    return " ".join(text.split())[:400]


def _collect(results, sweep_dir: Path) -> list[dict]:
    trials = []
    for result in results:
        metrics = result.metrics or {}
        name = Path(result.path).name
        row = {"name": name, "params": {k: _plain(v) for k, v in result.config["params"].items()},
               "run_dir": str(sweep_dir / "trials" / name)}
        if result.error is not None:
            row.update(status="failed", error=_error_text(result.error))
        elif metrics.get("final_miou") is not None:
            row["status"] = "completed"
        else:
            row["status"] = "stopped"  # by the scheduler, after its last student report
        for key in ("final_miou", "best_miou", "teacher_miou", "stage_s", "shared_dir"):
            if metrics.get(key) is not None:
                row[key] = metrics[key]
        if row["status"] == "stopped" and metrics.get("val_miou") is not None:
            row["last_val_miou"] = metrics["val_miou"]
        row["wall_s"] = metrics.get("trial_wall_s", metrics.get("time_total_s"))
        trials.append(row)
    return sorted(trials, key=lambda t: t["name"])


def run_sweep(config_path: str, overrides: list[str], retry_failed: bool = False) -> dict:
    """Run (or resume) the sweep of a config; writes sweep.json, sweep.md and the heat map."""
    raw, source = load_raw(config_path, overrides)
    cfg = config_from_dict(raw, source)
    check_space(raw, cfg.sweep)
    check_optuna(cfg)
    require_local("a sweep", **{"run.output_dir": cfg.run.output_dir, "data.root": cfg.data.root})
    raw = _absolute_paths(raw)
    counts = checkpoint_counts(cfg.sweep)
    if counts:
        # One teacher saves the checkpoints of every K; the base config is one of the trials' teachers.
        set_dotted(raw, "selection.extra_checkpoint_counts", counts)
        set_dotted(raw, K_KEY, counts[0])
    base = config_from_dict(raw, source)
    sweep_dir = Path(base.run.output_dir)
    _guard_sweep_dir(sweep_dir, raw)
    start = time.perf_counter()
    init_ray(base, extra_cpus=math.ceil(cfg.sweep.max_concurrent_trials * cfg.sweep.trial_cpus))  # the trials' drivers
    tracker = make_tracker(base, sweep_dir)  # the sweep's MLflow run; trials and shared stages nest under it
    try:
        summary = _run_trials(cfg, base, raw, sweep_dir, config_path, overrides, retry_failed, start,
                              getattr(tracker, "run_id", None))
    except BaseException:
        tracker.failed()
        raise
    best = summary.get("best") or {}
    tracker.finish(["sweep.json", "sweep.md", "sweep_heatmap.png"], {f"best_{cfg.sweep.metric}": best.get(cfg.sweep.metric)})
    return summary


def _run_trials(cfg: Config, base: Config, raw: dict, sweep_dir: Path, config_path: str, overrides: list[str],
                retry_failed: bool, start: float, tracking_parent: str | None) -> dict:

    swept = sorted(cfg.sweep.params)
    if not touches_shared(swept):
        print(f"[sweep] shared stages: one teacher (checkpoints at epochs {base.scoring_checkpoint_epochs()}) "
              f"and one labeling pass for every trial", flush=True)
        Pipeline(base, shared_root=sweep_dir / "shared", tracking_parent=tracking_parent).run_shared()
    else:
        print(f"[sweep] {', '.join(k for k in swept if touches_shared([k]))} change the teacher: "
              f"each distinct teacher is trained once, by the first trial that needs it", flush=True)

    trainable = tune.with_resources(
        tune.with_parameters(sweep_trial, base_raw=raw, sweep_dir=str(sweep_dir), tracking_parent=tracking_parent),
        {"cpu": cfg.sweep.trial_cpus, "memory": cfg.sweep.trial_memory_mib * 2**20})
    tune_dir = sweep_dir / "tune"
    if tune.Tuner.can_restore(str(tune_dir)):
        print(f"[sweep] resuming the sweep in {tune_dir} (finished trials are kept"
              f"{', failed ones retried' if retry_failed else ''})", flush=True)
        tuner = tune.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True, restart_errored=retry_failed)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"params": _tune_space(cfg.sweep.params, cfg.sweep.search)},
            tune_config=tune.TuneConfig(
                num_samples=cfg.sweep.num_samples,
                scheduler=_scheduler(base),
                search_alg=_search_alg(cfg),
                trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_name,
            ),
            run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir),
                                      failure_config=tune.FailureConfig(max_failures=cfg.sweep.trial_max_failures)),
        )
    results = tuner.fit()
    trials = _collect(results, sweep_dir)
    return write_sweep_outputs(sweep_dir, config_path, overrides, base, trials, time.perf_counter() - start)


def write_sweep_outputs(sweep_dir: Path, config_path: str, overrides: list[str], cfg: Config, trials: list[dict],
                        wall_s: float) -> dict:
    shared = shared_summary(sweep_dir / "shared")
    best = best_trial(trials, cfg.sweep.metric, cfg.sweep.mode)
    if best:
        best = {**best, "command": run_command(config_path, overrides, best["params"], str(sweep_dir / "best"))}
    counts = {}
    for t in trials:
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    summary = {
        "sweep_dir": str(sweep_dir), "config_path": config_path, "overrides": overrides, "search": cfg.sweep.search,
        "params": cfg.sweep.params, "metric": cfg.sweep.metric, "mode": cfg.sweep.mode,
        "max_concurrent_trials": cfg.sweep.max_concurrent_trials,
        "teacher_trainings": sum(s["teacher_trained"] for s in shared),
        "shared": shared, "trials": trials, "best": best,
        "counts": ", ".join(f"{n} {status}" for status, n in sorted(counts.items())),
        "compute": compute_summary(shared, trials), "wall_s": wall_s, "heatmap": None,
    }
    cells = grid_cells(trials, cfg.sweep.metric)
    if cells:
        sweep_heatmap(*cells, sweep_dir / "sweep_heatmap.png", title=f"{cfg.sweep.metric} (%) over R and K")
        summary["heatmap"] = "sweep_heatmap.png"
    write_json_atomic(sweep_dir / "sweep.json", summary)
    (sweep_dir / "sweep.md").write_text(render_markdown(summary))
    return summary

