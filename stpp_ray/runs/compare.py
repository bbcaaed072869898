"""`stpp-ray compare`: the methods and the oracle over several seeds, one table.

For each seed the teacher-based methods (SupOnly, ST, ST++, DMT) run one after another
in one run directory, so the teacher is trained once and reused (its fingerprint does
not depend on the method). The online methods, which train no SupOnly teacher, and the
oracle get a directory each. The oracle trains on every labeled image of
`oracle_split` for the same number of optimisation steps as the teacher.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from ..config import Config, config_from_dict
from ..datasets import read_split
from ..methods import get_method, names as method_names
from ..training import supervised_repeats

ORACLE = "oracle"
ORACLE_LABEL = "Oracle (all labels)"


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


def _total_wall(report: dict) -> float:
    """Compute time of a method: every stage it needed, reused ones included."""
    return sum(s.get("wall_s") or 0.0 for s in report["stages"])


def summarize(rows: list[dict]) -> list[dict]:
    """Mean, sample standard deviation, min and max of mIoU per method."""
    out = []
    for method in (*method_names(), ORACLE):
        values = [r["miou"] for r in rows if r["method"] == method]
        if not values:
            continue
        walls = [r["wall_s"] for r in rows if r["method"] == method]
        out.append({
            "method": method, "label": ORACLE_LABEL if method == ORACLE else get_method(method).label,
            "seeds": len(values),
            "miou_mean": statistics.fmean(values),
            "miou_std": statistics.stdev(values) if len(values) > 1 else math.nan,
            "miou_min": min(values), "miou_max": max(values),
            "wall_s_mean": statistics.fmean(walls),
        })
    return out


def render_table(summary: list[dict]) -> str:
    lines = ["| method | val mIoU (mean ± std) | min – max | seeds | wall time per run |", "|---|---|---|---|---|"]
    for s in summary:
        std = "" if math.isnan(s["miou_std"]) else f" ± {100 * s['miou_std']:.2f}"
        lines.append(f"| {s['label']} | {100 * s['miou_mean']:.2f}{std} | "
                     f"{100 * s['miou_min']:.2f} – {100 * s['miou_max']:.2f} | {s['seeds']} | {s['wall_s_mean']:.0f} s |")
    return "\n".join(lines)


def run_compare(cfg: Config, seeds: list[int], out_dir: Path, oracle_split: str | None,
                methods: tuple[str, ...] | None = None) -> dict:
    from .pipeline import Pipeline

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
            report = Pipeline(run_cfg).run()
            rows.append({"seed": seed, "method": method, "miou": report["final"]["miou"],
                         "teacher_miou": report["teacher"]["miou"], "wall_s": _total_wall(report)})
            _write(out_dir, cfg, rows, seeds)
        if oracle_split:
            epochs = oracle_epochs(cfg, Path(cfg.data.root).resolve(), oracle_split)
            run_cfg = _variant(cfg, f"compare seed {seed} oracle", method="supervised", run__seed=seed,
                               data__labeled_split=oracle_split, train__epochs=epochs,
                               run__output_dir=str(out_dir / f"seed{seed}_oracle"))
            print(f"[compare] seed {seed}: oracle ({epochs} epochs on {oracle_split})", flush=True)
            report = Pipeline(run_cfg).run()
            rows.append({"seed": seed, "method": ORACLE, "miou": report["final"]["miou"],
                         "teacher_miou": report["teacher"]["miou"], "wall_s": _total_wall(report)})
            _write(out_dir, cfg, rows, seeds)
    return _write(out_dir, cfg, rows, seeds)


def _write(out_dir: Path, cfg: Config, rows: list[dict], seeds: list[int]) -> dict:
    summary = summarize(rows)
    result = {"seeds": seeds, "rows": rows, "summary": summary, "config": cfg.model_dump()}
    (out_dir / "compare.json").write_text(json.dumps(result, indent=2))
    (out_dir / "compare.md").write_text("# Method comparison\n\n" + render_table(summary) + "\n")
    return result
