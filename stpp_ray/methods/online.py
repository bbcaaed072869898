"""The online methods' shared training loop (pure PyTorch, no Ray).

Mean Teacher, U2PL and UniMatch train one stage on two streams: every step draws one
labeled batch and one unlabeled batch. `UnlabeledSet` makes each unlabeled image's views
(seeded per sample, so they do not depend on which worker loads it) as the method asks;
the method's `step` turns the batches into loss terms, and `train_online_epoch` combines
them with every count taken over the global batch (all ranks), so W workers at global
batch B train as one worker at B. An EMA teacher (Mean Teacher, U2PL) follows the student.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from ..augment import normalize, strong_augment, to_tv, weak_augment
from ..datasets import IGNORE_INDEX, read_image
from ..losses import masked_ce
from ..training import global_sum, is_distributed, sample_seed, split_key
from ..weights import unwrap
from .base import ONLINE, Method, Stage, StageBuilder, derive_fingerprint
from .self_training import TEACHER_KEYS, student_epochs

# The keys every online stage depends on; each method adds its own (`OnlineMethod.config_keys`).
ONLINE_KEYS = ("data.unlabeled_split", "semi.epochs", "semi.unlabeled_batch_size", "train.student_epochs")
_VIEW_STREAM, _PARTNER_STREAM = 1, 2


def online_epochs(cfg) -> int:
    """Epochs of the online stage, each one pass over the unlabeled set."""
    return cfg.semi.epochs or student_epochs(cfg)


@dataclass
class OnlineMethod(Method):
    """A method trained in one stage on the labeled and unlabeled streams, with no SupOnly teacher."""

    online: bool = True
    shared_stages: tuple[str, ...] = ("check_data",)
    trained_kinds: tuple[str, ...] = (ONLINE,)
    ema: bool = False  # an EMA teacher makes the targets; it is the model validated and saved
    cutmix_partner: bool = False  # the views of a second random image come under `mix_*`
    strong_cutout: bool = False  # the strong augmentation includes Cutout
    first_ema_step: int = 0  # the EMA counter at the teacher's first update (`ema_decay`)
    config_keys: tuple[str, ...] = ()  # the method's own config keys (its stage's fingerprint)

    def stages(self, cfg, build: StageBuilder) -> list[Stage]:
        fp = derive_fingerprint(cfg.fingerprint(*TEACHER_KEYS, *ONLINE_KEYS, *self.config_keys, "method"), "online")
        epochs = self.epochs(cfg)
        return [build.data(), build.train("online", fp, kind=ONLINE, epochs=epochs, checkpoint_epochs=[epochs],
                                          unlabeled=True)]

    def epochs(self, cfg) -> int:
        """Epochs of this method's online stage."""
        return online_epochs(cfg)

    def final_stage(self, cfg) -> str:
        return "online"

    def teacher_stage(self, cfg) -> str:
        """The model that makes the targets at the end (the EMA teacher, or UniMatch's model itself)."""
        return "online"

    def trains_labeled_batch_alone(self, cfg) -> bool:
        return False

    def make_state(self, cfg):
        """What the method keeps across steps and checkpoints (`state_dict`/`load_state_dict`), or None."""
        return None

    def warmup_steps(self, cfg, steps_per_epoch: int) -> int:
        """Supervised-only steps at the start (no EMA update)."""
        return 0

    def teacher_decay(self, semi) -> float:
        """The EMA teacher's decay."""
        return semi.ema_decay

    def before_step(self, ema, student, step: int, warmup_steps: int, steps_per_epoch: int) -> None:
        """What happens to the EMA teacher before a step (U2PL copies the student at first)."""

    @torch.no_grad()
    def update_teacher(self, ema, student, step: int, warmup_steps: int, semi) -> None:
        """After a step: the teacher's parameters follow the student's, its BatchNorm
        statistics come from its own train-mode forwards (Mean Teacher's and U2PL's code)."""
        if step >= warmup_steps:
            ema_update_(ema, student, ema_decay(step - warmup_steps + self.first_ema_step, self.teacher_decay(semi)),
                        buffers=False)

    def views(self, data: "UnlabeledSet", image, ignore) -> dict[str, torch.Tensor]:
        """The method's own views of one weakly augmented image (drawn from the sample's seed)."""
        return {}

    def step(self, ctx: "StepContext", x: torch.Tensor, y: torch.Tensor, u: dict) -> list["LossTerm"]:
        """The loss terms of one step on labeled images `x`, masks `y` and unlabeled views `u`."""
        raise NotImplementedError


class UnlabeledSet(Dataset):
    """The views one online method needs of each unlabeled image (dict of tensors).

    Always `weak` (normalised) and `ignore` (255 on crop padding, else 0), then the method's
    `views`; with `cutmix_partner` a second random image's views under `mix_*`. Keys are
    `(epoch, index)` pairs or plain indices read at the epoch of `set_epoch`, as
    `training.TrainSet`'s. `method`: an `OnlineMethod` or its name. `base_size`: see
    `augment.RandomRescale`.
    """

    def __init__(self, image_paths: Sequence[str], method: "OnlineMethod | str", crop_size: int, seed: int,
                 cutmix_prob: float = 0.5, base_size: int = 0):
        if isinstance(method, str):
            from . import get_method, online_names

            if method not in online_names():
                raise ValueError(f"unknown online method {method!r}; expected one of {online_names()}")
            method = get_method(method)
        self.paths = image_paths if isinstance(image_paths, Sequence) else list(image_paths)
        self.method, self.crop, self.seed, self.cutmix_prob = method, crop_size, seed, cutmix_prob
        self.epoch = 0
        self.weak = weak_augment(crop_size, base_size=base_size)
        self.strong = strong_augment(crop_size, cutout=method.strong_cutout)

    def set_epoch(self, epoch: int) -> None:
        """The epoch of plain-index keys (in this process only)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = split_key(key, self.epoch)
        out = self._views(epoch, index, _VIEW_STREAM)
        if self.method.cutmix_partner:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, epoch, index, _PARTNER_STREAM))
                partner = int(torch.randint(0, len(self.paths), ()))
            partner_views = self._views(epoch, partner, _PARTNER_STREAM, index)
            out.update({f"mix_{k}": v for k, v in partner_views.items() if not k.startswith("box")})
        return out

    def _views(self, epoch: int, index: int, *stream: int) -> dict[str, torch.Tensor]:
        image_np = read_image(self.paths[index])
        blank = torch.zeros(image_np.shape[:2], dtype=torch.uint8).numpy()
        out: dict[str, torch.Tensor] = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index, *stream))
            image, ignore = self.weak(*to_tv(image_np, blank))
            out["weak"], out["ignore"] = normalize(image.as_subclass(torch.Tensor)), ignore.as_subclass(torch.Tensor).long()
            out.update(self.method.views(self, image, ignore))
        return out


# ---------------------------------------------------------------------------------- losses


@dataclass
class LossTerm:
    """One loss term: `weight * total / N` where N is `count` summed over all ranks; with
    `pixels` (U2PL), times `pixels / N` as well (`pixels` also summed over ranks)."""

    name: str
    total: torch.Tensor
    count: torch.Tensor
    weight: float = 1.0
    pixels: torch.Tensor | None = None


def combine(terms: Sequence[LossTerm], world: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The step's loss from its terms, normalised by global counts (one all-reduce), and each
    term's share from this rank (their sum over ranks is the term's value). DDP averages
    gradients over ranks, hence the factor `world` in the loss."""
    counts = torch.stack([torch.stack([t.count.double(), (t.count if t.pixels is None else t.pixels).double()])
                          for t in terms]).to(terms[0].total.device)
    counts = global_sum(counts.detach()).clamp_min(1.0).to(terms[0].total.dtype)
    shares = []
    for t, (n, pixels) in zip(terms, counts):
        share = t.total / n
        shares.append(share * pixels / n if t.pixels is not None else share)
    loss = world * sum(t.weight * share for t, share in zip(terms, shares))
    return loss, [share.detach() for share in shares]


@dataclass
class StepContext:
    """What a step function needs besides the batches."""

    model: torch.nn.Module                 # the student (DDP-wrapped when distributed)
    ema: torch.nn.Module | None            # the EMA teacher (Mean Teacher, U2PL)
    progress: float                        # fraction of all steps done, in [0, 1]
    epoch: int                             # 1-based epoch
    epochs: int
    warmup: bool                           # a supervised-only step (U2PL's first epochs)
    cfg: object                            # config.SemiConfig
    step: int = 0                          # 0-based step of the stage
    seed: int = 0                          # `run.seed`, for draws that must agree on every rank
    state: object = None                   # the method's state across steps (`OnlineMethod.make_state`)


def ce_term(name: str, logits: torch.Tensor, target: torch.Tensor, weight: float = 1.0) -> LossTerm:
    """Cross entropy over the labeled pixels, normalised by their global count."""
    keep = target != IGNORE_INDEX
    return LossTerm(name, masked_ce(logits, target, keep), keep.sum(), weight)


@torch.no_grad()
def teacher_logits(teacher: torch.nn.Module, image: torch.Tensor, train: bool = False) -> torch.Tensor:
    """The teacher's logits, in eval mode or (`train`: batch statistics, dropout, and its
    BatchNorm running statistics updated) in train mode."""
    teacher.train(train)
    return teacher(image).float()


@torch.no_grad()
def ema_update_(teacher: torch.nn.Module, student: torch.nn.Module, decay: float, buffers: bool = True) -> None:
    """teacher <- decay * teacher + (1 - decay) * student for parameters and, with `buffers`,
    floating-point buffers (BatchNorm running statistics), integer buffers (batch counters)
    copied from the student. Without `buffers` the teacher keeps its own statistics."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.lerp_(s.detach(), 1.0 - decay)
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True) if buffers else ():
        if t.is_floating_point():
            t.lerp_(s, 1.0 - decay)
        else:
            t.copy_(s)


def ema_decay(step: int, decay: float) -> float:
    """The EMA decay at a step counted from the teacher's start: min(1 - 1/(step+1), decay),
    as Mean Teacher's and U2PL's code (the teacher follows the student closely at first)."""
    return min(1.0 - 1.0 / (step + 1), decay)


def cycle(loader, sampler, dataset, epoch: int) -> Iterator:
    """Endless labeled batches for one epoch: pass c over the labeled set is shuffled with
    the seed of (epoch, c), so a resumed epoch repeats the same batches. Augmentations are
    seeded with the same number: a `with_epoch` sampler carries it to loader processes, the
    dataset's `set_epoch` serves plain-index samplers."""
    c = 0
    while True:
        sampler.set_epoch(epoch * 10_000 + c)
        dataset.set_epoch(epoch * 10_000 + c)
        yield from loader
        c += 1


def train_online_epoch(method: OnlineMethod, model, ema, labeled: Iterator, unlabeled_loader, optimizer, scheduler,
                       device: torch.device, cfg, *, epoch: int, epochs: int, steps_done: int, total_steps: int,
                       warmup_steps: int, amp: bool = False, seed: int = 0, state=None) -> dict[str, float]:
    """One pass over the unlabeled loader with the method's `step` and teacher updates; `cfg`
    is the config's `semi` section, `state` the method's state (`OnlineMethod.make_state`)."""
    world = dist.get_world_size() if is_distributed() else 1
    sums: dict[str, float] = {}
    steps = images = 0
    start = time.perf_counter()
    for u in unlabeled_loader:
        x, y = next(labeled)
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        u = {k: v.to(device, non_blocking=True) for k, v in u.items()}
        step = steps_done + steps
        ctx = StepContext(model, ema, step / max(1, total_steps), epoch, epochs, step < warmup_steps, cfg,
                          step=step, seed=seed, state=state)
        if ema is not None:
            method.before_step(ema, unwrap(model), step, warmup_steps, total_steps // max(1, epochs))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            terms = method.step(ctx, x, y, u)
        loss, shares = combine(terms, world)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            method.update_teacher(ema, unwrap(model), step, warmup_steps, cfg)
        for t, share in zip(terms, shares):
            sums[t.name] = sums.get(t.name, 0.0) + float(share)
        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / world
        steps += 1
        images += x.shape[0] + u["weak"].shape[0]
    seconds = time.perf_counter() - start
    totals = global_sum(torch.tensor([images, *[sums.get(k, 0.0) for k in sorted(sums)]], dtype=torch.float64,
                                     device=device)).cpu()
    stats = {k: float(v) / max(1, steps) for k, v in zip(sorted(sums), totals[1:])}
    stats.update(images=int(totals[0]), steps=steps, seconds=seconds, images_per_s=float(totals[0]) / seconds if seconds else math.nan,
                 lr=optimizer.param_groups[0]["lr"])
    return stats
