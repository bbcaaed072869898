"""U2PL (Wang et al., CVPR 2022): the EMA teacher's argmax on the weak views is the target of
the student on a CutMix of two weak views; the alpha_t % highest-entropy pixels of the
(global) batch are left out. One supervised-only warm-up epoch, as U2PL's default, during
which the teacher copies the student. Its contrastive term is not implemented."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..augment import half_box
from ..datasets import IGNORE_INDEX
from ..losses import masked_ce
from ..training import is_distributed
from .online import LossTerm, OnlineMethod, StepContext, ce_term, teacher_logits


def u2pl_unreliable_percent(epoch: int, epochs: int, alpha0: float = 20.0) -> float:
    """alpha_t = alpha_0 (1 - t / T): the percent of valid unlabeled pixels, those with the
    highest entropy, left out of the pseudo-label loss at epoch t (0-based) of T."""
    if epochs <= 0 or not 0 <= epoch <= epochs:
        raise ValueError(f"need 0 <= epoch <= epochs and epochs > 0, got {epoch} of {epochs}")
    return alpha0 * (1.0 - epoch / epochs)


def _local_quantile(values: torch.Tensor, q: float) -> torch.Tensor | None:
    return torch.quantile(values.float(), q) if values.numel() else None


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
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
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
                                    "semi.cutmix_prob")

    def trains_labeled_batch_alone(self, cfg) -> bool:
        return cfg.semi.u2pl_warmup_epochs > 0  # the warm-up steps forward the labeled batch alone

    def warmup_steps(self, cfg, steps_per_epoch: int) -> int:
        return cfg.semi.u2pl_warmup_epochs * steps_per_epoch

    def views(self, data, image, ignore) -> dict[str, torch.Tensor]:
        """`box1`: the CutMix region of half the crop's area."""
        return {"box1": half_box(data.crop, data.cutmix_prob)}

    def step(self, ctx: StepContext, x: torch.Tensor, y: torch.Tensor, u: dict) -> list[LossTerm]:
        """Supervised CE + CE of the student on CutMixed weak views against the EMA teacher's
        argmax, the alpha_t % highest-entropy valid pixels of the global batch left out; U2PL's
        normalisation (kept-pixel mean times all pixels / kept pixels). The entropy is that of
        the teacher's eval-mode probabilities (U2PL's code takes it from a second, train-mode
        teacher forward of the mixed images). The labeled and unlabeled batches may differ in size."""
        b, bu = x.shape[0], u["weak"].shape[0]
        ctx.model.train()
        if ctx.warmup:
            return [ce_term("loss_x", ctx.model(x), y)]
        box = u["box1"]
        own, mix = teacher_logits(ctx.ema, torch.cat([u["weak"], u["mix_weak"]])).softmax(1).split([bu, bu])
        probs = torch.where(box.unsqueeze(1), mix, own)
        ignore = torch.where(box, u["mix_ignore"], u["ignore"])
        logits = ctx.model(torch.cat([x, torch.where(box.unsqueeze(1), u["mix_weak"], u["weak"])]))
        pseudo = probs.argmax(1).masked_fill(ignore == IGNORE_INDEX, IGNORE_INDEX)
        percent = u2pl_unreliable_percent(ctx.epoch - 1, ctx.epochs, ctx.cfg.u2pl_alpha0)
        target = u2pl_drop_unreliable(pseudo, probs, percent, quantile=global_quantile)
        keep = target != IGNORE_INDEX
        pixels = torch.tensor(float(target.numel()), device=target.device)
        unsup = LossTerm("loss_u", masked_ce(logits[b:], target, keep), keep.sum(), ctx.cfg.unsup_weight, pixels=pixels)
        return [ce_term("loss_x", logits[:b], y), unsup]


U2PL = U2PLMethod("u2pl", "U2PL (no contrastive term)")
