"""What a method is: its stage graph, which stage is its result, and how a stage trains.

A method builds its graph from the `StageBuilder` the pipeline hands it and never imports
the pipeline. Each training stage it builds carries a kind (a name the method defines);
inside a Ray Train worker, `Method.training(kind, cfg)` says how that stage trains.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import pyarrow as pa

from ..losses import cross_entropy_sum
from ..pseudo_labels import read_selection

# Stage kinds every method may use; a method can add its own (DMT's `dmt_phase`).
SUPERVISED = "supervised"  # cross entropy on the labeled set and any pseudo-labeled images
ONLINE = "online"  # an online method's step on labeled and unlabeled batches


def derive_fingerprint(parent: str, *parts: str) -> str:
    """A stage fingerprint: its upstream stage's chained with the parts that make it differ."""
    return hashlib.sha256("/".join((parent,) + parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PseudoLabels:
    """Pseudo-labeled images of one labeling stage that a training stage reads."""

    parquet_dir: str
    selection: str  # the images trained on, a `pseudo_labels.write_selection` file ("" for none)
    count: int  # how many it names
    curriculum_ratio: float | None = None  # DMT: the top fraction of each class kept (`dmt.curriculum_items`)


@dataclass(frozen=True)
class Stage:
    """One node of a run's graph: a name, its fingerprint and the work, run by the pipeline."""

    name: str
    fingerprint: str
    run: Callable[[], dict]
    needs: tuple[str, ...] = ()  # result keys a recorded result must hold to be reused (older ones rerun)


@dataclass(frozen=True)
class StageTraining:
    """How one rank trains a stage: its SGD settings and, for offline stages, its loss."""

    lr: float
    head_lr_multiplier: float
    momentum: float
    weight_decay: float
    criterion: Callable = cross_entropy_sum  # (logits, mask, *extras) -> (loss sum, pixel count)
    with_confidence: bool = False  # the training items also yield pseudo-label confidence maps
    pseudo_items: Callable = None  # (PseudoLabels, num_classes) -> training items; None = `plain_pseudo_items`

    def read_pseudo(self, source: PseudoLabels, num_classes: int) -> list:
        return (self.pseudo_items or plain_pseudo_items)(source, num_classes)


def plain_pseudo_items(source: PseudoLabels, num_classes: int) -> list:
    """Every pseudo-label of the source, strongly augmented (ST, ST++)."""
    return read_selection(source.selection)


def teacher_training(cfg) -> StageTraining:
    """The `train.*` optimiser with cross entropy: every stage that no method redefines."""
    t = cfg.train
    return StageTraining(t.lr, t.head_lr_multiplier, t.momentum, t.weight_decay)


class StageBuilder(Protocol):
    """What the pipeline offers a method to build its stages with."""

    def data(self) -> Stage:
        """The data check."""

    def train(self, name: str, fingerprint: str, *, kind: str, epochs: int, checkpoint_epochs: Sequence[int],
              pseudo: Callable[[], list[PseudoLabels]] = list, cfg=None, init_from: str = "",
              unlabeled: bool = False) -> Stage:
        """A Ray Train stage. `cfg`: a variant of the run's config (DMT's second model);
        `init_from`: the stage whose final weights it fine-tunes; `unlabeled`: the online stream."""

    def label(self, name: str, fingerprint: str, model_stage: str,
              image_ids: Callable[[], pa.Table | pa.Array | Sequence[str]], scoring: bool) -> Stage:
        """A Ray Data labeling pass of `model_stage`'s model over the unlabeled images `image_ids`
        (ids, or a table of `selected`); `scoring`: also score stability with its K checkpoints."""

    def select(self, fingerprint: str, label_stage: str) -> Stage:
        """ST++'s reliable-image selection from `label_stage`'s scores."""

    def pseudo_labels(self, label_stage: str, images: pa.Table | pa.Array | Sequence[str]) -> PseudoLabels:
        """The pseudo-labels of `images` (ids, or a table of `selected`) written by `label_stage`
        (once it has run), their ids written to a file that the Train workers read."""

    def result(self, stage: str) -> dict:
        """A finished stage's result."""

    def selected(self, reliable: bool) -> pa.Table:
        """The select stage's reliable (or unreliable) images, once it has run: `image_id` and
        `row`, each image's row in the shards the select stage scored (`pseudo_labels` uses
        them for those shards only)."""

    def unlabeled_ids(self) -> pa.Array:
        """The unlabeled split's image ids."""


@dataclass
class Method:
    """A semi-supervised method (or SupOnly) as the pipeline, report and workers see it."""

    name: str
    label: str  # its row in `stpp-ray compare`
    uses_unlabeled: bool = True  # reads the unlabeled split
    online: bool = False  # trains on an unlabeled stream, without a SupOnly teacher
    head: str = "stpp"  # `model.head: auto` resolves to this
    selects_reliable: bool = False  # uses ST++'s selection, so R and K matter
    trained_kinds: tuple[str, ...] = (SUPERVISED,)  # the stage kinds trained with `teacher_training`
    # Stages shared by every run with the same teacher config (a sweep runs them once).
    shared_stages: tuple[str, ...] = field(default=("check_data", "teacher", "label_teacher"))

    def stages(self, cfg, build: StageBuilder) -> list[Stage]:
        raise NotImplementedError

    def final_stage(self, cfg) -> str:
        """The stage whose model is the method's result."""
        raise NotImplementedError

    def teacher_stage(self, cfg) -> str:
        """The stage reported as `teacher` (the SupOnly teacher where the method trains one)."""
        return "teacher"

    def projection_channels(self, cfg) -> int:
        """Width of a projection head the model needs (U2PL's contrastive term), 0 for none."""
        return 0

    def trains_labeled_batch_alone(self, cfg) -> bool:
        """Whether some training forward pass holds only the labeled batch (BatchNorm needs 2+ images)."""
        return True

    def training(self, kind: str, cfg) -> StageTraining:
        """How a stage of `kind` trains (in the Ray Train worker)."""
        if kind not in self.trained_kinds:
            raise ValueError(f"method {self.name} has no stage kind {kind!r}")
        return teacher_training(cfg)
