"""bench.json -> markdown tables, and the measured block of BENCHMARKS.md."""

from __future__ import annotations

from pathlib import Path

from .training import TRAIN_SETUPS

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"  # the block `make bench` rewrites


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _f(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{round(x, digits) + 0.0:.{digits}f}"  # no "-0.0"


def _runs(summary: dict) -> str:
    return ", ".join(f"{v:.1f}" for v in summary["runs"])


def machine_lines(r: dict) -> list[str]:
    m = r["machine"]
    steal = m.get("cpu_steal_pct")
    steal = "" if steal is None else f" ({steal:.0f}% CPU steal by the hypervisor during the run)"
    at = f" at commit {m['commit']}" if m.get("commit") else ""
    return [f"Measured {r['date']}{at} on {m['cores']} cores ({m['cpu_model']}){steal}, {m['memory_gib']} GiB, "
            f"GPU: {m['gpu'] or 'none'}; torch {m['torch']} ({m['torch_threads']} threads), Ray {m['ray']}, "
            f"Python {m['python']}. Command: `{r['command'].strip()}`; {r['total_wall_s'] / 60:.1f} min in all"
            + (f" (`ray.init` {r['ray_init_s']:.1f} s)." if r.get("ray_init_s") else "."), ""]


def _labeling(lab: dict) -> list[str]:
    s, rate = lab["seconds"], lab["images_per_s"]
    out = [f"### Labeling + stability scoring", "",
           f"{lab['images']} unlabeled {lab['image_size']}x{lab['image_size']} images, K = {lab['checkpoints']} "
           f"checkpoints of {lab['model']} (the last one labels), batch {lab['batch_size']}; median of "
           f"{len(s['ray']['runs'])} runs (every run in brackets).", ""]
    rows = [
        ["Ray Data pass (actor pool, Parquet shards)", _f(s["ray"]["median"]), f"[{_runs(s['ray'])}]", _f(rate["ray"]),
         _f(lab["ray_vs_bare"], 2), _f(lab["ray_vs_reference"], 2)],
        [f"Ray Data pass, {lab['small_images']} images", _f(s["ray_small"]["median"]), f"[{_runs(s['ray_small'])}]",
         _f(rate["ray_small"]), "", ""],
        ["bare batched loop, one process, all cores", _f(s["bare"]["median"]), f"[{_runs(s['bare'])}]",
         _f(rate["bare"]), "1.00", _f(rate["bare"] / rate["reference"], 2)],
        [f"reference procedure (batch 1, K checkpoints, then a 2nd pass labeling), {lab['reference_images']} images",
         _f(s["reference"]["median"]),
         f"[{_runs(s['reference'])}]", _f(rate["reference"]), _f(rate["reference"] / rate["bare"], 2), "1.00"],
    ]
    out += _table(["how", "seconds", "runs", "images/s", "vs bare", "vs reference"], rows)
    extra = lab["ray_extra_seconds"]
    out += [f"Ray Data pass beyond its fixed cost, from the two sizes run back to back: the "
            f"{lab['images'] - lab['small_images']} extra images took {_f(lab['ray_extra_usable_median_s'])} s more "
            f"(median; every run: [{_runs(extra)}]), i.e. {_f(lab['ray_marginal_images_per_s'])} images/s = "
            f"{_f(lab['ray_marginal_vs_bare'], 2)}x the bare loop; so the fixed cost of a pass (actor start-up, "
            f"checkpoint loading, planning, writing, shard check and rename) is about {_f(lab['ray_fixed_s'])} s."
            + (" Some runs' differences were not positive: the machine's noise exceeded them, and those runs "
               "are left out." if lab.get("ray_marginal_noisy") else ""), ""]
    return out


def _training(tr: dict) -> list[str]:
    out = ["### Training", "",
           f"{tr['model']}, {tr['crop']}x{tr['crop']} crops, global batch {tr['global_batch']}, {tr['epochs_per_run']} "
           "epochs per run; images/s is the median over the epochs after the first of every run.", ""]
    rows = [["bare loop, one process, all cores", _f(tr["bare"]["images_per_s"]), "1.00", "", ""]]
    for key, workers, sync in TRAIN_SETUPS:
        if key in tr:
            r = tr[key]
            name = f"Ray Train, {workers} worker{'s' if workers > 1 else ''}" + ("" if sync or workers == 1 else
                                                                                ", per-worker BatchNorm")
            rows.append([name, _f(r["images_per_s"]), _f(r["vs_bare"], 2),
                         f"{_f(r['startup_s']['median'])} [{_runs(r['startup_s'])}]",
                         f"{_f(r['teardown_s']['median'])} [{_runs(r['teardown_s'])}]"])
    out += _table(["how", "images/s", "vs bare", "start-up s (runs)", "teardown s (runs)"], rows)
    out += ["Start-up: from `TorchTrainer.fit()` to the first epoch starting in the workers (controller, worker "
            "processes, imports, process group, model and data set-up). Teardown: from the end of the last "
            "epoch's work to `fit()` returning. Synchronised BatchNorm (the default, for batch-size invariance) "
            "all-reduces every BatchNorm layer's statistics in the forward and their gradients in the backward.", ""]
    return out


def _e2e(e: dict) -> list[str]:
    label = " ".join(e["overrides"]) or "as shipped"
    out = ["### End to end", "", f"`jobs/demo.yaml` ({label}): final mIoU {100 * e['final_miou']:.2f}, "
           f"{e['total_wall_s']:.0f} s of stage wall time.", ""]
    rows, totals = [], {"wall_s": 0.0, "compute_s": 0.0, "ray_s": 0.0, "other_s": 0.0}
    for s in e["stages"]:
        for key in totals:
            totals[key] += s[key]
        share = (s["wall_s"] - s["compute_s"]) / s["wall_s"] if s["wall_s"] else 0.0
        rows.append([s["stage"], _f(s["wall_s"]), _f(s["compute_s"]), _f(s["ray_s"]), _f(s["other_s"]),
                     f"{100 * share:.0f} %"])
    rows.append(["**all**", _f(totals["wall_s"]), _f(totals["compute_s"]), _f(totals["ray_s"]), _f(totals["other_s"]),
                 f"{100 * (1 - totals['compute_s'] / totals['wall_s']):.0f} %"])
    out += _table(["stage", "wall s", "compute s", "Ray s", "reports, writes s", "not compute"], rows)
    out += ["Compute: training and validation time measured inside the epoch loop; for labeling stages, the bare "
            "loop redoing the same labeling. Ray: Train start-up + teardown, or the labeling pass beyond the bare "
            "loop. Reports, writes: checkpoint reports to Ray Train and the stage's own files between epochs.", ""]
    return out


def targets(r: dict) -> list[list[str]]:
    rows = []
    if "labeling" in r:
        lab = r["labeling"]
        rows.append(["labeling >= 0.9x bare batched loop", f"{lab['ray_vs_bare']:.2f}x (beyond fixed cost "
                     f"{lab['ray_marginal_vs_bare']:.2f}x)", "yes" if lab["ray_vs_bare"] >= 0.9 else "no"])
        rows.append(["labeling >= 3x reference procedure", f"{lab['ray_vs_reference']:.2f}x",
                     "yes" if lab["ray_vs_reference"] >= 3 else "no"])
    if "training" in r:
        tr = r["training"]
        for key, workers, sync in TRAIN_SETUPS:
            if key in tr:
                v = tr[key]["vs_bare"]
                what = f"{workers} worker{'s' if workers > 1 else ''}" + ("" if sync or workers == 1 else ", per-worker BN")
                rows.append([f"Ray Train epoch throughput ({what}) >= 0.9x bare", f"{v:.2f}x", "yes" if v >= 0.9 else "no"])
        startup = tr["startup_s"]["median"]
        rows.append(["Ray Train start-up < 15 s", f"{startup:.1f} s (median of every run)", "yes" if startup < 15 else "no"])
    return rows


def render_markdown(r: dict) -> str:
    lines = machine_lines(r)
    if "labeling" in r:
        lines += _labeling(r["labeling"])
    if "training" in r:
        lines += _training(r["training"])
    if "e2e" in r:
        lines += _e2e(r["e2e"])
    if targets(r):
        lines += ["### Targets", ""] + _table(["target", "measured", "met"], targets(r))
    return "\n".join(lines)


def update_doc(path: Path, markdown: str, block: str = "bench") -> None:
    """Replace the text between the `<!-- {block}:begin -->` and `<!-- {block}:end -->` markers of `path`."""
    begin, end = f"<!-- {block}:begin -->", f"<!-- {block}:end -->"
    text = path.read_text()
    if begin not in text or end not in text:
        raise ValueError(f"{path}: no {begin} ... {end} block to update")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{markdown.rstrip()}\n{end}{tail}")
