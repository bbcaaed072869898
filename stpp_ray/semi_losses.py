"""Building blocks of the online semi-supervised methods (issue 7), pure PyTorch.

- Mean Teacher (Tarvainen & Valpola, NeurIPS 2017): `ema_update_`, `sigmoid_rampup`,
  `softmax_mse_sum`.
- U2PL (Wang et al., CVPR 2022): `u2pl_unreliable_percent`, `u2pl_drop_unreliable`.
- DMT (Feng et al., Dynamic Mutual Training): `dmt_weights`.
- UniMatch (Yang et al., CVPR 2023) and FixMatch-style methods: `confident_pseudo_labels`.

Losses return (sum, count) pairs where a mean is taken, so that callers can divide by the
count of the whole global batch (the batch-size invariance of `engine.train_one_epoch`).
Nothing here is wired into a `method:` yet.
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = 255


@torch.no_grad()
def ema_update_(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student for parameters; buffers (BatchNorm
    statistics, counters) are copied from the student."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.lerp_(s.detach(), 1.0 - decay)
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        t.copy_(s)


def sigmoid_rampup(step: float, length: float) -> float:
    """exp(-5 (1 - t)^2) with t = step / length clipped to [0, 1]; 1 when length is 0."""
    if length <= 0:
        return 1.0
    t = min(max(step / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def softmax_mse_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel, the mean over classes of (softmax(student) - softmax(teacher))^2; returns its
    sum over the `valid` pixels (B x H x W bool, default all) and their count. No gradient
    flows into the teacher."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"shape mismatch: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}")
    diff = (student_logits.softmax(1) - teacher_logits.detach().softmax(1)) ** 2
    per_pixel = diff.mean(1)
    if valid is None:
        valid = torch.ones_like(per_pixel, dtype=torch.bool)
    return per_pixel[valid].sum(), valid.sum().to(per_pixel.dtype)


def u2pl_unreliable_percent(epoch: int, epochs: int, alpha0: float = 20.0) -> float:
    """alpha_t = alpha_0 (1 - t / T): the percent of valid unlabeled pixels, those with the
    highest entropy, left out of the pseudo-label loss at epoch t (0-based) of T."""
    if epochs <= 0 or not 0 <= epoch <= epochs:
        raise ValueError(f"need 0 <= epoch <= epochs and epochs > 0, got {epoch} of {epochs}")
    return alpha0 * (1.0 - epoch / epochs)


def u2pl_drop_unreliable(pseudo: torch.Tensor, probs: torch.Tensor, percent: float,
                         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """A copy of `pseudo` (B x H x W) where the valid pixels whose entropy (of `probs`,
    B x C x H x W) reaches the (100 - percent)-th percentile of the valid pixels' entropy
    become `ignore_index`. `percent` <= 0 drops nothing."""
    out = pseudo.clone()
    valid = pseudo != ignore_index
    if percent <= 0 or not valid.any():
        return out
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
    threshold = torch.quantile(entropy[valid].float(), 1.0 - min(percent, 100.0) / 100.0)
    out[valid & (entropy >= threshold)] = ignore_index
    return out


def dmt_weights(current_probs: torch.Tensor, pseudo_probs: torch.Tensor, gamma1: float,
                gamma2: float) -> torch.Tensor:
    """DMT's per-pixel loss weight (B x H x W) for pseudo-labels argmax(pseudo_probs) given the
    model being trained (`current_probs`, both B x C x H x W softmax outputs). With p the
    current model's probability of the pseudo-label class:
    agree -> p^gamma1; disagree and the pseudo-label at least as confident -> p^gamma2;
    disagree and the current model more confident -> 0."""
    if current_probs.shape != pseudo_probs.shape:
        raise ValueError(f"shape mismatch: {tuple(current_probs.shape)} vs {tuple(pseudo_probs.shape)}")
    current_probs, pseudo_probs = current_probs.detach(), pseudo_probs.detach()
    current_conf, current_label = current_probs.max(1)
    pseudo_conf, pseudo_label = pseudo_probs.max(1)
    p = current_probs.gather(1, pseudo_label.unsqueeze(1)).squeeze(1)
    agree = current_label == pseudo_label
    current_wins = current_conf > pseudo_conf
    return torch.where(agree, p ** gamma1, torch.where(current_wins, torch.zeros_like(p), p ** gamma2))


def confident_pseudo_labels(probs: torch.Tensor, threshold: float,
                            ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """argmax labels of `probs` (B x C x H x W) and the mask of pixels whose confidence is at
    least `threshold`; labels of the other pixels are `ignore_index`."""
    conf, label = probs.detach().max(1)
    keep = conf >= threshold
    return torch.where(keep, label, torch.full_like(label, ignore_index)), keep
