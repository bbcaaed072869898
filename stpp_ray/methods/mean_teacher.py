"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017): an EMA teacher predicts the weak view;
the student learns its softmax (squared error) on the strong view (ST++'s strong
augmentation, Cutout included), weighted by a sigmoid ramp-up. As CuriousAI/mean-teacher
pytorch/main.py: the teacher predicts in train mode (its BatchNorm statistics are its own),
and only its parameters are averaged, with decay min(1 - 1/(k+1), 0.999) at update k = 1, 2, ..."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..augment import normalize
from ..datasets import IGNORE_INDEX
from .online import LossTerm, OnlineMethod, StepContext, ce_term, teacher_logits


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


@dataclass
class MeanTeacher(OnlineMethod):
    ema: bool = True
    strong_cutout: bool = True
    first_ema_step: int = 1  # update_ema_variables after global_step += 1: alpha = 0.5 first
    config_keys: tuple[str, ...] = ("semi.mean_teacher_epochs", "semi.mean_teacher_ema_decay", "semi.consistency_weight",
                                    "semi.rampup_fraction")

    def epochs(self, cfg) -> int:
        return cfg.semi.mean_teacher_epochs or super().epochs(cfg)

    def teacher_decay(self, semi) -> float:
        return semi.mean_teacher_ema_decay

    def views(self, data, image, ignore) -> dict[str, torch.Tensor]:
        """`strong1`/`ignore1`: ST++'s strong augmentation, Cutout set to 255."""
        strong, strong_ignore = data.strong(image, ignore)
        return {"strong1": normalize(strong.as_subclass(torch.Tensor)),
                "ignore1": strong_ignore.as_subclass(torch.Tensor).long()}

    def step(self, ctx: StepContext, x: torch.Tensor, y: torch.Tensor, u: dict) -> list[LossTerm]:
        """Supervised CE + ramped-up softmax squared error between student (strong view) and EMA
        teacher (weak view), over the strong view's valid pixels. The labeled and unlabeled
        batches may differ in size."""
        b = x.shape[0]
        ctx.model.train()
        logits = ctx.model(torch.cat([x, u["strong1"]]))
        mse_sum, mse_count = softmax_mse_sum(logits[b:], teacher_logits(ctx.ema, u["weak"], train=True),
                                             valid=u["ignore1"] != IGNORE_INDEX)
        weight = ctx.cfg.consistency_weight * sigmoid_rampup(ctx.progress, ctx.cfg.rampup_fraction)
        return [ce_term("loss_x", logits[:b], y), LossTerm("loss_u", mse_sum, mse_count, weight)]


MEAN_TEACHER = MeanTeacher("mean_teacher", "Mean Teacher")
