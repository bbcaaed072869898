"""UniMatch (Yang et al., CVPR 2023): the model's own prediction of the weak view (train mode)
teaches two strong views (colour, blur, CutMix with a second image predicted in eval mode)
and the weak view's features after channel dropout, above a confidence threshold."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..augment import cutmix_box, normalize
from ..datasets import IGNORE_INDEX
from ..losses import masked_ce
from .online import LossTerm, OnlineMethod, StepContext, ce_term


def confident_pseudo_labels(probs: torch.Tensor, threshold: float,
                            ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """argmax labels of `probs` (B x C x H x W) and the mask of pixels whose confidence is at
    least `threshold`; labels of the other pixels are `ignore_index`."""
    conf, label = probs.detach().max(1)
    keep = conf >= threshold
    return torch.where(keep, label, torch.full_like(label, ignore_index)), keep


def _confident_term(name: str, logits: torch.Tensor, probs: torch.Tensor, ignore: torch.Tensor,
                    threshold: float, weight: float) -> LossTerm:
    target, confident = confident_pseudo_labels(probs, threshold)
    valid = ignore != IGNORE_INDEX
    return LossTerm(name, masked_ce(logits, target, confident & valid), valid.sum(), weight)


@dataclass
class UniMatch(OnlineMethod):
    head: str = "unimatch"
    cutmix_partner: bool = True
    config_keys: tuple[str, ...] = ("semi.confidence_threshold", "semi.feature_dropout", "semi.cutmix_prob")

    def views(self, data, image, ignore) -> dict[str, torch.Tensor]:
        """`strong1`, `strong2` (no Cutout) and their CutMix boxes `box1`, `box2`."""
        out = {}
        for v in (1, 2):
            strong, _ = data.strong(image, ignore)
            out[f"strong{v}"] = normalize(strong.as_subclass(torch.Tensor))
            out[f"box{v}"] = cutmix_box(data.crop, data.cutmix_prob)
        return out

    def step(self, ctx: StepContext, x: torch.Tensor, y: torch.Tensor, u: dict) -> list[LossTerm]:
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
        terms = [ce_term("loss_x", logits[:b], y, 0.5)]
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


UNIMATCH = UniMatch("unimatch", "UniMatch")
