"""What one training stage is (`StageSpec`) and everything one rank needs to train it (no Ray here).

Ray Train workers and the benchmark's bare single-process loop build their model, data
and optimiser through `setup_rank`, so the two measure exactly the same work.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from .config import Config
from .datasets import Sample
from .evaluation import EvalSet, collate_pairs
from .methods.base import PseudoLabels, StageTraining, plain_pseudo_items, teacher_training
from .methods.online import OnlineMethod, UnlabeledSet
from .models import build_model, convert_batchnorm_for_distributed, split_parameters
from .storage import is_uri
from .training import GlobalBatchSampler, ItemSequence, TrainItem, TrainSet, build_optimizer, poly_scheduler, supervised_repeats
from .weights import read_weights


@dataclass
class StageSpec:
    """What one training stage trains on and where it writes (all paths absolute): the
    Ray Train workers are told everything here, they guess nothing from names."""

    name: str
    stage_dir: str
    fingerprint: str
    labeled: list[list[str]]                    # [image_id, image_path, mask_path]
    val: list[list[str]]                        # [image_id, image_path, mask_path]
    method: str                                 # the method that built it (`methods.get_method`)
    kind: str                                   # its kind, as the method defines it (`Method.training`)
    epochs: int
    pseudo: list[PseudoLabels] = field(default_factory=list)
    checkpoint_epochs: list[int] = field(default_factory=list)
    unlabeled: str = ""                         # online methods: the unlabeled pool's file (`image_pool.write_pool`)
    init_weights: str = ""                      # weights to fine-tune (DMT's phases)
    fault_epoch: int = 0                        # tests only: kill one worker once at this epoch

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StageSpec":
        return cls(**{**d, "pseudo": [PseudoLabels(**p) for p in d["pseudo"]]})


def build_train_items(spec: StageSpec, training: StageTraining | None = None, num_classes: int = 0) -> ItemSequence:
    """Labeled items, then pseudo-labeled ones, as LiheYoung/ST-PlusPlus main.py and
    dataset/semi.py: a supervised stage (no pseudo-labels, no unlabeled stream: the teachers)
    lists a small labeled set twice (`supervised_repeats`); a student repeats the
    labeled set ceil(|pseudo| / |L|) times to balance its pseudo-labeled images. The
    pseudo-labels are read as `training` says (DMT keeps a curriculum of them), made when indexed."""
    labeled = [TrainItem(i, img, mask) for i, img, mask in spec.labeled]
    if not spec.pseudo and not spec.unlabeled:
        return ItemSequence((labeled, supervised_repeats(len(labeled))))
    read = training.read_pseudo if training is not None else plain_pseudo_items
    # empty: a selection of no image (R * |U| < 1, or R = 1 for the unreliable part)
    pseudo = [read(source, num_classes) for source in spec.pseudo if source.count]
    total = sum(len(p) for p in pseudo)
    repeat = -(-total // len(labeled)) if total and labeled else 1
    return ItemSequence((labeled, repeat), *((p, 1) for p in pseudo))


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


def setup_rank(cfg: Config, items: Sequence[TrainItem], val_samples: Sequence[Sample], epochs: int,
               rank: int = 0, world: int = 1, device: torch.device = torch.device("cpu"), *,
               training: StageTraining | None = None, online: OnlineMethod | None = None,
               unlabeled_paths: Sequence[str] = (), init_weights: str = "") -> RankTraining:
    """Model (DDP-wrapped when world > 1, so a process group must exist), loaders over this
    rank's share of each global batch, SGD with the poly schedule over `epochs`.

    `training`: the stage's optimiser settings and items (default: `train.*`, cross entropy).
    `online` and `unlabeled_paths`: an online method and its unlabeled images (an epoch is
    one pass over them). `init_weights`: a weights file to start from (DMT's phases)."""
    training = training or teacher_training(cfg)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = build_model(cfg.model.name, cfg.model.backbone, cfg.data.num_classes,
                        output_stride=cfg.model.output_stride, pretrained=cfg.model.pretrained,
                        aspp_channels=cfg.model.aspp_channels, head=cfg.model.resolved_head(),
                        projection_channels=online.projection_channels(cfg) if online is not None else 0)
    if init_weights:
        model.load_state_dict(read_weights(init_weights)["model"])
    backbone_params, head_params = split_parameters(model)
    if world > 1 and cfg.train.sync_batchnorm:
        model = convert_batchnorm_for_distributed(model, device.type)
    model = model.to(device).to(memory_format=torch.channels_last)
    ema = None
    if unlabeled_paths and online is not None and online.ema:
        ema = copy.deepcopy(model).requires_grad_(False)  # same weights on every rank, updated identically
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    base_size = cfg.data.scale_base_size()
    train_set = TrainSet(items, cfg.data.layout, cfg.data.crop_size, cfg.run.seed,
                         with_confidence=training.with_confidence, base_size=base_size)
    sampler = GlobalBatchSampler(len(train_set), cfg.train.batch_size, rank, world, cfg.run.seed, with_epoch=True)
    loader = _train_loader(train_set, sampler, cfg, device)
    val_loader = torch.utils.data.DataLoader(EvalSet(list(val_samples)[rank::world], cfg.data.layout),
                                             batch_size=cfg.train.eval_batch_size, collate_fn=collate_pairs)
    optimizer = build_optimizer(backbone_params, head_params, training.lr, training.head_lr_multiplier,
                                training.momentum, training.weight_decay)
    setup = RankTraining(model, train_set, sampler, loader, val_loader, optimizer, scheduler=None, ema=ema)
    if unlabeled_paths:
        setup.unlabeled_set = UnlabeledSet(unlabeled_paths, online, cfg.data.crop_size, cfg.run.seed,
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
    # Worker processes that read images from a bucket start from a forkserver, so none inherits
    # this process's S3 client and its threads through fork() (s3fs documents hangs from that).
    context = "forkserver" if workers and is_uri(cfg.data.root) else None
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                       pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                       generator=torch.Generator().manual_seed(cfg.run.seed),
                                       multiprocessing_context=context)
