"""Engine: global-batch sharding and exact 1-worker == 2-worker training steps."""


import pytest
import torch

from stpp_ray.engine import GlobalBatchSampler, build_optimizer, poly_scheduler, sample_seed, train_one_epoch
from stpp_ray.models import build_model, convert_batchnorm_for_distributed, split_parameters
from tests.helpers import assert_states_close, run_on_gloo_workers


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_share_the_same_global_batches(world):
    single = list(GlobalBatchSampler(37, 8, 0, 1, seed=3))
    shards = [list(GlobalBatchSampler(37, 8, r, world, seed=3)) for r in range(world)]
    assert len(single) == 4  # 37 // 8, the incomplete batch dropped
    for step, batch in enumerate(single):
        assert sum((s[step] for s in shards), []) == batch


def test_epochs_reshuffle_and_seeds_are_worker_independent():
    s = GlobalBatchSampler(32, 8, 0, 1, seed=0)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first
    assert sample_seed(0, 1, 5) == sample_seed(0, 1, 5) != sample_seed(0, 2, 5)


def test_sampler_refuses_impossible_shapes():
    with pytest.raises(ValueError, match="divisible"):
        GlobalBatchSampler(32, 6, 0, 4, 0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(3, 8, 0, 1, 0)


def test_poly_schedule():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([p], [], lr=0.1, head_lr_multiplier=10, momentum=0.9, weight_decay=0)
    sched = poly_scheduler(opt, total_iters=10, power=0.9)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 0.9)


def _data(n=8, size=32, classes=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, classes, (n, size, size), generator=g)
    y[:, :4] = 255  # some ignored pixels, unevenly spread over the shards
    y[0] = 255
    return x, y


def _one_step(world: int, rank: int) -> dict:
    torch.manual_seed(0)
    model = build_model("deeplabv3plus", "tiny", 3, output_stride=8, aspp_channels=16)
    for m in model.modules():  # dropout masks are drawn per worker: equal in law, not bitwise
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    backbone, head = split_parameters(model)
    if world > 1:
        model = convert_batchnorm_for_distributed(model, "cpu")
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = build_optimizer(backbone, head, lr=0.05, head_lr_multiplier=10, momentum=0.9, weight_decay=1e-4)
    sched = poly_scheduler(opt, 10, 0.9)
    x, y = _data()
    per = len(x) // world
    batch = [(x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])]
    stats = train_one_epoch(model, batch * 2, opt, sched, torch.device("cpu"))
    state = {k: v.clone() for k, v in getattr(model, "module", model).state_dict().items()}
    return {"state": state, "loss": stats["loss"]}


def test_two_workers_take_the_same_steps_as_one(tmp_path):
    """Synchronised BN + global pixel normalisation: 2 workers x 4 images == 1 worker x 8."""
    single = _one_step(1, 0)
    two = run_on_gloo_workers(_one_step, 2, tmp_path / "two.pt")
    assert two["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert_states_close(two["state"], single["state"])


def test_augmentation_depends_only_on_seed_epoch_and_index(tmp_path):
    from stpp_ray.datasets import build_samples
    from stpp_ray.demo_data import generate_demo_dataset
    from stpp_ray.engine import TrainItem, TrainSet

    root = generate_demo_dataset(tmp_path / "d", num_train=32, num_val=2, image_size=32)
    samples = build_samples("voc", root, "ImageSets/Segmentation/1_8/labeled.txt", with_masks=True)
    items = [TrainItem(s.image_id, str(s.image_path), str(s.mask_path), strong=True) for s in samples]
    a, b = TrainSet(items, "voc", 24, seed=1), TrainSet(items, "voc", 24, seed=1)
    b[3]  # a different access history must not matter
    for i in range(len(items)):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    before = torch.get_rng_state()
    a.set_epoch(1)
    assert not torch.equal(a[0][0], b[0][0])
    assert torch.equal(torch.get_rng_state(), before), "loading a sample must leave the global RNG alone"
