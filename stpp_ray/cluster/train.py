"""Ray Train glue: one training stage as a `TorchTrainer` run.

`train_loop_per_worker` is plain PyTorch around the training loops; the Ray calls are the
context (rank, world size, device), `get_checkpoint` for resume and `report` for metrics
and checkpoints. The worker is told its stage by a `StageSpec`: the method that built it
and the kind, epochs, inputs and initial weights. The driver side is `fit_stage`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

import ray.train
import ray.train.torch
from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError
from ray.train import CheckpointConfig, ControllerError, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from ..config import Config
from ..datasets import Sample
from ..evaluation import evaluate
from ..image_pool import ImagePaths, read_pool
from ..methods import get_method
from ..methods.base import ONLINE
from ..methods.online import cycle, train_online_epoch
from ..stage_setup import RankTraining, StageSpec, build_train_items, setup_rank
from ..storage import BucketPath, location, ray_storage_path
from ..training import rank_share, sample_seed, train_one_epoch
from ..weights import architecture, save_weights, unwrap

FAULT_MARKER = ".fault_injected"
# Tests only: "<stage>:<epoch>" makes one worker of that stage exit once, at that epoch.
FAULT_ENV = "STPP_RAY_TEST_FAULT"


def final_path(spec: StageSpec) -> Path:
    """The stage's final weights (the method's result when it is the final stage)."""
    return location(spec.stage_dir) / "final.pt"


def best_path(spec: StageSpec) -> Path:
    """The weights of the epoch with the best validation mIoU."""
    return location(spec.stage_dir) / "best.pt"


def checkpoint_path(spec: StageSpec, epoch: int) -> Path:
    """The weights saved at one of `spec.checkpoint_epochs` (ST++'s K checkpoints)."""
    return location(spec.stage_dir) / "checkpoints" / f"epoch_{epoch:03d}.pt"


def _device(cfg: Config) -> torch.device:
    if cfg.ray.use_gpu:
        return ray.train.torch.get_device()
    return torch.device("cpu")


def _write_metrics(stage_dir: Path, record: dict) -> None:
    path = stage_dir / "metrics.jsonl"
    if isinstance(path, BucketPath):  # an object cannot be appended to: written again whole
        path.write_text((path.read_text() if path.exists() else "") + json.dumps(record) + "\n")
        return
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(stage_dir: Path, last_epoch: int) -> None:
    """Drop metric lines of epochs that will be trained again after a resume."""
    path = stage_dir / "metrics.jsonl"
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["epoch"] <= last_epoch]
    path.write_text("".join(line + "\n" for line in keep))


def _shares(batch: int, world: int) -> str:
    sizes = sorted({hi - lo for lo, hi in (rank_share(batch, r, world) for r in range(world))})
    return " or ".join(map(str, sizes))


def _should_eval(epoch: int, epochs: int, interval: int) -> bool:
    return epoch == epochs or (interval > 0 and epoch % interval == 0)


class StageWorker:
    """One rank's training of one stage: set-up, resume, epochs, validation, outputs."""

    def __init__(self, cfg: Config, spec: StageSpec, rank: int, world: int):
        self.cfg, self.spec, self.rank, self.world = cfg, spec, rank, world
        self.stage_dir = location(spec.stage_dir)
        torch.set_num_threads(max(1, round(cfg.ray.cpus_per_worker)))
        self.device = _device(cfg)
        method = get_method(spec.method)
        training = method.training(spec.kind, cfg)
        self.online = method if spec.kind == ONLINE else None
        val_samples = [Sample(i, location(img), location(mask)) for i, img, mask in spec.val]
        self.setup: RankTraining = setup_rank(
            cfg, build_train_items(spec, training, cfg.data.num_classes), val_samples, spec.epochs, rank, world,
            self.device, training=training, online=self.online,
            unlabeled_paths=ImagePaths(read_pool(spec.unlabeled)) if self.online else (), init_weights=spec.init_weights)
        self.criterion = training.criterion
        self.arch = architecture(cfg.model, cfg.data.num_classes,
                                 self.online.projection_channels(cfg) if self.online else 0)
        self.method_state = self.online.make_state(cfg) if self.online else None
        self.start_epoch, self.best_miou = 0, -1.0

    def resume(self) -> None:
        """Load the latest reported checkpoint after a restart or rerun of the stage."""
        checkpoint = ray.train.get_checkpoint()  # Ray: the latest reported checkpoint, or None
        if checkpoint is None:
            return
        setup = self.setup
        with checkpoint.as_directory() as ckpt_dir:
            state = torch.load(Path(ckpt_dir) / "state.pt", map_location="cpu", weights_only=True)
        unwrap(setup.model).load_state_dict(state["model"])
        if setup.ema is not None:
            setup.ema.load_state_dict(state["ema"])
        setup.optimizer.load_state_dict(state["optimizer"])
        setup.scheduler.load_state_dict(state["scheduler"])
        if self.method_state is not None:
            self.method_state.load_state_dict(state["method_state"])
        self.start_epoch, self.best_miou = state["epoch"], state["best_miou"]
        if self.rank == 0:
            _say(f"[{self.spec.name}] resuming after epoch {self.start_epoch}/{self.spec.epochs}")

    def announce(self) -> None:
        cfg, spec, setup = self.cfg, self.spec, self.setup
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(self.stage_dir, self.start_epoch)
        unlabeled = f" + {len(setup.unlabeled_set)} unlabeled (global batch {cfg.unlabeled_batch_size()})" if self.online else ""
        _say(f"[{spec.name}] {len(setup.train_set)} training images{unlabeled}, {setup.steps_per_epoch()} steps/epoch, "
             f"global batch {cfg.train.batch_size} over {self.world} worker(s) ({_shares(cfg.train.batch_size, self.world)} each), "
             f"device {self.device}")

    def run(self) -> None:
        self.resume()
        if self.rank == 0:
            self.announce()
        writer = _tensorboard(self.stage_dir) if self.rank == 0 else None
        for epoch in range(self.start_epoch + 1, self.spec.epochs + 1):
            record = self.train_epoch(epoch)
            if _should_eval(epoch, self.spec.epochs, self.cfg.train.eval_interval):
                record.update(self.validate(epoch))
            if self.rank == 0:
                kept = self.kept_model(epoch)
                _save_epoch_outputs(self.spec, kept, self.arch, record)
                self.best_miou = _save_best(self.spec, kept, self.arch, record, self.best_miou)
                _log_epoch(writer, self.spec.name, record, self.spec.epochs)
            self.report(epoch, {k: v for k, v in record.items() if k != "val_iou"})
        if writer is not None:
            writer.close()

    def train_epoch(self, epoch: int) -> dict:
        cfg, spec, setup = self.cfg, self.spec, self.setup
        started_at = time.time()
        setup.sampler.set_epoch(epoch)
        setup.train_set.set_epoch(epoch)
        # Dropout draws from the global RNG: seed it per (epoch, rank) so that a run resumed
        # from a checkpoint repeats exactly what the uninterrupted run would have done.
        torch.manual_seed(sample_seed(cfg.run.seed, epoch, 1_000_000_000 + self.rank))
        self.maybe_fail(epoch)
        if self.online is not None:
            stats = self.train_online_epoch(epoch)
        else:
            stats = train_one_epoch(setup.model, setup.loader, setup.optimizer, setup.scheduler, self.device,
                                    amp=cfg.train.amp, criterion=self.criterion)
        record = {"stage": spec.name, "epoch": epoch, "loss": stats["loss"], "lr": stats["lr"],
                  "images_per_s": stats["images_per_s"], "train_seconds": stats["seconds"], "started_at": started_at,
                  "steps": stats["steps"], "images": stats["images"], "workers": self.world}
        record.update({k: v for k, v in stats.items() if k.startswith("loss_")})
        return record

    def train_online_epoch(self, epoch: int) -> dict:
        cfg, setup, epochs = self.cfg, self.setup, self.spec.epochs
        setup.unlabeled_sampler.set_epoch(epoch)
        setup.unlabeled_set.set_epoch(epoch)
        steps = setup.steps_per_epoch()
        return train_online_epoch(self.online, setup.model, setup.ema,
                                  cycle(setup.loader, setup.sampler, setup.train_set, epoch), setup.unlabeled_loader,
                                  setup.optimizer, setup.scheduler, self.device, cfg.semi, epoch=epoch, epochs=epochs,
                                  steps_done=(epoch - 1) * steps, total_steps=epochs * steps,
                                  warmup_steps=self.online.warmup_steps(cfg, steps), amp=cfg.train.amp,
                                  seed=cfg.run.seed, state=self.method_state)

    def maybe_fail(self, epoch: int) -> None:
        """Simulated crash of one worker process (tests only), a few seconds into the epoch as
        in a real crash: Ray Train collects the previous epoch's report asynchronously, and a
        process dying at once could lose it."""
        if self.spec.fault_epoch == epoch and self.rank == self.world - 1 and not (self.stage_dir / FAULT_MARKER).exists():
            time.sleep(5)
            (self.stage_dir / FAULT_MARKER).write_text(str(time.time()))
            os._exit(1)

    def kept_model(self, epoch: int):
        """The model validated and saved: the EMA teacher where there is one (Mean Teacher's code
        picks its best by the EMA model, U2PL's saves and validates the teacher), except in
        warm-up epochs, whose teacher is not trained yet (U2PL's code validates the student there)."""
        setup = self.setup
        if setup.ema is None:
            return setup.model
        steps = setup.steps_per_epoch()
        return setup.model if self.online.warmup_steps(self.cfg, steps) >= epoch * steps else setup.ema

    def validate(self, epoch: int) -> dict:
        cfg, setup = self.cfg, self.setup
        eval_start = time.perf_counter()
        eval_options = cfg.eval.options(cfg.data.crop_size)
        cm = evaluate(self.kept_model(epoch), setup.val_loader, cfg.data.num_classes, self.device, **eval_options)
        out = {"val_miou": cm.miou(), "val_iou": [None if v != v else float(v) for v in cm.iou()]}
        if setup.ema is not None:
            out["student_val_miou"] = evaluate(setup.model, setup.val_loader, cfg.data.num_classes, self.device,
                                               **eval_options).miou()
        out["eval_seconds"] = time.perf_counter() - eval_start
        return out

    def report(self, epoch: int, metrics: dict) -> None:
        """Ray Train hears at checkpoint epochs only (every epoch's metrics are in metrics.jsonl)."""
        if epoch % self.cfg.train.checkpoint_interval and epoch != self.spec.epochs:
            return
        if self.rank != 0:
            ray.train.report(metrics)  # Ray: every rank reports at each checkpoint epoch
            return
        setup = self.setup
        with tempfile.TemporaryDirectory() as tmp:
            state = {"model": unwrap(setup.model).state_dict(), "optimizer": setup.optimizer.state_dict(),
                     "scheduler": setup.scheduler.state_dict(), "epoch": epoch, "best_miou": self.best_miou}
            if setup.ema is not None:
                state["ema"] = setup.ema.state_dict()
            if self.method_state is not None:  # U2PL's memory banks, the same on every rank
                state["method_state"] = self.method_state.state_dict()
            torch.save(state, Path(tmp) / "state.pt")
            # Ray: rank 0 reports the resumable state; Ray copies it to the run's storage.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"epoch_{epoch:04d}")


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker: plain PyTorch DDP training of one stage."""
    ctx = ray.train.get_context()  # Ray: this worker's rank and the world size
    StageWorker(Config.model_validate(loop_config["config"]), StageSpec.from_dict(loop_config["stage"]),
                ctx.get_world_rank(), ctx.get_world_size()).run()


def _save_epoch_outputs(spec: StageSpec, model, arch: dict, record: dict) -> None:
    """The ST++ checkpoint of this epoch (if it is one), the final weights, the metrics line."""
    epoch = record["epoch"]
    if epoch in spec.checkpoint_epochs:
        save_weights(checkpoint_path(spec, epoch), model, arch, epoch=epoch, stage=spec.name)
    if epoch == spec.epochs:
        save_weights(final_path(spec), model, arch, epoch=epoch, stage=spec.name, val_miou=record.get("val_miou"))
    _write_metrics(location(spec.stage_dir), record)


def _save_best(spec: StageSpec, model, arch: dict, record: dict, best_miou: float) -> float:
    miou = record.get("val_miou")
    if miou is None or miou <= best_miou:
        return best_miou
    save_weights(best_path(spec), model, arch, epoch=record["epoch"], stage=spec.name, val_miou=miou)
    return miou


def _say(line: str) -> None:
    """One progress line on the worker's stdout (Ray Train's patched print would log it twice)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _tensorboard(stage_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but logging must never stop training
        return None
    if isinstance(stage_dir, BucketPath):
        return _UploadedSummaryWriter(stage_dir / "tensorboard")
    return SummaryWriter(log_dir=str(stage_dir / "tensorboard"))


class _UploadedSummaryWriter:
    """TensorBoard event files written locally and uploaded to the bucket at each flush."""

    def __init__(self, target: BucketPath):
        from torch.utils.tensorboard import SummaryWriter

        self.target, self.local = target, tempfile.mkdtemp(prefix="stpp_ray_tb_")
        self.writer = SummaryWriter(log_dir=self.local)

    def add_scalar(self, *args) -> None:
        self.writer.add_scalar(*args)

    def flush(self) -> None:
        self.writer.flush()
        self._upload()

    def close(self) -> None:
        self.writer.close()
        self._upload()
        shutil.rmtree(self.local, ignore_errors=True)

    def _upload(self) -> None:
        for path in Path(self.local).iterdir():
            (self.target / path.name).write_bytes(path.read_bytes())


def _log_epoch(writer, stage: str, record: dict, epochs: int) -> None:
    epoch = record["epoch"]
    line = f"[{stage}] epoch {epoch}/{epochs} loss {record['loss']:.4f} {record['images_per_s']:.1f} img/s"
    if "val_miou" in record:
        line += f" val mIoU {100 * record['val_miou']:.2f}"
    _say(line)
    if writer is not None:
        for key in ("loss", "lr", "images_per_s", "val_miou"):
            if key in record:
                writer.add_scalar(f"{stage}/{key}", record[key], epoch)
        writer.flush()


def _injected_fault_epoch(stage: str) -> int:
    stage_name, _, epoch = os.environ.get(FAULT_ENV, "").partition(":")
    return int(epoch) if stage_name == stage and epoch else 0


def fit_stage(cfg: Config, spec: StageSpec, storage_path: Path, callbacks: list | None = None) -> dict:
    """Run one training stage on Ray Train; rerunning resumes from its last checkpoint.
    Returns its summary (`summarize_stage`) and the paths of its weight files.

    `callbacks`: Ray Train user callbacks, e.g. Tune's `TuneReportCallback` inside a sweep trial."""
    # Ray Train's controller polls its workers every 2 s by default, so every run ends up to
    # 2 s after its last epoch; 0.5 s costs a few more tiny calls. A value set by the user wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    spec = replace(spec, fault_epoch=_injected_fault_epoch(spec.name))
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = 1

    def make_trainer() -> TorchTrainer:  # a new one per attempt
        return TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": cfg.model_dump(), "stage": spec.to_dict()},
            scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,  # a tuple: elastic
                                         resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
            run_config=RunConfig(
                # The fingerprint in the name keeps a changed config from resuming stale state.
                name=run_name,
                storage_path=ray_storage_path(storage_path),
                failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                callbacks=list(callbacks or []),
            ),
        )

    called = time.time()
    run_name = f"{spec.name}-{spec.fingerprint}"
    _fit_with_restarts(make_trainer, spec.name, cfg.train.max_failures, snapshot=_train_state,
                       release=_release_failed_attempt)
    return {**summarize_stage(location(spec.stage_dir), time.time() - called, called),
            "planned_epochs": spec.epochs, "final_checkpoint": str(final_path(spec)),
            "best_checkpoint": str(best_path(spec)),
            "checkpoints": [str(checkpoint_path(spec, e)) for e in spec.checkpoint_epochs]}


def _lost_worker(err: BaseException) -> BaseException | None:
    """The actor or node death behind a Ray Train failure, if that is what it was."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (RayActorError, NodeDiedError, WorkerCrashedError)):
            return err
        err = getattr(err, "controller_failure", None) or err.__cause__ or err.__context__
    return None


def _train_state() -> tuple[set[str], set[str]] | None:
    """Ids of this job's live Ray Train controllers and of the cluster's created placement
    groups; None where Ray's state API does not answer (a cluster without its dashboard)."""
    from ray.util.state import list_actors, list_placement_groups

    job = ray.get_runtime_context().get_job_id()
    try:
        controllers = {a.actor_id for a in list_actors(
            filters=[("class_name", "=", "TrainController"), ("state", "=", "ALIVE"), ("job_id", "=", job)], limit=10_000)}
        groups = {g.placement_group_id for g in list_placement_groups(filters=[("state", "=", "CREATED")], limit=10_000)}
    except Exception:  # noqa: BLE001 - the restart below then goes without the clean-up
        return None
    return controllers, groups


def _release_failed_attempt(before: tuple[set[str], set[str]] | None, stage: str) -> None:
    """Free what a fit that raised still holds.

    Ray 2.58 leaks it after a RAISE at start-up (measured): the controller stays ALIVE (its
    surviving worker holds its handle) with that worker, and the attempt's placement group
    stays CREATED even once they are killed, so the next attempt waits forever for its CPUs.
    The attempt's controller is the one that appeared during the fit (`before`: the state when
    it began), its group the groups that appeared and hold no live actor. Where several
    controllers appeared (a sweep's concurrent trials), nothing is touched."""
    from ray._raylet import ActorID, PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group
    from ray.util.state import list_actors

    now = _train_state()
    if before is None or now is None:
        _say(f"[{stage}] Ray's state API did not answer: the failed attempt's resources are left to Ray")
        return
    controllers, groups = now
    leaked = controllers - before[0]
    if len(leaked) > 1:
        _say(f"[{stage}] cannot tell the failed attempt's Ray Train controller among {len(leaked)}; "
             "the restart may wait for its resources")
        return
    if leaked:
        worker = ray._private.worker.global_worker
        ray.kill(worker.core_worker.get_actor_handle(ActorID.from_hex(leaked.pop())), no_restart=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        used = {a.placement_group_id for a in list_actors(filters=[("state", "!=", "DEAD")], limit=10_000)}
        if not any(g in used for g in groups - before[1]):
            break
        time.sleep(0.5)  # the killed controller's workers are still going
    for group in groups - before[1] - used:
        remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(group)))


def _fit_with_restarts(make_trainer, stage: str, restarts: int, snapshot=lambda: None,
                       release=lambda before, stage: None) -> None:
    """`make_trainer().fit()`, run again from the stage's last checkpoint (same run name and storage)
    when Ray Train gives up on a lost worker that it does not count as retryable: a worker
    killed while the group is still starting (its controller raises `ActorDiedError`, which
    `FailurePolicy` RAISEs). `release(snapshot() taken before the fit, stage)` first frees what
    the failed attempt still holds.
    Other failures, and the `restarts`-th, propagate."""
    for attempt in range(restarts + 1):
        before = snapshot()
        try:
            make_trainer().fit()
            return
        except ControllerError as err:
            lost = _lost_worker(err)
            if lost is None or attempt == restarts:
                raise
            release(before, stage)
            _say(f"[{stage}] Ray Train gave up after losing a worker ({type(lost).__name__}); "
                 f"restarting the stage from its last checkpoint ({attempt + 1} of {restarts})")


def summarize_stage(stage_dir: Path, wall_s: float, called_at: float | None = None) -> dict:
    """Final metrics of a finished stage from its metrics.jsonl. With `called_at` (when
    `fit()` was called), also where this call's wall time went: `compute_s` (the epochs'
    training and validation), `startup_s` (until the first epoch began), `teardown_s` (after
    the last epoch's work until `fit()` returned); the rest went to checkpoint reports and
    file writes between epochs."""
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines() if line]
    evals = [r for r in records if "val_miou" in r]
    last = evals[-1] if evals else {}
    images = sum(r["images_per_s"] * r["train_seconds"] for r in records)
    seconds = sum(r["train_seconds"] for r in records)
    summary = {
        "wall_s": wall_s,
        "epochs": len(records),
        "steps": sum(r.get("steps", 0) for r in records),  # optimiser steps, and the images they forwarded
        "train_images": round(images),
        "miou": last.get("val_miou"),
        "student_miou": last.get("student_val_miou"),  # the student's, where an EMA teacher is the model
        "per_class_iou": last.get("val_iou"),
        "best_miou": max((r["val_miou"] for r in evals), default=None),
        "train_images_per_s": images / seconds if seconds else None,
    }
    this_call = [r for r in records if called_at is not None and r.get("started_at", 0.0) >= called_at]
    if this_call:
        work = [r["train_seconds"] + r.get("eval_seconds", 0.0) for r in this_call]
        summary["compute_s"] = sum(work)
        summary["startup_s"] = this_call[0]["started_at"] - called_at
        summary["teardown_s"] = called_at + wall_s - (this_call[-1]["started_at"] + work[-1])
    return summary
