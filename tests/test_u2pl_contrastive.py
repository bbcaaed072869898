"""U2PL's contrastive term (Haochen-Wang409/U2PL u2pl/utils/loss_helper.py) on hand-computed
cases, its memory bank, and the worker-count invariance of the whole step."""

from __future__ import annotations

import math

import pytest
import torch

from stpp_ray.methods.u2pl_contrastive import ClassQueues, ContrastSettings, contrastive_sums

ONE = ContrastSettings(num_queries=1, num_negatives=1, temperature=0.5, low_rank=1, high_rank=2)


def _case(neg_class1=(1.0, 1.0)):
    """One labeled image of 1 x 2 pixels: pixel 0 is class 0, pixel 1 class 1 (D = 2)."""
    rep = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2).requires_grad_()
    rep_teacher = torch.tensor([[1.0, 1.0], [-1.0, 1.0]]).T.reshape(1, 2, 1, 2)
    prob = torch.tensor([[0.9, 0.1], [0.2, 0.8]]).T.reshape(1, 2, 1, 2)
    labels = torch.tensor([[[0, 1]]])
    queues = ClassQueues([4, 4], 2)
    queues.push(0, torch.tensor([[0.0, 1.0]]))
    queues.push(1, torch.tensor([neg_class1]))
    return rep, rep_teacher, prob, labels, queues


def test_infonce_against_hand_computed_values():
    """Class 0: anchor (1,0), prototype (1,1), negative (0,1): cosines 1/sqrt2 and 0.
    Class 1: anchor (0,1), prototype (-1,1), negative (1,1): cosines 1/sqrt2 and 1/sqrt2.
    Each term is -log softmax(cos / T)[0]; the loss is their mean over the 2 classes present."""
    rep, rep_teacher, prob, labels, queues = _case()
    none = torch.zeros(1, 1, 2, dtype=torch.bool)
    total, count = contrastive_sums(rep, rep_teacher, prob, labels, torch.ones_like(none), none, 1, queues, ONE,
                                    torch.Generator().manual_seed(0))
    c = 1 / math.sqrt(2)
    class0 = -math.log(math.exp(c / 0.5) / (math.exp(c / 0.5) + math.exp(0.0)))
    class1 = math.log(2.0)
    assert float(count) == 2.0
    assert float(total.detach()) / float(count) == pytest.approx((class0 + class1) / 2, rel=1e-6)
    total.backward()
    assert rep.grad.abs().sum() > 0, "the anchors (student features) get gradients"
    assert [q.shape[0] for q in queues.queues] == [1, 1], "no negative mask: nothing pushed"


def test_a_class_with_an_empty_bank_counts_in_the_mean_with_no_term_and_one_class_gives_none():
    rep, rep_teacher, prob, labels, queues = _case()
    queues.queues[1] = torch.zeros(0, 2)
    none = torch.zeros(1, 1, 2, dtype=torch.bool)
    total, count = contrastive_sums(rep, rep_teacher, prob, labels, torch.ones_like(none), none, 1, queues, ONE,
                                    torch.Generator().manual_seed(0))
    c = 1 / math.sqrt(2)
    assert float(count) == 2.0 and float(total) == pytest.approx(math.log(1 + math.exp(-c / 0.5)), rel=1e-6)
    only_class0 = torch.tensor([[[0, 0]]])
    total, count = contrastive_sums(rep, rep_teacher, prob, only_class0, torch.ones_like(none), none, 1, queues, ONE,
                                    torch.Generator().manual_seed(0))
    assert float(total) == 0.0 and float(count) == 0.0, "U2PL: a batch with one class has no contrastive loss"


def test_negatives_follow_the_papers_rule():
    """Labeled pixels: another class whose top-r_l predictions hold c. Unlabeled pixels: the
    negative mask (high entropy) and c ranked in [r_l, r_h). U2PL's code intersects the labeled
    rule with `label == c` and so never pushes a labeled negative (U2PL#171)."""
    d, c3 = 2, ContrastSettings(num_queries=1, num_negatives=1, low_rank=2, high_rank=3)
    # 2 images (1 labeled, 1 unlabeled) of 1 x 3 pixels, 3 classes; teacher probabilities per pixel:
    prob = torch.tensor([
        [[0.6, 0.3, 0.1], [0.1, 0.6, 0.3], [0.5, 0.1, 0.4]],   # labeled: labels 0, 1, 2
        [[0.7, 0.2, 0.1], [0.3, 0.5, 0.2], [0.1, 0.2, 0.7]],   # unlabeled: pseudo-labels 0, 1, 2
    ]).permute(0, 2, 1).reshape(2, 3, 1, 3)
    labels = torch.tensor([[[0, 1, 2]], [[0, 1, 2]]])
    rep = torch.randn(2, d, 1, 3)
    rep_teacher = torch.arange(12, dtype=torch.float32).reshape(2, 1, 3, d).permute(0, 3, 1, 2)
    negative = torch.tensor([[[True, True, True]], [[False, True, True]]])
    queues = ClassQueues([9, 9, 9], d)
    contrastive_sums(rep, rep_teacher, prob, labels, torch.ones_like(negative), negative, 1, queues, c3,
                     torch.Generator().manual_seed(0))
    feature = {(b, j): rep_teacher[b, :, 0, j].tolist() for b in range(2) for j in range(3)}
    # class 0: labeled pixel 2 (label 2, top-2 = {0, 2}); unlabeled pixels whose 3rd class is 0: pixel 2.
    assert queues.queues[0].tolist() == [feature[0, 2], feature[1, 2]]
    # class 1: labeled pixel 0 (top-2 {0, 1}); unlabeled: pixel 0 ranks 1 second, not third; none.
    assert queues.queues[1].tolist() == [feature[0, 0]]
    # class 2: labeled pixel 1 (top-2 {1, 2}); unlabeled pixel 1 (third class 2).
    assert queues.queues[2].tolist() == [feature[0, 1], feature[1, 1]]


def test_memory_bank_is_a_bounded_fifo_queue_per_class():
    queues = ClassQueues([4, 2], 1)
    queues.push(0, torch.tensor([[1.0], [2.0], [3.0]]))
    queues.push(0, torch.tensor([[4.0], [5.0], [6.0]]))
    queues.push(1, torch.tensor([[7.0]]))
    assert queues.queues[0].flatten().tolist() == [3.0, 4.0, 5.0, 6.0], "the newest rows, oldest dropped"
    assert queues.queues[1].flatten().tolist() == [7.0]
    assert queues.nbytes() == 5 * 4
    restored = ClassQueues([1, 1], 1)
    restored.load_state_dict(queues.state_dict())
    assert restored.sizes == [4, 2] and all(torch.equal(a, b) for a, b in zip(restored.queues, queues.queues))
    restored.push(1, torch.tensor([[8.0], [9.0]]))
    assert restored.queues[1].flatten().tolist() == [8.0, 9.0] and queues.queues[1].flatten().tolist() == [7.0]
