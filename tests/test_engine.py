"""Engine: global-batch sharding and exact 1-worker == 2-worker training steps."""

import numpy as np
import pytest
import torch

from stpp_ray.training import GlobalBatchSampler, build_optimizer, poly_scheduler, rank_share, sample_seed, train_one_epoch
from stpp_ray.models import build_model, convert_batchnorm_for_distributed, split_parameters
from tests.helpers import assert_states_close, run_on_gloo_workers


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
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


def test_a_world_that_does_not_divide_the_batch_gets_shares_differing_by_one():
    """An elastic group may shrink to any size: 8 images over 3 workers are 2, 3 and 3."""
    assert [rank_share(8, r, 3) for r in range(3)] == [(0, 2), (2, 5), (5, 8)]
    assert [len(next(iter(GlobalBatchSampler(37, 8, r, 3, seed=3)))) for r in range(3)] == [2, 3, 3]


def test_sampler_refuses_impossible_shapes():
    with pytest.raises(ValueError, match="leaves some of 4 workers without an image"):
        GlobalBatchSampler(32, 3, 0, 4, 0)
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
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = 0.0
    backbone, head = split_parameters(model)
    if world > 1:
        model = convert_batchnorm_for_distributed(model, "cpu")
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = build_optimizer(backbone, head, lr=0.05, head_lr_multiplier=10, momentum=0.9, weight_decay=1e-4)
    sched = poly_scheduler(opt, 10, 0.9)
    x, y = _data()
    lo, hi = rank_share(len(x), rank, world)
    batch = [(x[lo:hi], y[lo:hi])]
    stats = train_one_epoch(model, batch * 2, opt, sched, torch.device("cpu"))
    state = {k: v.clone() for k, v in getattr(model, "module", model).state_dict().items()}
    return {"state": state, "loss": stats["loss"]}


@pytest.mark.multiprocess
@pytest.mark.parametrize("world", [2, 3])
def test_two_or_three_workers_take_the_same_steps_as_one(tmp_path, world):
    """Synchronised BN + global pixel normalisation: 2 workers x 4 images, or 3 workers with
    2, 3 and 3 (an elastic group's uneven shares), == 1 worker x 8."""
    single = _one_step(1, 0)
    many = run_on_gloo_workers(_one_step, world, tmp_path / "many.pt")
    assert many["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert_states_close(many["state"], single["state"])


def test_augmentation_depends_only_on_seed_epoch_and_index(tmp_path):
    from stpp_ray.datasets import build_samples
    from stpp_ray.demo_data import generate_demo_dataset
    from stpp_ray.training import TrainItem, TrainSet

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


def test_train_items_double_a_small_labeled_set_for_the_teacher_only(tmp_path):
    """LiheYoung/ST-PlusPlus main.py: the SupOnly teacher trains on L twice when |L| < 200;
    dataset/semi.py: a student on L x ceil(|U'| / |L|) + U' (U' its pseudo-labeled images)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stpp_ray.datasets import encode_mask_png
    from stpp_ray.pseudo_labels import SCHEMA, write_selection
    from stpp_ray.methods.base import SUPERVISED, PseudoLabels
    from stpp_ray.stage_setup import StageSpec, build_train_items

    def spec(n, **kw):
        rows = [[f"l{i}", f"l{i}.jpg", f"l{i}.png"] for i in range(n)]
        return StageSpec("teacher", str(tmp_path), "fp", labeled=rows, val=[], method="stpp", kind=SUPERVISED,
                         epochs=1, **kw)

    assert [it.image_id for it in build_train_items(spec(3))] == ["l0", "l1", "l2"] * 2
    assert len(build_train_items(spec(92))) == 184 and len(build_train_items(spec(199))) == 398
    assert len(build_train_items(spec(200))) == 200 and len(build_train_items(spec(1464))) == 1464
    # The online methods' labeled stream cycles alongside the unlabeled one: not doubled.
    assert len(build_train_items(spec(92, unlabeled="unlabeled.arrow"))) == 92

    ids = [f"u{i}" for i in range(10)]
    mask = encode_mask_png(np.zeros((4, 4), np.uint8))
    pq.write_table(pa.Table.from_pylist([{"image_id": i, "mask_png": mask} for i in ids], schema=SCHEMA),
                   tmp_path / "part-0.parquet")
    source = PseudoLabels(str(tmp_path), write_selection(tmp_path / "selections", "label_teacher", tmp_path, ids), len(ids))
    student = build_train_items(spec(3, pseudo=[source]))
    assert [it.image_id for it in student[:12]] == ["l0", "l1", "l2"] * 4  # ceil(10 / 3), not doubled first
    assert [it.image_id for it in student[12:]] == ids and all(it.strong for it in student[12:])
    assert len(student) == 22 and student[-1].image_id == "u9" and student[13].image_id == "u1"


def test_sampler_can_pass_the_epoch_with_each_index(tmp_path):
    """`with_epoch`: the same batches as (epoch, index) pairs; TrainSet reads such a key at its epoch."""
    from stpp_ray.datasets import encode_mask_png
    from stpp_ray.training import TrainItem, TrainSet
    from tests.helpers import write_random_images

    plain, tagged = GlobalBatchSampler(12, 4, 1, 2, seed=3), GlobalBatchSampler(12, 4, 1, 2, seed=3, with_epoch=True)
    for s in (plain, tagged):
        s.set_epoch(5)
    assert [[(5, i) for i in batch] for batch in plain] == list(tagged)
    it = iter(tagged)
    tagged.set_epoch(6)  # an iteration already begun keeps its epoch
    assert next(it)[0][0] == 5

    (_, path), = write_random_images(tmp_path, ["a.png"], (20, 20), seed=0)
    mask = encode_mask_png(np.zeros((20, 20), np.uint8))
    items = [TrainItem("a", path, mask_png=mask, strong=True)]
    copy, main = TrainSet(items, "voc", 16, seed=1), TrainSet(items, "voc", 16, seed=1)
    main.set_epoch(3)
    assert all(torch.equal(a, b) for a, b in zip(copy[(3, 0)], main[0]))
    assert not torch.equal(copy[(4, 0)][0], copy[(3, 0)][0])
