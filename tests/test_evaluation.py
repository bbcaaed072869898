"""Evaluation and inference as the reference code does it: test-time augmentation, sliding
windows, centre crops, and validation batches of mixed image sizes (stub models, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from stpp_ray.config import load_config
from stpp_ray.datasets import Sample
from stpp_ray.evaluation import (EvalSet, collate_pairs, evaluate, predict_probs, sliding_window_probs,
                                 window_starts)
from stpp_ray.metrics import ConfusionMatrix

C = 4


class PixelNet(torch.nn.Module):
    """Per-pixel linear logits: translation-equivariant, so windows change nothing."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, C, 1)
        with torch.no_grad():
            self.conv.weight.mul_(4.0)

    def forward(self, x):
        return self.conv(x)


class RampNet(PixelNet):
    """PixelNet plus a ramp along the width of its input: neither flip- nor shift-equivariant,
    so the logits of each view (scale, flip, window) are known and distinct."""

    def forward(self, x):
        w = x.shape[-1]
        ramp = torch.arange(C, dtype=x.dtype).view(1, C, 1, 1) * torch.linspace(0, 3, w).view(1, 1, 1, w)
        return self.conv(x) + ramp


class Recorder(PixelNet):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape[-2:]))
        return super().forward(x)


def _image(h, w, b=1, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# --- test-time augmentation ---------------------------------------------------------------

def _stpp_tta(model, x, scales, flip):
    """ST++ (LiheYoung/ST-PlusPlus model/semseg/base.py, forward(tta=True)), by hand: resize the
    input to int(h*s) x int(w*s), softmax at that scale, resize the probabilities back; bilinear,
    align_corners=True; the flipped view's softmax is flipped back."""
    h, w = x.shape[-2:]
    total = 0
    with torch.no_grad():
        for s in scales:
            xs = F.interpolate(x, size=(int(h * s), int(w * s)), mode="bilinear", align_corners=True)
            out = F.softmax(model(xs), dim=1)
            total = total + F.interpolate(out, (h, w), mode="bilinear", align_corners=True)
            if flip:
                out = F.softmax(model(xs.flip(3)), dim=1).flip(3)
                total = total + F.interpolate(out, (h, w), mode="bilinear", align_corners=True)
    return total


@pytest.mark.parametrize("flip", [False, True])
def test_tta_takes_the_softmax_at_each_scale_then_resizes_as_stpp(flip):
    model, x = RampNet(), _image(13, 17)
    scales = (0.5, 0.75, 1.0, 1.5, 2.0)
    got = predict_probs(model, x, scales, flip)
    torch.testing.assert_close(got, _stpp_tta(model, x, scales, flip), rtol=1e-5, atol=1e-5)


def test_tta_of_scale_one_without_flip_is_the_softmax():
    model, x = RampNet(), _image(9, 11)
    torch.testing.assert_close(predict_probs(model, x), model(x).softmax(1))


# --- sliding windows ----------------------------------------------------------------------

def test_window_starts_follow_unimatch():
    # UniMatch supervised.py evaluate(): rows/cols 0, s, 2s, ... < size with s = int(2/3 window)
    assert window_starts(1024, 721) == [0, 480, 960]
    assert window_starts(2048, 721) == [0, 480, 960, 1440, 1920]
    assert window_starts(300, 721) == [0]  # smaller than the window: one window, the image itself
    for size, window in [(50, 32), (7, 32), (100, 3), (64, 32)]:
        covered = np.zeros(size, bool)
        for s in window_starts(size, window):
            covered[s:s + window] = True
        assert covered.all()


def test_sliding_windows_are_unimatch_crops_of_the_image():
    model = Recorder()
    sliding_window_probs(model, _image(50, 70), 32)
    # stride 21: rows 0, 21, 42 (heights 32, 29, 8), cols 0, 21, 42, 63 (widths 32, 32, 28, 7)
    assert model.shapes == [(h, w) for h in (32, 29, 8) for w in (32, 32, 28, 7)]


@pytest.mark.parametrize("size", [(50, 70), (20, 25), (32, 90)])
def test_sliding_equals_whole_image_for_a_translation_equivariant_model(size):
    model, x = PixelNet(), _image(*size, b=2)
    torch.testing.assert_close(sliding_window_probs(model, x, 32), model(x).softmax(1), rtol=1e-5, atol=1e-6)


def test_overlaps_are_averaged():
    model, x = RampNet(), _image(40, 50)
    probs = sliding_window_probs(model, x, 24)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 40, 50))
    # UniMatch's unnormalised sum of window softmaxes, by hand: the same argmax
    total, count = torch.zeros(1, C, 40, 50), torch.zeros(40, 50)
    for r in range(0, 40, 16):
        for c in range(0, 50, 16):
            total[:, :, r:r + 24, c:c + 24] += model(x[:, :, r:r + 24, c:c + 24]).softmax(1)
            count[r:r + 24, c:c + 24] += 1
    torch.testing.assert_close(probs, total / count)
    assert count.min() >= 1 and count.max() == 4


def test_tta_with_sliding_windows_on_each_view():
    model, x = PixelNet(), _image(30, 40)
    torch.testing.assert_close(predict_probs(model, x, (0.5, 1.0, 1.5), True, window=16),
                               predict_probs(model, x, (0.5, 1.0, 1.5), True), rtol=1e-5, atol=1e-5)


# --- evaluate -----------------------------------------------------------------------------

def _pairs(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(3, h, w, generator=g), torch.randint(0, C, (h, w), generator=g)) for h, w in sizes]


SIZES = [(20, 30), (30, 20), (20, 30), (17, 23), (30, 20), (20, 30), (40, 41)]


def _cm_one_by_one(model, pairs, predict):
    cm = ConfusionMatrix(C)
    with torch.no_grad():
        for image, mask in pairs:
            cm.update(predict(model, image[None]).argmax(1)[0], mask)
    return cm.matrix


@pytest.mark.parametrize("batch", [1, 2, 3, 8])
def test_evaluate_on_mixed_sizes_equals_one_image_at_a_time(batch):
    model, pairs = RampNet(), _pairs(SIZES)
    loader = torch.utils.data.DataLoader(pairs, batch_size=batch, collate_fn=collate_pairs)
    got = evaluate(model, loader, C, torch.device("cpu")).matrix
    np.testing.assert_array_equal(got, _cm_one_by_one(model, pairs, lambda m, x: m(x)))


def test_evaluate_still_takes_stacked_batches():
    model, pairs = RampNet(), _pairs([(20, 30)] * 4)
    loader = torch.utils.data.DataLoader(pairs, batch_size=2)
    got = evaluate(model, loader, C, torch.device("cpu")).matrix
    np.testing.assert_array_equal(got, _cm_one_by_one(model, pairs, lambda m, x: m(x)))


@pytest.mark.parametrize("batch", [1, 3])
def test_evaluate_sliding_is_sliding_window_inference(batch):
    model, pairs = RampNet(), _pairs(SIZES)
    loader = torch.utils.data.DataLoader(pairs, batch_size=batch, collate_fn=collate_pairs)
    got = evaluate(model, loader, C, torch.device("cpu"), mode="sliding", window=16).matrix
    np.testing.assert_array_equal(got, _cm_one_by_one(model, pairs, lambda m, x: sliding_window_probs(m, x, 16)))
    whole = evaluate(model, loader, C, torch.device("cpu")).matrix
    assert not np.array_equal(got, whole)  # RampNet's logits depend on the window


def test_evaluate_center_crop_scores_the_central_crop_only():
    model, pairs = RampNet(), _pairs([(20, 30), (30, 20), (10, 12)])
    loader = torch.utils.data.DataLoader(pairs, batch_size=3, collate_fn=collate_pairs)
    got = evaluate(model, loader, C, torch.device("cpu"), mode="center_crop", window=16).matrix
    cm = ConfusionMatrix(C)
    with torch.no_grad():
        for image, mask in pairs:
            h, w = mask.shape
            top, left = max(0, (h - 16) // 2), max(0, (w - 16) // 2)
            crop = (slice(top, top + 16), slice(left, left + 16))
            cm.update(model(image[None][(..., *crop)]).argmax(1)[0], mask[crop])
    np.testing.assert_array_equal(got, cm.matrix)
    assert got.sum() == 16 * 16 * 2 + 10 * 12


def test_evaluate_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        evaluate(PixelNet(), [], C, torch.device("cpu"), mode="tiles")


# --- the validation loader of a training rank ----------------------------------------------

def _write_val_set(root, sizes):
    rng = np.random.default_rng(0)
    samples = []
    for i, (h, w) in enumerate(sizes):
        img, mask = root / f"v{i}.png", root / f"v{i}_mask.png"
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels[..., 0] if i == 1 else pixels).save(img)  # one gray image
        Image.fromarray(rng.integers(0, C, (h, w), dtype=np.uint8)).save(mask)
        samples.append(Sample(f"v{i}", img, mask))
    return samples


def test_rank_validation_loader_on_mixed_sizes_any_eval_batch_size(tmp_path):
    from stpp_ray.training import TrainItem
    from stpp_ray.stage_setup import setup_rank

    samples = _write_val_set(tmp_path, [(24, 32), (32, 24), (24, 32), (20, 36), (32, 24)])
    items = [TrainItem(s.image_id, str(s.image_path), str(s.mask_path)) for s in samples] * 2
    matrices = []
    for batch in (1, 3):
        cfg = load_config(None, ["model.backbone=tiny", "model.aspp_channels=8", f"data.num_classes={C}",
                                 "train.batch_size=2", f"train.eval_batch_size={batch}", "train.epochs=1",
                                 "selection.num_checkpoints=1"])
        setup = setup_rank(cfg, items, samples, epochs=1)
        matrices.append(evaluate(setup.model, setup.val_loader, C, torch.device("cpu")).matrix)
    np.testing.assert_array_equal(matrices[1], matrices[0])
    assert matrices[0].sum() == sum(h * w for h, w in [(24, 32), (32, 24), (24, 32), (20, 36), (32, 24)])


def test_eval_set_items_are_full_size(tmp_path):
    samples = _write_val_set(tmp_path, [(24, 32), (32, 24)])
    shapes = [(tuple(x.shape), tuple(y.shape)) for x, y in EvalSet(samples, "voc")]
    assert shapes == [((3, 24, 32), (24, 32)), ((3, 32, 24), (32, 24))]


# --- configuration and report --------------------------------------------------------------

def test_eval_options_resolve_the_window():
    cfg = load_config(None, ["data.crop_size=721"])
    assert cfg.eval.options(cfg.data.crop_size) == {"mode": "whole", "window": 0}
    cfg = load_config(None, ["data.crop_size=721", "eval.mode=sliding"])
    assert cfg.eval.options(cfg.data.crop_size) == {"mode": "sliding", "window": 721}
    cfg = load_config(None, ["eval.mode=center_crop", "eval.window=513"])
    assert cfg.eval.options(cfg.data.crop_size) == {"mode": "center_crop", "window": 513}


@pytest.mark.parametrize("name", ["cityscapes_1_16", "cityscapes_1_8", "cityscapes_1_4", "cityscapes_1_2"])
def test_cityscapes_jobs_evaluate_by_sliding_windows(name):
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[1] / "jobs" / f"{name}.yaml")
    assert cfg.eval.options(cfg.data.crop_size) == {"mode": "sliding", "window": cfg.data.crop_size}


def test_report_states_how_the_miou_was_measured(tmp_path):
    import json

    from stpp_ray.orchestration.report import write_report

    cfg = load_config(None, ["method=supervised", "data.crop_size=721", "eval.mode=sliding"])
    results = {"teacher": {"miou": 0.5, "best_miou": 0.6, "per_class_iou": [0.5] * 21}}
    report = write_report(cfg, tmp_path, results, [{"name": "teacher", "wall_s": 1.0}], partial=True)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    for r in (report, on_disk):
        assert r["eval"] == {"mode": "sliding", "window": 721, "stride": 480}
        assert r["final"]["eval_mode"] == r["teacher"]["eval_mode"] == "sliding"
        assert r["final"]["miou"] == 0.5
    assert "sliding-window inference over the full image (721 px windows, stride 480)" in (tmp_path / "report.md").read_text()
    whole = write_report(load_config(None, ["method=supervised"]), tmp_path, results, [], partial=True)
    assert whole["eval"] == {"mode": "whole"} and whole["final"]["eval_mode"] == "whole"
