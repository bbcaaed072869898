"""Sweeps without Ray: the search space, which stages trials can share, results and their table.

`cluster/tune.py` runs the trials on Ray Tune; everything here is plain data in, data out.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shlex
from pathlib import Path
from typing import Any

from ..config import ConfigError, SweepConfig, config_from_dict, set_dotted
from ..methods import get_method
from ..methods.self_training import LABEL_KEYS, TEACHER_KEYS

R_KEY = "selection.reliable_fraction"
K_KEY = "selection.num_checkpoints"
DISTRIBUTIONS = ("uniform", "loguniform", "randint")
# Keys whose change gives a trial another teacher or labeling pass (K is served by one teacher).
SHARED_PREFIXES = tuple(k for k in TEACHER_KEYS + LABEL_KEYS) + ("data", "method")
FORBIDDEN_PREFIXES = ("sweep", "run.output_dir", "ray.address", "selection.extra_checkpoint_counts")
SHORT_NAMES = {R_KEY: "R", K_KEY: "K"}


class SweepError(ValueError):
    """A search space that cannot be run; the message names the key."""


def _covers(a: str, b: str) -> bool:
    """Whether dotted keys `a` and `b` overlap (equal, or one a section of the other)."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _candidate_values(key: str, spec: Any, search: str) -> list:
    """Values to validate for one key: every grid/choice value, or a distribution's bounds."""
    if isinstance(spec, list):
        if not spec:
            raise SweepError(f"sweep.params: {key!r} has an empty list of values")
        return spec
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS:
        if search == "grid":
            raise SweepError(f"sweep.params: {key!r}: distributions need sweep.search=random or optuna (grid takes lists)")
        (kind, bounds), = spec.items()
        if not (isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, (int, float)) for b in bounds)
                and bounds[0] < bounds[1]):
            raise SweepError(f"sweep.params: {key!r}: {kind} needs [low, high] with low < high, got {bounds!r}")
        if kind == "loguniform" and bounds[0] <= 0:
            raise SweepError(f"sweep.params: {key!r}: loguniform needs a positive lower bound")
        if kind == "randint":
            if not all(isinstance(b, int) for b in bounds):
                raise SweepError(f"sweep.params: {key!r}: randint needs integer bounds")
            return [bounds[0], bounds[1] - 1]
        return list(bounds)
    raise SweepError(f"sweep.params: {key!r}: expected a list of values or one of "
                     f"{{{', '.join(DISTRIBUTIONS)}: [low, high]}}, got {spec!r}")


def check_space(raw: dict, sweep: SweepConfig) -> None:
    """Refuse a search space that could not run, before any teacher is trained."""
    if not sweep.params:
        raise SweepError("sweep.params is empty: name at least one key to sweep")
    for key, spec in sweep.params.items():
        for bad in FORBIDDEN_PREFIXES:
            if _covers(key, bad):
                raise SweepError(f"sweep.params: {key!r} cannot be swept (it belongs to the sweep itself)")
        for value in _candidate_values(key, spec, sweep.search):
            if key == K_KEY and (isinstance(value, bool) or not isinstance(value, int)):
                raise SweepError(f"sweep.params: {K_KEY} takes integers, got {value!r}")
            trial = set_dotted(copy.deepcopy(raw), key, value)
            try:
                config_from_dict(trial, f"sweep value {key}={value!r}")
            except ConfigError as err:
                raise SweepError(str(err)) from None
    method = raw.get("method", "stpp")
    swept = set(sweep.params)
    if not get_method(method).selects_reliable and swept & {R_KEY, K_KEY} and "method" not in swept:
        raise SweepError(f"sweep.params: R and K only matter for method stpp (this config's method is {method!r})")


def checkpoint_counts(sweep: SweepConfig) -> list[int]:
    """Every K the search space can produce (empty if K is not swept)."""
    spec = sweep.params.get(K_KEY)
    if spec is None:
        return []
    if isinstance(spec, list):
        return sorted({int(v) for v in spec})
    lo, hi = spec["randint"]
    return list(range(lo, hi))


def touches_shared(keys) -> bool:
    """Whether a swept key changes the teacher or its labeling pass (then trials cannot all share one)."""
    return any(_covers(key, prefix) for key in keys for prefix in SHARED_PREFIXES)


def short_name(key: str) -> str:
    return SHORT_NAMES.get(key, key.rsplit(".", 1)[-1])


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def trial_label(params: dict) -> str:
    """A readable, filesystem-safe label such as `R=0.5_K=3`."""
    label = "_".join(f"{short_name(k)}={format_value(v)}" for k, v in sorted(params.items()))
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", label)[:120]


def _as_override(value: Any) -> str:
    """A value as `key=value` text that the override parser (YAML) reads back unchanged."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return value
    return json.dumps(value)


def override_args(params: dict) -> list[str]:
    """`key=value` command-line overrides reproducing `params`."""
    return [f"{key}={_as_override(value)}" for key, value in sorted(params.items())]


def best_trial(trials: list[dict], metric: str, mode: str) -> dict | None:
    done = [t for t in trials if t["status"] == "completed" and _finite(t.get(metric))]
    if not done:
        return None
    pick = max if mode == "max" else min
    return pick(done, key=lambda t: t[metric])


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def run_command(config_path: str, cli_overrides: list[str], params: dict, output_dir: str) -> str:
    """The ready-to-run `stpp-ray run` command of one trial's config."""
    args = ["stpp-ray", "run", "-c", config_path, *cli_overrides, *override_args(params), f"run.output_dir={output_dir}"]
    return " ".join(shlex.quote(a) for a in args)


def grid_cells(trials: list[dict], metric: str) -> tuple[list, list, list[list[float | None]]] | None:
    """(R values, K values, mean metric per (K, R) cell) when both are swept; else None."""
    rows = [t for t in trials if R_KEY in t["params"] and K_KEY in t["params"]]
    if not rows:
        return None
    rs = sorted({t["params"][R_KEY] for t in rows})
    ks = sorted({t["params"][K_KEY] for t in rows})
    cells: list[list[float | None]] = []
    for k in ks:
        line = []
        for r in rs:
            vals = [t[metric] for t in rows if t["params"][R_KEY] == r and t["params"][K_KEY] == k
                    and t["status"] == "completed" and _finite(t.get(metric))]
            line.append(sum(vals) / len(vals) if vals else None)
        cells.append(line)
    return rs, ks, cells


def _pct(v) -> str:
    return f"{100 * v:.2f}" if _finite(v) else "–"


def render_markdown(summary: dict) -> str:
    """`sweep.md`: the trial table, the best config as a command, compute against a naive sweep."""
    metric = summary["metric"]
    keys = sorted({k for t in summary["trials"] for k in t["params"]})
    lines = [f"# Sweep of {summary['config_path']}", "",
             f"- search: {summary['search']} over {', '.join(f'`{k}`' for k in keys)}; metric `{metric}` ({summary['mode']})",
             f"- trials: {len(summary['trials'])} ({summary['counts']}), up to "
             f"{summary.get('max_concurrent_trials', 1)} at a time (their wall times overlap)",
             f"- teacher trainings: **{summary['teacher_trainings']}**", ""]
    for shared in summary["shared"]:
        lines.append(f"- shared teacher `{shared['dir']}`: val mIoU {_pct(shared.get('teacher_miou'))}, "
                     f"teacher {shared.get('teacher_s', 0):.0f} s, labeling {shared.get('label_s', 0):.0f} s")
    lines += ["", "| trial | " + " | ".join(short_name(k) for k in keys) + " | final mIoU | best mIoU | status | wall s |",
              "|---|" + "---|" * len(keys) + "---|---|---|---|"]
    for t in summary["trials"]:
        cells = [format_value(t["params"].get(k, "")) for k in keys]
        status = t["status"] + (f": {t['error']}" if t.get("error") else "")
        wall = f"{t['wall_s']:.0f}" if _finite(t.get("wall_s")) else "–"
        lines.append(f"| {t['name']} | " + " | ".join(cells) +
                     f" | {_pct(t.get('final_miou'))} | {_pct(t.get('best_miou'))} | {status} | {wall} |")
    best = summary.get("best")
    lines += [""]
    if best:
        lines += [f"Best ({metric} {_pct(best[metric])}): trial {best['name']}", "", "```", best["command"], "```"]
    else:
        lines += ["No trial completed."]
    compute = summary["compute"]
    lines += ["", "## Compute", "",
              "Sums of measured stage wall times (trials running at once overlap in time):", "",
              f"- this sweep: {compute['shared_s']:.0f} s of shared stages + {compute['trials_s']:.0f} s of trial "
              f"stages = **{compute['total_s']:.0f} s** (wall of this invocation: {summary['wall_s']:.0f} s)",
              f"- a naive sweep, which trains the teacher and labels the pool again in every trial: the same trial "
              f"stages plus one shared-stage cost per trial = **{compute['naive_estimate_s']:.0f} s**"]
    if summary.get("heatmap"):
        lines += ["", f"![{metric} over R and K]({summary['heatmap']})"]
    return "\n".join(lines) + "\n"


def shared_summary(shared_root: Path) -> list[dict]:
    """Per shared directory: whether its teacher finished, its mIoU and stage times."""
    out = []
    for manifest in sorted(Path(shared_root).glob("*/manifest.json")):
        stages = json.loads(manifest.read_text()).get("stages", {})
        teacher = stages.get("teacher", {}).get("result")
        label = stages.get("label_teacher", {}).get("result")
        check = stages.get("check_data", {}).get("result")
        out.append({
            "dir": manifest.parent.name,
            "teacher_trained": teacher is not None,
            "teacher_miou": (teacher or {}).get("miou"),
            "teacher_s": (teacher or {}).get("wall_s", 0.0),
            "label_s": (label or {}).get("wall_s", 0.0),
            "check_s": (check or {}).get("wall_s", 0.0),
        })
    return out


def compute_summary(shared: list[dict], trials: list[dict]) -> dict:
    """Stage seconds spent by this sweep, and what a sweep without sharing would have spent."""
    cost = {s["dir"]: s["teacher_s"] + s["label_s"] + s["check_s"] for s in shared}
    shared_s = sum(cost.values())
    trials_s = sum(t.get("stage_s") or 0.0 for t in trials)
    naive = sum((t.get("stage_s") or 0.0) + cost.get(t.get("shared_dir", ""), 0.0) for t in trials)
    return {"shared_s": shared_s, "trials_s": trials_s, "total_s": shared_s + trials_s, "naive_estimate_s": naive}
