"""U2PL's pixel-level contrastive term ("every pixel matters"): unreliable pixels as negatives.

Haochen-Wang409/U2PL u2pl/utils/loss_helper.py `compute_contra_memobank_loss` and
train_semi.py, experiments/pascal/1464/ours/config.yaml (the defaults in `semi.u2pl_*`):

- anchors of class c: pixels labeled c (ground truth, or the teacher's pseudo-label among the
  alpha_t % lowest-entropy unlabeled pixels) whose teacher probability of c exceeds delta_p
  (0.3); `num_queries` of them drawn with replacement;
- positive key: the class prototype, the mean teacher feature of the pixels labeled c;
- negatives: a per-class FIFO queue (`ClassQueues`) of teacher features of pixels for which c
  is unlikely: labeled pixels of another class with c among the teacher's top `low_rank`
  classes, and high-entropy unlabeled pixels with c ranked in [low_rank, high_rank);
  `num_negatives` per anchor drawn from the queue;
- InfoNCE over (positive, negatives) with cosine similarity / temperature, averaged over the
  anchors of each class, then over the classes present in the batch.

Everything is pooled over the global batch so that the result does not depend on the worker
count: keys and counts are gathered (labeled images first, then unlabeled, in rank order, which
is the order of one worker's batch), and the draws use one generator seeded identically on
every rank. Each rank computes the InfoNCE terms of the anchors that fall in its own pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..training import is_distributed


class ClassQueues:
    """One FIFO queue of feature vectors per class, keeping the newest `sizes[c]` rows (U2PL's
    `dequeue_and_enqueue`: append, then drop the oldest beyond the size)."""

    def __init__(self, sizes: list[int], dim: int):
        self.sizes = list(sizes)
        self.queues = [torch.zeros(0, dim) for _ in sizes]

    def push(self, c: int, keys: torch.Tensor) -> None:
        queue = torch.cat([self.queues[c], keys.detach().float().cpu()])
        self.queues[c] = queue[-self.sizes[c]:] if queue.shape[0] > self.sizes[c] else queue

    def __len__(self) -> int:
        return len(self.queues)

    def nbytes(self) -> int:
        return sum(q.numel() * q.element_size() for q in self.queues)

    def state_dict(self) -> dict:
        return {"sizes": self.sizes, "queues": [q.clone() for q in self.queues]}

    def load_state_dict(self, state: dict) -> None:
        self.sizes, self.queues = list(state["sizes"]), [q.clone() for q in state["queues"]]


@dataclass(frozen=True)
class ContrastSettings:
    """The contrastive term's knobs (U2PL's config.yaml `trainer.contrastive`)."""

    num_queries: int = 256  # anchors drawn per class
    num_negatives: int = 50  # negatives drawn per anchor
    temperature: float = 0.5
    positive_threshold: float = 0.3  # delta_p: an anchor's teacher probability of its class
    negative_threshold: float = 1.0  # delta_n: a negative's teacher probability of the class
    low_rank: int = 3
    high_rank: int = 20


def _gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """`rows` (N x D, N may differ per rank) of every rank, concatenated in rank order."""
    if not is_distributed():
        return rows
    n = torch.tensor([rows.shape[0]], device=rows.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, rows.shape[1]), dtype=rows.dtype, device=rows.device)
    padded[:rows.shape[0]] = rows
    gathered = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[:int(s.item())] for g, s in zip(gathered, sizes)])


def _gather_counts(counts: torch.Tensor) -> torch.Tensor:
    """World x len(counts) matrix of every rank's counts (1 x len on one worker)."""
    if not is_distributed():
        return counts.unsqueeze(0)
    out = [torch.zeros_like(counts) for _ in range(dist.get_world_size())]
    dist.all_gather(out, counts.contiguous())
    return torch.stack(out)


def _rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _global_sum(x: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        x = x.clone()
        dist.all_reduce(x)
    return x


def contrastive_sums(rep: torch.Tensor, rep_teacher: torch.Tensor, prob_teacher: torch.Tensor,
                     labels: torch.Tensor, anchor_mask: torch.Tensor, negative_mask: torch.Tensor,
                     num_labeled: int, queues: ClassQueues, settings: ContrastSettings,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of U2PL's contrastive loss and the global count that divides it.

    `rep`, `rep_teacher`: B x D x h x w student and teacher features of the labeled images
    (the first `num_labeled`) then the unlabeled ones; `prob_teacher`: B x C x h x w teacher
    probabilities; `labels`: B x h x w (ground truth, then pseudo-labels; 255 = none);
    `anchor_mask` / `negative_mask`: B x h x w pixels that may be anchors (labeled, low-entropy
    unlabeled) / negatives (labeled, high-entropy unlabeled). Pushes this step's negatives into
    `queues` (identically on every rank). The loss is sum / count with both summed over ranks."""
    num_classes = prob_teacher.shape[1]
    dim = rep.shape[1]
    rep = rep.permute(0, 2, 3, 1)
    rep_teacher = rep_teacher.permute(0, 2, 3, 1).detach().float()  # float32 sums and counts under AMP too
    ranks = prob_teacher.detach().argsort(1, descending=True).permute(0, 2, 3, 1)  # B x h x w x C
    prob = prob_teacher.detach().permute(0, 2, 3, 1)
    parts = (slice(0, num_labeled), slice(num_labeled, None))
    anchors, present, protos = [], [], []
    for c in range(num_classes):
        is_c = labels == c
        candidates = is_c & anchor_mask & (prob[..., c] > settings.positive_threshold)
        # Per part (labeled, unlabeled) so that the global order is one worker's order.
        anchors.append([rep[p][candidates[p]] for p in parts])
        member = is_c & anchor_mask
        proto_sum = _global_sum(torch.cat([rep_teacher[member].sum(0), member.sum().reshape(1).float()]))
        present.append(bool(proto_sum[-1] > 0))
        protos.append(proto_sum[:dim] / proto_sum[-1].clamp_min(1))
        unlikely = negative_mask & (prob[..., c] < settings.negative_threshold)
        in_top = ranks[parts[0]][..., :settings.low_rank].eq(c).any(-1) & (labels[parts[0]] != c)
        in_window = ranks[parts[1]][..., settings.low_rank:settings.high_rank].eq(c).any(-1)
        for p, where in zip(parts, (in_top, in_window)):
            queues.push(c, _gather_rows(rep_teacher[p][unlikely[p] & where]))
    return _anchor_terms(anchors, present, protos, queues, settings, generator, rep)


def _anchor_terms(anchors, present, protos, queues: ClassQueues, settings: ContrastSettings,
                  generator: torch.Generator, rep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of the anchors drawn from the global candidate list that are this rank's."""
    total = rep.sum() * 0.0  # keeps the graph connected when no class has a term
    valid = sum(present)
    if valid <= 1:  # U2PL: a batch with one class or none gives no contrastive loss
        return total, torch.tensor(0.0, device=rep.device)
    counts = torch.tensor([[len(a) for a in per_class] for per_class in anchors], device=rep.device)
    everyone = _gather_counts(counts.flatten()).view(-1, len(anchors), 2).cpu()  # world x C x part
    rank = _rank()
    for c, per_class in enumerate(anchors):
        n_global = int(everyone[:, c].sum())
        if not present[c] or n_global == 0 or queues.queues[c].shape[0] == 0:
            continue  # the class counts in the mean with a zero term, as U2PL's
        picks = torch.randint(n_global, (settings.num_queries,), generator=generator).to(rep.device)
        negatives = queues.queues[c][torch.randint(queues.queues[c].shape[0],
                                                   (settings.num_queries * settings.num_negatives,),
                                                   generator=generator)]
        # Global index space: labeled candidates of rank 0, 1, ..., then unlabeled ones.
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), everyone[:, c].T.flatten().cumsum(0)]).tolist()
        world = everyone.shape[0]
        mine = []
        for part in (0, 1):
            k = part * world + rank
            lo, hi = offsets[k], offsets[k + 1]
            chosen = (picks >= lo) & (picks < hi)
            mine.append((per_class[part][picks[chosen] - lo], chosen.nonzero().flatten()))
        feats = torch.cat([f for f, _ in mine])
        if feats.shape[0] == 0:
            continue
        order = torch.cat([i for _, i in mine])
        keys = torch.cat([protos[c].expand(settings.num_queries, 1, -1).to(rep.device),
                          negatives.to(rep.device).view(settings.num_queries, settings.num_negatives, -1)], dim=1)
        logits = F.cosine_similarity(feats.float().unsqueeze(1), keys[order], dim=2) / settings.temperature
        ce = F.cross_entropy(logits.float(), torch.zeros(len(order), dtype=torch.long, device=rep.device), reduction="sum")
        total = total + ce / settings.num_queries
    # Divided by the classes present (on one rank only: the count is summed over ranks).
    return total, torch.tensor(float(valid) if rank == 0 else 0.0, device=rep.device)
