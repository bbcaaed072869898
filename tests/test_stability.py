import math

import numpy as np
import pytest
import torch

from stpp_ray.stability import batched_checkpoint_ious, checkpoint_ious, image_miou, stability_score


def test_image_miou_hand_computed_2x2():
    # pred [[0, 0], [1, 1]] vs ref [[0, 1], [1, 1]]
    # class 0: inter 1, union 2 -> 1/2 ; class 1: inter 2, union 3 -> 2/3 ; class 2 absent: left out
    pred = np.array([[0, 0], [1, 1]])
    ref = np.array([[0, 1], [1, 1]])
    assert image_miou(pred, ref, 3) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_image_miou_hand_computed_3x3():
    # pred: 0 0 1 / 0 2 1 / 2 2 1     ref: 0 0 0 / 0 2 1 / 1 2 1
    # class 0: pred {00,01,10}, ref {00,01,02,10} -> inter 3, union 4 -> 3/4
    # class 1: pred {02,12,22}, ref {12,20,22}    -> inter 2, union 4 -> 1/2
    # class 2: pred {11,20,21}, ref {11,21}       -> inter 2, union 3 -> 2/3
    # classes 3, 4 absent from both: left out
    pred = np.array([[0, 0, 1], [0, 2, 1], [2, 2, 1]])
    ref = np.array([[0, 0, 0], [0, 2, 1], [1, 2, 1]])
    assert image_miou(pred, ref, 5) == pytest.approx((3 / 4 + 1 / 2 + 2 / 3) / 3)


def test_identical_and_disjoint():
    a = np.array([[0, 1], [2, 3]])
    assert image_miou(a, a, 4) == 1.0
    assert image_miou(np.zeros((2, 2), int), np.ones((2, 2), int), 2) == 0.0


def test_class_present_only_in_pred_counts_as_zero():
    # pred [0, 2] vs ref [0, 1]: class 0 IoU 1/1, class 1 (ref only) 0/1, class 2 (pred only) 0/1;
    # class 3 in neither is left out -> mIoU = 1/3
    assert image_miou(np.array([0, 2]), np.array([0, 1]), 4) == pytest.approx(1 / 3)


def test_stability_score_and_checkpoint_ious():
    final = np.array([[0, 1], [1, 1]])
    p1 = np.array([[0, 0], [1, 1]])  # vs final: (1/2 + 2/3) / 2 = 7/12
    p2 = final.copy()  # 1.0
    assert checkpoint_ious([p1, p2, final], 2) == pytest.approx([7 / 12, 1.0])
    assert stability_score([p1, p2, final], 2) == pytest.approx((7 / 12 + 1.0) / 2)
    assert math.isnan(stability_score([final], 2))
    assert checkpoint_ious([final], 2) == []


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        image_miou(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(ValueError):
        image_miou(np.zeros((2, 2), int), np.zeros((2, 3), int), 3)
    with pytest.raises(ValueError):
        batched_checkpoint_ious(torch.zeros(2, 3, 4), 3)


def test_batched_equals_per_image():
    g = torch.Generator().manual_seed(0)
    k, b, n = 4, 5, 6
    final = torch.randint(0, n, (b, 7, 9), generator=g)
    noise = torch.randint(0, n, (k - 1, b, 7, 9), generator=g)
    keep = torch.rand(k - 1, b, 7, 9, generator=g) < 0.6
    preds = torch.cat([torch.where(keep, final.expand_as(noise), noise), final[None]])
    preds[:, 0] = 2  # image 0: all checkpoints identical, one class
    out = batched_checkpoint_ious(preds, n)
    assert out.shape == (b, k - 1) and out.dtype == torch.float64
    for i in range(b):
        expected = checkpoint_ious([preds[j, i].numpy() for j in range(k)], n)
        np.testing.assert_allclose(out[i].numpy(), expected, rtol=1e-12)
    assert out[0].tolist() == [1.0] * (k - 1)


def test_batched_single_checkpoint_is_empty():
    assert batched_checkpoint_ious(torch.zeros(1, 3, 2, 2, dtype=torch.long), 2).shape == (3, 0)
