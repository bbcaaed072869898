"""SupOnly, ST and ST++ (Yang et al., CVPR 2022): a teacher, its pseudo-labels, students.

ST++: the teacher's K checkpoints score every unlabeled image's stability; student 1 trains
on the labeled and the R most stable images, labels the rest, and student 2 trains on all.
The fingerprint keys of the teacher and its labeling pass live here; DMT and the online
methods reuse the teacher's.
"""

from __future__ import annotations

from ..pseudo_labels import SHARD_FORMAT
from .base import SUPERVISED, Method, Stage, StageBuilder, derive_fingerprint

TEACHER_KEYS = (
    "data.layout", "data.root", "data.num_classes", "data.labeled_split", "data.val_split", "data.crop_size", "data.base_size", "data.max_images",
    "data.demo", "data.demo_seed", "data.demo_num_train", "data.demo_num_val", "data.demo_image_size", "model", "train.epochs", "train.batch_size", "train.lr",
    "train.head_lr_multiplier", "train.momentum", "train.weight_decay", "train.poly_power",
    "train.eval_interval", "train.amp", "train.sync_batchnorm", "eval", "run.seed",
)
LABEL_KEYS = ("data.unlabeled_split", "label.teacher", "label.tta", "label.tta_scales")
SELECT_KEYS = ("selection.reliable_fraction", "selection.num_checkpoints")


def teacher_fingerprint(cfg) -> str:
    """The teacher's config keys plus the epochs it saves checkpoints at (not K itself)."""
    return derive_fingerprint(cfg.fingerprint(*TEACHER_KEYS), "checkpoints", str(cfg.scoring_checkpoint_epochs()))


def labeling_fingerprint(cfg) -> str:
    """The labeling keys and the shards' layout: shards written by another layout are relabeled."""
    return derive_fingerprint(cfg.fingerprint(*LABEL_KEYS), "shards", SHARD_FORMAT)


def shared_fingerprint(cfg) -> str:
    """Fingerprint of the shared stages (teacher and its labeling pass)."""
    return derive_fingerprint(teacher_fingerprint(cfg), labeling_fingerprint(cfg), cfg.method)


def student_epochs(cfg) -> int:
    """Epochs of each student stage."""
    return cfg.train.student_epochs or cfg.train.epochs


def teacher_stages(cfg, build: StageBuilder) -> list[Stage]:
    """The data check and the SupOnly teacher, which saves the K scoring checkpoints."""
    teacher = build.train("teacher", teacher_fingerprint(cfg), kind=SUPERVISED, epochs=cfg.train.epochs,
                          checkpoint_epochs=cfg.scoring_checkpoint_epochs())
    return [build.data(), teacher]


class SupOnly(Method):
    def stages(self, cfg, build: StageBuilder) -> list[Stage]:
        return teacher_stages(cfg, build)

    def final_stage(self, cfg) -> str:
        return "teacher"


class SelfTraining(Method):
    """ST: one student on the labeled images and every pseudo-labeled one."""

    def stages(self, cfg, build: StageBuilder) -> list[Stage]:
        label_fp = shared_fingerprint(cfg)
        student_fp = derive_fingerprint(label_fp, "student", str(cfg.train.student_epochs))
        return teacher_stages(cfg, build) + [
            build.label("label_teacher", label_fp, "teacher", build.unlabeled_ids, scoring=False),
            build.train("student", student_fp, kind=SUPERVISED, epochs=student_epochs(cfg),
                        checkpoint_epochs=[student_epochs(cfg)],
                        pseudo=lambda: [build.pseudo_labels("label_teacher", build.unlabeled_ids())]),
        ]

    def final_stage(self, cfg) -> str:
        return "student"


class SelfTrainingPlusPlus(Method):
    """ST++: select the reliable images by stability, retrain, relabel the rest, retrain on all."""

    def stages(self, cfg, build: StageBuilder) -> list[Stage]:
        label_fp = shared_fingerprint(cfg)
        select_fp = derive_fingerprint(label_fp, cfg.fingerprint(*SELECT_KEYS))
        s1_fp = derive_fingerprint(select_fp, "student1", str(cfg.train.student_epochs))
        l1_fp = derive_fingerprint(s1_fp, "label_student1")
        s2_fp = derive_fingerprint(l1_fp, "student2")
        epochs = student_epochs(cfg)
        reliable, unreliable = (lambda: build.selected(True)), (lambda: build.selected(False))
        return teacher_stages(cfg, build) + [
            build.label("label_teacher", label_fp, "teacher", build.unlabeled_ids, scoring=True),
            build.select(select_fp, "label_teacher"),
            build.train("student1", s1_fp, kind=SUPERVISED, epochs=epochs, checkpoint_epochs=[epochs],
                        pseudo=lambda: [build.pseudo_labels("label_teacher", reliable())]),
            build.label("label_student1", l1_fp, "student1", unreliable, scoring=False),
            build.train("student2", s2_fp, kind=SUPERVISED, epochs=epochs, checkpoint_epochs=[epochs], pseudo=lambda: [
                build.pseudo_labels("label_teacher", reliable()),
                build.pseudo_labels("label_student1", unreliable()),
            ]),
        ]

    def final_stage(self, cfg) -> str:
        return "student2"


SUPONLY = SupOnly("supervised", "SupOnly (teacher)", uses_unlabeled=False)
ST = SelfTraining("st", "ST")
STPP = SelfTrainingPlusPlus("stpp", "ST++", selects_reliable=True)
