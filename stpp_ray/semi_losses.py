"""Building blocks of the online semi-supervised methods (issue 7), pure PyTorch.

- Mean Teacher (Tarvainen & Valpola, NeurIPS 2017): `ema_update_`, `sigmoid_rampup`,
  `softmax_mse_sum`.
- U2PL (Wang et al., CVPR 2022): `u2pl_unreliable_percent`, `u2pl_drop_unreliable`.
- DMT (Feng et al., Dynamic Mutual Training): `dmt_weights`, `class_balanced_thresholds`.
- UniMatch (Yang et al., CVPR 2023) and FixMatch-style methods: `confident_pseudo_labels`.

Losses return (sum, count) pairs where a mean is taken, so that callers can divide by the
count of the whole global batch (the batch-size invariance of `engine.train_one_epoch`).
`online.py` (Mean Teacher, U2PL, UniMatch) and `engine.train_one_epoch` (DMT) use them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

IGNORE_INDEX = 255


@torch.no_grad()
def ema_update_(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student for parameters and floating-point
    buffers (BatchNorm running statistics, so that they match the averaged weights);
    integer buffers (batch counters) are copied from the student."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.lerp_(s.detach(), 1.0 - decay)
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        if t.is_floating_point():
            t.lerp_(s, 1.0 - decay)
        else:
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


def dmt_weights(current_probs: torch.Tensor, pseudo_label: torch.Tensor, pseudo_conf: torch.Tensor,
                gamma1: float, gamma2: float) -> torch.Tensor:
    """DMT's per-pixel loss weight (B x H x W) for pseudo-labels `pseudo_label` of confidence
    `pseudo_conf` (B x H x W) given the model being trained (`current_probs`, B x C x H x W
    softmax). With p the current model's probability of the pseudo-label class:
    agree -> p^gamma1; disagree and the pseudo-label at least as confident -> p^gamma2;
    disagree and the current model more confident -> 0. Ignored pixels (255) get any value."""
    if current_probs.shape[0:1] + current_probs.shape[2:] != pseudo_label.shape:
        raise ValueError(f"shape mismatch: {tuple(current_probs.shape)} vs {tuple(pseudo_label.shape)}")
    current_probs = current_probs.detach()
    current_conf, current_label = current_probs.max(1)
    label = pseudo_label.long().clamp_max(current_probs.shape[1] - 1)
    p = current_probs.gather(1, label.unsqueeze(1)).squeeze(1)
    agree = current_label == label
    current_wins = current_conf > pseudo_conf.to(current_conf.dtype)
    return torch.where(agree, p ** gamma1, torch.where(current_wins, torch.zeros_like(p), p ** gamma2))


def confident_pseudo_labels(probs: torch.Tensor, threshold: float,
                            ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """argmax labels of `probs` (B x C x H x W) and the mask of pixels whose confidence is at
    least `threshold`; labels of the other pixels are `ignore_index`."""
    conf, label = probs.detach().max(1)
    keep = conf >= threshold
    return torch.where(keep, label, torch.full_like(label, ignore_index)), keep


def class_balanced_thresholds(histogram: np.ndarray, ratio: float) -> np.ndarray:
    """DMT's (CBST-style) pseudo-label curriculum: per class, the confidence level of its
    (floor(n * ratio) + 1)-th most confident pixel, from `histogram` (C x L counts of pixels
    predicted as class c at quantised confidence level l). Pixels below their class's level
    are left out, so about the top `ratio` of each class is kept; ratio >= 1 keeps all."""
    histogram = np.asarray(histogram)
    levels = np.zeros(histogram.shape[0], dtype=np.int64)
    if ratio >= 1:
        return levels
    for c, counts in enumerate(histogram):
        n = int(counts.sum())
        if n == 0:
            continue
        at_or_above = np.cumsum(counts[::-1])[::-1]  # pixels with level >= l
        levels[c] = int(np.nonzero(at_or_above >= min(n, int(n * ratio) + 1))[0].max())
    return levels
