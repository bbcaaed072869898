"""Tests for stpp_ray.plots: palette, overlay, and that each plot writes a valid PNG."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from stpp_ray.plots import (
    VOC_COLORS,
    colorize,
    overlay,
    per_class_iou_chart,
    pseudo_label_grid,
    score_histogram,
    score_histogram_counts,
)

RNG = np.random.default_rng(0)


def _check_png(path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG" and img.width > 0 and img.height > 0


def test_voc_palette_known_values():
    assert VOC_COLORS.shape == (256, 3) and VOC_COLORS.dtype == np.uint8
    mask = np.array([[0, 1, 2], [3, 15, 255]], dtype=np.uint8)
    rgb = colorize(mask)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == (0, 0, 0)
    assert tuple(rgb[0, 1]) == (128, 0, 0)
    assert tuple(rgb[0, 2]) == (0, 128, 0)
    assert tuple(rgb[1, 0]) == (128, 128, 0)
    assert tuple(rgb[1, 1]) == (192, 128, 128)  # VOC "person"
    assert tuple(rgb[1, 2]) == (224, 224, 192)


def test_overlay_keeps_background_and_blends_foreground():
    image = RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    mask = np.zeros((6, 5), dtype=np.uint8)
    mask[2:4, 1:3] = 1
    out = overlay(image, mask, alpha=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    bg = mask == 0
    np.testing.assert_array_equal(out[bg], image[bg])
    expected = np.rint(0.5 * image[2, 1].astype(float) + 0.5 * np.array([128, 0, 0]))
    np.testing.assert_array_equal(out[2, 1], expected.astype(np.uint8))


def test_overlay_rejects_size_mismatch():
    with pytest.raises(ValueError):
        overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), np.uint8))


def _row(i: int, reliable: bool, score: float, shape=(24, 32)) -> dict:
    return {
        "image": RNG.integers(0, 256, (*shape, 3), dtype=np.uint8),
        "mask": RNG.integers(0, 4, shape, dtype=np.uint8),
        "image_id": f"img_{i:03d}",
        "score": score,
        "reliable": reliable,
    }


def test_pseudo_label_grid_writes_png(tmp_path):
    rows = [_row(i, i < 5, s) for i, s in enumerate([0.9, 0.8, float("nan"), 0.95, 0.7, 0.1, 0.3, 0.2])]
    rows.append(_row(99, False, 0.05, shape=(40, 20)))
    out = pseudo_label_grid(rows, tmp_path / "sub" / "grid.png", title="round 1", max_per_group=3)
    assert out == tmp_path / "sub" / "grid.png"
    _check_png(out)


def test_pseudo_label_grid_with_empty_group(tmp_path):
    out = pseudo_label_grid([_row(0, True, 0.5)], tmp_path / "grid.png")
    _check_png(out)


def test_score_histogram_writes_png(tmp_path):
    scores = list(RNG.random(50)) + [float("nan")]
    _check_png(score_histogram(scores, tmp_path / "hist.png", threshold=0.4, title="scores"))
    _check_png(score_histogram([], tmp_path / "empty.png"))


def test_score_histogram_counts_add_up_and_skip_nan():
    scores = [0.0, 0.05, 0.15, 0.5, 0.99, 1.0, float("nan"), None]
    bins = score_histogram_counts(scores, bins=10)
    assert len(bins) == 10
    assert sum(b["count"] for b in bins) == 6
    assert bins[0] == {"lo": 0.0, "hi": 0.1, "count": 2}
    assert bins[-1]["hi"] == 1.0 and bins[-1]["count"] == 2
    assert all(math.isclose(a["hi"], b["lo"]) for a, b in zip(bins, bins[1:]))
    assert sum(b["count"] for b in score_histogram_counts([float("nan")])) == 0


def test_per_class_iou_chart_writes_png(tmp_path):
    names = ["background", "cat", "dog", "bird"]
    series = {"teacher": [0.9, 0.5, None, 0.2], "final student": [0.92, float("nan"), 0.4, 0.3]}
    _check_png(per_class_iou_chart(names, series, tmp_path / "iou.png", title="IoU"))


def test_per_class_iou_chart_rejects_length_mismatch(tmp_path):
    with pytest.raises(ValueError):
        per_class_iou_chart(["a", "b"], {"x": [0.1]}, tmp_path / "bad.png")
