"""`stpp-ray compare`: the methods and the oracle over several seeds, one table.

For each seed the teacher-based methods (SupOnly, ST, ST++, DMT) run one after another
in one run directory, so the teacher is trained once and reused (its fingerprint does
not depend on the method). The online methods, which train no SupOnly teacher, and the
oracle get a directory each. Every row states its budget: optimiser steps (all the stages
a method needs, the teacher's included), images forwarded per step, wall time. A second
SupOnly row trains as many steps as the longest method, so that no gain is extra training;
the oracle trains on every labeled image of `oracle_split` for as many steps as the teacher.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from ..config import Config, config_from_dict
from ..datasets import read_split
from ..files import write_json_atomic, write_text_atomic
from ..storage import require_local
from ..methods import get_method, names as method_names
from ..training import supervised_repeats

ORACLE = "oracle"
LONG_SUPONLY = "supervised_long"
EXTRA_LABELS = {LONG_SUPONLY: "SupOnly, as many steps as the longest method", ORACLE: "Oracle (all labels)"}


def _variant(cfg: Config, source: str, **changes) -> Config:
    raw = cfg.model_dump()
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config_from_dict(raw, source)


def oracle_epochs(cfg: Config, root: Path, oracle_split: str) -> int:
    """Epochs giving the oracle as many optimisation steps as the teacher (each lists its
    labeled set `supervised_repeats` times per epoch)."""
    cap = cfg.data.max_images or math.inf
    labeled, full = (min(len(read_split(root, split)), cap) for split in (cfg.data.labeled_split, oracle_split))
    per_epoch = labeled * supervised_repeats(labeled), full * supervised_repeats(full)
    return max(1, round(cfg.train.epochs * per_epoch[0] / per_epoch[1]))


def _budget(report: dict) -> dict:
    """What a method cost: every stage it needed, reused ones included."""
    stages = report["stages"]
    steps = sum(s.get("steps") or 0 for s in stages)
    images = sum(s.get("train_images") or 0 for s in stages)
    return {"wall_s": sum(s.get("wall_s") or 0.0 for s in stages), "steps": steps,
            "images_per_step": images / steps if steps else None}


def _label(method: str) -> str:
    return EXTRA_LABELS.get(method) or get_method(method).label


def summarize(rows: list[dict]) -> list[dict]:
    """Mean, sample standard deviation, min and max of mIoU per method, its gain over SupOnly on
    each seed (the seeds SupOnly ran), and its mean budget."""
    suponly = {r.get("seed"): r["miou"] for r in rows if r["method"] == "supervised"}
    out = []
    for method in (*method_names(), LONG_SUPONLY, ORACLE):
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        values = [r["miou"] for r in mine]
        mean = lambda key: statistics.fmean(r[key] for r in mine) if all(r.get(key) for r in mine) else None  # noqa: E731
        out.append({
            "method": method, "label": _label(method), "seeds": len(values),
            "miou_mean": statistics.fmean(values),
            "miou_std": statistics.stdev(values) if len(values) > 1 else math.nan,
            "miou_min": min(values), "miou_max": max(values),
            "gains": [] if method == "supervised" else
                     [r["miou"] - suponly[r.get("seed")] for r in mine if r.get("seed") in suponly],
            "wall_s_mean": statistics.fmean(r["wall_s"] for r in mine),
            "steps_mean": mean("steps"), "images_per_step_mean": mean("images_per_step"),
        })
    return out


def render_table(summary: list[dict]) -> str:
    lines = ["| method | val mIoU (mean ± std) | min – max | gain over SupOnly, per seed | seeds | optimiser steps "
             "| images per step | wall time per run |", "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        std = "" if math.isnan(s["miou_std"]) else f" ± {100 * s['miou_std']:.2f}"
        steps = "–" if s.get("steps_mean") is None else f"{s['steps_mean']:.0f}"
        per_step = "–" if s.get("images_per_step_mean") is None else f"{s['images_per_step_mean']:.1f}"
        gains = ", ".join(f"{100 * g:+.1f}" for g in s.get("gains", [])) or "–"
        lines.append(f"| {s['label']} | {100 * s['miou_mean']:.2f}{std} | "
                     f"{100 * s['miou_min']:.2f} – {100 * s['miou_max']:.2f} | {gains} | {s['seeds']} | {steps} | {per_step} | "
                     f"{s['wall_s_mean']:.0f} s |")
    return "\n".join(lines)


def long_suponly_epochs(cfg: Config, teacher_steps: int, longest_steps: int) -> int:
    """Teacher epochs that reach at least `longest_steps` optimiser steps, from a teacher that
    took `teacher_steps` in `train.epochs` epochs."""
    per_epoch = max(1, teacher_steps // cfg.train.epochs)
    return max(cfg.train.epochs, math.ceil(longest_steps / per_epoch))


def _run(rows: list[dict], out_dir: Path, cfg: Config, seeds: list[int], seed: int, method: str, run_cfg: Config) -> dict:
    from .pipeline import Pipeline

    report = Pipeline(run_cfg).run()
    rows.append({"seed": seed, "method": method, "miou": report["final"]["miou"],
                 "teacher_miou": report["teacher"]["miou"], "student_miou": report["final"].get("student_miou"),
                 **_budget(report)})
    _write(out_dir, cfg, rows, seeds)
    return report


def run_compare(cfg: Config, seeds: list[int], out_dir: Path, oracle_split: str | None,
                methods: tuple[str, ...] | None = None, long_suponly: bool = True) -> dict:
    require_local("a comparison", out=out_dir, **{"data.root": cfg.data.root})
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for seed in seeds:
        for method in methods or method_names():
            # The teacher-based methods share one directory per seed, hence one teacher.
            run_dir = out_dir / (f"seed{seed}_{method}" if get_method(method).online else f"seed{seed}")
            run_cfg = _variant(cfg, f"compare seed {seed} {method}", method=method, run__seed=seed,
                               run__output_dir=str(run_dir))
            print(f"[compare] seed {seed}: {method}", flush=True)
            report = _run(rows, out_dir, cfg, seeds, seed, method, run_cfg)
            if method == "supervised":
                teacher_steps = report["teacher"]["steps"]
        longest = max(r["steps"] for r in rows if r["seed"] == seed)
        if long_suponly and "supervised" in (methods or method_names()) and longest > teacher_steps:
            epochs = long_suponly_epochs(cfg, teacher_steps, longest)
            run_cfg = _variant(cfg, f"compare seed {seed} long SupOnly", method="supervised", run__seed=seed,
                               train__epochs=epochs, run__output_dir=str(out_dir / f"seed{seed}_suponly_long"))
            print(f"[compare] seed {seed}: SupOnly for {epochs} epochs ({longest} steps, the longest method's)", flush=True)
            _run(rows, out_dir, cfg, seeds, seed, LONG_SUPONLY, run_cfg)
        if oracle_split:
            epochs = oracle_epochs(cfg, Path(cfg.data.root).resolve(), oracle_split)
            run_cfg = _variant(cfg, f"compare seed {seed} oracle", method="supervised", run__seed=seed,
                               data__labeled_split=oracle_split, train__epochs=epochs,
                               run__output_dir=str(out_dir / f"seed{seed}_oracle"))
            print(f"[compare] seed {seed}: oracle ({epochs} epochs on {oracle_split})", flush=True)
            _run(rows, out_dir, cfg, seeds, seed, ORACLE, run_cfg)
    return _write(out_dir, cfg, rows, seeds)


def _write(out_dir: Path, cfg: Config, rows: list[dict], seeds: list[int]) -> dict:
    from ..plots import method_bar_chart

    summary = summarize(rows)
    result = {"seeds": seeds, "rows": rows, "summary": summary, "config": cfg.model_dump()}
    write_json_atomic(out_dir / "compare.json", result)
    method_bar_chart([s["label"] for s in summary], [s["miou_mean"] for s in summary], [s["miou_std"] for s in summary],
                     out_dir / "compare.png", title="Validation mIoU per method (mean ± std over seeds)")
    write_text_atomic(out_dir / "compare.md", "# Method comparison\n\n![mean ± std per method](compare.png)\n\n"
                      + render_table(summary) + "\n")
    return result
