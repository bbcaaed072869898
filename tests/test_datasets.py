"""Tests for stpp_ray.datasets: layouts, split lists, validated reading."""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stpp_ray.datasets import (
    IGNORE_INDEX,
    LAYOUTS,
    DatasetError,
    Sample,
    build_samples,
    check_disjoint,
    check_samples,
    decode_mask_png,
    encode_mask_png,
    read_image,
    read_mask,
    read_split,
    resolve_path,
)

RNG = np.random.default_rng(0)
VOC_PALETTE = [c for i in range(256) for c in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)]


def write_image(path: Path, size=(8, 8), fmt=None) -> np.ndarray:
    """Write a random RGB image (WxH ``size``) and return its pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return pixels


def write_mask(path: Path, values: np.ndarray, mode="L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(values.astype(np.uint8))
    if mode == "P":
        img = img.convert("L")
        img = Image.frombytes("P", img.size, img.tobytes())
        img.putpalette(VOC_PALETTE)
    elif mode == "RGB":
        img = img.convert("RGB")
    img.save(path)


def label_grid(size=(8, 8), num_classes=3) -> np.ndarray:
    h, w = size[1], size[0]
    mask = (np.arange(h * w).reshape(h, w) % num_classes).astype(np.uint8)
    mask[0, 0] = IGNORE_INDEX
    return mask


def write_split(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def make_voc(root: Path, ids=("a", "b", "c")) -> None:
    for i in ids:
        write_image(root / "JPEGImages" / f"{i}.jpg")
        write_mask(root / "SegmentationClass" / f"{i}.png", label_grid(num_classes=21), mode="P")
    write_split(root / "train.txt", list(ids))


def problems_of(excinfo) -> list[str]:
    return excinfo.value.problems


# ---- layouts: good paths ----------------------------------------------------


def test_layouts_constant():
    assert LAYOUTS == ("voc", "cityscapes", "folder")


def test_resolve_path(tmp_path):
    assert resolve_path(tmp_path, "x/y.txt") == tmp_path / "x" / "y.txt"
    assert resolve_path(tmp_path, "/abs/y.txt") == Path("/abs/y.txt")


def test_voc_good(tmp_path):
    make_voc(tmp_path)
    samples = build_samples("voc", tmp_path, "train.txt", with_masks=True)
    assert [s.image_id for s in samples] == ["a", "b", "c"]
    assert samples[0] == Sample("a", tmp_path / "JPEGImages/a.jpg", tmp_path / "SegmentationClass/a.png")
    check_samples(samples, num_classes=21, layout="voc")
    image = read_image(samples[0].image_path)
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    mask = read_mask(samples[0].mask_path, "voc")
    np.testing.assert_array_equal(mask, label_grid(num_classes=21))


def test_voc_unlabeled_has_no_mask_path(tmp_path):
    write_image(tmp_path / "JPEGImages" / "u.jpg")
    write_split(tmp_path / "unlabeled.txt", ["u"])
    (sample,) = build_samples("voc", tmp_path, "unlabeled.txt", with_masks=False)
    assert sample.mask_path is None
    check_samples([sample], num_classes=21, layout="voc")


def test_voc_two_column_split(tmp_path):
    write_image(tmp_path / "imgs" / "x.jpg")
    write_mask(tmp_path / "labels" / "x.png", label_grid(num_classes=21), mode="P")
    write_split(tmp_path / "s.txt", ["imgs/x.jpg labels/x.png"])
    assert read_split(tmp_path, "s.txt") == ["imgs/x.jpg labels/x.png"]
    (sample,) = build_samples("voc", tmp_path, "s.txt", with_masks=True)
    assert sample == Sample("x", tmp_path / "imgs/x.jpg", tmp_path / "labels/x.png")


def test_voc_grayscale_mask_accepted(tmp_path):
    path = tmp_path / "m.png"
    write_mask(path, label_grid(num_classes=21), mode="L")
    np.testing.assert_array_equal(read_mask(path, "voc"), label_grid(num_classes=21))


def test_cityscapes_good_and_label_mapping(tmp_path):
    image_id = "train/aachen/aachen_000000_000019"
    write_image(tmp_path / "leftImg8bit" / f"{image_id}_leftImg8bit.png")
    label_ids = np.array([[7, 8, 11, 26], [33, 0, 1, 255], [31, 24, 4, 6], [23, 21, 22, 34]], dtype=np.uint8)
    label_ids = np.kron(label_ids, np.ones((2, 2), dtype=np.uint8))  # 8x8
    write_mask(tmp_path / "gtFine" / f"{image_id}_gtFine_labelIds.png", label_ids)
    write_split(tmp_path / "splits" / "train.txt", [image_id])

    (sample,) = build_samples("cityscapes", tmp_path, "splits/train.txt", with_masks=True)
    assert sample.image_id == image_id
    assert sample.mask_path.name == "aachen_000000_000019_gtFine_labelIds.png"
    check_samples([sample], num_classes=19, layout="cityscapes")
    train_ids = read_mask(sample.mask_path, "cityscapes")
    expected = np.array([[0, 1, 2, 13], [18, 255, 255, 255], [16, 11, 255, 255], [10, 8, 9, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(train_ids[::2, ::2], expected)


CITY_ID = "train/jena/jena_000078_000019"
CITY_IMAGE = f"leftImg8bit/{CITY_ID}_leftImg8bit.png"
# Values that the labelId table would change (7 -> 0, 8 -> 1, 0 -> 255, 26 -> 13).
CITY_VALUES = np.kron(np.array([[7, 8], [0, 26]], dtype=np.uint8), np.ones((4, 4), dtype=np.uint8))


@pytest.mark.parametrize("suffix,expected", [
    ("labelTrainIds", CITY_VALUES),  # UniMatch's form (LiheYoung/UniMatch splits/cityscapes): already train ids
    ("labelIds", np.kron(np.array([[0, 1], [255, 13]], dtype=np.uint8), np.ones((4, 4), dtype=np.uint8))),
])
def test_cityscapes_two_column_masks_are_remapped_only_when_label_ids(tmp_path, suffix, expected):
    mask = f"gtFine/{CITY_ID}_gtFine_{suffix}.png"
    write_image(tmp_path / CITY_IMAGE)
    write_mask(tmp_path / mask, CITY_VALUES)
    write_split(tmp_path / "s.txt", [f"{CITY_IMAGE} {mask}"])
    (sample,) = build_samples("cityscapes", tmp_path, "s.txt", with_masks=True)
    assert sample == Sample(CITY_ID, tmp_path / CITY_IMAGE, tmp_path / mask)
    np.testing.assert_array_equal(read_mask(sample.mask_path, "cityscapes"), expected)
    check_samples([sample], num_classes=27, layout="cityscapes")


def test_cityscapes_id_falls_back_to_label_train_ids(tmp_path):
    write_image(tmp_path / CITY_IMAGE)
    write_mask(tmp_path / "gtFine" / f"{CITY_ID}_gtFine_labelTrainIds.png", CITY_VALUES)
    write_split(tmp_path / "s.txt", [CITY_ID])
    (sample,) = build_samples("cityscapes", tmp_path, "s.txt", with_masks=True)
    assert sample.mask_path.name == "jena_000078_000019_gtFine_labelTrainIds.png"
    np.testing.assert_array_equal(read_mask(sample.mask_path, "cityscapes"), CITY_VALUES)
    # With both present, labelIds wins.
    write_mask(tmp_path / "gtFine" / f"{CITY_ID}_gtFine_labelIds.png", CITY_VALUES)
    (sample,) = build_samples("cityscapes", tmp_path, "s.txt", with_masks=True)
    assert sample.mask_path.name == "jena_000078_000019_gtFine_labelIds.png"


def test_cityscapes_missing_mask_names_the_label_ids_file(tmp_path):
    write_image(tmp_path / CITY_IMAGE)
    write_split(tmp_path / "s.txt", [CITY_ID])
    with pytest.raises(DatasetError) as excinfo:
        build_samples("cityscapes", tmp_path, "s.txt", with_masks=True)
    assert problems_of(excinfo) == [f"{tmp_path / 'gtFine' / CITY_ID}_gtFine_labelIds.png: missing mask file"]


def test_cityscapes_both_forms_give_the_same_id(tmp_path):
    two_column = f"{CITY_IMAGE} gtFine/{CITY_ID}_gtFine_labelTrainIds.png"
    write_split(tmp_path / "s.txt", [CITY_ID, two_column])
    with pytest.raises(DatasetError, match=f"duplicate id '{CITY_ID}'"):
        read_split(tmp_path, "s.txt")
    with pytest.raises(DatasetError, match="1 id"):
        check_disjoint([CITY_ID], [two_column])


def test_builtin_split_resolves_to_the_shipped_file(tmp_path):
    from stpp_ray.datasets import BUILTIN_SPLITS_DIR

    assert resolve_path(tmp_path, "builtin:pascal/92/labeled.txt") == BUILTIN_SPLITS_DIR / "pascal/92/labeled.txt"
    assert len(read_split(tmp_path, "builtin:pascal/92/labeled.txt")) == 92
    with pytest.raises(DatasetError, match=r"unknown builtin split 'builtin:pascal/92'.*builtin:pascal/92/labeled\.txt"):
        read_split(tmp_path, "builtin:pascal/92")


def test_builtin_split_entries_resolve_under_the_data_root(tmp_path):
    write_image(tmp_path / "JPEGImages" / "2007_000733.jpg")  # the first id of the list
    with pytest.raises(DatasetError) as excinfo:
        build_samples("voc", tmp_path, "builtin:pascal/92/labeled.txt", with_masks=False)
    assert f"{tmp_path}/JPEGImages/2010_004493.jpg: missing image file" in problems_of(excinfo)
    assert f"{tmp_path}/JPEGImages/2007_000733.jpg: missing image file" not in problems_of(excinfo)


def test_compare_oracle_epochs_reads_builtin_splits(tmp_path):
    from stpp_ray.orchestration.compare import oracle_epochs
    from stpp_ray.config import load_config

    cfg = load_config(None, ["data.labeled_split=builtin:pascal/1_16/labeled.txt", "train.epochs=80"])
    assert oracle_epochs(cfg, tmp_path, "builtin:pascal/1464/labeled.txt") == round(80 * 662 / 1464)


def test_folder_good_mixed_extensions(tmp_path):
    for image_id, ext in [("p", "png"), ("q", "jpeg"), ("r", "bmp"), ("s", "tif")]:
        write_image(tmp_path / "images" / f"{image_id}.{ext}")
        write_mask(tmp_path / "masks" / f"{image_id}.png", label_grid(num_classes=4))
    write_split(tmp_path / "train.txt", ["p", "q", "r", "s"])
    samples = build_samples("folder", tmp_path, "train.txt", with_masks=True)
    assert [s.image_path.suffix for s in samples] == [".png", ".jpeg", ".bmp", ".tif"]
    check_samples(samples, num_classes=4, layout="folder")


def test_unknown_layout(tmp_path):
    make_voc(tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset layout 'coco'"):
        build_samples("coco", tmp_path, "train.txt", with_masks=True)


# ---- missing files ----------------------------------------------------------


def test_build_samples_missing_image_and_mask(tmp_path):
    make_voc(tmp_path)
    (tmp_path / "JPEGImages" / "b.jpg").unlink()
    (tmp_path / "SegmentationClass" / "c.png").unlink()
    with pytest.raises(DatasetError) as excinfo:
        build_samples("voc", tmp_path, "train.txt", with_masks=True)
    msg = str(excinfo.value)
    assert f"{tmp_path / 'JPEGImages' / 'b.jpg'}: missing image file" in msg
    assert f"{tmp_path / 'SegmentationClass' / 'c.png'}: missing mask file" in msg
    # Without masks, the missing mask does not matter.
    (tmp_path / "train.txt").write_text("a\nc\n")
    assert len(build_samples("voc", tmp_path, "train.txt", with_masks=False)) == 2


def test_folder_missing_image_names_tried_path(tmp_path):
    write_split(tmp_path / "train.txt", ["nope"])
    with pytest.raises(DatasetError, match=r"images.nope\.\{jpg,jpeg.*missing image file"):
        build_samples("folder", tmp_path, "train.txt", with_masks=False)


def test_check_samples_missing_file(tmp_path):
    sample = Sample("z", tmp_path / "z.jpg", tmp_path / "z.png")
    with pytest.raises(DatasetError) as excinfo:
        check_samples([sample], num_classes=21, layout="voc")
    assert problems_of(excinfo) == [f"{tmp_path / 'z.jpg'}: missing image file", f"{tmp_path / 'z.png'}: missing mask file"]


# ---- bad images -------------------------------------------------------------


def test_read_image_truncated_jpeg(tmp_path):
    path = tmp_path / "t.jpg"
    write_image(path, size=(32, 32))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(DatasetError, match=re.escape(f"{path}: unreadable or truncated image")):
        read_image(path)


def test_read_image_zero_byte(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(DatasetError, match=re.escape(f"{path}: empty (zero-byte) image file")):
        read_image(path)


def test_read_image_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    with pytest.raises(DatasetError, match=re.escape(f"{path}: not an image file")):
        read_image(path)


def test_read_image_missing(tmp_path):
    with pytest.raises(DatasetError, match="missing image file"):
        read_image(tmp_path / "gone.jpg")


def test_read_image_converts_to_rgb(tmp_path):
    path = tmp_path / "g.png"
    Image.fromarray(np.full((5, 7), 9, np.uint8)).save(path)
    image = read_image(path)
    assert image.shape == (5, 7, 3) and (image == 9).all()


# ---- bad masks --------------------------------------------------------------


def test_rgb_mask_rejected(tmp_path):
    path = tmp_path / "m.png"
    write_mask(path, label_grid(), mode="RGB")
    with pytest.raises(DatasetError, match=re.escape(f"{path}: RGB mask where a palette or single-channel mask is expected")):
        read_mask(path, "voc")


def test_mask_size_mismatch(tmp_path):
    sample = Sample("a", tmp_path / "a.jpg", tmp_path / "a.png")
    write_image(sample.image_path, size=(8, 8))
    write_mask(sample.mask_path, label_grid(size=(8, 6)))
    with pytest.raises(DatasetError) as excinfo:
        check_samples([sample], num_classes=21, layout="voc")
    (problem,) = problems_of(excinfo)
    assert problem.startswith(str(sample.mask_path))
    assert "mask size 8x6 (WxH) differs from image size 8x8" in problem


def test_mask_label_out_of_range(tmp_path):
    sample = Sample("a", tmp_path / "a.jpg", tmp_path / "a.png")
    write_image(sample.image_path)
    mask = label_grid(num_classes=21)
    mask[1, 1], mask[2, 2] = 21, 200
    write_mask(sample.mask_path, mask, mode="P")
    with pytest.raises(DatasetError) as excinfo:
        check_samples([sample], num_classes=21, layout="voc")
    (problem,) = problems_of(excinfo)
    assert problem.startswith(str(sample.mask_path))
    assert "outside [0, 21) other than 255: 21, 200" in problem


def test_check_samples_collects_all_problems(tmp_path):
    make_voc(tmp_path, ids=("a", "b", "c", "d"))
    samples = build_samples("voc", tmp_path, "train.txt", with_masks=True)
    (tmp_path / "JPEGImages" / "a.jpg").write_bytes(b"")
    write_mask(tmp_path / "SegmentationClass" / "b.png", label_grid(), mode="RGB")
    (tmp_path / "JPEGImages" / "c.jpg").write_text("text")
    with pytest.raises(DatasetError) as excinfo:
        check_samples(samples, num_classes=21, layout="voc")
    problems = problems_of(excinfo)
    assert len(problems) == 3
    for name, text in [("a.jpg", "zero-byte"), ("b.png", "RGB mask"), ("c.jpg", "not an image")]:
        assert any(name in p and text in p for p in problems), (name, problems)
    assert "3 problem(s)" in str(excinfo.value)


def test_check_samples_truncates_long_lists(tmp_path):
    samples = [Sample(str(i), tmp_path / f"{i}.jpg") for i in range(25)]
    with pytest.raises(DatasetError) as excinfo:
        check_samples(samples, num_classes=21, layout="voc")
    msg = str(excinfo.value)
    assert len(problems_of(excinfo)) == 25
    assert "... and 5 more" in msg
    assert "19.jpg" in msg and "20.jpg" not in msg


# ---- split lists ------------------------------------------------------------


def test_read_split_skips_blanks_and_comments(tmp_path):
    write_split(tmp_path / "s.txt", ["# header", "a", "", "  b  ", "   # indented comment", "c"])
    assert read_split(tmp_path, "s.txt") == ["a", "b", "c"]


def test_read_split_missing(tmp_path):
    with pytest.raises(DatasetError, match=re.escape(f"{tmp_path / 'nope.txt'}: split file not found")):
        read_split(tmp_path, "nope.txt")


def test_read_split_empty(tmp_path):
    write_split(tmp_path / "s.txt", ["# only a comment", ""])
    with pytest.raises(DatasetError, match="split file is empty"):
        read_split(tmp_path, "s.txt")


def test_read_split_duplicates(tmp_path):
    path = write_split(tmp_path / "s.txt", ["a", "b", "# c", "a"])
    with pytest.raises(DatasetError, match=r"duplicate id 'a' \(first on line 1, again on line 4\)") as excinfo:
        read_split(tmp_path, path)
    assert str(path) in str(excinfo.value)


def test_read_split_duplicate_across_forms(tmp_path):
    write_split(tmp_path / "s.txt", ["x", "JPEGImages/x.jpg SegmentationClass/x.png"])
    with pytest.raises(DatasetError, match="duplicate id 'x'"):
        read_split(tmp_path, "s.txt")


def test_read_split_too_many_columns(tmp_path):
    write_split(tmp_path / "s.txt", ["a b c"])
    with pytest.raises(DatasetError, match=r"s\.txt:1: expected an id or two paths"):
        read_split(tmp_path, "s.txt")


# ---- disjointness -----------------------------------------------------------


def test_check_disjoint_ok():
    check_disjoint(["a", "b"], ["c", "d"], val_ids=["e"])


def test_check_disjoint_overlap_names_ids():
    with pytest.raises(DatasetError, match=r"2 id\(s\) are both labeled and unlabeled: b, c"):
        check_disjoint(["a", "b", "c"], ["b", "c", "d"])


def test_check_disjoint_two_column_and_val():
    with pytest.raises(DatasetError) as excinfo:
        check_disjoint(["JPEGImages/a.jpg SegmentationClass/a.png"], ["a"], val_ids=["a", "v"])
    problems = problems_of(excinfo)
    assert len(problems) == 3
    assert any("labeled and val: a" in p for p in problems)


def test_check_disjoint_lists_only_a_few():
    ids = [f"id{i:03d}" for i in range(50)]
    with pytest.raises(DatasetError) as excinfo:
        check_disjoint(ids, ids)
    assert "50 id(s)" in str(excinfo.value)
    assert "id004, ..." in str(excinfo.value) and "id005" not in str(excinfo.value)


def test_dataset_error_pickles_with_problems():
    err = pickle.loads(pickle.dumps(DatasetError("two problems", ["p1", "p2"])))
    assert isinstance(err, ValueError)
    assert str(err) == "two problems" and err.problems == ["p1", "p2"]


# ---- pseudo-label PNG bytes -------------------------------------------------


def test_mask_png_round_trip():
    mask = RNG.integers(0, 256, (7, 9), dtype=np.uint8)
    data = encode_mask_png(mask)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(data)).mode == "L"
    out = decode_mask_png(data)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, mask)


def test_encode_mask_png_rejects_bad_input():
    with pytest.raises(ValueError, match="HxW uint8"):
        encode_mask_png(np.zeros((4, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="HxW uint8"):
        encode_mask_png(np.zeros((4, 4, 3), dtype=np.uint8))


def test_decode_mask_png_rejects_garbage():
    with pytest.raises(DatasetError, match="cannot decode mask PNG"):
        decode_mask_png(b"not a png")


def test_the_unlabeled_pool_is_two_arrow_columns_read_in_chunks(tmp_path, monkeypatch):
    import pyarrow as pa

    from stpp_ray import image_pool
    from stpp_ray.image_pool import ImagePool

    monkeypatch.setattr(image_pool, "CHUNK", 3)  # several chunks from 7 samples
    samples = [Sample(f"u{i}", tmp_path / f"u{i}.jpg") for i in range(7)]
    pool = ImagePool.of(iter(samples))
    assert isinstance(pool.ids, pa.Array) and isinstance(pool.paths, pa.Array) and len(pool) == 7
    assert list(pool) == samples and pool[-1] == samples[-1] and pool[2:4] == samples[2:4]
    picked = pool.subset(["u5", "u1", "stranger"])
    assert picked.image_ids() == ["u1", "u5"] and picked.paths.to_pylist() == [str(tmp_path / "u1.jpg"), str(tmp_path / "u5.jpg")]
    assert pool.among(["u3", "x"]) == ["u3"] and len(ImagePool.of([])) == 0
    assert pool.table().column_names == ["image_id", "image_path"]


@pytest.mark.parametrize("templated", [False, True])
def test_an_online_stages_pool_file_gives_back_the_pool_and_its_paths_by_index(tmp_path, templated):
    """`write_pool` / `read_pool`: what an online stage's spec names instead of |U| paths."""
    import pyarrow as pa

    from stpp_ray.image_pool import ImagePaths, ImagePool, read_pool, write_pool
    from stpp_ray.methods.online import UnlabeledSet

    ids = pa.array([f"u{i}" for i in range(5)])
    pool = (ImagePool(ids, template=(f"{tmp_path}/JPEGImages/", ".jpg")) if templated
            else ImagePool(ids, pa.array([f"{tmp_path}/img/u{i}.png" for i in range(5)])))
    path = write_pool(tmp_path / "selections", "unlabeled", pool)
    assert write_pool(tmp_path / "selections", "unlabeled", pool) == path  # the same pool: the same file
    back = read_pool(path)
    assert list(back) == list(pool) and back.template == pool.template
    if templated:
        assert read_pool(path).table().column_names == ["image_id", "image_path"]
        assert pa.ipc.open_file(path).schema.names == ["image_id"]  # the paths are not written
    paths = ImagePaths(back)
    assert len(paths) == 5 and paths[3] == str(pool[3].image_path) and paths[1:3] == pool.paths.to_pylist()[1:3]
    unlabeled = UnlabeledSet(paths, "mean_teacher", 8, seed=0)
    assert unlabeled.paths is paths and len(unlabeled) == 5  # indexed, not copied into a list
    other = ImagePool(ids[:4], pool.paths[:4]) if templated else ImagePool(ids[:4], template=("x/", ".jpg"))
    assert write_pool(tmp_path / "selections", "unlabeled", other) != path
    shorter = ImagePool(ids.slice(0, 4), template=pool.template) if templated else ImagePool(ids.slice(0, 4), pool.paths.slice(0, 4))
    assert list(read_pool(write_pool(tmp_path / "selections", "unlabeled", shorter))) == list(pool)[:4]  # a slice: its own file


@pytest.mark.parametrize("lines", [
    ["# the pool", "a", "", "  b  ", "c\r", "2007_000032"],  # comments, blanks, padding, CRLF: read in Arrow
    ["a", "b", "a"],  # a duplicate: iter_samples names its lines
    ["a", "JPEGImages/b.jpg SegmentationClass/b.png"],  # two columns
    ["a", "b", "gone"],  # a missing image: iter_samples lists it
    ["a", "sub/b"],  # a path separator
    ["# only comments"],
])
@pytest.mark.parametrize("text_block", [3, 1 << 16])  # lines across blocks; the whole file in one
def test_a_voc_pool_read_in_arrow_equals_the_sample_by_sample_reading(tmp_path, lines, text_block, monkeypatch):
    """`ImagePool.read` takes a plain local VOC split in Arrow and leaves every other split,
    and every problem, to `iter_samples`: the same pool or the same error either way."""
    from stpp_ray import image_pool
    from stpp_ray.datasets import iter_samples
    from stpp_ray.image_pool import ImagePool, _plain_voc_pool

    monkeypatch.setattr(image_pool, "TEXT_BLOCK", text_block)

    make_voc(tmp_path, ids=("a", "b", "c", "2007_000032"))
    (tmp_path / "JPEGImages" / "sub").mkdir()
    write_image(tmp_path / "JPEGImages" / "sub" / "b.jpg")
    write_split(tmp_path / "u.txt", lines)
    try:
        expected = [(s.image_id, str(s.image_path)) for s in iter_samples("voc", tmp_path, "u.txt", with_masks=False)]
    except DatasetError as err:
        with pytest.raises(DatasetError, match=re.escape(str(err))):
            ImagePool.read("voc", tmp_path, "u.txt")
        assert _plain_voc_pool("voc", tmp_path, "u.txt") is None
        return
    pool = ImagePool.read("voc", tmp_path, "u.txt")
    assert list(zip(pool.image_ids(), pool.paths.to_pylist())) == expected
    assert [(s.image_id, str(s.image_path)) for s in pool] == expected  # paths derived one by one, too
    assert (_plain_voc_pool("voc", tmp_path, "u.txt") is not None) == (lines[0] == "# the pool")
    assert (pool.template is not None) == (lines[0] == "# the pool")
