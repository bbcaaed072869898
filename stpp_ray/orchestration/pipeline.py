"""Running a method's stage graph in a run directory, with its manifest.

The method builds its stages (`methods.get_method(cfg.method).stages`) from the
`StageBuilder` this pipeline is: the data check, Ray Train stages, Ray Data labeling
passes and ST++'s selection. Stages already done with the same fingerprint are reused
(`manifest.py`); training stages resume inside the stage from Ray Train's last checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa

from ..config import Config
from ..datasets import (Sample, build_samples, check_disjoint, check_samples, read_split, resolve_path,
                        sample_for_check)
from ..demo_data import ensure_demo_dataset
from ..image_pool import ImagePool, distinct_sorted, release_arrow_memory, write_pool
from ..files import locked
from ..methods import get_method
from ..methods.base import PseudoLabels, Stage, derive_fingerprint
from ..methods.self_training import shared_fingerprint
from ..selection import read_ranking, select_reliable, write_ranking, write_selection_json
from ..storage import check_writable, is_uri, location, remove_tree
from ..tracking import NullTracker, make_tracker
from .manifest import Manifest


class Pipeline:
    """Builds and runs the stage graph of `cfg.method` in `cfg.run.output_dir`."""

    def __init__(self, cfg: Config, shared_root: Path | None = None, train_callbacks: Callable[[], list] | None = None,
                 tracking_parent: str | None = None, tracking_params: dict | None = None):
        """`shared_root` (sweeps): the shared stages live in `shared_root/<shared fingerprint>`,
        reused by every run with the same teacher config. `train_callbacks` makes the Ray Train
        callbacks of each training stage that is not shared (a sweep's Tune reporting).
        `tracking_parent`: the MLflow run this run's MLflow run nests under (a sweep's)."""
        self.cfg = cfg
        self.method = get_method(cfg.method)
        self.run_dir = location(cfg.run.output_dir).resolve()  # a directory or an object-store URI
        self.root = location(cfg.data.root).resolve()
        check_writable(self.run_dir)  # before the manifest is read: one error naming the store's answer
        self.shared_dir = Path(shared_root).resolve() / shared_fingerprint(cfg) if shared_root else self.run_dir
        self.train_callbacks = train_callbacks
        self.manifest = Manifest(self.run_dir / "manifest.json")
        self.shared_manifest = Manifest(self.shared_dir / "manifest.json") if shared_root else self.manifest
        self.results: dict[str, dict] = {}
        self.tracking_parent, self.tracking_params = tracking_parent, tracking_params
        self.tracker = NullTracker()

    def _shared_lock(self) -> Path | None:
        """The lock file of the shared stages when they live outside this run (sweeps)."""
        return self.shared_dir.with_suffix(".lock") if self.shared_dir != self.run_dir else None

    def home(self, stage: str) -> Path:
        """Directory holding a stage's outputs."""
        return self.shared_dir if stage in self.method.shared_stages else self.run_dir

    # ---- data -----------------------------------------------------------------
    def _split(self, role: str, split: str) -> str:
        d = self.cfg.data
        if d.max_images:
            # data.max_images: the first N ids, written to the run directory so that only
            # their files need to exist and the run records which images it used.
            entries = read_split(self.root, split)[:d.max_images]
            subset = self.run_dir / "subset_splits" / f"{role}.txt"
            subset.parent.mkdir(parents=True, exist_ok=True)
            subset.write_text(f"# the first {len(entries)} ids of {split} (data.max_images={d.max_images})\n"
                              + "".join(e + "\n" for e in entries))
            split = str(subset)
        return split

    def _samples(self, role: str, split: str) -> list[Sample]:
        return build_samples(self.cfg.data.layout, self.root, self._split(role, split), with_masks=True)

    def prepare_data(self) -> None:
        cfg, d = self.cfg, self.cfg.data
        if d.demo and is_uri(self.root):
            raise ValueError(f"data.root={self.root}: the demo dataset is generated on local disk; give a "
                             "directory, or upload the dataset there and set data.demo=false")
        if d.demo:
            ensure_demo_dataset(self.root, seed=d.demo_seed, num_train=d.demo_num_train,
                                num_val=d.demo_num_val, image_size=d.demo_image_size)
        self.labeled = self._samples("labeled", d.labeled_split)
        self.val = self._samples("val", d.val_split)
        self.unlabeled = ImagePool.of([])
        if self.method.uses_unlabeled:
            self.unlabeled = ImagePool.read(d.layout, self.root, self._split("unlabeled", d.unlabeled_split))
            labeled, val = [s.image_id for s in self.labeled], [s.image_id for s in self.val]
            check_disjoint(labeled, self.unlabeled.among(labeled + val), val)  # only the overlaps matter
            release_arrow_memory()
        if cfg.model.pretrained not in ("none", "imagenet"):
            from ..models import build_backbone
            # Fail here, naming the file, rather than inside every Train worker.
            build_backbone(cfg.model.backbone, cfg.model.output_stride, cfg.model.pretrained)
        if self.method.online and len(self.unlabeled) < cfg.unlabeled_batch_size():
            raise ValueError(f"{resolve_path(self.root, d.unlabeled_split)}: {len(self.unlabeled)} unlabeled images are "
                             f"fewer than one global unlabeled batch ({cfg.unlabeled_batch_size()})")
        if len(self.labeled) < cfg.train.batch_size:
            raise ValueError(f"{resolve_path(self.root, d.labeled_split)}: {len(self.labeled)} labeled images "
                             f"are fewer than one global batch (train.batch_size={cfg.train.batch_size})"
                             + (f" with data.max_images={d.max_images}" if d.max_images else ""))

    # ---- the StageBuilder a method builds its graph with ------------------------------------
    def data(self) -> Stage:
        fp = derive_fingerprint(self.cfg.fingerprint("data"), "with_unlabeled" if self.unlabeled else "labeled_only")

        def run() -> dict:
            start = time.perf_counter()
            d = self.cfg.data
            unlabeled = self.unlabeled
            if d.check_images == "sample":
                unlabeled = sample_for_check(self.unlabeled, d.check_sample_size, self.cfg.run.seed)
            where = {}
            if d.check_images:
                for samples in (self.labeled, self.val):
                    check_samples(samples, d.num_classes, d.layout)
                if len(unlabeled) and len(unlabeled) >= d.check_on_cluster_from:
                    from ..cluster.check import check_pool_on_cluster
                    from ..cluster.session import init_ray

                    init_ray(self.cfg)
                    pool = unlabeled if isinstance(unlabeled, ImagePool) else ImagePool.of(unlabeled)
                    where = check_pool_on_cluster(pool, d.layout)
                else:
                    check_samples(unlabeled, d.num_classes, d.layout)
                    where = {"checked_on": "driver"}
            return {"wall_s": time.perf_counter() - start, "labeled": len(self.labeled),
                    "unlabeled": len(self.unlabeled), "val": len(self.val),
                    "unlabeled_checked": len(unlabeled) if d.check_images else 0, **where}

        return Stage("check_data", fp, run)

    def unlabeled_ids(self) -> pa.Array:
        return self.unlabeled.ids

    def result(self, stage: str) -> dict:
        return self.results[stage]

    def selected(self, reliable: bool) -> pa.Table:
        return read_ranking(self.results["select"]["ranking"]).part(reliable)

    def pseudo_labels(self, label_stage: str, images: pa.Table | pa.Array | Sequence[str]) -> PseudoLabels:
        from ..pseudo_labels import write_selection

        ids, rows = _ids_and_rows(images)
        if self.results.get("select", {}).get("scored") != label_stage:
            rows = None  # the rows the select stage recorded are those of the shards it scored
        if rows is None:
            ids = distinct_sorted(ids)  # sorted once here, so write_selection takes them as they are
        parquet_dir, count = self.results[label_stage]["parquet_dir"], len(ids)
        selection = write_selection(self.run_dir / "selections", label_stage, parquet_dir, ids, rows) if count else ""
        return PseudoLabels(parquet_dir, selection, count)

    def train(self, name: str, fingerprint: str, *, kind: str, epochs: int, checkpoint_epochs: Sequence[int],
              pseudo: Callable[[], list[PseudoLabels]] = list, cfg: Config | None = None, init_from: str = "",
              unlabeled: bool = False) -> Stage:
        from ..cluster.train import fit_stage
        from ..stage_setup import StageSpec

        cfg = cfg or self.cfg

        def run() -> dict:
            home = self.home(name)
            stage_dir = _fresh_stage_dir(home / name, fingerprint)
            rows = lambda samples: [[s.image_id, str(s.image_path), str(s.mask_path)] for s in samples]  # noqa: E731
            spec = StageSpec(name=name, stage_dir=str(stage_dir), fingerprint=fingerprint, labeled=rows(self.labeled),
                             val=rows(self.val), method=cfg.method, kind=kind, epochs=epochs, pseudo=pseudo(),
                             checkpoint_epochs=list(checkpoint_epochs),
                             unlabeled=write_pool(self.run_dir / "selections", "unlabeled", self.unlabeled) if unlabeled else "",
                             init_weights=self.results[init_from]["final_checkpoint"] if init_from else "")
            callbacks = self.train_callbacks() if self.train_callbacks and name not in self.method.shared_stages else []
            return fit_stage(cfg, spec, home / "ray_train", callbacks=callbacks)

        return Stage(name, fingerprint, run)

    def label(self, name: str, fingerprint: str, model_stage: str,
              image_ids: Callable[[], pa.Table | pa.Array | Sequence[str]], scoring: bool) -> Stage:
        from ..cluster.label import run_labeling
        from ..weights import architecture

        def run() -> dict:
            trained = self.results[model_stage]
            label_ckpt = trained["best_checkpoint" if self.cfg.label.teacher == "best" else "final_checkpoint"]
            ckpts = trained["checkpoints"] if scoring else [label_ckpt]
            if scoring and self.cfg.label.teacher == "final":
                # The last scoring checkpoint is the final epoch's weights, saved twice: naming
                # it lets the Labeler reuse its forward pass for the pseudo-labels.
                label_ckpt = ckpts[-1]
            images = self.unlabeled.subset(_ids_and_rows(image_ids())[0])
            out = self.home(name) / "pseudo_labels" / name.removeprefix("label_")
            if not len(images):  # e.g. R = 1 leaves no unreliable image for student1 to label
                print(f"[{name}] no images to label", flush=True)
                return {"images": 0, "wall_s": 0.0, "images_per_s": None, "parquet_dir": str(out)}
            print(f"[{name}] labeling {len(images)} images with {model_stage} "
                  f"({len(ckpts)} checkpoint(s) scored, TTA {'on' if self.cfg.label.tta else 'off'})", flush=True)
            stats = run_labeling(self.cfg, images, ckpts, label_ckpt, out,
                                 architecture(self.cfg.model, self.cfg.data.num_classes))
            print(f"[{name}] {stats['images']} images in {stats['wall_s']:.1f} s "
                  f"({stats['images_per_s']:.1f} img/s) -> {out}", flush=True)
            return {**stats, "parquet_dir": str(out)}

        return Stage(name, fingerprint, run)

    def select(self, fingerprint: str, label_stage: str) -> Stage:
        from ..pseudo_labels import scores

        def run() -> dict:
            start = time.perf_counter()
            # The score of this K from the stored per-checkpoint IoUs (the teacher may have saved more).
            sel = select_reliable(scores(self.results[label_stage]["parquet_dir"], self.cfg.checkpoint_epochs()),
                                  self.cfg.selection.reliable_fraction)
            path = self.run_dir / "selection.json"
            write_selection_json(sel, path)
            ranking = write_ranking(sel, self.run_dir / "selection.arrow")
            return {"wall_s": time.perf_counter() - start, "reliable_images": sel.num_reliable,
                    "unreliable_images": len(sel.ranked) - sel.num_reliable, "path": str(path), "ranking": ranking,
                    "scored": label_stage}

        return Stage("select", fingerprint, run, needs=("ranking",))

    # ---- running ------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        return self.method.stages(self.cfg, self)

    def run(self) -> dict:
        from .report import write_report

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tracker = make_tracker(self.cfg, self.run_dir, self.tracking_parent, self.tracking_params)
        try:
            self.prepare_data()
            timeline: list[dict] = []
            stages = self.stages()
            shared = self.method.shared_stages
            with locked(self._shared_lock()):
                for stage in stages:
                    if stage.name in shared:
                        self._run_stage(stage, self.shared_manifest, timeline)
            for stage in stages:
                if stage.name not in shared:
                    self._run_stage(stage, self.manifest, timeline)
            report = write_report(self.cfg, self.run_dir, self.results, timeline, partial=False)
        except BaseException:
            self.tracker.failed()
            raise
        pictures = [*report.get("pictures", []), (report.get("selection") or {}).get("picture")]
        self.tracker.finish(["report.json", "report.md", *filter(None, pictures)],
                            {"final_miou": report["final"].get("miou"), "teacher_miou": report["teacher"].get("miou")})
        return report

    def run_shared(self) -> dict[str, dict]:
        """Only the shared stages (a sweep's driver runs them before any trial)."""
        self.shared_dir.mkdir(parents=True, exist_ok=True)
        self.tracker = make_tracker(self.cfg, self.shared_dir, self.tracking_parent, self.tracking_params)
        self.prepare_data()
        timeline: list[dict] = []
        with locked(self._shared_lock()):
            for stage in self.stages():
                if stage.name in self.method.shared_stages:
                    self._run_stage(stage, self.shared_manifest, timeline, report=False)
        self.tracker.finish([], {})
        return {entry["name"]: entry for entry in timeline}

    def _run_stage(self, stage: Stage, manifest: Manifest, timeline: list[dict], report: bool = True) -> None:
        from .report import write_report

        previous = manifest.done(stage)
        if previous is not None:
            print(f"[pipeline] stage '{stage.name}' already done: reusing its outputs", flush=True)
            self.results[stage.name] = previous
            timeline.append({"name": stage.name, "reused": True, **_brief(previous)})
            # Logged now if an earlier run did not (tracking turned on later, or a crash), except
            # a sweep trial's shared stages: the run that trained them logged them.
            if stage.name not in self.method.shared_stages or self.shared_dir == self.run_dir or not report:
                self.tracker.stage_reused(stage.name, self.home(stage.name) / stage.name, previous)
            return
        if stage.name != "check_data":
            from ..cluster.session import init_ray
            init_ray(self.cfg)
        print(f"[pipeline] stage '{stage.name}' starting", flush=True)
        follower = self.tracker.stage_started(stage.name, self.home(stage.name) / stage.name)
        start = time.perf_counter()
        try:
            result = stage.run()
        except BaseException:
            self.tracker.stage_finished(follower, {}, status="FAILED")
            raise
        result.setdefault("wall_s", time.perf_counter() - start)
        self.results[stage.name] = result
        manifest.record(stage, result)
        self.tracker.stage_finished(follower, result)
        timeline.append({"name": stage.name, "reused": False, **_brief(result)})
        release_arrow_memory()  # what the stage freed, before the next one
        if report:
            write_report(self.cfg, self.run_dir, self.results, timeline, partial=True)


def _ids_and_rows(images: pa.Table | pa.Array | Sequence[str]) -> tuple[pa.Array, np.ndarray | None]:
    """Image ids (Arrow) and, from a table of the select stage (`Selection.part`), their rows."""
    if isinstance(images, pa.Table):
        rows = images.column("row").to_numpy() if "row" in images.column_names else None
        return images.column("image_id").combine_chunks(), rows
    return (images if isinstance(images, pa.Array) else pa.array(list(map(str, images)), pa.string())), None


def _fresh_stage_dir(stage_dir: Path, fingerprint: str) -> Path:
    """The stage's directory, emptied if it holds the outputs of another config (never mixed)."""
    marker = stage_dir / ".fingerprint"
    if stage_dir.exists() and (not marker.exists() or marker.read_text() != fingerprint):
        remove_tree(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(fingerprint)
    return stage_dir


def _brief(result: dict) -> dict:
    keys = ("wall_s", "miou", "student_miou", "best_miou", "images", "images_per_s", "train_images_per_s", "epochs",
            "steps", "train_images", "compute_s", "startup_s", "teardown_s")
    return {k: result[k] for k in keys if k in result}
