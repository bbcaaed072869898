"""Loss and weighting blocks of the online methods against hand-computed cases."""

import math

import pytest
import torch

from stpp_ray.methods.dmt import dmt_weights
from stpp_ray.methods.mean_teacher import sigmoid_rampup, softmax_mse_sum
from stpp_ray.methods.online import ema_update_
from stpp_ray.methods.u2pl import u2pl_drop_unreliable, u2pl_unreliable_percent
from stpp_ray.methods.unimatch import confident_pseudo_labels


def _probs(*pixels):
    """B=1, H=1, W=len(pixels) probabilities from per-pixel class lists."""
    return torch.tensor(pixels, dtype=torch.float64).T.reshape(1, len(pixels[0]), 1, len(pixels))


def test_ema_moves_parameters_and_statistics_toward_the_student_and_copies_counters():
    teacher, student = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        teacher.weight.copy_(torch.tensor([1.0, 2.0]))
        student.weight.copy_(torch.tensor([3.0, 6.0]))
        student.running_mean.copy_(torch.tensor([0.5, -0.5]))
    student.num_batches_tracked += 7
    ema_update_(teacher, student, decay=0.75)
    assert teacher.weight.tolist() == [0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * 6]  # 1.5, 3.0
    assert teacher.running_mean.tolist() == [0.125, -0.125] and int(teacher.num_batches_tracked) == 7
    with pytest.raises(ValueError, match="decay"):
        ema_update_(teacher, student, 1.5)


def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(100, 100) == 1.0 and sigmoid_rampup(250, 100) == 1.0 and sigmoid_rampup(3, 0) == 1.0


def test_softmax_mse_on_two_pixels():
    student = torch.log(_probs([0.5, 0.5], [1.0, 1e-30]))  # softmax gives back the probabilities
    teacher = torch.log(_probs([1.0, 1e-30], [1.0, 1e-30]))
    total, count = softmax_mse_sum(student, teacher)
    # pixel 1: ((0.5-1)^2 + (0.5-0)^2) / 2 = 0.25; pixel 2: 0
    assert total.item() == pytest.approx(0.25) and count.item() == 2
    total, count = softmax_mse_sum(student, teacher, valid=torch.tensor([[[False, True]]]))
    assert total.item() == pytest.approx(0.0) and count.item() == 1


def test_u2pl_percent_schedule():
    assert u2pl_unreliable_percent(0, 80) == 20.0
    assert u2pl_unreliable_percent(40, 80) == 10.0
    assert u2pl_unreliable_percent(80, 80) == 0.0
    with pytest.raises(ValueError):
        u2pl_unreliable_percent(81, 80)


def test_u2pl_drops_the_highest_entropy_valid_pixels():
    # entropies (nats): uniform pair ln 2 = 0.693, [0.9, 0.1] 0.325, [0.99, 0.01] 0.056, one-hot 0
    probs = _probs([0.5, 0.5], [0.9, 0.1], [0.99, 0.01], [1.0, 0.0], [0.5, 0.5])
    pseudo = torch.tensor([[[0, 0, 0, 1, 255]]])  # the last pixel is already ignored
    # 25 % of the 4 valid pixels: the 75th percentile of [0.693, 0.325, 0.056, 0] lies between
    # 0.325 and 0.693, so only the uniform pixel goes
    assert u2pl_drop_unreliable(pseudo, probs, 25.0).tolist() == [[[255, 0, 0, 1, 255]]]
    # 50 %: the median is (0.325 + 0.056) / 2, so the two most uncertain go
    assert u2pl_drop_unreliable(pseudo, probs, 50.0).tolist() == [[[255, 255, 0, 1, 255]]]
    assert u2pl_drop_unreliable(pseudo, probs, 0.0).tolist() == pseudo.tolist()


def test_dmt_weight_in_each_of_its_three_cases():
    gamma1, gamma2 = 2.0, 3.0
    current = _probs([0.8, 0.2], [0.4, 0.6], [0.3, 0.7])
    pseudo = _probs([0.6, 0.4], [0.9, 0.1], [0.6, 0.4])
    pseudo_conf, pseudo_label = pseudo.max(1)
    w = dmt_weights(current, pseudo_label, pseudo_conf, gamma1, gamma2)[0, 0].tolist()
    # pixel 1: both say class 0 -> p^gamma1 = 0.8^2
    # pixel 2: disagree, pseudo (0.9) more confident than current (0.6) -> p^gamma2 = 0.4^3
    # pixel 3: disagree, current (0.7) more confident than pseudo (0.6) -> 0
    assert w == pytest.approx([0.64, 0.064, 0.0])


def test_confident_pseudo_labels_keep_pixels_at_or_above_the_threshold():
    probs = _probs([0.95, 0.05], [0.2, 0.8], [0.5, 0.5])
    labels, keep = confident_pseudo_labels(probs, 0.95)
    assert labels.tolist() == [[[0, 255, 255]]] and keep.tolist() == [[[True, False, False]]]
