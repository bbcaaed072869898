"""Everything one rank needs to train a stage, built from the config (no Ray here).

Ray Train workers and the benchmark's bare single-process loop build their model, data
and optimiser through this one function, so the two measure exactly the same work.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch

from .config import Config
from .datasets import Sample
from .checkpoints import read_weights
from .engine import EvalSet, GlobalBatchSampler, TrainItem, TrainSet, build_optimizer, collate_pairs, poly_scheduler
from .models import build_model, convert_batchnorm_for_distributed, split_parameters
from .online import EMA_METHODS, UnlabeledSet


@dataclass
class RankTraining:
    model: torch.nn.Module
    train_set: TrainSet
    sampler: GlobalBatchSampler
    loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    # Online methods only: the unlabeled stream and (Mean Teacher, U2PL) the EMA teacher.
    unlabeled_set: UnlabeledSet | None = None
    unlabeled_sampler: GlobalBatchSampler | None = None
    unlabeled_loader: torch.utils.data.DataLoader | None = None
    ema: torch.nn.Module | None = None

    def steps_per_epoch(self) -> int:
        return len(self.unlabeled_sampler if self.unlabeled_sampler is not None else self.sampler)


def optimizer_settings(cfg: Config, dmt_phase: bool = False) -> tuple[float, float, float, float]:
    """(lr, head lr multiplier, momentum, weight decay) of a stage's SGD: `train.*`, or in DMT's
    phases (the stages that train on pseudo-label confidences) DMT's recipe `semi.dmt_*`."""
    if dmt_phase:
        return cfg.semi.dmt_lr, cfg.semi.dmt_head_lr_multiplier, cfg.train.momentum, cfg.semi.dmt_weight_decay
    return cfg.train.lr, cfg.train.head_lr_multiplier, cfg.train.momentum, cfg.train.weight_decay


def setup_rank(cfg: Config, items: Sequence[TrainItem], val_samples: Sequence[Sample], epochs: int,
               rank: int = 0, world: int = 1, device: torch.device = torch.device("cpu"),
               unlabeled_paths: Sequence[str] = (), init_weights: str = "",
               with_confidence: bool = False) -> RankTraining:
    """Model (DDP-wrapped when world > 1, so a process group must exist), loaders over this
    rank's share of each global batch, SGD with the poly schedule over `epochs`.

    `unlabeled_paths`: the online methods' unlabeled images (an epoch is one pass over them).
    `init_weights`: a weights file to start from (DMT's phases fine-tune). `with_confidence`:
    the training set also yields pseudo-label confidences (DMT's loss weights)."""
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = build_model(cfg.model.name, cfg.model.backbone, cfg.data.num_classes,
                        output_stride=cfg.model.output_stride, pretrained=cfg.model.pretrained,
                        aspp_channels=cfg.model.aspp_channels, head=cfg.model.resolved_head())
    if init_weights:
        model.load_state_dict(read_weights(init_weights)["model"])
    backbone_params, head_params = split_parameters(model)
    if world > 1 and cfg.train.sync_batchnorm:
        model = convert_batchnorm_for_distributed(model, device.type)
    model = model.to(device).to(memory_format=torch.channels_last)
    ema = None
    if unlabeled_paths and cfg.method in EMA_METHODS:
        ema = copy.deepcopy(model).requires_grad_(False)  # same weights on every rank, updated identically
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    base_size = cfg.data.scale_base_size()
    train_set = TrainSet(items, cfg.data.layout, cfg.data.crop_size, cfg.run.seed, with_confidence=with_confidence,
                         base_size=base_size)
    sampler = GlobalBatchSampler(len(train_set), cfg.train.batch_size, rank, world, cfg.run.seed, with_epoch=True)
    loader = _train_loader(train_set, sampler, cfg, device)
    val_loader = torch.utils.data.DataLoader(EvalSet(list(val_samples)[rank::world], cfg.data.layout),
                                             batch_size=cfg.train.eval_batch_size, collate_fn=collate_pairs)
    optimizer = build_optimizer(backbone_params, head_params, *optimizer_settings(cfg, dmt_phase=with_confidence))
    setup = RankTraining(model, train_set, sampler, loader, val_loader, optimizer, scheduler=None, ema=ema)
    if unlabeled_paths:
        setup.unlabeled_set = UnlabeledSet(unlabeled_paths, cfg.method, cfg.data.crop_size, cfg.run.seed,
                                           cfg.semi.cutmix_prob, base_size=base_size)
        setup.unlabeled_sampler = GlobalBatchSampler(len(unlabeled_paths), cfg.unlabeled_batch_size(), rank, world,
                                                     cfg.run.seed, with_epoch=True)
        setup.unlabeled_loader = _train_loader(setup.unlabeled_set, setup.unlabeled_sampler, cfg, device)
    setup.scheduler = poly_scheduler(optimizer, epochs * setup.steps_per_epoch(), cfg.train.poly_power)
    return setup


def _train_loader(dataset, sampler: GlobalBatchSampler, cfg: Config, device: torch.device) -> torch.utils.data.DataLoader:
    """A training loader that gives the same batches with any `train.loader_workers`: the
    sampler passes each index with its epoch (worker processes keep their own dataset copies)
    and the loader's own generator draws its worker base seed, which a DataLoader otherwise
    takes from the global RNG at each in-process pass but only once with persistent workers,
    shifting the model's dropout masks."""
    workers = cfg.train.loader_workers
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                       pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                       generator=torch.Generator().manual_seed(cfg.run.seed))
