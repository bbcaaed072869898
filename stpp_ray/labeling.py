"""One-pass stability scoring and pseudo-labeling of a batch of unlabeled images.

`Labeler` holds the K scoring checkpoints and the labeling model. For each batch it
runs every checkpoint once, scores each image from those predictions and takes the
pseudo-label from the labeling model in the same pass (reusing the final
checkpoint's probabilities when it is the labeling model and no TTA is asked).
It is a plain callable on dicts of numpy arrays: Ray Data's `map_batches` uses it as
an actor class, and tests call it directly.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np
import torch

from .augment import normalize
from .config import TTA_SCALES
from .weights import load_model
from .datasets import encode_mask_png, read_image
from .evaluation import predict_probs
from .stability import batched_checkpoint_ious, stability_of_rows


class Labeler:
    """Scores and pseudo-labels batches of images given as `image_id` and `image_path` columns."""

    def __init__(self, checkpoint_paths: Sequence[str], label_checkpoint: str, *, tta: bool = False,
                 tta_scales: Sequence[float] = TTA_SCALES, device: str = "cpu",
                 num_threads: int = 0, expect_arch: dict | None = None):
        if num_threads > 0:
            torch.set_num_threads(num_threads)
        self.device = torch.device(device)
        self.paths = list(checkpoint_paths)
        loaded = [load_model(p, expect_arch) for p in self.paths]
        self.models = [m.to(self.device).to(memory_format=torch.channels_last) for m, _ in loaded]
        self.epochs = [int(blob["meta"].get("epoch", -1)) for _, blob in loaded]
        self.num_classes = int(loaded[-1][1]["arch"]["num_classes"]) if loaded else None
        self.label_index = self.paths.index(label_checkpoint) if label_checkpoint in self.paths else None
        if self.label_index is None:
            model, blob = load_model(label_checkpoint, expect_arch)
            self.label_model = model.to(self.device).to(memory_format=torch.channels_last)
            self.num_classes = int(blob["arch"]["num_classes"])
        else:
            self.label_model = self.models[self.label_index]
        self.scales = tuple(tta_scales) if tta else (1.0,)
        self.flip = tta

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        ids = [str(i) for i in batch["image_id"]]
        images = [read_image(str(p)) for p in batch["image_path"]]
        out: dict[str, list] = defaultdict(lambda: [None] * len(ids))
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for idx, image in enumerate(images):
            by_size[image.shape[:2]].append(idx)  # same-size images share one forward pass
        for indices in by_size.values():
            stacked = np.stack([images[i] for i in indices])
            for key, values in self._label_group(stacked).items():
                for i, v in zip(indices, values):
                    out[key][i] = v
        out["image_id"] = ids
        out["image_path"] = [str(p) for p in batch["image_path"]]
        return dict(out)

    @torch.inference_mode()
    def _label_group(self, images: np.ndarray) -> dict[str, list]:
        x = normalize(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()).to(self.device)
        preds, probs = [], None
        for k, model in enumerate(self.models):
            logits = model(x.contiguous(memory_format=torch.channels_last))
            preds.append(logits.argmax(1))
            if k == self.label_index and self.scales == (1.0,) and not self.flip:
                probs = logits.float().softmax(1)
        if probs is None:
            probs = predict_probs(self.label_model, x, self.scales, self.flip)
            probs = probs / probs.sum(1, keepdim=True)
        b = images.shape[0]
        if len(preds) > 1:
            ckpt_miou = batched_checkpoint_ious(torch.stack(preds), self.num_classes).cpu().double().tolist()
        else:
            ckpt_miou = [[] for _ in range(b)]
        # Every checkpoint's score, keyed by position (the epochs need not be distinct here).
        earlier = len(preds) - 1
        stability = stability_of_rows(np.asarray(ckpt_miou, np.float64).reshape(-1), np.tile(np.arange(earlier), b),
                                      np.arange(b + 1) * earlier, range(earlier + 1)).tolist()
        confidence, label = probs.max(1)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
        masks = label.to(torch.uint8).cpu().numpy()
        confidence_maps = (confidence * 254).round().to(torch.uint8).cpu().numpy()
        return {
            "mask_png": [encode_mask_png(m) for m in masks],
            "confidence_png": [encode_mask_png(c) for c in confidence_maps],
            "stability": stability,
            "ckpt_miou": ckpt_miou,
            "ckpt_epochs": [self.epochs[:-1]] * b,
            "confidence": confidence.mean((1, 2)).double().cpu().tolist(),
            "entropy": entropy.mean((1, 2)).double().cpu().tolist(),
            "height": [int(images.shape[1])] * b,
            "width": [int(images.shape[2])] * b,
        }
