"""DataLoader worker processes (`train.loader_workers`) change neither the augmentations nor the
trained weights: each sample's augmentation is seeded by (seed, epoch, index) also inside the
loader processes, whose dataset copies never see the main process's `set_epoch`."""

from __future__ import annotations

import pytest
import torch

from stpp_ray.config import load_config
from stpp_ray.datasets import build_samples, encode_mask_png, read_mask
from stpp_ray.demo_data import DEMO_NUM_CLASSES, generate_demo_dataset
from stpp_ray.training import TrainItem, sample_seed, train_one_epoch
from stpp_ray.methods.online import cycle, train_online_epoch
from stpp_ray.methods import get_method
from stpp_ray.stage_setup import setup_rank

EPOCHS = 2


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """32 generated 32 x 32 images: 8 labeled, 8 pseudo-labeled (strong), all 32 as unlabeled."""
    root = generate_demo_dataset(tmp_path_factory.mktemp("loader_workers"), num_train=32, num_val=2, image_size=32)
    samples = build_samples("voc", root, "ImageSets/Segmentation/train.txt", with_masks=True)
    labeled = [TrainItem(s.image_id, str(s.image_path), str(s.mask_path)) for s in samples[:8]]
    pseudo = [TrainItem(s.image_id, str(s.image_path), mask_png=encode_mask_png(read_mask(s.mask_path, "voc")),
                        strong=True) for s in samples[8:16]]
    return labeled + pseudo, [str(s.image_path) for s in samples]


def _config(workers: int, *overrides: str):
    return load_config(None, ["model.backbone=tiny", "model.aspp_channels=8", f"data.num_classes={DEMO_NUM_CLASSES}",
                              "data.crop_size=24", "data.base_size=40", "train.batch_size=4", "train.lr=0.01",
                              f"train.loader_workers={workers}", "run.seed=5", *overrides])


def _train(cfg, items, unlabeled=()) -> dict:
    """Two epochs as `cluster.train.StageWorker` runs them (one process, no Ray)."""
    online = bool(unlabeled)
    method = get_method(cfg.method) if online else None
    setup = setup_rank(cfg, items, [], EPOCHS, online=method, unlabeled_paths=unlabeled)
    device = torch.device("cpu")
    steps = setup.steps_per_epoch()
    for epoch in range(1, EPOCHS + 1):
        setup.sampler.set_epoch(epoch)
        setup.train_set.set_epoch(epoch)
        torch.manual_seed(sample_seed(cfg.run.seed, epoch, 1_000_000_000))
        if online:
            setup.unlabeled_sampler.set_epoch(epoch)
            setup.unlabeled_set.set_epoch(epoch)
            train_online_epoch(method, setup.model, setup.ema, cycle(setup.loader, setup.sampler, setup.train_set, epoch),
                               setup.unlabeled_loader, setup.optimizer, setup.scheduler, device, cfg.semi,
                               epoch=epoch, epochs=EPOCHS, steps_done=(epoch - 1) * steps, total_steps=EPOCHS * steps,
                               warmup_steps=0)
        else:
            train_one_epoch(setup.model, setup.loader, setup.optimizer, setup.scheduler, device)
    kept = setup.ema if setup.ema is not None else setup.model
    return {k: v.clone() for k, v in kept.state_dict().items()}


def _assert_equal_states(a: dict, b: dict, what: str) -> None:
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def test_offline_stage_weights_do_not_depend_on_loader_workers(demo):
    """Labeled (weak) and pseudo-labeled (weak + strong, Cutout) items, 2 epochs."""
    items, _ = demo
    in_process = _train(_config(0), items)
    for workers in (1, 2):
        _assert_equal_states(_train(_config(workers), items), in_process, f"loader_workers={workers}")


def test_online_stage_weights_do_not_depend_on_loader_workers(demo):
    """UniMatch: unlabeled views, CutMix boxes and partners, and the labeled stream cycled
    twice per epoch (8 labeled, 16 unlabeled images at batch 4), each pass reshuffled."""
    items, unlabeled = demo
    cfg = ["method=unimatch", "semi.confidence_threshold=0.0"]
    in_process = _train(_config(0, *cfg), items[:8], unlabeled[:16])
    _assert_equal_states(_train(_config(2, *cfg), items[:8], unlabeled[:16]), in_process, "loader_workers=2")


def _images_by_index(setup, epoch: int) -> dict[int, torch.Tensor]:
    setup.sampler.set_epoch(epoch)
    setup.train_set.set_epoch(epoch)
    keys = [key for batch in setup.sampler for key in batch]
    images = torch.cat([image for image, _ in setup.loader])
    indices = [key[1] if isinstance(key, tuple) else key for key in keys]  # (epoch, index) or index
    return dict(zip(indices, images, strict=True))


def test_loader_processes_augment_each_epoch_anew(demo):
    items, _ = demo
    setup = setup_rank(_config(2), items, [], EPOCHS)
    first, second = _images_by_index(setup, 1), _images_by_index(setup, 2)
    assert first.keys() == second.keys()
    changed = sum(not torch.equal(first[i], second[i]) for i in first)
    assert changed >= len(first) - 1, f"only {changed} of {len(first)} images got a new augmentation in epoch 2"
    for i in list(second)[:4]:  # exactly the in-process augmentation of (epoch 2, index)
        assert torch.equal(second[i], setup.train_set[(2, i)][0])
