"""End to end: wall time per stage of a demo ST++ run and how much of it is not compute.

Training stages report their own breakdown (`stpp_ray.cluster.train.summarize_stage`): compute
is what the epoch loop measured (training + validation), Ray's start-up and teardown come
from the epochs' start times against `fit()`'s wall, the rest is checkpoint reports and
the stage's file writes. Labeling stages: compute is the bare single-process loop redoing
the same labeling afterwards (same images, same checkpoints).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from stpp_ray.config import Config

from .labeling import bare_loop


def run_demo(cfg: Config, threads: int, scratch: Path) -> dict:
    """Run the pipeline of `cfg` from scratch; per-stage wall, compute and the rest."""
    from stpp_ray.orchestration.pipeline import Pipeline

    run_dir = Path(cfg.run.output_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    pipeline = Pipeline(cfg)
    report = pipeline.run()
    rows = []
    for stage in report["stages"]:
        row = {"stage": stage["name"], "wall_s": stage["wall_s"]}
        if "compute_s" in stage:
            row.update(compute_s=stage["compute_s"], ray_s=stage["startup_s"] + stage["teardown_s"],
                       other_s=stage["wall_s"] - stage["compute_s"] - stage["startup_s"] - stage["teardown_s"])
        elif stage["name"].startswith("label_") and stage.get("images"):
            compute = _bare_labeling(pipeline, stage["name"], threads, scratch)
            row.update(compute_s=compute, ray_s=stage["wall_s"] - compute, other_s=0.0)
        else:  # check_data, select: driver-side work without Ray
            row.update(compute_s=stage["wall_s"], ray_s=0.0, other_s=0.0)
        rows.append(row)
    return {"run_dir": str(run_dir), "final_miou": report["final"]["miou"], "total_wall_s": report["total_wall_s"],
            "stages": rows}


def _bare_labeling(pipeline, stage: str, threads: int, scratch: Path) -> float:
    """The bare loop over the images and checkpoints the pipeline's labeling stage used."""
    results = pipeline.results
    if stage == "label_teacher":
        ids = None
        teacher = results["teacher"]
        checkpoints = teacher["checkpoints"] if pipeline.cfg.method == "stpp" else [teacher["final_checkpoint"]]
    else:  # label_student1: the unreliable images with student1's final weights
        ids = set(pipeline.selected(reliable=False).column("image_id").to_pylist())
        checkpoints = [results["student1"]["final_checkpoint"]]
    pool = pipeline.unlabeled
    images = [(i, p) for i, p in zip(pool.ids.to_pylist(), pool.paths.to_pylist()) if ids is None or i in ids]
    return bare_loop(pipeline.cfg, images, checkpoints, scratch / stage, threads)
