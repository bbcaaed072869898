"""Everything one rank needs to train a stage, built from the config (no Ray here).

Ray Train workers and the benchmark's bare single-process loop build their model, data
and optimiser through this one function, so the two measure exactly the same work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .config import Config
from .datasets import Sample
from .engine import EvalSet, GlobalBatchSampler, TrainItem, TrainSet, build_optimizer, poly_scheduler
from .models import build_model, convert_batchnorm_for_distributed, split_parameters


@dataclass
class RankTraining:
    model: torch.nn.Module
    train_set: TrainSet
    sampler: GlobalBatchSampler
    loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def setup_rank(cfg: Config, items: Sequence[TrainItem], val_samples: Sequence[Sample], epochs: int,
               rank: int = 0, world: int = 1, device: torch.device = torch.device("cpu")) -> RankTraining:
    """Model (DDP-wrapped when world > 1, so a process group must exist), loaders over this
    rank's share of each global batch, SGD with the poly schedule over `epochs`."""
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = build_model(cfg.model.name, cfg.model.backbone, cfg.data.num_classes,
                        output_stride=cfg.model.output_stride, pretrained=cfg.model.pretrained,
                        aspp_channels=cfg.model.aspp_channels)
    backbone_params, head_params = split_parameters(model)
    if world > 1 and cfg.train.sync_batchnorm:
        model = convert_batchnorm_for_distributed(model, device.type)
    model = model.to(device).to(memory_format=torch.channels_last)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    train_set = TrainSet(items, cfg.data.layout, cfg.data.crop_size, cfg.run.seed)
    sampler = GlobalBatchSampler(len(train_set), cfg.train.batch_size, rank, world, cfg.run.seed)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.train.loader_workers,
                                         pin_memory=device.type == "cuda", persistent_workers=cfg.train.loader_workers > 0)
    val_loader = torch.utils.data.DataLoader(EvalSet(list(val_samples)[rank::world], cfg.data.layout),
                                             batch_size=cfg.train.eval_batch_size)
    optimizer = build_optimizer(backbone_params, head_params, cfg.train.lr, cfg.train.head_lr_multiplier,
                                cfg.train.momentum, cfg.train.weight_decay)
    scheduler = poly_scheduler(optimizer, epochs * len(sampler), cfg.train.poly_power)
    return RankTraining(model, train_set, sampler, loader, val_loader, optimizer, scheduler)
