"""The stage graphs of SupOnly, ST and ST++, the run directory and its manifest.

Each stage has a fingerprint: a hash of the config keys it depends on chained with
its upstream stage's fingerprint. A stage whose recorded fingerprint matches is
reused; otherwise it (and so everything downstream) is recomputed, and the reason is
printed. Training stages resume inside the stage from Ray Train's last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .checkpoints import architecture
from .config import Config
from .datasets import Sample, build_samples, check_disjoint, check_samples, resolve_path
from .demo_data import ensure_demo_dataset
from .selection import select_reliable, selection_to_json

TEACHER_KEYS = (
    "data.layout", "data.root", "data.num_classes", "data.labeled_split", "data.val_split", "data.crop_size",
    "data.demo", "data.demo_seed", "data.demo_num_train", "data.demo_num_val", "data.demo_image_size", "model", "train.epochs", "train.batch_size", "train.lr",
    "train.head_lr_multiplier", "train.momentum", "train.weight_decay", "train.poly_power",
    "train.eval_interval", "train.amp", "train.sync_batchnorm", "selection.num_checkpoints", "run.seed",
)
LABEL_KEYS = ("data.unlabeled_split", "label.teacher", "label.tta", "label.tta_scales")
SELECT_KEYS = ("selection.reliable_fraction",)


def chain(parent: str, *parts: str) -> str:
    return hashlib.sha256("/".join((parent,) + parts).encode()).hexdigest()[:16]


@dataclass
class Stage:
    name: str
    fingerprint: str
    run: Callable[[], dict]


class Manifest:
    """`manifest.json`: per finished stage its fingerprint, result and outputs."""

    def __init__(self, path: Path):
        self.path = path
        self.stages: dict[str, dict] = {}
        if path.exists():
            self.stages = json.loads(path.read_text()).get("stages", {})

    def done(self, stage: Stage) -> dict | None:
        entry = self.stages.get(stage.name)
        if entry and entry.get("fingerprint") == stage.fingerprint:
            return entry["result"]
        if entry:
            print(f"[pipeline] config changed since stage '{stage.name}' ran "
                  f"(fingerprint {entry.get('fingerprint')} -> {stage.fingerprint}): recomputing it", flush=True)
        return None

    def record(self, stage: Stage, result: dict) -> None:
        self.stages[stage.name] = {"fingerprint": stage.fingerprint, "result": result,
                                   "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_json(self.path, {"stages": self.stages})


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


class Pipeline:
    """Builds and runs the stage graph of `cfg.method` in `cfg.run.output_dir`."""

    def __init__(self, cfg: Config, fault_epoch: int = 0, fault_stage: str = ""):
        self.cfg = cfg
        self.run_dir = Path(cfg.run.output_dir).resolve()
        self.root = Path(cfg.data.root).resolve()
        self.fault_epoch, self.fault_stage = fault_epoch, fault_stage
        self.manifest = Manifest(self.run_dir / "manifest.json")
        self.results: dict[str, dict] = {}

    # ---- data -----------------------------------------------------------------
    def prepare_data(self) -> None:
        cfg = self.cfg
        if cfg.data.demo:
            ensure_demo_dataset(self.root, seed=cfg.data.demo_seed, num_train=cfg.data.demo_num_train,
                                num_val=cfg.data.demo_num_val, image_size=cfg.data.demo_image_size)
        d = cfg.data
        self.labeled = build_samples(d.layout, self.root, d.labeled_split, with_masks=True)
        self.val = build_samples(d.layout, self.root, d.val_split, with_masks=True)
        self.unlabeled: list[Sample] = []
        if cfg.method != "supervised":
            self.unlabeled = build_samples(d.layout, self.root, d.unlabeled_split, with_masks=False)
            check_disjoint([s.image_id for s in self.labeled], [s.image_id for s in self.unlabeled],
                           [s.image_id for s in self.val])
        if len(self.labeled) < cfg.train.batch_size:
            raise ValueError(f"{resolve_path(self.root, d.labeled_split)}: {len(self.labeled)} labeled images "
                             f"are fewer than one global batch (train.batch_size={cfg.train.batch_size})")

    def data_stage(self) -> Stage:
        fp = chain(self.cfg.fingerprint("data"), "with_unlabeled" if self.unlabeled else "labeled_only")

        def run() -> dict:
            start = time.perf_counter()
            if self.cfg.data.check_images:
                for samples in (self.labeled, self.val, self.unlabeled):
                    check_samples(samples, self.cfg.data.num_classes, self.cfg.data.layout)
            return {"wall_s": time.perf_counter() - start, "labeled": len(self.labeled),
                    "unlabeled": len(self.unlabeled), "val": len(self.val)}

        return Stage("check_data", fp, run)

    # ---- stage builders -------------------------------------------------------------
    def _rows(self, samples: list[Sample]) -> list[list[str]]:
        return [[s.image_id, str(s.image_path), str(s.mask_path)] for s in samples]

    def train_stage(self, name: str, fp: str, pseudo: Callable[[], list[dict]], checkpoint_epochs: list[int]) -> Stage:
        from .train_ray import StageSpec, fit_stage

        def run() -> dict:
            stage_dir = self.run_dir / name
            marker = stage_dir / ".fingerprint"
            if stage_dir.exists() and (not marker.exists() or marker.read_text() != fp):
                shutil.rmtree(stage_dir)  # outputs of another config: never mixed with this one's
            stage_dir.mkdir(parents=True, exist_ok=True)
            marker.write_text(fp)
            spec = StageSpec(name=name, stage_dir=str(stage_dir), fingerprint=fp, labeled=self._rows(self.labeled),
                             val=self._rows(self.val), pseudo=pseudo(), checkpoint_epochs=checkpoint_epochs,
                             fault_epoch=self.fault_epoch if name == self.fault_stage else 0)
            result = fit_stage(self.cfg, spec, self.run_dir / "ray_train")
            result["final_checkpoint"] = str(stage_dir / "final.pt")
            result["checkpoints"] = [str(stage_dir / "checkpoints" / f"epoch_{e:03d}.pt") for e in checkpoint_epochs]
            return result

        return Stage(name, fp, run)

    def label_stage(self, name: str, fp: str, model_stage: str, images: Callable[[], list[Sample]],
                    scoring: bool) -> Stage:
        from .label_ray import run_labeling

        def run() -> dict:
            trained = self.results[model_stage]
            label_ckpt = trained["final_checkpoint"]
            if self.cfg.label.teacher == "best":
                label_ckpt = str(Path(label_ckpt).with_name("best.pt"))
            ckpts = trained["checkpoints"] if scoring else [label_ckpt]
            samples = images()
            out = self.run_dir / "pseudo_labels" / model_stage
            print(f"[{name}] labeling {len(samples)} images with {model_stage} "
                  f"({len(ckpts)} checkpoint(s) scored, TTA {'on' if self.cfg.label.tta else 'off'})", flush=True)
            stats = run_labeling(self.cfg, [(s.image_id, str(s.image_path)) for s in samples], ckpts, label_ckpt,
                                 out, architecture(self.cfg.model, self.cfg.data.num_classes))
            print(f"[{name}] {stats['images']} images in {stats['wall_s']:.1f} s "
                  f"({stats['images_per_s']:.1f} img/s) -> {out}", flush=True)
            return {**stats, "parquet_dir": str(out)}

        return Stage(name, fp, run)

    def select_stage(self, fp: str) -> Stage:
        from .pseudo import scores

        def run() -> dict:
            start = time.perf_counter()
            sel = select_reliable(scores(self.results["label_teacher"]["parquet_dir"]),
                                  self.cfg.selection.reliable_fraction)
            _write_json(self.run_dir / "selection.json", selection_to_json(sel))
            return {"wall_s": time.perf_counter() - start, "reliable": sel.reliable, "unreliable": sel.unreliable,
                    "path": str(self.run_dir / "selection.json")}

        return Stage("select", fp, run)

    def _pseudo_source(self, label_stage: str, ids: list[str]) -> dict:
        paths = {s.image_id: str(s.image_path) for s in self.unlabeled}
        return {"parquet_dir": self.results[label_stage]["parquet_dir"], "image_paths": {i: paths[i] for i in ids}}

    def stages(self) -> list[Stage]:
        cfg = self.cfg
        ckpt_epochs = cfg.checkpoint_epochs()
        final_only = [cfg.stage_epochs("student")]
        data = self.data_stage()
        teacher_fp = cfg.fingerprint(*TEACHER_KEYS)
        graph = [data, self.train_stage("teacher", teacher_fp, lambda: [], ckpt_epochs)]
        if cfg.method == "supervised":
            return graph
        label_fp = chain(teacher_fp, cfg.fingerprint(*LABEL_KEYS), cfg.method)
        all_u = lambda: self.unlabeled  # noqa: E731
        graph.append(self.label_stage("label_teacher", label_fp, "teacher", all_u, scoring=cfg.method == "stpp"))
        if cfg.method == "st":
            student_fp = chain(label_fp, "student", str(cfg.train.student_epochs))
            graph.append(self.train_stage(
                "student", student_fp,
                lambda: [self._pseudo_source("label_teacher", [s.image_id for s in self.unlabeled])], final_only))
            return graph
        select_fp = chain(label_fp, cfg.fingerprint(*SELECT_KEYS))
        s1_fp = chain(select_fp, "student1", str(cfg.train.student_epochs))
        l1_fp = chain(s1_fp, "label_student1")
        s2_fp = chain(l1_fp, "student2")
        reliable = lambda: self.results["select"]["reliable"]  # noqa: E731
        unreliable = lambda: self.results["select"]["unreliable"]  # noqa: E731
        by_id = lambda ids: [s for s in self.unlabeled if s.image_id in set(ids)]  # noqa: E731
        graph += [
            self.select_stage(select_fp),
            self.train_stage("student1", s1_fp, lambda: [self._pseudo_source("label_teacher", reliable())], final_only),
            self.label_stage("label_student1", l1_fp, "student1", lambda: by_id(unreliable()), scoring=False),
            self.train_stage("student2", s2_fp, lambda: [
                self._pseudo_source("label_teacher", reliable()),
                self._pseudo_source("label_student1", unreliable()),
            ], final_only),
        ]
        return graph

    # ---- running ------------------------------------------------------------------------
    def run(self) -> dict:
        from .report import write_report

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.prepare_data()
        timeline = []
        for stage in self.stages():
            previous = self.manifest.done(stage)
            if previous is not None:
                print(f"[pipeline] stage '{stage.name}' already done: reusing its outputs", flush=True)
                self.results[stage.name] = previous
                timeline.append({"name": stage.name, "reused": True, **_brief(previous)})
                continue
            if stage.name != "check_data":
                from .ray_session import init_ray
                init_ray(self.cfg)
            print(f"[pipeline] stage '{stage.name}' starting", flush=True)
            start = time.perf_counter()
            result = stage.run()
            result.setdefault("wall_s", time.perf_counter() - start)
            self.results[stage.name] = result
            self.manifest.record(stage, result)
            timeline.append({"name": stage.name, "reused": False, **_brief(result)})
            write_report(self.cfg, self.run_dir, self.results, timeline, partial=True)
        return write_report(self.cfg, self.run_dir, self.results, timeline, partial=False,
                            image_paths={s.image_id: str(s.image_path) for s in self.unlabeled})


def _brief(result: dict) -> dict:
    keys = ("wall_s", "miou", "best_miou", "images", "images_per_s", "train_images_per_s", "epochs")
    return {k: result[k] for k in keys if k in result}
