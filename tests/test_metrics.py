import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from stpp_ray.metrics import ConfusionMatrix


def test_hand_computed_matrix_and_scores():
    # target: [[0, 0], [1, 2]]   pred: [[0, 1], [1, 1]]
    # rows = target, cols = pred: (0,0) (0,1) (1,1) (2,1)
    cm = ConfusionMatrix(3)
    cm.update(np.array([[0, 1], [1, 1]]), np.array([[0, 0], [1, 2]]))
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
    assert cm.matrix.dtype == np.int64
    # IoU0 = 1 / (2 + 1 - 1) = 1/2; IoU1 = 1 / (1 + 3 - 1) = 1/3; IoU2 = 0 / (1 + 0 - 0) = 0
    np.testing.assert_allclose(cm.iou(), [1 / 2, 1 / 3, 0.0])
    assert cm.miou() == pytest.approx((1 / 2 + 1 / 3) / 3)
    assert cm.pixel_accuracy() == pytest.approx(2 / 4)


def test_ignore_index_and_absent_classes():
    cm = ConfusionMatrix(4, ignore_index=255)
    cm.update(torch.tensor([0, 1, 3, 2]), torch.tensor([0, 1, 255, 255]))
    assert cm.matrix.sum() == 2
    iou = cm.iou()
    assert iou[0] == 1.0 and iou[1] == 1.0 and math.isnan(iou[2]) and math.isnan(iou[3])
    assert cm.miou() == 1.0 and cm.pixel_accuracy() == 1.0


def test_empty_matrix_is_nan():
    cm = ConfusionMatrix(3)
    assert math.isnan(cm.miou()) and math.isnan(cm.pixel_accuracy())
    assert np.isnan(cm.iou()).all()


def test_matches_naive_loop_and_merge():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 5, size=(3, 7, 9))
    target = rng.integers(0, 5, size=(3, 7, 9))
    target[0, 0, :4] = 255
    naive = np.zeros((5, 5), dtype=np.int64)
    for t, p in zip(target.ravel(), pred.ravel()):
        if t != 255:
            naive[t, p] += 1
    a, b = ConfusionMatrix(5), ConfusionMatrix(5)
    a.update(pred[:2], target[:2])
    b.update(torch.from_numpy(pred[2:]), torch.from_numpy(target[2:]))
    a.merge(b)
    np.testing.assert_array_equal(a.matrix, naive)
    with pytest.raises(ValueError):
        a.merge(ConfusionMatrix(4))


@pytest.mark.parametrize("bad", [-1, 3])
def test_out_of_range_prediction_raises(bad):
    with pytest.raises(ValueError, match="prediction"):
        ConfusionMatrix(3).update(np.array([0, bad]), np.array([0, 1]))


def test_out_of_range_target_and_shape_mismatch_raise():
    with pytest.raises(ValueError, match="target"):
        ConfusionMatrix(3).update(np.array([0, 1]), np.array([0, 7]))
    with pytest.raises(ValueError, match="shape"):
        ConfusionMatrix(3).update(np.zeros(3, int), np.zeros(4, int))
    with pytest.raises(ValueError, match="integers"):
        ConfusionMatrix(3).update(np.zeros(3), np.zeros(3, int))


def test_all_reduce_without_and_with_process_group():
    cm = ConfusionMatrix(2)
    cm.update(np.array([0, 1, 1]), np.array([0, 1, 0]))
    before = cm.matrix.copy()
    assert cm.all_reduce() is cm
    np.testing.assert_array_equal(cm.matrix, before)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        cm.all_reduce()
    finally:
        dist.destroy_process_group()
    np.testing.assert_array_equal(cm.matrix, before)
    assert cm.matrix.dtype == np.int64
