"""Tests for the embedded VOC-layout demo dataset."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stpp_ray import demo_data
from stpp_ray.demo_data import (
    DEMO_CLASSES,
    DEMO_NUM_CLASSES,
    VOC_PALETTE,
    ensure_demo_dataset,
    generate_demo_dataset,
)

SMALL = dict(num_train=64, num_val=32)


def _read_ids(path: Path) -> list[str]:
    return path.read_text().split()


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "voc", seed=0, **SMALL)


@pytest.fixture(scope="module")
def info(demo) -> dict:
    return json.loads((demo / "demo_info.json").read_text())


def test_constants_and_palette():
    assert DEMO_CLASSES[0] == "background"
    assert len(DEMO_CLASSES) == DEMO_NUM_CLASSES
    assert len(VOC_PALETTE) == 768 and all(0 <= v <= 255 for v in VOC_PALETTE)
    colour = lambda c: tuple(VOC_PALETTE[3 * c:3 * c + 3])  # noqa: E731
    assert colour(0) == (0, 0, 0)
    assert colour(1) == (128, 0, 0)
    assert colour(2) == (0, 128, 0)
    assert colour(15) == (192, 128, 128)
    assert colour(255) == (224, 224, 192)


def test_digits_match_sklearn_loader():
    from sklearn.datasets import load_digits

    images, target = demo_data._load_digits()
    ref = load_digits()
    np.testing.assert_array_equal(images * 16.0, ref.images)
    np.testing.assert_array_equal(target, ref.target)


def test_glyph_instances_disjoint_between_train_and_val():
    split = demo_data._glyph_indices(0)
    for digit in range(10):
        train, val = set(split["train"][digit]), set(split["val"][digit])
        assert train and val and not train & val


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    tiny = dict(num_train=16, num_val=8)
    first = _all_files(generate_demo_dataset(tmp_path / "a", seed=0, **tiny))
    again = _all_files(generate_demo_dataset(tmp_path / "b", seed=0, **tiny))
    assert again == first
    other = _all_files(generate_demo_dataset(tmp_path / "c", seed=1, **tiny))
    assert other.keys() == again.keys()
    jpgs = [k for k in again if k.endswith(".jpg")]
    assert sum(other[k] != again[k] for k in jpgs) > len(jpgs) // 2


def test_layout_and_split_contract(demo):
    seg = demo / "ImageSets" / "Segmentation"
    pool = _read_ids(seg / "train.txt")
    val = _read_ids(seg / "val.txt")
    assert pool == [f"demo_train_{i:04d}" for i in range(64)]
    assert val == [f"demo_val_{i:04d}" for i in range(32)]
    assert not set(pool) & set(val)
    for image_id in pool + val:
        assert (demo / "JPEGImages" / f"{image_id}.jpg").is_file()
        assert (demo / "SegmentationClass" / f"{image_id}.png").is_file()

    labeled = {}
    for name, expected in (("1_16", 4), ("1_8", 8), ("full", 64)):
        lab = _read_ids(seg / name / "labeled.txt")
        unl = _read_ids(seg / name / "unlabeled.txt")
        assert len(lab) == len(set(lab)) == expected
        assert set(lab) <= set(pool) and set(unl) <= set(pool)
        if name != "full":
            assert not set(lab) & set(unl)
            assert set(lab) | set(unl) == set(pool)
        labeled[name] = (set(lab), unl)
    assert labeled["1_16"][0] <= labeled["1_8"][0]
    assert labeled["full"][0] == set(pool)
    # Documented: full/unlabeled repeats 1_16/unlabeled (non-empty on purpose).
    assert labeled["full"][1] == labeled["1_16"][1]


def test_masks_are_voc_palette_pngs(demo):
    for png in sorted((demo / "SegmentationClass").glob("*.png"))[:40]:
        mask = Image.open(png)
        image = Image.open(demo / "JPEGImages" / f"{png.stem}.jpg")
        assert mask.mode == "P" and image.mode == "RGB"
        assert mask.size == image.size == (64, 64)
        assert mask.getpalette()[:768] == VOC_PALETTE
        values = set(np.unique(np.asarray(mask)).tolist())
        assert values <= set(range(DEMO_NUM_CLASSES)) | {255}
        assert values & set(range(1, DEMO_NUM_CLASSES)), f"{png.stem} has no object"


def test_every_class_appears_in_train_and_val(demo):
    for prefix in ("demo_train_", "demo_val_"):
        counts = np.zeros(256, dtype=np.int64)
        for png in (demo / "SegmentationClass").glob(f"{prefix}*.png"):
            counts += np.bincount(np.asarray(Image.open(png)).ravel(), minlength=256)
        assert (counts[:DEMO_NUM_CLASSES] > 0).all(), prefix
        assert counts[255] > 0  # the ignore band exists


def test_labeled_subset_covers_all_classes(demo, info):
    present = {r["id"]: set(r["factors"]["visible_pixels"]) for r in info["train"]}
    ids = _read_ids(demo / "ImageSets" / "Segmentation" / "1_8" / "labeled.txt")
    assert set().union(*(present[i] for i in ids)) == set(DEMO_CLASSES[1:])


def test_info_records_difficulty(info):
    assert info["classes"] == list(DEMO_CLASSES)
    assert info["num_train"] == 64 and info["num_val"] == 32 and info["seed"] == 0
    assert info["image_size"] == 64 and "generator_version" in info
    assert [r["id"] for r in info["train"]] == [f"demo_train_{i:04d}" for i in range(64)]
    levels = {r["difficulty"] for r in info["train"]}
    assert levels == {"easy", "medium", "hard"}
    for record in info["train"] + info["val"]:
        assert {"n_objects", "n_distractors", "occlusion", "blur_sigma"} <= set(record["factors"])
    # The rare class really is rarer than the others.
    counts = {c: 0 for c in DEMO_CLASSES[1:]}
    for record in info["train"] + info["val"]:
        for name in record["factors"]["object_classes"]:
            counts[name] += 1
    assert counts[info["rare_class"]] < min(v for k, v in counts.items() if k != info["rare_class"])


def test_ensure_is_idempotent_and_regenerates(tmp_path, monkeypatch):
    out = tmp_path / "voc"
    params = dict(num_train=16, num_val=4)
    assert ensure_demo_dataset(out, seed=3, **params) == out
    marker = out / ".demo_complete"
    assert json.loads(marker.read_text())["seed"] == 3
    before = _all_files(out)

    def boom(*args, **kwargs):
        raise AssertionError("must not regenerate")

    monkeypatch.setattr(demo_data, "generate_demo_dataset", boom)
    ensure_demo_dataset(out, seed=3, **params)
    monkeypatch.undo()

    marker.unlink()  # e.g. an interrupted run
    (out / "JPEGImages" / "demo_train_0000.jpg").write_bytes(b"corrupt")
    ensure_demo_dataset(out, seed=3, **params)
    assert _all_files(out) == before

    # Different parameters: regenerated, and stale files of the old run are gone.
    ensure_demo_dataset(out, seed=3, num_train=8, num_val=4)
    assert json.loads(marker.read_text())["num_train"] == 8
    assert not (out / "JPEGImages" / "demo_train_0010.jpg").exists()


def test_generate_leaves_foreign_files_alone(tmp_path):
    out = tmp_path / "voc"
    (out / "JPEGImages").mkdir(parents=True)
    keep = out / "JPEGImages" / "mine.jpg"
    keep.write_bytes(b"x")
    generate_demo_dataset(out, seed=0, num_train=4, num_val=2)
    assert keep.read_bytes() == b"x"


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        generate_demo_dataset(tmp_path / "x", num_train=0)
