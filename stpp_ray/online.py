"""Online semi-supervised training: Mean Teacher, U2PL and UniMatch (pure PyTorch, no Ray).

Every step draws one labeled batch and one unlabeled batch. The unlabeled views of an
image are made by `UnlabeledSet` (seeded per sample, so they do not depend on which
worker loads it); the methods differ only in their step function:

- `mean_teacher` (Tarvainen & Valpola 2017): an EMA teacher predicts the weak view; the
  student learns its softmax (squared error) on the strong view (ST++'s strong
  augmentation), weighted by a sigmoid ramp-up.
- `u2pl` (Wang et al. 2022): the EMA teacher's argmax on the weak views is the target of the
  student on a CutMix of two weak views; the alpha_t % highest-entropy pixels of the
  (global) batch are left out. One supervised-only warm-up epoch, as U2PL's default. Its
  contrastive term is not implemented.
- `unimatch` (Yang et al. 2023): the model's own prediction of the weak view (train mode)
  teaches two strong views (colour, blur, CutMix with a second image predicted in eval
  mode) and the weak view's features after channel dropout; confidence threshold.

Losses follow the reference code's normalisations, with every count taken over the
global batch (all ranks), so W workers at global batch B train as one worker at B.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Dataset

from .augment import cutmix_box, normalize, strong_augment, to_tv, weak_augment
from .checkpoints import unwrap
from .datasets import IGNORE_INDEX, read_image
from .engine import global_sum, is_distributed, sample_seed, split_key
from .semi_losses import (confident_pseudo_labels, ema_update_, sigmoid_rampup, softmax_mse_sum,
                          u2pl_drop_unreliable, u2pl_unreliable_percent)

ONLINE_METHODS = ("mean_teacher", "u2pl", "unimatch")
EMA_METHODS = ("mean_teacher", "u2pl")
_VIEW_STREAM, _PARTNER_STREAM = 1, 2


def half_box(size: int, p: float = 0.5) -> torch.Tensor:
    """U2PL's CutMix region: with probability p a box of half the crop's area, width drawn
    in (size/2, size), at a random place (True inside)."""
    box = torch.zeros(size, size, dtype=torch.bool)
    if torch.rand(()).item() >= p or size < 3:
        return box
    width = int(torch.randint(size // 2 + 1, size, ()))
    height = min(size, round(size * size / 2 / width))
    top = int(torch.randint(0, size - height + 1, ()))
    left = int(torch.randint(0, size - width + 1, ()))
    box[top:top + height, left:left + width] = True
    return box


class UnlabeledSet(Dataset):
    """The views one method needs of each unlabeled image (dict of tensors).

    Always `weak` (normalised) and `ignore` (255 on crop padding, else 0). Mean Teacher adds
    `strong1`/`ignore1` (ST++'s strong augmentation, Cutout set to 255); UniMatch adds
    `strong1`, `strong2` (no Cutout) and CutMix boxes `box1`, `box2`; U2PL adds `box1`.
    UniMatch and U2PL also get a second random image's views under `mix_*` (CutMix partner).
    Keys are `(epoch, index)` pairs or plain indices read at the epoch of `set_epoch`, as
    `engine.TrainSet`'s. `base_size`: see `augment.RandomRescale`.
    """

    def __init__(self, image_paths: Sequence[str], method: str, crop_size: int, seed: int, cutmix_prob: float = 0.5,
                 base_size: int = 0):
        if method not in ONLINE_METHODS:
            raise ValueError(f"unknown online method {method!r}; expected one of {ONLINE_METHODS}")
        self.paths = list(image_paths)
        self.method, self.crop, self.seed, self.cutmix_prob = method, crop_size, seed, cutmix_prob
        self.epoch = 0
        self.weak = weak_augment(crop_size, base_size=base_size)
        self.strong = strong_augment(crop_size, cutout=method == "mean_teacher")

    def set_epoch(self, epoch: int) -> None:
        """The epoch of plain-index keys (in this process only)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = split_key(key, self.epoch)
        out = self._views(epoch, index, _VIEW_STREAM)
        if self.method in ("u2pl", "unimatch"):
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
            if self.method == "mean_teacher":
                strong, strong_ignore = self.strong(image, ignore)
                out["strong1"] = normalize(strong.as_subclass(torch.Tensor))
                out["ignore1"] = strong_ignore.as_subclass(torch.Tensor).long()
            elif self.method == "unimatch":
                for v in (1, 2):
                    strong, _ = self.strong(image, ignore)
                    out[f"strong{v}"] = normalize(strong.as_subclass(torch.Tensor))
                    out[f"box{v}"] = cutmix_box(self.crop, self.cutmix_prob)
            else:
                out["box1"] = half_box(self.crop, self.cutmix_prob)
        return out


# ---------------------------------------------------------------------------------- losses


@dataclass
class Term:
    """One loss term: `weight * total / N` where N is `count` summed over all ranks; with
    `pixels` (U2PL), times `pixels / N` as well (`pixels` also summed over ranks)."""

    name: str
    total: torch.Tensor
    count: torch.Tensor
    weight: float = 1.0
    pixels: torch.Tensor | None = None


def combine(terms: Sequence[Term], world: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
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


def masked_ce(logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Summed pixel cross entropy over `keep` (target values outside `keep` may be 255)."""
    per_pixel = F.cross_entropy(logits.float(), target.masked_fill(~keep, 0), reduction="none")
    return (per_pixel * keep).sum()


def global_quantile(values: torch.Tensor, q: float) -> torch.Tensor | None:
    """Exact q-quantile of `values` pooled over all ranks (all-gather of padded vectors);
    None when no rank has a value. Every rank must call it."""
    if not is_distributed():
        return torch.quantile(values.float(), q) if values.numel() else None
    n = torch.tensor([values.numel()], device=values.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.float32, device=values.device)
    padded[:values.numel()] = values.float()
    gathered = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    pooled = torch.cat([g[:int(s.item())] for g, s in zip(gathered, sizes)])
    return torch.quantile(pooled, q) if pooled.numel() else None


@dataclass
class StepContext:
    """What a step function needs besides the batches."""

    model: torch.nn.Module                 # the student (DDP-wrapped when distributed)
    ema: torch.nn.Module | None            # the EMA teacher (Mean Teacher, U2PL)
    progress: float                        # fraction of all steps done, in [0, 1]
    epoch: int                             # 1-based epoch
    epochs: int
    warmup: bool                           # U2PL's supervised-only epochs
    cfg: object                            # config.SemiConfig


def _ce_term(name: str, logits: torch.Tensor, target: torch.Tensor, weight: float = 1.0) -> Term:
    keep = target != IGNORE_INDEX
    return Term(name, masked_ce(logits, target, keep), keep.sum(), weight)


@torch.no_grad()
def _teacher_logits(teacher: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    teacher.eval()
    return teacher(image).float()


def mean_teacher_step(ctx: StepContext, x: torch.Tensor, y: torch.Tensor, u: dict) -> list[Term]:
    """Supervised CE + ramped-up softmax squared error between student (strong view) and EMA
    teacher (weak view), over the strong view's valid pixels. The labeled and unlabeled
    batches may differ in size."""
    b = x.shape[0]
    ctx.model.train()
    logits = ctx.model(torch.cat([x, u["strong1"]]))
    mse_sum, mse_count = softmax_mse_sum(logits[b:], _teacher_logits(ctx.ema, u["weak"]),
                                         valid=u["ignore1"] != IGNORE_INDEX)
    weight = ctx.cfg.consistency_weight * sigmoid_rampup(ctx.progress, ctx.cfg.rampup_fraction)
    return [_ce_term("loss_x", logits[:b], y), Term("loss_u", mse_sum, mse_count, weight)]


def u2pl_step(ctx: StepContext, x: torch.Tensor, y: torch.Tensor, u: dict) -> list[Term]:
    """Supervised CE + CE of the student on CutMixed weak views against the EMA teacher's
    argmax, the alpha_t % highest-entropy valid pixels of the global batch left out; U2PL's
    normalisation (kept-pixel mean times all pixels / kept pixels). The entropy is that of
    the teacher's eval-mode probabilities (U2PL's code takes it from a second, train-mode
    teacher forward of the mixed images). The labeled and unlabeled batches may differ in size."""
    b, bu = x.shape[0], u["weak"].shape[0]
    ctx.model.train()
    if ctx.warmup:
        return [_ce_term("loss_x", ctx.model(x), y)]
    box = u["box1"]
    own, mix = _teacher_logits(ctx.ema, torch.cat([u["weak"], u["mix_weak"]])).softmax(1).split([bu, bu])
    probs = torch.where(box.unsqueeze(1), mix, own)
    ignore = torch.where(box, u["mix_ignore"], u["ignore"])
    logits = ctx.model(torch.cat([x, torch.where(box.unsqueeze(1), u["mix_weak"], u["weak"])]))
    pseudo = probs.argmax(1).masked_fill(ignore == IGNORE_INDEX, IGNORE_INDEX)
    percent = u2pl_unreliable_percent(ctx.epoch - 1, ctx.epochs, ctx.cfg.u2pl_alpha0)
    target = u2pl_drop_unreliable(pseudo, probs, percent, quantile=global_quantile)
    keep = target != IGNORE_INDEX
    pixels = torch.tensor(float(target.numel()), device=target.device)
    unsup = Term("loss_u", masked_ce(logits[b:], target, keep), keep.sum(), ctx.cfg.unsup_weight, pixels=pixels)
    return [_ce_term("loss_x", logits[:b], y), unsup]


def unimatch_step(ctx: StepContext, x: torch.Tensor, y: torch.Tensor, u: dict) -> list[Term]:
    """UniMatch: (loss_x + 0.25 loss_s1 + 0.25 loss_s2 + 0.5 loss_fp) / 2, each unsupervised
    term the CE over confident pixels divided by the valid pixels. The labeled and unlabeled
    batches may differ in size."""
    b, bu = x.shape[0], u["weak"].shape[0]
    model, threshold = ctx.model, ctx.cfg.confidence_threshold
    with torch.no_grad():
        model.eval()
        mix_probs = model(u["mix_weak"]).float().softmax(1)
    model.train()
    logits, logits_fp = model(torch.cat([x, u["weak"]]), feature_dropout=ctx.cfg.feature_dropout)
    weak_probs = logits[b:].detach().float().softmax(1)  # UniMatch's unimatch.py: split([num_lb, num_ulb])
    terms = [_ce_term("loss_x", logits[:b], y, 0.5)]
    strong_in = []
    for v in (1, 2):
        box = u[f"box{v}"]
        strong_in.append(torch.where(box.unsqueeze(1), u[f"mix_strong{v}"], u[f"strong{v}"]))
    strong_logits = model(torch.cat(strong_in)).split([bu, bu])
    for v, s_logits in zip((1, 2), strong_logits):
        box = u[f"box{v}"]
        probs = torch.where(box.unsqueeze(1), mix_probs, weak_probs)
        ignore = torch.where(box, u["mix_ignore"], u["ignore"])
        terms.append(_confident_term(f"loss_s{v}", s_logits, probs, ignore, threshold, 0.125))
    terms.append(_confident_term("loss_fp", logits_fp[b:], weak_probs, u["ignore"], threshold, 0.25))
    return terms


def _confident_term(name: str, logits: torch.Tensor, probs: torch.Tensor, ignore: torch.Tensor,
                    threshold: float, weight: float) -> Term:
    target, confident = confident_pseudo_labels(probs, threshold)
    valid = ignore != IGNORE_INDEX
    return Term(name, masked_ce(logits, target, confident & valid), valid.sum(), weight)


STEPS = {"mean_teacher": mean_teacher_step, "u2pl": u2pl_step, "unimatch": unimatch_step}


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


def train_online_epoch(method: str, model, ema, labeled: Iterator, unlabeled_loader, optimizer, scheduler,
                       device: torch.device, cfg, *, epoch: int, epochs: int, steps_done: int, total_steps: int,
                       warmup_steps: int, amp: bool = False) -> dict[str, float]:
    """One pass over the unlabeled loader; `cfg` is the config's `semi` section."""
    world = dist.get_world_size() if is_distributed() else 1
    step_fn = STEPS[method]
    sums: dict[str, float] = {}
    steps = images = 0
    start = time.perf_counter()
    for u in unlabeled_loader:
        x, y = next(labeled)
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        u = {k: v.to(device, non_blocking=True) for k, v in u.items()}
        step = steps_done + steps
        ctx = StepContext(model, ema, step / max(1, total_steps), epoch, epochs, step < warmup_steps, cfg)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            terms = step_fn(ctx, x, y, u)
        loss, shares = combine(terms, world)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            # During U2PL's warm-up the teacher copies the student (decay 0), as U2PL does.
            decay = 0.0 if step < warmup_steps else ema_decay(step - warmup_steps, cfg.ema_decay)
            ema_update_(ema, unwrap(model), decay)
        for t, share in zip(terms, shares):
            sums[t.name] = sums.get(t.name, 0.0) + float(share)
        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / world
        steps += 1
        images += x.shape[0] + u["weak"].shape[0]
    seconds = time.perf_counter() - start
    totals = global_sum(torch.tensor([images, *[sums.get(k, 0.0) for k in sorted(sums)]], dtype=torch.float64,
                                     device=device)).cpu()
    stats = {k: float(v) / max(1, steps) for k, v in zip(sorted(sums), totals[1:])}
    stats.update(images=int(totals[0]), seconds=seconds, images_per_s=float(totals[0]) / seconds if seconds else math.nan,
                 lr=optimizer.param_groups[0]["lr"])
    return stats
