"""U2PL (Wang et al., CVPR 2022): the EMA teacher's argmax on the weak views is the target of
the student on a CutMix of two weak views; the alpha_t % highest-entropy pixels of the
(global) batch are left out. One supervised-only warm-up epoch, as U2PL's default, during
which the teacher copies the student. Its contrastive term (`u2pl_contrastive.py`) pulls
reliable pixels to their class prototype and away from unreliable pixels stored in per-class
memory banks (`semi.u2pl_contrastive`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..augment import half_box
from ..datasets import IGNORE_INDEX
from ..losses import masked_ce
from ..training import is_distributed, sample_seed
from .online import LossTerm, OnlineMethod, StepContext, ce_term, teacher_logits
from .u2pl_contrastive import ClassQueues, ContrastSettings, contrastive_sums

_CONTRAST_STREAM = 3  # the seed stream of the anchors' and negatives' draws


def u2pl_unreliable_percent(epoch: int, epochs: int, alpha0: float = 20.0) -> float:
    """alpha_t = alpha_0 (1 - t / T): the percent of valid unlabeled pixels, those with the
    highest entropy, left out of the pseudo-label loss at epoch t (0-based) of T."""
    if epochs <= 0 or not 0 <= epoch <= epochs:
        raise ValueError(f"need 0 <= epoch <= epochs and epochs > 0, got {epoch} of {epochs}")
    return alpha0 * (1.0 - epoch / epochs)


def _local_quantile(values: torch.Tensor, q: float) -> torch.Tensor | None:
    return torch.quantile(values.float(), q) if values.numel() else None


def pixel_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-pixel entropy (B x H x W) of class probabilities (B x C x H x W)."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(1)


def u2pl_drop_unreliable(pseudo: torch.Tensor, probs: torch.Tensor, percent: float,
                         ignore_index: int = IGNORE_INDEX, quantile=_local_quantile) -> torch.Tensor:
    """A copy of `pseudo` (B x H x W) where the valid pixels whose entropy (of `probs`,
    B x C x H x W) reaches the (100 - percent)-th percentile of the valid pixels' entropy
    become `ignore_index`. `percent` <= 0 drops nothing. `quantile(values, q)` (None when
    there are no values) may pool the values of all workers (`online.global_quantile`)."""
    out = pseudo.clone()
    if percent <= 0:
        return out
    valid = pseudo != ignore_index
    entropy = pixel_entropy(probs)
    threshold = quantile(entropy[valid], 1.0 - min(percent, 100.0) / 100.0)
    if threshold is not None:
        out[valid & (entropy >= threshold)] = ignore_index
    return out


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
class U2PLMethod(OnlineMethod):
    ema: bool = True
    cutmix_partner: bool = True
    config_keys: tuple[str, ...] = ("semi.ema_decay", "semi.unsup_weight", "semi.u2pl_alpha0", "semi.u2pl_warmup_epochs",
                                    "semi.cutmix_prob", "semi.u2pl_contrastive", "semi.u2pl_contrastive_weight",
                                    "semi.u2pl_temperature", "semi.u2pl_num_queries", "semi.u2pl_num_negatives",
                                    "semi.u2pl_low_rank", "semi.u2pl_high_rank", "semi.u2pl_positive_threshold",
                                    "semi.u2pl_negative_threshold", "semi.u2pl_entropy_percent", "semi.u2pl_queue_size",
                                    "semi.u2pl_first_queue_size")

    def projection_channels(self, cfg) -> int:
        """The projection head's width: the decoder's (U2PL: 256), with the contrastive term."""
        return cfg.model.aspp_channels if cfg.semi.u2pl_contrastive else 0

    def make_state(self, cfg) -> ClassQueues | None:
        """The memory banks, one per class, of the contrastive term's negatives."""
        if not cfg.semi.u2pl_contrastive:
            return None
        s = cfg.semi
        return ClassQueues([s.u2pl_first_queue_size] + [s.u2pl_queue_size] * (cfg.data.num_classes - 1),
                           cfg.model.aspp_channels)

    def trains_labeled_batch_alone(self, cfg) -> bool:
        return cfg.semi.u2pl_warmup_epochs > 0  # the warm-up steps forward the labeled batch alone

    def warmup_steps(self, cfg, steps_per_epoch: int) -> int:
        return cfg.semi.u2pl_warmup_epochs * steps_per_epoch

    @torch.no_grad()
    def before_step(self, ema, student, step: int, warmup_steps: int, steps_per_epoch: int) -> None:
        """train_semi.py: through the first semi-supervised epoch the teacher's parameters are the
        student's at the start of every step; the EMA takes over after it. Deviation: its first step
        also copies the student's BatchNorm statistics (docs/DEVIATIONS.md)."""
        if warmup_steps <= step < warmup_steps + steps_per_epoch:
            for t, s in zip(ema.parameters(), student.parameters(), strict=True):
                t.copy_(s)
            if step == warmup_steps:  # the teacher's own statistics so far are those of its initial weights
                for t, s in zip(ema.buffers(), student.buffers(), strict=True):
                    t.copy_(s)

    def views(self, data, image, ignore) -> dict[str, torch.Tensor]:
        """`box1`: the CutMix region of half the crop's area."""
        return {"box1": half_box(data.crop, data.cutmix_prob)}

    def step(self, ctx: StepContext, x: torch.Tensor, y: torch.Tensor, u: dict) -> list[LossTerm]:
        """Supervised CE + CE of the student on CutMixed weak views against the EMA teacher's
        argmax, the alpha_t % highest-entropy valid pixels of the global batch left out; U2PL's
        normalisation (kept-pixel mean times all pixels / kept pixels). As U2PL's train_semi.py,
        the pseudo-labels come from the teacher in eval mode and the entropy from a second,
        train-mode teacher forward of the student's images. With `semi.u2pl_contrastive`, the
        contrastive term `loss_c`. The labeled and unlabeled batches may differ in size."""
        b, bu = x.shape[0], u["weak"].shape[0]
        contrastive = ctx.state is not None
        ctx.model.train()
        if ctx.warmup:
            with torch.no_grad():  # train_semi.py: the teacher's BatchNorm statistics follow the labeled batches
                ctx.ema.train()
                ctx.ema(x, projection=contrastive)
            if not contrastive:
                return [ce_term("loss_x", ctx.model(x), y)]
            logits, _, rep = ctx.model(x, projection=True)
            # The projection head takes part in every step (DDP needs a gradient for it), as U2PL's 0 * rep.sum().
            return [ce_term("loss_x", logits, y), LossTerm("loss_c", rep.sum() * 0.0, torch.zeros((), device=x.device))]
        box = u["box1"]
        own, mix = teacher_logits(ctx.ema, torch.cat([u["weak"], u["mix_weak"]])).softmax(1).split([bu, bu])
        probs = torch.where(box.unsqueeze(1), mix, own)
        ignore = torch.where(box, u["mix_ignore"], u["ignore"])
        images = torch.cat([x, torch.where(box.unsqueeze(1), u["mix_weak"], u["weak"])])
        if contrastive:
            logits, _, rep = ctx.model(images, projection=True)
        else:
            logits = ctx.model(images)
        with torch.no_grad():  # train_semi.py's second teacher forward, in train mode, of all the student's images
            ctx.ema.train()
            teacher_out = ctx.ema(images, projection=contrastive)
        teacher_probs = (teacher_out[0] if contrastive else teacher_out)[b:].float().softmax(1)
        pseudo = probs.argmax(1).masked_fill(ignore == IGNORE_INDEX, IGNORE_INDEX)
        percent = u2pl_unreliable_percent(ctx.epoch - 1, ctx.epochs, ctx.cfg.u2pl_alpha0)
        target = u2pl_drop_unreliable(pseudo, teacher_probs, percent, quantile=global_quantile)
        keep = target != IGNORE_INDEX
        pixels = torch.tensor(float(target.numel()), device=target.device)
        unsup = LossTerm("loss_u", masked_ce(logits[b:], target, keep), keep.sum(), ctx.cfg.unsup_weight, pixels=pixels)
        terms = [ce_term("loss_x", logits[:b], y), unsup]
        if contrastive:
            terms.append(self._contrastive_term(ctx, teacher_out, rep, y, pseudo, teacher_probs, b))
        return terms

    def _contrastive_term(self, ctx: StepContext, teacher_out: tuple, rep: torch.Tensor, y: torch.Tensor,
                          pseudo: torch.Tensor, probs: torch.Tensor, b: int) -> LossTerm:
        """train_semi.py's masks at the feature resolution: anchors among the labeled pixels
        and the alpha_t % lowest-entropy unlabeled ones, negatives among the labeled pixels
        and the alpha_t % highest-entropy ones; then `contrastive_sums`."""
        s = ctx.cfg
        _, teacher_small, teacher_rep = teacher_out
        with torch.no_grad():
            valid = pseudo != IGNORE_INDEX
            entropy = pixel_entropy(probs)
            alpha = s.u2pl_entropy_percent * (1.0 - (ctx.epoch - 1) / ctx.epochs) / 100.0
            low, high = global_quantile(entropy[valid], alpha), global_quantile(entropy[valid], 1.0 - alpha)
            low_u = valid & (entropy <= low) if low is not None else torch.zeros_like(valid)
            high_u = valid & (entropy >= high) if high is not None else torch.zeros_like(valid)
            size = rep.shape[-2:]
            small = lambda m: F.interpolate(m[:, None].float(), size=size, mode="nearest")[:, 0]  # noqa: E731
            labels = small(torch.cat([y, pseudo])).long()
            labeled = torch.cat([y != IGNORE_INDEX, torch.zeros_like(valid)])
            anchor_mask = small(labeled | torch.cat([torch.zeros_like(y, dtype=torch.bool), low_u])).bool()
            negative_mask = small(labeled | torch.cat([torch.zeros_like(y, dtype=torch.bool), high_u])).bool()
        num_classes = teacher_small.shape[1]
        settings = ContrastSettings(s.u2pl_num_queries, s.u2pl_num_negatives, s.u2pl_temperature,
                                    s.u2pl_positive_threshold, s.u2pl_negative_threshold,
                                    min(s.u2pl_low_rank, num_classes), min(s.u2pl_high_rank, num_classes))
        generator = torch.Generator().manual_seed(sample_seed(ctx.seed, ctx.epoch, ctx.step, _CONTRAST_STREAM))
        total, count = contrastive_sums(rep, teacher_rep, teacher_small.float().softmax(1), labels, anchor_mask,
                                        negative_mask, b, ctx.state, settings, generator)
        return LossTerm("loss_c", total, count, s.u2pl_contrastive_weight)


U2PL = U2PLMethod("u2pl", "U2PL")
