"""Typed run configuration: pydantic models, YAML loading and dotted overrides.

Every field carries a description; the README's configuration reference is generated
from them (``stpp_ray.config.reference_markdown``) and a test keeps the two in sync.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .methods import get_method, names as method_names

TTA_SCALES = (0.5, 0.75, 1.0, 1.5, 2.0)  # ST++'s test-time scales (LiheYoung/ST-PlusPlus model/semseg/base.py)


class ConfigError(ValueError):
    """A configuration problem; the message names the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    layout: Literal["voc", "cityscapes", "folder"] = Field(
        "voc", description="Dataset layout on disk: `voc`, `cityscapes` or `folder` (images/, masks/, split lists)."
    )
    root: str = Field(
        "data/demo",
        description="Dataset root directory, or an S3 URI (`s3://bucket/prefix`, README: Object storage). "
                    "Relative paths are relative to the current directory.",
    )
    num_classes: int = Field(21, ge=2, le=255, description="Number of classes, background included (255 is the ignore label).")
    labeled_split: str = Field(
        "ImageSets/Segmentation/1_16/labeled.txt",
        description="Split list of labeled training images (one id per line), relative to `data.root` unless absolute; "
        "`builtin:NAME` is a standard split shipped with stpp_ray (`stpp-ray splits` lists them).",
    )
    unlabeled_split: str = Field(
        "ImageSets/Segmentation/1_16/unlabeled.txt",
        description="Split list of unlabeled training images; their masks, if any, are never read.",
    )
    val_split: str = Field("ImageSets/Segmentation/val.txt", description="Split list of validation images (with masks).")
    crop_size: int = Field(321, ge=8, description="Square training crop after random scaling (321 for VOC, 721 for Cityscapes in the paper).")
    base_size: int | None = Field(
        None, ge=0,
        description="Random scaling draws the long side in [0.5, 2.0] x this many pixels, the short side following "
        "(as ST++); 0 = the image's own long side (as UniMatch's code); unset = per layout: 400 for `voc`, 2048 for "
        "`cityscapes` (ST++'s), 0 for `folder` and for the generated demo data (`data.demo`).",
    )
    max_images: int = Field(
        0, ge=0,
        description="Use only the first N ids of each split list (labeled, unlabeled, val), for a quick trial of a "
        "real config; only their files need to exist. 0 = all.",
    )
    demo: bool = Field(
        False,
        description="Generate the embedded demo dataset at `data.root` if it is missing (see `stpp-ray demo-data`).",
    )
    demo_seed: int = Field(0, description="Seed of the generated demo dataset (only with `data.demo`).")
    demo_num_train: int = Field(512, ge=16, description="Training-pool size of the generated demo dataset.")
    demo_num_val: int = Field(128, ge=1, description="Validation-set size of the generated demo dataset.")
    demo_image_size: int = Field(64, ge=16, description="Side length of the generated demo images.")
    check_images: bool | Literal["sample"] = Field(
        True,
        description="Read and validate every image and mask before training starts (stops on the first bad file set); "
        "`sample`: every labeled and validation file, and `data.check_sample_size` unlabeled images drawn with `run.seed` "
        "(for pools too large to read twice).",
    )
    check_sample_size: int = Field(1000, ge=1, description="Unlabeled images read by `data.check_images: sample`.")
    check_on_cluster_from: int = Field(
        20_000, ge=0,
        description="Unlabeled images to check from which the check is a Ray Data pass across the cluster (tasks of "
        "one CPU, about four per CPU, of 256 to 8192 images); fewer are read in the driver, where a pass's start-up would "
        "cost more than the reads. 0: always on the cluster.",
    )

    def scale_base_size(self) -> int:
        """`base_size`, or when unset the layout's default (LiheYoung/ST-PlusPlus dataset/semi.py: 400 for
        Pascal, 2048 for Cityscapes); 0 for the demo data, whose small images are no Pascal photos."""
        if self.base_size is not None:
            return self.base_size
        if self.demo:
            return 0
        return {"voc": 400, "cityscapes": 2048}.get(self.layout, 0)


class ModelConfig(_Section):
    name: Literal["deeplabv3plus"] = Field("deeplabv3plus", description="Segmentation architecture.")
    backbone: Literal["resnet18", "resnet50", "resnet101", "mobilenet_v3_large", "tiny"] = Field(
        "resnet50", description="Backbone network (torchvision; `tiny` is a small residual trunk for CPU demos)."
    )
    output_stride: Literal[8, 16] = Field(
        16, description="Backbone output stride (8 or 16), via dilated convolutions; the ASPP rates follow it: "
        "(12, 24, 36) at 8 as ST++'s code, (6, 12, 18) at 16 as UniMatch's configs.",
    )
    pretrained: str = Field(
        "none",
        description="Backbone weights: `none`, `imagenet` (torchvision download, needs internet), or a local state-dict path.",
    )
    aspp_channels: int = Field(256, ge=8, description="Width of the ASPP and decoder (256 in the paper).")
    head: Literal["auto", "stpp", "unimatch"] = Field(
        "auto", description="DeepLabv3+ head as a reference builds it: `stpp` (ST++: Dropout2d(0.5) after the ASPP "
        "projection, Dropout(0.1) after the decoder), `unimatch` (UniMatch: no dropout); both have BatchNorm in the "
        "ASPP pooling branch. `auto`: `unimatch` for method unimatch, else `stpp`.",
    )
    # The run's method, set by Config validation: `auto` resolves against it.
    _method: str = PrivateAttr("stpp")

    def resolved_head(self) -> str:
        """The head to build: `head`, with `auto` resolved from the run's method."""
        if self.head != "auto":
            return self.head
        return get_method(self._method).head


class TrainConfig(_Section):
    epochs: int = Field(80, ge=1, description="Epochs of the teacher (and of the students unless `train.student_epochs` is set).")
    student_epochs: int = Field(
        0, ge=0, description="Epochs of each student stage; 0 = `train.epochs`, as in the paper. Students see |L|+|U| images per epoch."
    )
    batch_size: int = Field(
        16, ge=1, description="Global batch size, whatever the worker count; each worker gets its share, batch_size / ray.num_workers rounded down or up."
    )
    lr: float = Field(0.001, gt=0, description="Backbone learning rate (the paper: 0.001 x batch/16 for VOC, 0.004 for Cityscapes).")
    head_lr_multiplier: float = Field(10.0, gt=0, description="Learning-rate multiplier of the non-backbone (head) parameters.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(1e-4, ge=0, description="SGD weight decay.")
    poly_power: float = Field(0.9, ge=0, description="Power of the poly learning-rate decay over all iterations.")
    eval_interval: int = Field(
        1, ge=0, description="Validate every N epochs (the last epoch is always validated); 0 validates only the last."
    )
    eval_batch_size: int = Field(
        1, ge=1, description="Validation images per loader batch per worker; a batch of mixed image sizes runs one "
        "forward pass per size, so any value gives the same mIoU."
    )
    sync_batchnorm: bool = Field(
        True, description="Synchronise BatchNorm statistics across workers (batch-size invariance); off = per-worker BN."
    )
    loader_workers: int = Field(0, ge=0, description="DataLoader worker processes per training worker (0 = in-process).")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Training device: `auto` follows `ray.use_gpu`."
    )
    amp: bool = Field(False, description="Mixed precision (bfloat16 autocast) on CUDA; ignored on CPU.")
    checkpoint_interval: int = Field(
        1, ge=1, description="Report a resumable checkpoint to Ray Train every N epochs (and at the last epoch)."
    )
    max_failures: int = Field(
        2, ge=0, description="Restarts of a stage's worker group after a lost worker, each from the last epoch checkpoint: "
        "Ray Train's own, and the pipeline's where Ray Train will not retry (a worker lost while the group starts)."
    )


class SelectionConfig(_Section):
    reliable_fraction: float = Field(0.5, gt=0, le=1, description="R: fraction of unlabeled images kept as reliable (top by stability).")
    num_checkpoints: int = Field(3, ge=1, description="K: teacher checkpoints at epochs floor(i*E/K), i=1..K, for stability scoring.")
    extra_checkpoint_counts: list[int] = Field(
        [],
        description="More K values whose checkpoints the teacher also saves and the labeling also scores, so one teacher serves them all (`stpp-ray sweep` sets it).",
    )


class LabelConfig(_Section):
    teacher: Literal["final", "best"] = Field(
        "final",
        description="Checkpoint that pseudo-labels: `final` (default) or `best` on validation (leaks validation labels, as the reference code).",
    )
    tta: bool = Field(False, description="Test-time augmentation for pseudo-labels: scales x {identity, hflip}, softmax summed.")
    tta_scales: list[float] = Field(
        list(TTA_SCALES), description="Scales of the test-time augmentation."
    )
    batch_size: int = Field(16, ge=1, description="Images per Ray Data batch in the labeling pass.")
    min_actors: int = Field(
        1, ge=1, description="Minimum size of the labeling actor pool (it starts with as many actors as fit in the free resources)."
    )
    max_actors: int = Field(0, ge=0, description="Maximum size of the labeling actor pool (0 = as many as the cluster's CPUs/GPUs allow).")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs per labeling actor (its torch threads) on CPU clusters.")
    gpus_per_actor: float = Field(1.0, ge=0, description="GPUs per labeling actor when `ray.use_gpu`.")
    rows_per_file: int = Field(256, ge=1, description="Target rows per Parquet shard (also the most rows of a labeling input block).")


class EvalConfig(_Section):
    """How validation predicts full images for the reported mIoU (pseudo-labeling always forwards whole images, as ST++)."""

    mode: Literal["whole", "sliding", "center_crop"] = Field(
        "whole",
        description="`whole`: one forward pass over each full image (ST++'s evaluation); `sliding`: softmax averaged over "
        "`eval.window`-pixel square windows at stride 2/3 window covering the full image (UniMatch's Cityscapes "
        "protocol); `center_crop`: only the central `eval.window` square is predicted and scored.",
    )
    window: int = Field(0, ge=0, description="Side of the sliding window or centre crop in pixels; 0 = `data.crop_size`.")

    def options(self, crop_size: int) -> dict:
        """`mode` and the effective `window`: the keyword arguments of `evaluation.evaluate`."""
        return {"mode": self.mode, "window": 0 if self.mode == "whole" else self.window or crop_size}


class SemiConfig(_Section):
    """Knobs of the methods other than ST/ST++ (see the README's "Other methods")."""

    epochs: int = Field(
        0, ge=0, description="Online methods (mean_teacher, u2pl, unimatch): epochs, each one pass over the unlabeled set "
        "(the labeled set cycles alongside); 0 = `train.student_epochs`, or `train.epochs` when that is 0.",
    )
    mean_teacher_epochs: int = Field(
        0, ge=0, description="Mean Teacher: its own `semi.epochs` (0 = `semi.epochs`), for a budget that should not move "
        "U2PL's and UniMatch's.",
    )
    unlabeled_batch_size: int = Field(
        0, ge=0, description="Online methods: global unlabeled batch per step (0 = `train.batch_size`, as UniMatch's equal batches).",
    )
    ema_decay: float = Field(
        0.99, ge=0, le=1, description="U2PL: EMA decay of the teacher, reached after a min(1 - 1/(k+1)) warm-up from "
        "the first semi-supervised step (U2PL's net.ema_decay: 0.99).")
    mean_teacher_ema_decay: float = Field(
        0.999, ge=0, le=1, description="Mean Teacher: EMA decay of the teacher, min(1 - 1/(k+1), decay) at its k-th "
        "update from k = 1, so 0.5 first (CuriousAI/mean-teacher pytorch/main.py, --ema-decay 0.999).")
    consistency_weight: float = Field(1.0, ge=0, description="Mean Teacher: weight of the softmax squared-error consistency loss.")
    rampup_fraction: float = Field(
        0.3, ge=0, le=1, description="Mean Teacher: sigmoid ramp-up exp(-5(1-t)^2) of the consistency weight over this fraction of all steps."
    )
    unsup_weight: float = Field(1.0, ge=0, description="U2PL: weight of the unsupervised cross entropy.")
    u2pl_alpha0: float = Field(
        20.0, ge=0, le=100, description="U2PL: percent of highest-entropy pixels left out at the start, alpha_t = alpha_0 (1 - t/T)."
    )
    u2pl_warmup_epochs: int = Field(1, ge=0, description="U2PL: supervised-only epochs at the start (U2PL's sup_only_epoch); the teacher copies the student.")
    # U2PL's contrastive term: Haochen-Wang409/U2PL experiments/pascal/1464/ours/config.yaml
    # (trainer.contrastive) and train_semi.py (the queue sizes).
    u2pl_contrastive: bool = Field(
        True, description="U2PL: the pixel-level contrastive term with unreliable pixels as negatives (a projection head "
        "and per-class memory banks); false = its ablation, the pseudo-label loss alone.")
    u2pl_contrastive_weight: float = Field(
        0.25, ge=0, description="U2PL: lambda_c, the contrastive term's weight: U2PL's loss_weight 1 divided by the GPU "
        "count, which its train_semi.py applies to the gradient (0.25 = its 4 VOC GPUs, 0.125 = its 8 Cityscapes GPUs).")
    u2pl_temperature: float = Field(0.5, gt=0, description="U2PL: InfoNCE temperature (0.5).")
    u2pl_num_queries: int = Field(256, ge=1, description="U2PL: anchor pixels drawn per class and step (256).")
    u2pl_num_negatives: int = Field(50, ge=1, description="U2PL: negatives drawn from the class's memory bank per anchor (50).")
    u2pl_low_rank: int = Field(
        3, ge=1, description="U2PL: r_l; a labeled pixel is a negative of class c when c is among its top r_l predictions "
        "(and not its label), an unreliable unlabeled pixel when c ranks in [r_l, r_h) (3).")
    u2pl_high_rank: int = Field(20, ge=2, description="U2PL: r_h, clipped to the number of classes (20).")
    u2pl_positive_threshold: float = Field(0.3, ge=0, le=1, description="U2PL: delta_p, the teacher probability of its class an anchor needs (0.3).")
    u2pl_negative_threshold: float = Field(1.0, ge=0, le=1, description="U2PL: delta_n, the teacher probability of the class a negative must stay under (1).")
    u2pl_entropy_percent: float = Field(
        20.0, ge=0, le=100, description="U2PL: alpha_0 of the anchors and negatives: the alpha_t % lowest-entropy unlabeled "
        "pixels may be anchors, the alpha_t % highest negatives; alpha_t = alpha_0 (1 - t/T) (low_entropy_threshold: 20).")
    u2pl_queue_size: int = Field(30000, ge=1, description="U2PL: memory-bank size of each class but the first, in feature vectors (30000).")
    u2pl_first_queue_size: int = Field(50000, ge=1, description="U2PL: memory-bank size of class 0, the background in VOC (50000).")
    confidence_threshold: float = Field(0.95, ge=0, le=1, description="UniMatch: pseudo-label confidence threshold.")
    feature_dropout: float = Field(0.5, ge=0, lt=1, description="UniMatch: channel dropout on the encoder features (feature perturbation).")
    cutmix_prob: float = Field(0.5, ge=0, le=1, description="UniMatch and U2PL: probability of a CutMix box per strong view.")
    dmt_ratios: list[float] = Field(
        [0.2, 0.4, 0.6, 0.8, 1.0], min_length=1,
        description="DMT: per phase, the fraction of most confident pixels of each class kept as pseudo-labels (curriculum).",
    )
    dmt_gamma1: float = Field(5.0, ge=0, description="DMT: weight p^gamma1 where model and pseudo-label agree (VOC scripts: 5).")
    dmt_gamma2: float = Field(5.0, ge=0, description="DMT: weight p^gamma2 where they disagree and the pseudo-label is more confident.")
    # DMT's phase recipe, voldemortX/DST-CBC segmentation/dmt-voc-20-1.sh and dmt-voc-106-1lr.sh
    # (ep=4, lr=0.001; dmt-city-8-1.sh: ep=10, lr=0.004, gammas 3) and segmentation/main.py
    # (SGD momentum 0.9, --weight-decay default 0.0005, one lr for backbone and classifier).
    dmt_phase_epochs: int = Field(
        4, ge=0, description="DMT: fine-tuning epochs per model per phase (DMT's VOC scripts: 4, Cityscapes: 10; "
        "0 = `train.student_epochs`, or `train.epochs`).",
    )
    dmt_lr: float = Field(0.001, gt=0, description="DMT: learning rate of the phases' fine-tuning (DMT's VOC scripts: 0.001, Cityscapes: 0.004).")
    dmt_head_lr_multiplier: float = Field(
        1.0, gt=0, description="DMT: head learning-rate multiplier in the phases (DMT: 1, one rate for all parameters)."
    )
    dmt_weight_decay: float = Field(5e-4, ge=0, description="DMT: SGD weight decay in the phases (DMT: 5e-4).")
    dmt_seed_offset: int = Field(1, ge=1, description="DMT: the second model is trained with seed `run.seed` + this (other initialisation and data order).")

    @model_validator(mode="after")
    def _ratios_in_range(self) -> "SemiConfig":
        if any(not 0 < r <= 1 for r in self.dmt_ratios):
            raise ValueError(f"dmt_ratios must lie in (0, 1], got {self.dmt_ratios}")
        return self


class RayConfig(_Section):
    num_workers: int | tuple[int, int] = Field(
        1, description="Ray Train workers (DDP ranks) per training stage, or a range `[min, max]`: elastic training, "
        "which starts with at least `min` and grows and shrinks with the cluster (the result does not depend on the count).")
    use_gpu: bool = Field(False, description="One GPU per Train worker (NCCL backend) and GPUs for labeling actors.")
    address: str = Field("", description="Ray cluster address; empty starts or joins a local instance (RAY_ADDRESS is honoured).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per Train worker; its torch threads follow it.")
    local_num_cpus: int = Field(0, ge=0, description="Logical CPUs of a locally started Ray (0 = this machine's cores).")

    @model_validator(mode="after")
    def _worker_range(self) -> "RayConfig":
        low, high = self.worker_range()
        if not 1 <= low <= high:
            raise ValueError(f"ray.num_workers must be at least 1, or a range [min, max] with 1 <= min <= max, got {self.num_workers}")
        return self

    def worker_range(self) -> tuple[int, int]:
        """(min, max) Train workers; equal unless elastic."""
        return tuple(self.num_workers) if isinstance(self.num_workers, tuple) else (self.num_workers, self.num_workers)

    @property
    def max_workers(self) -> int:
        return self.worker_range()[1]


class RunSection(_Section):
    output_dir: str = Field("runs/demo", description="Run directory: report, checkpoints, pseudo-labels, manifest. "
                                                     "May be an S3 URI (`s3://bucket/prefix`) for `stpp-ray run`.")
    seed: int = Field(0, description="Seed of initialisation, data order and augmentation.")


class SweepConfig(_Section):
    params: dict[str, Any] = Field(
        {"selection.reliable_fraction": [0.3, 0.5, 0.7], "selection.num_checkpoints": [2, 3, 4]},
        description="Search space of `stpp-ray sweep`: dotted key -> list of values (grid, or a choice in random and "
        "optuna search), or in those `{uniform: [lo, hi]}`, `{loguniform: [lo, hi]}`, `{randint: [lo, hi]}` (hi exclusive).",
    )
    search: Literal["grid", "random", "optuna"] = Field(
        "grid", description="`grid`: every combination; `random`: `sweep.num_samples` draws; `optuna`: `sweep.num_samples` "
        "trials chosen by Optuna's TPE from the finished trials' `sweep.metric` (`pip install 'stpp_ray[tune]'`)."
    )
    num_samples: int = Field(1, ge=1, description="Grid: repeats of the whole grid; random and optuna: number of trials.")
    metric: Literal["final_miou", "best_miou"] = Field(
        "final_miou", description="What ranks trials: the last student's val mIoU at its last epoch, or its best val mIoU."
    )
    mode: Literal["max", "min"] = Field("max", description="Whether the metric is maximised or minimised.")
    max_concurrent_trials: int = Field(1, ge=1, description="Trials running at once (each needs its Train workers' resources).")
    trial_cpus: float = Field(
        1.0, ge=0, description="Logical CPUs each trial's driver holds besides its Train workers and labeling actors. "
        "0 suits a cluster whose CPUs are all the workers': the drivers mostly wait (a local instance adds "
        "max_concurrent_trials x this many logical CPUs for them). With 0, set `sweep.trial_memory_mib`."
    )
    trial_memory_mib: int = Field(
        0, ge=0, description="Ray `memory` each trial's driver reserves, MiB (it holds the pool's ids and the selection). "
        "Ray Tune needs a trial to reserve something: CPUs or this."
    )
    scheduler: Literal["none", "asha"] = Field(
        "none", description="`asha` stops trials whose students' val mIoU lags at the same point of training."
    )
    asha_grace_period: int = Field(1, ge=1, description="ASHA: student reports a trial makes before it can be stopped.")
    asha_reduction_factor: float = Field(2.0, gt=1, description="ASHA: fraction 1/x of trials kept at each rung.")
    trial_max_failures: int = Field(0, ge=0, description="Retries of a failed trial (it resumes from its finished stages).")

    @model_validator(mode="after")
    def _trial_reserves_something(self) -> "SweepConfig":
        if not self.trial_cpus and not self.trial_memory_mib:
            raise ValueError("sweep.trial_cpus = 0 needs sweep.trial_memory_mib > 0: Ray Tune refuses a trial that reserves nothing")
        return self


class TrackingConfig(_Section):
    mlflow_uri: str = Field(
        "", description="MLflow tracking URI (`file:///abs/mlruns`, `http://host:5000`, ...); empty turns tracking off. "
        "Needs `pip install 'stpp_ray[tracking]'`."
    )
    experiment: str = Field("stpp_ray", description="MLflow experiment the runs go to (created if missing).")
    run_name: str = Field("", description="Name of the parent MLflow run; empty: the run directory's name.")


class Config(_Section):
    method: str = Field(
        "stpp", description="Pipeline: " + ", ".join(f"`{name}`" for name in method_names())
        + " (`supervised` is SupOnly; see the README's \"Other methods\").",
    )
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    label: LabelConfig = Field(default_factory=LabelConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    run: RunSection = Field(default_factory=RunSection)
    semi: SemiConfig = Field(default_factory=SemiConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in method_names():
            raise ValueError(f"unknown method {value!r}; expected one of {', '.join(method_names())}")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        if self.selection.num_checkpoints > self.train.epochs:
            raise ValueError(
                f"selection.num_checkpoints (K={self.selection.num_checkpoints}) must not exceed "
                f"train.epochs ({self.train.epochs}): checkpoints are saved at distinct epochs"
            )
        for k in self.selection.extra_checkpoint_counts:
            if not 1 <= k <= self.train.epochs:
                raise ValueError(f"selection.extra_checkpoint_counts: K={k} must lie in [1, train.epochs={self.train.epochs}]")
        workers = self.ray.max_workers
        if self.train.batch_size < workers:
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) is smaller than ray.num_workers ({workers}): "
                "the global batch is shared out, at least one image per worker"
            )
        if self.unlabeled_batch_size() < workers:
            raise ValueError(
                f"semi.unlabeled_batch_size ({self.unlabeled_batch_size()}) is smaller than ray.num_workers ({workers})"
            )
        if self.train.device == "cuda" and not self.ray.use_gpu:
            raise ValueError("train.device=cuda needs ray.use_gpu=true (Ray must assign GPUs to the workers)")
        self.model._method = self.method  # model.head=auto follows the method
        # The heads' ASPP pooling branch has BatchNorm on a 1x1 map: a training forward of the
        # labeled batch alone (the online methods add unlabeled images to it) needs 2+ images
        # per BatchNorm.
        labeled_alone = get_method(self.method).trains_labeled_batch_alone(self)
        synced = self.ray.max_workers == 1 or self.train.sync_batchnorm
        per_bn = self.train.batch_size if synced else self.train.batch_size // self.ray.max_workers
        if labeled_alone and per_bn < 2:
            where = "train.batch_size" if synced else "train.batch_size / ray.num_workers (train.sync_batchnorm=false), the smallest share,"
            raise ValueError(
                f"{where} is {per_bn}: BatchNorm in the ASPP pooling branch needs at least 2 images per "
                "BatchNorm in training; raise train.batch_size (or turn train.sync_batchnorm on)"
            )
        return self

    def unlabeled_batch_size(self) -> int:
        """Global unlabeled batch of the online methods."""
        return self.semi.unlabeled_batch_size or self.train.batch_size

    def checkpoint_epochs(self) -> list[int]:
        """The K ST++ checkpoint epochs (1-based): floor(i * E / K) for i = 1..K."""
        return checkpoint_epochs(self.train.epochs, self.selection.num_checkpoints)

    def scoring_checkpoint_epochs(self) -> list[int]:
        """Epochs the teacher saves and the labeling scores: the union over K and the extra K values."""
        counts = [self.selection.num_checkpoints, *self.selection.extra_checkpoint_counts]
        return sorted({e for k in counts for e in checkpoint_epochs(self.train.epochs, k)})

    def fingerprint(self, *sections: str) -> str:
        """Stable hash of the given top-level sections (or dotted keys) of this config."""
        dumped = self.model_dump()
        picked = {name: _get_dotted(dumped, name) for name in sections}
        blob = json.dumps(picked, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def checkpoint_epochs(epochs: int, k: int) -> list[int]:
    """Evenly spaced checkpoint epochs floor(i*E/K), i=1..K; the last is E."""
    return [(i * epochs) // k for i in range(1, k + 1)]


def _get_dotted(d: dict, key: str) -> Any:
    for part in key.split("."):
        d = d[part]
    return d


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``a.b=value``; the value is parsed as YAML (numbers, booleans, lists)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.epochs=10)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(raw: dict, key: str, value: Any) -> dict:
    """Set a dotted key (``a.b.c``) in a nested dict, creating sections as needed."""
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"key {key!r}: {part!r} is a value, not a section")
    node[parts[-1]] = value
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set dotted keys in a nested dict; unknown keys are caught later by validation."""
    for item in overrides:
        set_dotted(raw, *parse_override(item))
    return raw


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        lines.append(f"  {key}: {msg}" + (f" (got {e['input']!r})" if e["type"] != "extra_forbidden" and not isinstance(e.get("input"), dict) else ""))
    return "\n".join(lines)


def config_from_dict(raw: dict, source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config and apply dotted ``key=value`` overrides; errors name the file and key."""
    raw, source = load_raw(path, overrides)
    return config_from_dict(raw, source)


def load_raw(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> tuple[dict, str]:
    """The YAML mapping with overrides applied, not yet validated, and a description of its source."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    overrides = list(overrides)
    raw = apply_overrides(raw, overrides)
    if overrides:
        source += " with overrides " + " ".join(overrides)
    return raw, source


def reference_markdown() -> str:
    """The configuration reference (README) generated from the field descriptions."""
    lines = ["| key | default | description |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            default = field.get_default(call_default_factory=True)
            lines.append(f"| `{prefix}{name}` | `{json.dumps(default)}` | {field.description} |")

    walk(Config, "")
    return "\n".join(lines)
