"""DMT (Feng et al., Dynamic Mutual Training): two models teach each other in phases.

After the SupOnly teacher (model A), a second teacher B trains with another seed. In phase
p with ratio r_p, A and B label U, and each fine-tunes on the other's labels, keeping the top
r_p of each class (class-balanced thresholds, a curriculum) and weighting each pixel by how
far the model being trained agrees (`dmt_weights`). The last phase trains A only.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import numpy as np
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from ..datasets import IGNORE_INDEX, decode_mask_png
from ..pseudo_labels import PseudoItems, batches, read_selection
from ..training import NO_CONFIDENCE
from .base import SUPERVISED, Method, PseudoLabels, plain_pseudo_items, Stage, StageBuilder, StageTraining, derive_fingerprint
from .self_training import labeling_fingerprint, student_epochs, teacher_fingerprint, teacher_stages

PHASE = "dmt_phase"  # a model fine-tuned on the other model's curriculum of pseudo-labels
# voldemortX/DST-CBC segmentation/dmt-voc-20-1.sh and dmt-voc-106-1lr.sh (ep=4, lr=0.001;
# dmt-city-8-1.sh: ep=10, lr=0.004, gammas 3) and segmentation/main.py (SGD momentum 0.9,
# --weight-decay default 0.0005, one lr for backbone and classifier): `semi.dmt_*`.
DMT_KEYS = ("semi.dmt_gamma1", "semi.dmt_gamma2", "semi.dmt_phase_epochs", "semi.dmt_lr", "semi.dmt_head_lr_multiplier",
            "semi.dmt_weight_decay", "train.student_epochs")


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


def dmt_loss_sum(logits: torch.Tensor, mask: torch.Tensor, confidence: torch.Tensor,
                 gammas: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """DMT's dynamically weighted CE, summed over valid pixels, and their count: pseudo-labeled
    pixels weighted by `dmt_weights`, ground-truth pixels by 1."""
    valid = mask != IGNORE_INDEX
    per_pixel = F.cross_entropy(logits.float(), mask.masked_fill(~valid, 0), reduction="none")
    weights = dmt_weights(logits.detach().float().softmax(1), mask, confidence.float() / (NO_CONFIDENCE - 1), *gammas)
    weights = torch.where(confidence == NO_CONFIDENCE, torch.ones_like(weights), weights)
    return (per_pixel * weights * valid).sum(), valid.sum()


def read_curriculum_items(items: PseudoItems, ratio: float, num_classes: int) -> tuple[PseudoItems, list[int]]:
    """DMT's training items: pseudo-labels below their class's confidence level (the top
    `ratio` of each class kept, `class_balanced_thresholds` over all these images) set to
    255 when an item is loaded (`training.item_data`), with their confidence maps. The
    levels come from one streamed pass over the shards. Returns the items and the levels (0-254)."""
    histogram = np.zeros((num_classes, 256), dtype=np.int64)
    for batch in batches(items.index.directory, ["image_id", "mask_png", "confidence_png"]):
        batch = batch.filter(pc.is_in(batch.column(0), value_set=items.image_ids))
        for mask_png, conf_png in zip(batch.column(1).to_pylist(), batch.column(2).to_pylist()):
            np.add.at(histogram, (decode_mask_png(mask_png).ravel(), decode_mask_png(conf_png).ravel()), 1)
    levels = class_balanced_thresholds(histogram, ratio)
    kept = PseudoItems(items.index, items.image_ids, items.rows, strong=False, levels=tuple(levels.tolist()))
    return kept, levels.tolist()


def phase_epochs(cfg) -> int:
    """Fine-tuning epochs per model per phase."""
    return cfg.semi.dmt_phase_epochs or student_epochs(cfg)


def curriculum_items(source: PseudoLabels, num_classes: int) -> PseudoItems:
    """A phase's training items from the other model's labels: its curriculum where the
    source names a ratio, else every pseudo-label."""
    if source.curriculum_ratio is None:
        return plain_pseudo_items(source, num_classes)
    items, _ = read_curriculum_items(read_selection(source.selection), source.curriculum_ratio, num_classes)
    return items


class DynamicMutualTraining(Method):
    def stages(self, cfg, build: StageBuilder) -> list[Stage]:
        cfg_b = cfg.model_copy(update={"run": cfg.run.model_copy(update={"seed": cfg.run.seed + cfg.semi.dmt_seed_offset})})
        label_fp = labeling_fingerprint(cfg)
        phase_fp = cfg.fingerprint(*DMT_KEYS)
        models = {"a": ("teacher", teacher_fingerprint(cfg)), "b": ("teacher_b", derive_fingerprint(teacher_fingerprint(cfg_b), "teacher_b"))}
        graph = teacher_stages(cfg, build)
        graph.append(build.train("teacher_b", models["b"][1], kind=SUPERVISED, epochs=cfg.train.epochs,
                                 checkpoint_epochs=[cfg.train.epochs], cfg=cfg_b))
        ratios = cfg.semi.dmt_ratios
        for p, ratio in enumerate(ratios, start=1):
            last = p == len(ratios)
            labels = {}
            for who in ("b",) if last else ("a", "b"):
                stage, fp = models[who]
                labels[who] = (f"dmt_label_{stage}", derive_fingerprint(fp, "label", label_fp))
                graph.append(build.label(*labels[who], stage, build.unlabeled_ids, scoring=False))
            trained = {}
            for who, other in (("a", "b"),) if last else (("a", "b"), ("b", "a")):
                name = f"dmt_{who}{p}"
                fp = derive_fingerprint(models[who][1], labels[other][1], phase_fp, str(ratio))
                source = lambda label=labels[other][0], r=ratio: [  # noqa: E731
                    replace(build.pseudo_labels(label, build.unlabeled_ids()), curriculum_ratio=r)]
                graph.append(build.train(name, fp, kind=PHASE, epochs=phase_epochs(cfg), checkpoint_epochs=[phase_epochs(cfg)],
                                         pseudo=source, cfg=cfg if who == "a" else cfg_b, init_from=models[who][0]))
                trained[who] = (name, fp)
            models.update(trained)
        return graph

    def final_stage(self, cfg) -> str:
        return f"dmt_a{len(cfg.semi.dmt_ratios)}"

    def training(self, kind: str, cfg) -> StageTraining:
        if kind != PHASE:
            return super().training(kind, cfg)
        s = cfg.semi
        return StageTraining(s.dmt_lr, s.dmt_head_lr_multiplier, cfg.train.momentum, s.dmt_weight_decay,
                             criterion=partial(dmt_loss_sum, gammas=(s.dmt_gamma1, s.dmt_gamma2)),
                             with_confidence=True, pseudo_items=curriculum_items)


DMT = DynamicMutualTraining("dmt", "DMT")
