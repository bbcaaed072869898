"""Ray Train glue: one training stage (teacher or student) as a `TorchTrainer` run.

`train_loop_per_worker` is plain PyTorch around the engine; the Ray calls are the
context (rank, world size, device), `get_checkpoint` for resume and `report` for
metrics and checkpoints. The driver side is `fit_stage`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import ray.train
import ray.train.torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from .checkpoints import architecture, save_weights, unwrap
from .config import Config
from .datasets import Sample
from .engine import TrainItem, evaluate, sample_seed, supervised_repeats, train_one_epoch
from .rank_setup import setup_rank
from .online import ONLINE_METHODS, cycle, train_online_epoch
from .pseudo import read_curriculum_items, read_pseudo_items

FAULT_MARKER = ".fault_injected"


@dataclass
class StageSpec:
    """What one training stage trains on and where it writes (all paths absolute)."""

    name: str
    stage_dir: str
    fingerprint: str
    labeled: list[list[str]]                    # [image_id, image_path, mask_path]
    val: list[list[str]]                        # [image_id, image_path, mask_path]
    # {"parquet_dir", "image_paths": {id: path}}, DMT adds "curriculum_ratio" and "num_classes"
    pseudo: list[dict] = field(default_factory=list)
    checkpoint_epochs: list[int] = field(default_factory=list)
    fault_epoch: int = 0                        # tests only: kill one worker once at this epoch
    unlabeled: list[str] = field(default_factory=list)  # online methods: unlabeled image paths
    init_weights: str = ""                      # DMT phases: the weights to fine-tune


def build_train_items(spec: StageSpec) -> list[TrainItem]:
    """Labeled items, then pseudo-labeled ones, as LiheYoung/ST-PlusPlus main.py and
    dataset/semi.py: a supervised stage (no pseudo-labels, no unlabeled stream: the teachers)
    lists a small labeled set twice (`supervised_repeats`); a student repeats the
    labeled set ceil(|pseudo| / |L|) times to balance its pseudo-labeled images."""
    labeled = [TrainItem(i, img, mask) for i, img, mask in spec.labeled]
    if not spec.pseudo and not spec.unlabeled:
        return labeled * supervised_repeats(len(labeled))
    pseudo: list[TrainItem] = []
    for source in spec.pseudo:
        if not source["image_paths"]:
            continue  # an empty selection (R * |U| < 1, or R = 1 for the unreliable part)
        if "curriculum_ratio" in source:
            items, _ = read_curriculum_items(source["parquet_dir"], source["image_paths"], source["curriculum_ratio"],
                                             source["num_classes"])
            pseudo.extend(items)
        else:
            pseudo.extend(read_pseudo_items(source["parquet_dir"], source["image_paths"]))
    if pseudo and labeled:
        repeat = -(-len(pseudo) // len(labeled))
        labeled = labeled * repeat
    return labeled + pseudo


def _device(cfg: Config) -> torch.device:
    if cfg.ray.use_gpu:
        return ray.train.torch.get_device()
    return torch.device("cpu")


def _write_metrics(stage_dir: Path, record: dict) -> None:
    with open(stage_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(stage_dir: Path, last_epoch: int) -> None:
    """Drop metric lines of epochs that will be trained again after a resume."""
    path = stage_dir / "metrics.jsonl"
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["epoch"] <= last_epoch]
    path.write_text("".join(line + "\n" for line in keep))


def _should_eval(epoch: int, epochs: int, interval: int) -> bool:
    return epoch == epochs or (interval > 0 and epoch % interval == 0)


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker: plain PyTorch DDP training of one stage."""
    cfg = Config.model_validate(loop_config["config"])
    spec = StageSpec(**loop_config["stage"])
    stage_dir = Path(spec.stage_dir)
    ctx = ray.train.get_context()  # Ray: this worker's rank and the world size
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, round(cfg.ray.cpus_per_worker)))
    device = _device(cfg)

    epochs = cfg.stage_epochs(spec.name)
    val_samples = [Sample(i, Path(img), Path(mask)) for i, img, mask in spec.val]
    online = cfg.method in ONLINE_METHODS and bool(spec.unlabeled)
    dmt = any("curriculum_ratio" in source for source in spec.pseudo)
    setup = setup_rank(cfg, build_train_items(spec), val_samples, epochs, rank, world, device,
                       unlabeled_paths=spec.unlabeled if online else (), init_weights=spec.init_weights,
                       with_confidence=dmt)
    model, optimizer, scheduler = setup.model, setup.optimizer, setup.scheduler
    # Mean Teacher and U2PL are evaluated and saved through their EMA teacher, as U2PL's code.
    kept = setup.ema if setup.ema is not None else model
    per_worker_batch = cfg.train.batch_size // world
    arch = architecture(cfg.model, cfg.data.num_classes)

    start_epoch, best_miou = 0, -1.0
    checkpoint = ray.train.get_checkpoint()  # Ray: the latest reported checkpoint after a restart or rerun
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = torch.load(Path(ckpt_dir) / "state.pt", map_location="cpu", weights_only=True)
        unwrap(model).load_state_dict(state["model"])
        if setup.ema is not None:
            setup.ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best_miou = state["epoch"], state["best_miou"]
        if rank == 0:
            _say(f"[{spec.name}] resuming after epoch {start_epoch}/{epochs}")
    if rank == 0:
        stage_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(stage_dir, start_epoch)
        unlabeled = f" + {len(spec.unlabeled)} unlabeled (global batch {cfg.unlabeled_batch_size()})" if online else ""
        _say(f"[{spec.name}] {len(setup.train_set)} training images{unlabeled}, {setup.steps_per_epoch()} steps/epoch, "
             f"global batch {cfg.train.batch_size} = {world} x {per_worker_batch}, device {device}")
    writer = _tensorboard(stage_dir) if rank == 0 else None

    for epoch in range(start_epoch + 1, epochs + 1):
        started_at = time.time()
        setup.sampler.set_epoch(epoch)
        setup.train_set.set_epoch(epoch)
        # Dropout draws from the global RNG: seed it per (epoch, rank) so that a run resumed
        # from a checkpoint repeats exactly what the uninterrupted run would have done.
        torch.manual_seed(sample_seed(cfg.run.seed, epoch, 1_000_000_000 + rank))
        if spec.fault_epoch == epoch and rank == world - 1 and not (stage_dir / FAULT_MARKER).exists():
            # Simulated crash of one worker process (tests only), a few seconds into the
            # epoch as in a real crash: Ray Train collects the previous epoch's report
            # asynchronously, and a process dying at once could lose it.
            time.sleep(5)
            (stage_dir / FAULT_MARKER).write_text(str(time.time()))
            os._exit(1)
        if online:
            setup.unlabeled_sampler.set_epoch(epoch)
            setup.unlabeled_set.set_epoch(epoch)
            steps = setup.steps_per_epoch()
            warmup = cfg.semi.u2pl_warmup_epochs * steps if cfg.method == "u2pl" else 0
            stats = train_online_epoch(cfg.method, model, setup.ema, cycle(setup.loader, setup.sampler, setup.train_set, epoch),
                                       setup.unlabeled_loader, optimizer, scheduler, device, cfg.semi, epoch=epoch,
                                       epochs=epochs, steps_done=(epoch - 1) * steps, total_steps=epochs * steps,
                                       warmup_steps=warmup, amp=cfg.train.amp)
        else:
            gammas = (cfg.semi.dmt_gamma1, cfg.semi.dmt_gamma2) if dmt else None
            stats = train_one_epoch(model, setup.loader, optimizer, scheduler, device, amp=cfg.train.amp, dmt_gammas=gammas)
        record = {"stage": spec.name, "epoch": epoch, "loss": stats["loss"], "lr": stats["lr"],
                  "images_per_s": stats["images_per_s"], "train_seconds": stats["seconds"], "started_at": started_at}
        record.update({k: v for k, v in stats.items() if k.startswith("loss_")})
        if _should_eval(epoch, epochs, cfg.train.eval_interval):
            eval_start = time.perf_counter()
            eval_options = cfg.eval.options(cfg.data.crop_size)
            cm = evaluate(kept, setup.val_loader, cfg.data.num_classes, device, **eval_options)
            record["val_miou"] = cm.miou()
            record["val_iou"] = [None if v != v else float(v) for v in cm.iou()]
            if setup.ema is not None:
                record["student_val_miou"] = evaluate(model, setup.val_loader, cfg.data.num_classes, device, **eval_options).miou()
            record["eval_seconds"] = time.perf_counter() - eval_start
        metrics = {k: v for k, v in record.items() if k != "val_iou"}
        if rank == 0:
            _save_epoch_outputs(spec, stage_dir, kept, arch, record, epochs)
            best_miou = _save_best(stage_dir, kept, arch, record, best_miou, spec.name)
            _log_epoch(writer, spec.name, record, epochs)
        if epoch % cfg.train.checkpoint_interval and epoch != epochs:
            continue  # per-epoch metrics are in metrics.jsonl; Ray hears at checkpoints only
        if rank != 0:
            ray.train.report(metrics)  # Ray: every rank reports at each checkpoint epoch
            continue
        with tempfile.TemporaryDirectory() as tmp:
            state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch, "best_miou": best_miou}
            if setup.ema is not None:
                state["ema"] = setup.ema.state_dict()
            torch.save(state, Path(tmp) / "state.pt")
            # Ray: rank 0 reports the resumable state; Ray copies it to the run's storage.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"epoch_{epoch:04d}")
    if writer is not None:
        writer.close()


def _save_epoch_outputs(spec: StageSpec, stage_dir: Path, model, arch: dict, record: dict, epochs: int) -> None:
    """The ST++ checkpoint of this epoch (if it is one), the final weights, the metrics line."""
    epoch = record["epoch"]
    if epoch in spec.checkpoint_epochs:
        save_weights(stage_dir / "checkpoints" / f"epoch_{epoch:03d}.pt", model, arch, epoch=epoch, stage=spec.name)
    if epoch == epochs:
        save_weights(stage_dir / "final.pt", model, arch, epoch=epoch, stage=spec.name, val_miou=record.get("val_miou"))
    _write_metrics(stage_dir, record)


def _save_best(stage_dir: Path, model, arch: dict, record: dict, best_miou: float, stage: str) -> float:
    miou = record.get("val_miou")
    if miou is None or miou <= best_miou:
        return best_miou
    save_weights(stage_dir / "best.pt", model, arch, epoch=record["epoch"], stage=stage, val_miou=miou)
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
    return SummaryWriter(log_dir=str(stage_dir / "tensorboard"))


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


def fit_stage(cfg: Config, spec: StageSpec, storage_path: Path, callbacks: list | None = None) -> dict:
    """Run one training stage on Ray Train; rerunning resumes from its last checkpoint.

    `callbacks`: Ray Train user callbacks, e.g. Tune's `TuneReportCallback` inside a sweep trial."""
    # Ray Train's controller polls its workers every 2 s by default, so every run ends up to
    # 2 s after its last epoch; 0.5 s costs a few more tiny calls. A value set by the user wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(), "stage": asdict(spec)},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        run_config=RunConfig(
            # The fingerprint in the name keeps a changed config from resuming stale state.
            name=f"{spec.name}-{spec.fingerprint}",
            storage_path=str(storage_path.resolve()),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks or []),
        ),
    )
    called = time.time()
    trainer.fit()
    return summarize_stage(Path(spec.stage_dir), time.time() - called, called)


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
        "miou": last.get("val_miou"),
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
