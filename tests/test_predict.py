"""Tests for stpp_ray.predict: masks and overlays written for image files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stpp_ray.augment import normalize
from stpp_ray.weights import load_model, save_weights
from stpp_ray.datasets import DatasetError, read_image
from stpp_ray.evaluation import predict_probs
from stpp_ray.models import build_model
from stpp_ray.plots import VOC_COLORS
from stpp_ray.predict import predict_images, predict_mask

ARCH = {"name": "deeplabv3plus", "backbone": "mobilenet_v3_large", "output_stride": 16,
        "aspp_channels": 16, "num_classes": 3}
SIZES = {"a.png": (32, 32), "b.png": (40, 48)}  # name -> (height, width)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model("deeplabv3plus", "mobilenet_v3_large", 3, aspp_channels=16)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_weights(path, model, ARCH)
    return path


@pytest.fixture()
def images(tmp_path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for name, (h, w) in SIZES.items():
        path = tmp_path / "in" / name
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _check_outputs(rows: list[dict], images: list[Path]) -> None:
    assert [r["image"] for r in rows] == [str(p) for p in images]
    for row, path in zip(rows, images):
        h, w = SIZES[path.name]
        with Image.open(row["mask"]) as m:
            assert m.mode == "P" and m.size == (w, h)
            assert np.array_equal(np.asarray(m.getpalette()[:9]), VOC_COLORS[:3].ravel())
            mask = np.asarray(m)
        assert mask.max() < 3
        assert row["classes_present"] == sorted(int(c) for c in np.unique(mask))
        with Image.open(row["overlay"]) as o:
            assert o.mode == "RGB" and o.size == (w, h)
        assert row["seconds"] >= 0


def test_predict_images_writes_masks_and_overlays(checkpoint, images, tmp_path):
    out = tmp_path / "out"
    rows = predict_images(checkpoint, images, out)
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.png", "a_overlay.png", "b_mask.png", "b_overlay.png"]
    _check_outputs(rows, images)
    model, _ = load_model(checkpoint)
    x = normalize(torch.from_numpy(read_image(images[1])).permute(2, 0, 1)).unsqueeze(0)
    expected = predict_probs(model, x).argmax(1)[0].numpy()
    with Image.open(rows[1]["mask"]) as m:
        np.testing.assert_array_equal(np.asarray(m), expected)


def test_predict_images_with_tta(checkpoint, images, tmp_path):
    _check_outputs(predict_images(checkpoint, images[:1], tmp_path / "out", tta=True), images[:1])


def test_same_stem_does_not_overwrite(checkpoint, images, tmp_path):
    other = tmp_path / "other" / "a.png"
    other.parent.mkdir()
    other.write_bytes(images[0].read_bytes())
    rows = predict_images(checkpoint, [images[0], other], tmp_path / "out")
    assert Path(rows[0]["mask"]).name == "a_mask.png" and Path(rows[1]["mask"]).name == "a_2_mask.png"


def test_missing_image_raises_dataset_error(checkpoint, images, tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(DatasetError, match="nope.png"):
        predict_images(checkpoint, [images[0], missing], tmp_path / "out")


def test_unreadable_image_raises_dataset_error(checkpoint, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match="bad.png"):
        predict_images(checkpoint, [bad], tmp_path / "out")


@pytest.mark.parametrize("options,names", [({}, None), ({"window": 20}, None),
                                           ({"tta": True}, ("port.jpg", "gray.png", "la.png"))])
def test_predict_on_mixed_sizes_and_modes(checkpoint, tmp_path, options, names):
    """Landscape and portrait, gray (L), palette (P), RGBA and gray+alpha (LA) inputs in one call:
    one mask per image at its own size, each equal to predicting its RGB conversion alone."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (24, 36, 3), dtype=np.uint8)
    inputs = {
        "land.png": Image.fromarray(rgb),
        "port.jpg": Image.fromarray(np.ascontiguousarray(rgb.transpose(1, 0, 2))),
        "gray.png": Image.fromarray(rgb[..., 0]),
        "pal.png": Image.fromarray(rgb).convert("P"),
        "rgba.png": Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (24, 36), dtype=np.uint8)])),
        "la.png": Image.fromarray(rgb[:20, :21]).convert("LA"),
    }
    inputs = {k: v for k, v in inputs.items() if names is None or k in names}
    paths = []
    for name, img in inputs.items():
        paths.append(tmp_path / "in" / name)
        paths[-1].parent.mkdir(exist_ok=True)
        img.save(paths[-1])
    rows = predict_images(checkpoint, paths, tmp_path / "out", **options)
    model, _ = load_model(checkpoint)
    for path, row, img in zip(paths, rows, inputs.values()):
        expected = predict_mask(model.eval(), np.array(Image.open(path).convert("RGB")), torch.device("cpu"), **options)
        with Image.open(row["mask"]) as m:
            assert m.mode == "P" and m.size == img.size, path.name
            np.testing.assert_array_equal(np.asarray(m), expected)
        with Image.open(row["overlay"]) as o:
            assert o.mode == "RGB" and o.size == img.size


def test_cli_window_flag_gives_the_sliding_window_prediction(checkpoint, images, tmp_path):
    from stpp_ray.cli import main

    assert main(["predict", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "cli"), "--window", "20",
                 *map(str, images)]) == 0
    expected = predict_images(checkpoint, images, tmp_path / "api", window=20)
    whole = predict_images(checkpoint, images, tmp_path / "whole")
    for name, ref in zip(["a", "b"], expected):
        got = np.asarray(Image.open(tmp_path / "cli" / f"{name}_mask.png"))
        assert np.array_equal(got, np.asarray(Image.open(ref["mask"])))
    assert any(not np.array_equal(np.asarray(Image.open(r["mask"])), np.asarray(Image.open(f["mask"])))
               for r, f in zip(expected, whole)), "windows of 20 px should change some prediction"
