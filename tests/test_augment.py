"""Tests for stpp_ray.augment: paired image/mask transforms."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from stpp_ray.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Cutout,
    RandomRescale,
    blur_kernel_size,
    cutmix_box,
    normalize,
    strong_augment,
    to_tv,
    weak_augment,
)

IGNORE = 255


def position_pair(height=12, width=20):
    """Image whose pixels encode (y, x) (values 1..), mask with a label per pixel (never 255)."""
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    image = np.stack([ys + 1, xs + 1, np.full_like(ys, 7)], axis=-1).astype(np.uint8)
    mask = ((ys * width + xs) % 250).astype(np.uint8)
    return to_tv(image, mask)


def block_pair(block=8, rows=5, cols=6):
    """Image of constant-colour blocks and a mask labelling each block (label = block index)."""
    rng = np.random.default_rng(1)
    colours = rng.choice(256**3, size=rows * cols, replace=False)
    colours = np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], axis=-1).astype(np.uint8)
    labels = np.arange(rows * cols, dtype=np.uint8).reshape(rows, cols)
    labels = np.kron(labels, np.ones((block, block), dtype=np.uint8))
    return to_tv(colours[labels], labels), torch.from_numpy(colours)


def source_positions(image):
    """(y, x) of each output pixel of a position_pair image; -1 where padded."""
    return image[0].long() - 1, image[1].long() - 1


# ---- weak: geometry keeps image and mask aligned ----------------------------


@pytest.mark.parametrize("seed", range(8))
def test_flip_and_crop_exactly_aligned(seed):
    image, mask = position_pair()
    torch.manual_seed(seed)
    out_image, out_mask = weak_augment(8, scale_range=(1.0, 1.0))(image, mask)
    ys, xs = source_positions(out_image)
    assert (ys >= 0).all() and (xs >= 0).all()
    np.testing.assert_array_equal(out_mask.numpy(), mask[ys, xs].numpy())
    # A crop keeps a contiguous window, flipped or not.
    row = xs[0].tolist()
    assert row in (list(range(row[0], row[0] + 8)), list(range(row[0], row[0] - 8, -1)))


def test_flip_happens_about_half_the_time():
    image, mask = position_pair()
    transform = weak_augment(8, scale_range=(1.0, 1.0))
    flips = 0
    for seed in range(40):
        torch.manual_seed(seed)
        out_image, _ = transform(image, mask)
        xs = source_positions(out_image)[1][0]
        flips += bool(xs[1] < xs[0])
    assert 8 <= flips <= 32


@pytest.mark.parametrize("seed", range(10))
def test_rescale_crop_flip_keeps_alignment(seed):
    (image, mask), colours = block_pair()
    torch.manual_seed(seed)
    out_image, out_mask = weak_augment(32)(image, mask)
    # Pixels whose colour is exactly one block's colour lie inside that block.
    pixels = out_image.permute(1, 2, 0).reshape(-1, 1, 3)
    match = (pixels == colours.reshape(1, -1, 3)).all(dim=-1)
    pure = match.any(dim=1)
    block_of = match.float().argmax(dim=1)
    labels = out_mask.reshape(-1).long()
    labelled = pure & (labels != IGNORE)
    assert labelled.sum() > 0.2 * (labels != IGNORE).sum()
    assert torch.equal(labels[labelled], block_of[labelled])


@pytest.mark.parametrize("seed", range(10))
def test_rescale_subpixel_alignment(seed):
    """Linear ramps survive bilinear resizing, so each output image pixel tells the
    source coordinate it samples; the mask label there must be the source pixel
    containing that point (nearest-exact), i.e. within half a pixel of it."""
    height, width = 40, 56
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    ramps = np.stack([4 * xs + 2, 4 * ys + 2, np.full_like(xs, 128)], axis=-1).astype(np.uint8)
    image, mask_x = to_tv(ramps, xs.astype(np.uint8))
    mask_y = tv_tensors.Mask(torch.from_numpy(ys.astype(np.uint8)))
    torch.manual_seed(seed)
    out_image, out_x, out_y = weak_augment(48)(image, mask_x, mask_y)
    for channel, out_mask, size in [(0, out_x, width), (1, out_y, height)]:
        source = (out_image[channel].double() - 2) / 4
        # Skip padding and the borders, where antialiasing clamps the ramp.
        inside = (out_mask != IGNORE) & (source > 2) & (source < size - 3)
        assert inside.sum() > 100
        error = (out_mask[inside].double() - source[inside]).abs()
        assert error.max() <= 0.5 + 0.125 + 1e-6  # half a pixel + uint8 rounding of the ramp


@pytest.mark.parametrize("ratio", [0.5, 2.0])
def test_rescale_is_relative_to_own_size(ratio):
    image, mask = position_pair(height=12, width=20)
    torch.manual_seed(0)
    out_image, out_mask = weak_augment(48, scale_range=(ratio, ratio))(image, mask)
    assert (out_mask != IGNORE).sum() == round(12 * ratio) * round(20 * ratio)


def _rescaled_size(height, width, base_size, scale_range=(1.0, 1.0)):
    image, mask = position_pair(height, width)
    out_image, out_mask = RandomRescale(scale_range, base_size)(image, mask)
    assert out_image.shape[1:] == out_mask.shape
    return tuple(out_mask.shape)


def test_rescale_long_side_follows_the_base_size():
    """ST++ dataset/transform.py `resize`: long side = randint(int(0.5 B), int(2 B)), the
    other side int(side * long / long_side + 0.5), whatever the image's own size."""
    assert _rescaled_size(30, 40, 400, (0.5, 0.5)) == (150, 200)  # 30 * 200 / 40 = 150
    assert _rescaled_size(40, 30, 400, (2.0, 2.0)) == (800, 600)  # portrait: the height is the long side
    assert _rescaled_size(12, 12, 25, (2.0, 2.0)) == (50, 50)
    assert _rescaled_size(13, 20, 10) == (7, 10)  # 6.5 rounds half up (Python's round gives 6)
    assert _rescaled_size(13, 20, 0, (0.5, 0.5)) == (7, 10)  # 0: the image's own long side, 20
    assert _rescaled_size(20, 13, 0, (2.0, 2.0)) == (40, 26)


def test_rescale_long_side_is_a_uniform_integer_with_both_ends():
    torch.manual_seed(0)
    longs = [max(_rescaled_size(6, 9, 10, (0.5, 2.0))) for _ in range(400)]
    assert set(longs) == set(range(5, 21))  # int(0.5 * 10) .. int(2.0 * 10), both included
    own = [max(_rescaled_size(6, 9, 0, (0.5, 2.0))) for _ in range(300)]
    assert set(own) == set(range(4, 19))  # int(0.5 * 9) .. 18


def test_base_size_defaults_per_layout():
    from stpp_ray.config import DataConfig

    assert DataConfig().scale_base_size() == 400  # voc: ST++ dataset/semi.py
    assert DataConfig(layout="cityscapes").scale_base_size() == 2048
    assert DataConfig(layout="folder").scale_base_size() == 0
    assert DataConfig(demo=True).scale_base_size() == 0  # the small generated images are no Pascal photos
    assert DataConfig(base_size=0).scale_base_size() == 0 and DataConfig(layout="folder", base_size=512).scale_base_size() == 512
    with pytest.raises(ValueError):
        DataConfig(base_size=-1)


def test_setup_rank_gives_every_training_set_the_base_size(tmp_path):
    from stpp_ray.config import load_config
    from stpp_ray.training import TrainItem
    from stpp_ray.methods import get_method
    from stpp_ray.stage_setup import setup_rank

    for extra, expected in [([], 400), (["data.base_size=96"], 96), (["data.layout=folder"], 0)]:
        cfg = load_config(None, ["model.backbone=tiny", "model.aspp_channels=8", "train.batch_size=2",
                                 "method=unimatch", *extra])
        setup = setup_rank(cfg, [TrainItem("a", "a.png", "a.png")] * 2, [], 1, online=get_method("unimatch"),
                           unlabeled_paths=["u.png"] * 2)
        for dataset in (setup.train_set, setup.unlabeled_set):
            assert dataset.weak.transforms[0].base_size == expected, (extra, type(dataset).__name__)


def test_padding_gives_image_zero_and_mask_ignore():
    image, mask = position_pair(height=6, width=10)
    for seed in range(5):
        torch.manual_seed(seed)
        out_image, out_mask = weak_augment(16, scale_range=(1.0, 1.0))(image, mask)
        padded = out_mask == IGNORE
        assert padded.sum() == 16 * 16 - 6 * 10
        assert (out_image[:, padded] == 0).all()
        assert (out_image[:, ~padded] > 0).all()
        ys, xs = source_positions(out_image)
        np.testing.assert_array_equal(out_mask[~padded].numpy(), mask[ys[~padded], xs[~padded]].numpy())


def test_small_images_are_padded_right_and_bottom_as_the_reference():
    # ST++'s crop pads only right/bottom, so a small image keeps its top-left corner
    # (up to the horizontal flip); v2's pad_if_needed would centre it at random.
    image, mask = position_pair(height=6, width=10)
    for seed in range(8):
        torch.manual_seed(seed)
        _, out_mask = weak_augment(16, scale_range=(1.0, 1.0))(image, mask)
        kept = (out_mask != IGNORE).nonzero()
        rows, cols = kept[:, 0], kept[:, 1]
        assert rows.min() == 0 and rows.max() == 5
        assert (cols.min(), cols.max()) in ((0, 9), (6, 15))


@pytest.mark.parametrize("size", [(6, 10), (40, 50), (100, 20)])
def test_output_shapes(size):
    image, mask = position_pair(*size)
    weak, strong = weak_augment(24), strong_augment(24)
    for seed in range(5):
        torch.manual_seed(seed)
        out_image, out_mask = strong(*weak(image, mask))
        assert isinstance(out_image, tv_tensors.Image) and isinstance(out_mask, tv_tensors.Mask)
        assert out_image.shape == (3, 24, 24) and out_image.dtype == torch.uint8
        assert out_mask.shape == (24, 24) and out_mask.dtype == torch.uint8


def test_int64_mask_keeps_dtype():
    image, mask = position_pair()
    out_image, out_mask = weak_augment(16)(image, tv_tensors.Mask(mask.long()))
    out_image, out_mask = strong_augment(16)(out_image, out_mask)
    assert out_mask.dtype == torch.int64 and out_mask.shape == (16, 16)


def test_mask_none_passes_through():
    image, _ = position_pair()
    out_image, out_mask = strong_augment(16)(*weak_augment(16)(image, None))
    assert out_mask is None and out_image.shape == (3, 16, 16)


# ---- strong ------------------------------------------------------------------


def test_cutout_mask_ignore_exactly_where_image_erased():
    rng = np.random.default_rng(0)
    image, mask = to_tv(np.full((64, 48, 3), 77, np.uint8), rng.integers(0, 21, (64, 48), dtype=np.uint8))
    cutout = Cutout(p=1.0)
    for seed in range(20):
        torch.manual_seed(seed)
        out_image, out_mask = cutout(image, mask)
        erased = out_mask == IGNORE
        rows, cols = erased.any(dim=1).nonzero(), erased.any(dim=0).nonzero()
        box_h, box_w = len(rows), len(cols)
        assert erased.sum() == box_h * box_w  # one rectangle
        assert rows.max() - rows.min() + 1 == box_h and cols.max() - cols.min() + 1 == box_w
        assert 0.01 <= box_h * box_w / (64 * 48) <= 0.4
        assert torch.equal(out_mask[~erased], mask[~erased])
        assert torch.equal(out_image[:, ~erased], image[:, ~erased])
        changed = (out_image != image).any(dim=0)
        assert changed[erased].float().mean() > 0.95
        assert len(out_image[:, erased].unique()) > 10  # random values, not a constant fill


def _reference_box(rng, height, width, redraw_area=True):
    """The references' rejection loops in numpy, an independent oracle: LiheYoung/ST-PlusPlus
    dataset/transform.py `cutout` (size and place redrawn together) and, without
    `redraw_area`, LiheYoung/UniMatch dataset/transform.py `obtain_cutmix_box` (size once)."""
    size = rng.uniform(0.02, 0.4) * height * width
    while True:
        if redraw_area:
            size = rng.uniform(0.02, 0.4) * height * width
        ratio = rng.uniform(0.3, 1 / 0.3)
        w, h = int(np.sqrt(size / ratio)), int(np.sqrt(size * ratio))
        x, y = rng.integers(0, width), rng.integers(0, height)
        if x + w <= width and y + h <= height:
            return h, w


def _old_box(rng, height, width):
    """The former law (area and aspect redrawn until the box fits, then placed): not the references'."""
    while True:
        size = rng.uniform(0.02, 0.4) * height * width
        ratio = rng.uniform(0.3, 1 / 0.3)
        w, h = int(np.sqrt(size / ratio)), int(np.sqrt(size * ratio))
        if h <= height and w <= width:
            return h, w


def _box_stats(boxes, height, width):
    boxes = np.array(boxes, dtype=float)
    area = (boxes[:, 0] * boxes[:, 1]).mean() / (height * width)
    sides = boxes[(boxes > 0).all(axis=1)]
    return area, np.abs(np.log(sides[:, 0] / sides[:, 1])).mean()


def test_cutout_box_law_is_the_st_plus_plus_reference():
    """Mean box area: about 14% of the crop under the reference's loop (the former code drew
    about 20%); values uniform in 0..254 as uint8(uniform(0, 255))."""
    side, n, tol = 32, 3000, 0.008
    rng = np.random.default_rng(0)
    reference, _ = _box_stats([_reference_box(rng, side, side) for _ in range(20000)], side, side)
    former, _ = _box_stats([_old_box(rng, side, side) for _ in range(20000)], side, side)
    assert abs(reference - 0.14) < 0.01 and abs(former - reference) > 5 * tol and abs(0.20 - reference) > 5 * tol
    image, mask = to_tv(np.full((side, side, 3), 77, np.uint8), np.zeros((side, side), np.uint8))
    cutout, boxes, top = Cutout(p=1.0), [], 0
    torch.manual_seed(0)
    for _ in range(n):
        out_image, out_mask = cutout(image, mask)
        erased = out_mask == IGNORE
        boxes.append((int(erased.any(dim=1).sum()), int(erased.any(dim=0).sum())))
        top = max(top, int(out_image.max()))
    area, _ = _box_stats(boxes, side, side)
    assert abs(area - reference) < tol, f"mean Cutout area {area:.4f}, reference {reference:.4f}"
    assert top == 254


def test_cutmix_box_law_is_unimatchs():
    """UniMatch draws the area once and redraws aspect and place: near-square boxes are favoured
    (mean |log(h/w)| about 0.60 at 32 px against 0.68 when the fit ignored the place)."""
    side, n, tol = 32, 3000, 0.03
    rng = np.random.default_rng(1)
    ref_area, ref_aspect = _box_stats([_reference_box(rng, side, side, redraw_area=False) for _ in range(20000)], side, side)
    _, old_aspect = _box_stats([_old_box(rng, side, side) for _ in range(20000)], side, side)
    assert abs(old_aspect - ref_aspect) > 2 * tol
    torch.manual_seed(0)
    boxes = []
    for _ in range(n):
        box = cutmix_box(side, p=1.0)
        boxes.append((int(box.any(dim=1).sum()), int(box.any(dim=0).sum())))
        assert int(box.sum()) == boxes[-1][0] * boxes[-1][1]  # one rectangle
    area, aspect = _box_stats(boxes, side, side)
    assert abs(area - ref_area) < 0.008, f"mean CutMix area {area:.4f}, reference {ref_area:.4f}"
    assert abs(aspect - ref_aspect) < tol, f"mean |log aspect| {aspect:.4f}, reference {ref_aspect:.4f}"


def test_cutout_probability():
    image, mask = position_pair(32, 32)
    cutout = Cutout(p=0.5)
    torch.manual_seed(0)
    applied = sum(bool((cutout(image, mask)[1] == IGNORE).any()) for _ in range(40))
    assert 8 <= applied <= 32


def test_strong_changes_mask_only_by_cutout():
    image, mask = position_pair(24, 24)
    transform = strong_augment(24)
    image_changed = 0
    for seed in range(20):
        torch.manual_seed(seed)
        out_image, out_mask = transform(image, mask)
        differs = out_mask != mask
        assert (out_mask[differs] == IGNORE).all()
        image_changed += not torch.equal(out_image, image)
    assert image_changed >= 15  # colour ops are applied most of the time


def test_same_seed_same_output():
    image, mask = position_pair(30, 40)
    weak, strong = weak_augment(24), strong_augment(24)

    def run(seed):
        torch.manual_seed(seed)
        random.seed(seed + 1)  # only torch's RNG should matter
        np.random.seed(seed + 1)
        return strong(*weak(image, mask))

    first, second = run(5), run(5)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    others = [run(s) for s in range(6, 10)]
    assert any(not torch.equal(first[0], other[0]) for other in others)


def test_blur_kernel_size():
    assert blur_kernel_size(321) == 13
    assert blur_kernel_size(769) == 13
    assert blur_kernel_size(8) == 7
    assert blur_kernel_size(1) == 1
    assert all(blur_kernel_size(c) % 2 == 1 for c in range(1, 40))


def test_strong_on_tiny_crop():
    image, mask = position_pair(4, 4)
    for seed in range(5):
        torch.manual_seed(seed)
        out_image, out_mask = strong_augment(4)(image, mask)
        assert out_image.shape == (3, 4, 4) and out_mask.shape == (4, 4)


# ---- normalize / to_tv ---------------------------------------------------------


def test_normalize_single_and_batch():
    image = torch.tensor([0, 255], dtype=torch.uint8).repeat(3, 1, 1).reshape(3, 1, 2)
    out = normalize(image)
    assert out.dtype == torch.float32 and out.shape == (3, 1, 2)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out[:, 0, 0], -mean / std)
    torch.testing.assert_close(out[:, 0, 1], (1 - mean) / std)
    batch = normalize(torch.stack([image, image]))
    assert batch.shape == (2, 3, 1, 2)
    torch.testing.assert_close(batch[1], out)
    assert type(normalize(tv_tensors.Image(image))) is torch.Tensor


def test_normalize_rejects_float():
    with pytest.raises(ValueError, match="uint8"):
        normalize(torch.zeros(3, 2, 2))


def test_to_tv():
    image_np = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    mask_np = np.array([[0, 1, 2], [3, 4, 255]], dtype=np.uint8)
    image, mask = to_tv(image_np, mask_np)
    assert isinstance(image, tv_tensors.Image) and image.shape == (3, 2, 3)
    assert image[:, 1, 2].tolist() == image_np[1, 2].tolist()
    assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.uint8
    assert mask.tolist() == mask_np.tolist()
    assert to_tv(image_np, None)[1] is None
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        to_tv(image_np[..., :2], mask_np)
    with pytest.raises(ValueError, match="differs"):
        to_tv(image_np, mask_np[:1])
