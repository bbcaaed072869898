"""Run the benchmarks and write bench/out/bench.json, bench/out/bench.md, bench/out/scale.md
(and, with --update-doc, the measured, memory, data-check, labeling-at-scale and scale-model blocks of BENCHMARKS.md).

    python -m bench.run                       # everything
    python -m bench.run --sections labeling   # one section
    python -m bench.run --sections memory --update-doc BENCHMARKS.md   # peak memory against |U|
    python -m bench.run --sections check --update-doc BENCHMARKS.md    # the data check at 200k images
    python -m bench.run --sections label_scale --update-doc BENCHMARKS.md   # labeling 200k images
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from . import data_check, e2e, labeling, labeling_scale, machine, memory, scale, training, workload
from .render import machine_lines, render_markdown, update_doc
from .stats import summary
from .training import TRAIN_SETUPS

SECTIONS = ("labeling", "training", "e2e", "memory", "check", "label_scale")


def _say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def bench_labeling(cfg, args, scratch: Path, cores: int) -> dict:
    images = workload.unlabeled_images(cfg, args.images)
    small = images[:max(cfg.label.batch_size, args.images // 4)]
    ref_images = images[:args.reference_images]
    checkpoints = workload.make_checkpoints(cfg, scratch / "checkpoints")
    k = len(checkpoints)
    out: dict = {"images": len(images), "small_images": len(small), "reference_images": len(ref_images), "checkpoints": k,
                 "batch_size": cfg.label.batch_size, "model": f"{cfg.model.name}/{cfg.model.backbone}",
                 "image_size": cfg.data.demo_image_size}
    runs: dict[str, list[float]] = {"ray": [], "ray_small": [], "bare": [], "reference": []}
    for i in range(args.runs):
        _say(f"labeling run {i + 1}/{args.runs}: Ray Data pass, {len(images)} and {len(small)} images")
        runs["ray"].append(labeling.ray_pass(cfg, images, checkpoints, scratch / "ray"))
        runs["ray_small"].append(labeling.ray_pass(cfg, small, checkpoints, scratch / "ray_small"))
        _say(f"labeling run {i + 1}/{args.runs}: bare loop and reference procedure")
        runs["bare"].append(labeling.bare_loop(cfg, images, checkpoints, scratch / "bare", cores))
        seconds, _ = labeling.reference_procedure(ref_images, checkpoints, checkpoints[-1], scratch / "reference", cores)
        runs["reference"].append(seconds)
    out["seconds"] = {name: summary(values) for name, values in runs.items()}
    counts = {"ray": len(images), "ray_small": len(small), "bare": len(images), "reference": len(ref_images)}
    rate = {name: counts[name] / out["seconds"][name]["median"] for name in runs}
    out["images_per_s"] = rate
    # Each run's two passes ran back to back, so their difference shares the machine's state.
    extra = [big - little for big, little in zip(runs["ray"], runs["ray_small"])]
    out["ray_extra_seconds"] = summary(extra)
    usable = [d for d in extra if d > 0]
    out["ray_extra_usable_median_s"] = statistics.median(usable) if usable else float("nan")
    marginal = (len(images) - len(small)) / out["ray_extra_usable_median_s"]
    out["ray_marginal_images_per_s"] = marginal
    out["ray_marginal_noisy"] = len(usable) < len(extra)
    out["ray_fixed_s"] = out["seconds"]["ray"]["median"] - len(images) / marginal
    out["ray_vs_bare"] = rate["ray"] / rate["bare"]
    out["ray_marginal_vs_bare"] = marginal / rate["bare"]
    out["ray_vs_reference"] = rate["ray"] / rate["reference"]
    return out


def bench_training(cfg, args, scratch: Path, cores: int) -> dict:
    cfg = cfg.model_copy(deep=True)
    cfg.train.epochs, cfg.train.eval_interval, cfg.train.checkpoint_interval = args.epochs, 0, args.epochs
    out: dict = {"epochs_per_run": args.epochs, "global_batch": cfg.train.batch_size,
                 "model": f"{cfg.model.name}/{cfg.model.backbone}", "crop": cfg.data.crop_size}
    _say(f"training: bare loop, {args.epochs} epochs")
    bare = training.bare_epochs(cfg, args.epochs, cores)
    out["bare"] = {"epoch_images_per_s": bare, "images_per_s": statistics.median(bare[1:] or bare)}
    startups = []
    for key, workers, sync in TRAIN_SETUPS:
        wcfg = cfg.model_copy(deep=True)
        wcfg.ray.num_workers, wcfg.ray.cpus_per_worker, wcfg.train.sync_batchnorm = workers, cores / workers, sync
        fits = []
        for i in range(args.fits):
            _say(f"training: Ray Train, {workers} worker(s), sync BN {sync}, run {i + 1}/{args.fits}")
            fits.append(training.ray_run(wcfg, args.epochs, scratch / "train", f"{key}_{i}"))
        epochs = [r for fit in fits for r in (fit["images_per_s"][1:] or fit["images_per_s"])]
        out[key] = {"workers": workers, "sync_batchnorm": sync, "fits": fits,
                    "images_per_s": statistics.median(epochs),
                    "startup_s": summary([f["startup_s"] for f in fits]),
                    "teardown_s": summary([f["teardown_s"] for f in fits])}
        out[key]["vs_bare"] = out[key]["images_per_s"] / out["bare"]["images_per_s"]
        startups += [f["startup_s"] for f in fits]
    out["startup_s"] = summary(startups)
    return out


def bench_e2e(cfg, args, scratch: Path, cores: int) -> dict:
    overrides = [f"run.output_dir={scratch / 'e2e_run'}", *args.e2e_overrides]
    ecfg = workload.bench_config(Path(cfg.data.root), overrides)
    _say(f"end to end: demo ST++ run with {' '.join(args.e2e_overrides) or 'the demo config'}")
    result = e2e.run_demo(ecfg, cores, scratch / "e2e_bare")
    result["overrides"] = list(args.e2e_overrides)
    return result


def bench_memory(cfg, args, scratch: Path, cores: int) -> dict:
    return memory.run(scratch, args.memory_sizes, say=_say)


def bench_check(cfg, args, scratch: Path, cores: int) -> dict:
    return data_check.run(scratch, args.check_images, say=_say)


def bench_label_scale(cfg, args, scratch: Path, cores: int) -> dict:
    bare = args.label_scale_images if args.label_scale_bare is None else args.label_scale_bare
    return labeling_scale.run(cfg, scratch, args.label_scale_images, args.label_scale_size, bare,
                              args.label_scale_reference, cores, say=_say)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--runs", type=int, default=3, help="repeats of each labeling measurement (median reported)")
    p.add_argument("--images", type=int, default=480, help="unlabeled images per labeling pass")
    p.add_argument("--reference-images", type=int, default=120,
                   help="images through the (slow, start-up free) reference procedure; its images/s is compared")
    p.add_argument("--epochs", type=int, default=3, help="epochs per training run (the first is warm-up)")
    p.add_argument("--fits", type=int, default=1, help="Ray Train runs per setup (1 and 2 workers, 2 without sync BN)")
    p.add_argument("--e2e-overrides", nargs="*", default=["train.epochs=10", "train.student_epochs=1"],
                   help="config overrides of the end-to-end demo run (none: the full demo)")
    p.add_argument("--memory-sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000],
                   help="pool sizes |U| of the memory section")
    p.add_argument("--check-images", type=int, default=200_000, help="pool size |U| of the data-check section")
    p.add_argument("--label-scale-images", type=int, default=200_000, help="pool size |U| of the labeling-at-scale section")
    p.add_argument("--label-scale-size", type=int, default=8, help="side of its images, px")
    p.add_argument("--label-scale-bare", type=int, default=None,
                   help="its first images labeled by the bare loop (default: all of them)")
    p.add_argument("--label-scale-reference", type=int, default=2_000, help="and by the reference procedure")
    p.add_argument("--data", type=Path, default=workload.ROOT / "data" / "demo")
    p.add_argument("--out", type=Path, default=workload.ROOT / "bench" / "out")
    p.add_argument("--update-doc", type=Path, help="rewrite the measured and scale-model blocks of this markdown file")
    args = p.parse_args(argv)

    started = time.perf_counter()
    cfg = workload.bench_config(args.data)
    needs_data = bool(set(args.sections) & {"labeling", "training", "e2e"})  # on the demo dataset
    uses_ray = needs_data or bool({"check", "label_scale"} & set(args.sections))  # memory: its own processes, no Ray
    if needs_data:
        workload.prepare_data(cfg)
    info = machine.describe()
    ticks = machine.cpu_times()
    cores = info["cores"]
    scratch = args.out / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    results: dict = {"machine": info, "command": "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:]),
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    results["ray_init_s"] = 0.0
    if uses_ray:
        from stpp_ray.cluster.session import init_ray
        t0 = time.perf_counter()
        init_ray(cfg)
        results["ray_init_s"] = time.perf_counter() - t0
        _say(f"ray.init: {results['ray_init_s']:.1f} s")
    runners = {"labeling": bench_labeling, "training": bench_training, "e2e": bench_e2e, "memory": bench_memory,
               "check": bench_check, "label_scale": bench_label_scale}
    for section in args.sections:
        t0 = time.perf_counter()
        results[section] = runners[section](cfg, args, scratch, cores)
        results[section]["section_wall_s"] = time.perf_counter() - t0
        _say(f"{section} done in {results[section]['section_wall_s']:.0f} s")
    results["total_wall_s"] = time.perf_counter() - started
    info["cpu_steal_pct"] = machine.steal_percent(ticks, machine.cpu_times())

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(results, indent=1) + "\n")
    markdown = render_markdown({k: v for k, v in results.items() if k not in ("memory", "check", "label_scale")})
    (args.out / "bench.md").write_text(markdown)
    scale_markdown = scale.markdown_from(results)
    (args.out / "scale.md").write_text(scale_markdown)
    if "memory" in results:
        memory_markdown = "\n".join(machine_lines(results)) + "\n" + memory.markdown(results["memory"])
        (args.out / "memory.md").write_text(memory_markdown)
    if "check" in results:
        check_markdown = "\n".join(machine_lines(results)) + "\n" + data_check.markdown(results["check"])
        (args.out / "check.md").write_text(check_markdown)
    if "label_scale" in results:
        label_scale_markdown = "\n".join(machine_lines(results)) + "\n" + labeling_scale.markdown(results["label_scale"])
        (args.out / "label_scale.md").write_text(label_scale_markdown)
    if args.update_doc:
        if needs_data:
            update_doc(args.update_doc, markdown)
            update_doc(args.update_doc, scale_markdown, block="scale")
        if "memory" in results:
            update_doc(args.update_doc, memory_markdown, block="memory")
        if "check" in results:
            update_doc(args.update_doc, check_markdown, block="check")
        if "label_scale" in results:
            update_doc(args.update_doc, label_scale_markdown, block="label_scale")
    shutil.rmtree(scratch, ignore_errors=True)
    print(markdown)
    _say(f"total {results['total_wall_s']:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    raise SystemExit(main())
