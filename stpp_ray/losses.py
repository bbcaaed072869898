"""The losses several methods share (a method's own live in its module). Sums and pixel
counts are kept apart so that the mean over a *global* batch can be formed across DDP
workers (batch-size invariance)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .datasets import IGNORE_INDEX


def cross_entropy_sum(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed pixel cross entropy and the number of pixels it covers (ignore_index skipped)."""
    target = target.long()
    loss_sum = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    count = (target != ignore_index).sum()
    return loss_sum, count


def masked_ce(logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Summed pixel cross entropy over `keep` (target values outside `keep` may be 255)."""
    per_pixel = F.cross_entropy(logits.float(), target.masked_fill(~keep, 0), reduction="none")
    return (per_pixel * keep).sum()
