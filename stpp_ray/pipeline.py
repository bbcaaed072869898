"""The stage graphs of SupOnly, ST and ST++, the run directory and its manifest.

Each stage has a fingerprint: a hash of the config keys it depends on chained with
its upstream stage's fingerprint. A stage whose recorded fingerprint matches is
reused; otherwise it (and so everything downstream) is recomputed, and the reason is
printed. Training stages resume inside the stage from Ray Train's last checkpoint.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .checkpoints import architecture
from .config import ONLINE_METHODS, Config
from .datasets import Sample, build_samples, check_disjoint, check_samples, read_split, resolve_path
from .demo_data import ensure_demo_dataset
from .selection import select_reliable, selection_to_json

TEACHER_KEYS = (
    "data.layout", "data.root", "data.num_classes", "data.labeled_split", "data.val_split", "data.crop_size", "data.base_size", "data.max_images",
    "data.demo", "data.demo_seed", "data.demo_num_train", "data.demo_num_val", "data.demo_image_size", "model", "train.epochs", "train.batch_size", "train.lr",
    "train.head_lr_multiplier", "train.momentum", "train.weight_decay", "train.poly_power",
    "train.eval_interval", "train.amp", "train.sync_batchnorm", "eval", "run.seed",
)
LABEL_KEYS = ("data.unlabeled_split", "label.teacher", "label.tta", "label.tta_scales")
SELECT_KEYS = ("selection.reliable_fraction", "selection.num_checkpoints")
ONLINE_KEYS = ("data.unlabeled_split", "semi.epochs", "semi.unlabeled_batch_size", "semi.ema_decay",
               "semi.consistency_weight", "semi.rampup_fraction", "semi.unsup_weight", "semi.u2pl_alpha0",
               "semi.u2pl_warmup_epochs", "semi.confidence_threshold", "semi.feature_dropout", "semi.cutmix_prob",
               "train.student_epochs")
DMT_KEYS = ("semi.dmt_gamma1", "semi.dmt_gamma2", "semi.dmt_phase_epochs", "semi.dmt_lr", "semi.dmt_head_lr_multiplier",
            "semi.dmt_weight_decay", "train.student_epochs")
# Stages that depend on neither R nor K: a sweep runs them once per distinct teacher config.
SHARED_STAGES = ("check_data", "teacher", "label_teacher")


def chain(parent: str, *parts: str) -> str:
    return hashlib.sha256("/".join((parent,) + parts).encode()).hexdigest()[:16]


def teacher_fingerprint(cfg: Config) -> str:
    """The teacher's config keys plus the epochs it saves checkpoints at (not K itself)."""
    return chain(cfg.fingerprint(*TEACHER_KEYS), "checkpoints", str(cfg.scoring_checkpoint_epochs()))


def shared_fingerprint(cfg: Config) -> str:
    """Fingerprint of the shared stages (teacher and its labeling pass)."""
    return chain(teacher_fingerprint(cfg), cfg.fingerprint(*LABEL_KEYS), cfg.method)


@contextmanager
def _locked(path: Path | None):
    """Exclusive lock on `path` (no-op for None): concurrent trials wait for one shared teacher."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


class Pipeline:
    """Builds and runs the stage graph of `cfg.method` in `cfg.run.output_dir`."""

    def __init__(self, cfg: Config, fault_epoch: int = 0, fault_stage: str = "", shared_root: Path | None = None,
                 train_callbacks: Callable[[], list] | None = None):
        """`shared_root` (sweeps): the shared stages live in `shared_root/<shared fingerprint>`,
        reused by every run with the same teacher config. `train_callbacks` makes the Ray Train
        callbacks of each student stage (a sweep's Tune reporting)."""
        self.cfg = cfg
        self.run_dir = Path(cfg.run.output_dir).resolve()
        self.root = Path(cfg.data.root).resolve()
        self.fault_epoch, self.fault_stage = fault_epoch, fault_stage
        self.shared_dir = Path(shared_root).resolve() / shared_fingerprint(cfg) if shared_root else self.run_dir
        self.train_callbacks = train_callbacks
        self.manifest = Manifest(self.run_dir / "manifest.json")
        self.shared_manifest = Manifest(self.shared_dir / "manifest.json") if shared_root else self.manifest
        self.results: dict[str, dict] = {}

    def _shared_lock(self) -> Path | None:
        """The lock file of the shared stages when they live outside this run (sweeps)."""
        return self.shared_dir.with_suffix(".lock") if self.shared_dir != self.run_dir else None

    def home(self, stage: str) -> Path:
        """Directory holding a stage's outputs."""
        return self.shared_dir if stage in SHARED_STAGES else self.run_dir

    # ---- data -----------------------------------------------------------------
    def prepare_data(self) -> None:
        cfg = self.cfg
        if cfg.data.demo:
            ensure_demo_dataset(self.root, seed=cfg.data.demo_seed, num_train=cfg.data.demo_num_train,
                                num_val=cfg.data.demo_num_val, image_size=cfg.data.demo_image_size)
        d = cfg.data

        def samples(role: str, split: str, with_masks: bool) -> list[Sample]:
            if d.max_images:
                # data.max_images: the first N ids, written to the run directory so that only
                # their files need to exist and the run records which images it used.
                entries = read_split(self.root, split)[:d.max_images]
                subset = self.run_dir / "subset_splits" / f"{role}.txt"
                subset.parent.mkdir(parents=True, exist_ok=True)
                subset.write_text(f"# the first {len(entries)} ids of {split} (data.max_images={d.max_images})\n"
                                  + "".join(e + "\n" for e in entries))
                split = str(subset)
            return build_samples(d.layout, self.root, split, with_masks=with_masks)

        self.labeled = samples("labeled", d.labeled_split, with_masks=True)
        self.val = samples("val", d.val_split, with_masks=True)
        self.unlabeled: list[Sample] = []
        if cfg.method != "supervised":
            self.unlabeled = samples("unlabeled", d.unlabeled_split, with_masks=False)
            check_disjoint([s.image_id for s in self.labeled], [s.image_id for s in self.unlabeled],
                           [s.image_id for s in self.val])
        if cfg.model.pretrained not in ("none", "imagenet"):
            from .models import build_backbone
            # Fail here, naming the file, rather than inside every Train worker.
            build_backbone(cfg.model.backbone, cfg.model.output_stride, cfg.model.pretrained)
        if cfg.method in ONLINE_METHODS and len(self.unlabeled) < cfg.unlabeled_batch_size():
            raise ValueError(f"{resolve_path(self.root, d.unlabeled_split)}: {len(self.unlabeled)} unlabeled images are "
                             f"fewer than one global unlabeled batch ({cfg.unlabeled_batch_size()})")
        if len(self.labeled) < cfg.train.batch_size:
            raise ValueError(f"{resolve_path(self.root, d.labeled_split)}: {len(self.labeled)} labeled images "
                             f"are fewer than one global batch (train.batch_size={cfg.train.batch_size})"
                             + (f" with data.max_images={d.max_images}" if d.max_images else ""))

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

    def train_stage(self, name: str, fp: str, pseudo: Callable[[], list[dict]], checkpoint_epochs: list[int],
                    cfg: Config | None = None, init_from: str = "", unlabeled: bool = False) -> Stage:
        """`cfg`: a variant of the run's config (DMT's second model); `init_from`: the stage
        whose final weights this one fine-tunes; `unlabeled`: the online methods' stream."""
        from .train_ray import StageSpec, fit_stage

        cfg = cfg or self.cfg

        def run() -> dict:
            home = self.home(name)
            stage_dir = home / name
            marker = stage_dir / ".fingerprint"
            if stage_dir.exists() and (not marker.exists() or marker.read_text() != fp):
                shutil.rmtree(stage_dir)  # outputs of another config: never mixed with this one's
            stage_dir.mkdir(parents=True, exist_ok=True)
            marker.write_text(fp)
            spec = StageSpec(name=name, stage_dir=str(stage_dir), fingerprint=fp, labeled=self._rows(self.labeled),
                             val=self._rows(self.val), pseudo=pseudo(), checkpoint_epochs=checkpoint_epochs,
                             fault_epoch=self.fault_epoch if name == self.fault_stage else 0,
                             unlabeled=[str(s.image_path) for s in self.unlabeled] if unlabeled else [],
                             init_weights=self.results[init_from]["final_checkpoint"] if init_from else "")
            callbacks = self.train_callbacks() if self.train_callbacks and name not in SHARED_STAGES else []
            result = fit_stage(cfg, spec, home / "ray_train", callbacks=callbacks)
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
            if scoring and self.cfg.label.teacher == "final":
                # The last scoring checkpoint is the final epoch's weights, saved twice: naming
                # it lets the Labeler reuse its forward pass for the pseudo-labels.
                label_ckpt = ckpts[-1]
            samples = images()
            out = self.home(name) / "pseudo_labels" / name.removeprefix("label_")
            if not samples:  # e.g. R = 1 leaves no unreliable image for student1 to label
                print(f"[{name}] no images to label", flush=True)
                return {"images": 0, "wall_s": 0.0, "images_per_s": None, "parquet_dir": str(out)}
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
            # The score of this K from the stored per-checkpoint IoUs (the teacher may have saved more).
            sel = select_reliable(scores(self.results["label_teacher"]["parquet_dir"], self.cfg.checkpoint_epochs()),
                                  self.cfg.selection.reliable_fraction)
            _write_json(self.run_dir / "selection.json", selection_to_json(sel))
            return {"wall_s": time.perf_counter() - start, "reliable": sel.reliable, "unreliable": sel.unreliable,
                    "path": str(self.run_dir / "selection.json")}

        return Stage("select", fp, run)

    def _pseudo_source(self, label_stage: str, ids: list[str]) -> dict:
        paths = {s.image_id: str(s.image_path) for s in self.unlabeled}
        return {"parquet_dir": self.results[label_stage]["parquet_dir"], "image_paths": {i: paths[i] for i in ids}}

    def online_stages(self) -> list[Stage]:
        """Mean Teacher, U2PL, UniMatch: one training stage on the labeled and unlabeled streams."""
        cfg = self.cfg
        fp = chain(cfg.fingerprint(*TEACHER_KEYS, *ONLINE_KEYS, "method"), "online")
        return [self.data_stage(), self.train_stage("online", fp, lambda: [], [cfg.stage_epochs("online")], unlabeled=True)]

    def dmt_stages(self, graph: list[Stage]) -> list[Stage]:
        """DMT after the teacher (model A): a second teacher B (another seed), then per phase p
        with ratio r_p, A_{p-1} and B_{p-1} label U, and each fine-tunes on the other's labels
        (the top r_p of each class). The last phase trains A only: A_n is the result."""
        cfg = self.cfg
        cfg_b = cfg.model_copy(update={"run": cfg.run.model_copy(update={"seed": cfg.run.seed + cfg.semi.dmt_seed_offset})})
        label_fp = cfg.fingerprint(*LABEL_KEYS)
        phase_fp = cfg.fingerprint(*DMT_KEYS)
        models = {"a": ("teacher", teacher_fingerprint(cfg)), "b": ("teacher_b", chain(teacher_fingerprint(cfg_b), "teacher_b"))}
        graph.append(self.train_stage("teacher_b", models["b"][1], lambda: [], [cfg.train.epochs], cfg=cfg_b))
        all_u = lambda: self.unlabeled  # noqa: E731
        ratios = cfg.semi.dmt_ratios
        for p, ratio in enumerate(ratios, start=1):
            last = p == len(ratios)
            labels = {}
            for who in ("b",) if last else ("a", "b"):
                stage, fp = models[who]
                labels[who] = (f"dmt_label_{stage}", chain(fp, "label", label_fp))
                graph.append(self.label_stage(labels[who][0], labels[who][1], stage, all_u, scoring=False))
            trained = {}
            for who, other in (("a", "b"),) if last else (("a", "b"), ("b", "a")):
                name = f"dmt_{who}{p}"
                fp = chain(models[who][1], labels[other][1], phase_fp, str(ratio))
                source = lambda label=labels[other][0], r=ratio: [{  # noqa: E731
                    **self._pseudo_source(label, [s.image_id for s in self.unlabeled]),
                    "curriculum_ratio": r, "num_classes": cfg.data.num_classes}]
                graph.append(self.train_stage(name, fp, source, [cfg.stage_epochs(name)],
                                              cfg=cfg if who == "a" else cfg_b, init_from=models[who][0]))
                trained[who] = (name, fp)
            models.update(trained)
        return graph

    def stages(self) -> list[Stage]:
        cfg = self.cfg
        if cfg.method in ONLINE_METHODS:
            return self.online_stages()
        final_only = [cfg.stage_epochs("student")]
        data = self.data_stage()
        graph = [data, self.train_stage("teacher", teacher_fingerprint(cfg), lambda: [], cfg.scoring_checkpoint_epochs())]
        if cfg.method == "supervised":
            return graph
        if cfg.method == "dmt":
            return self.dmt_stages(graph)
        label_fp = shared_fingerprint(cfg)
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
        timeline: list[dict] = []
        stages = self.stages()
        with _locked(self._shared_lock()):
            for stage in stages:
                if stage.name in SHARED_STAGES:
                    self._run_stage(stage, self.shared_manifest, timeline)
        for stage in stages:
            if stage.name not in SHARED_STAGES:
                self._run_stage(stage, self.manifest, timeline)
        return write_report(self.cfg, self.run_dir, self.results, timeline, partial=False,
                            image_paths={s.image_id: str(s.image_path) for s in self.unlabeled})

    def run_shared(self) -> dict[str, dict]:
        """Only the shared stages (a sweep's driver runs them before any trial)."""
        self.shared_dir.mkdir(parents=True, exist_ok=True)
        self.prepare_data()
        timeline: list[dict] = []
        with _locked(self._shared_lock()):
            for stage in self.stages():
                if stage.name in SHARED_STAGES:
                    self._run_stage(stage, self.shared_manifest, timeline, report=False)
        return {entry["name"]: entry for entry in timeline}

    def _run_stage(self, stage: Stage, manifest: Manifest, timeline: list[dict], report: bool = True) -> None:
        from .report import write_report

        previous = manifest.done(stage)
        if previous is not None:
            print(f"[pipeline] stage '{stage.name}' already done: reusing its outputs", flush=True)
            self.results[stage.name] = previous
            timeline.append({"name": stage.name, "reused": True, **_brief(previous)})
            return
        if stage.name != "check_data":
            from .ray_session import init_ray
            init_ray(self.cfg)
        print(f"[pipeline] stage '{stage.name}' starting", flush=True)
        start = time.perf_counter()
        result = stage.run()
        result.setdefault("wall_s", time.perf_counter() - start)
        self.results[stage.name] = result
        manifest.record(stage, result)
        timeline.append({"name": stage.name, "reused": False, **_brief(result)})
        if report:
            write_report(self.cfg, self.run_dir, self.results, timeline, partial=True)


def _brief(result: dict) -> dict:
    keys = ("wall_s", "miou", "best_miou", "images", "images_per_s", "train_images_per_s", "epochs",
            "compute_s", "startup_s", "teardown_s")
    return {k: result[k] for k in keys if k in result}
