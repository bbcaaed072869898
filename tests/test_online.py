"""The online methods (Mean Teacher, U2PL, UniMatch) and DMT's training pieces, without Ray."""

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stpp_ray.augment import cutmix_box
from stpp_ray.config import SemiConfig
from stpp_ray.datasets import encode_mask_png
from stpp_ray.methods import get_method
from stpp_ray.methods.dmt import PHASE, class_balanced_thresholds, dmt_loss_sum, phase_epochs, read_curriculum_items
from stpp_ray.training import NO_CONFIDENCE, TrainItem, TrainSet, item_data
from stpp_ray.models import build_model, convert_batchnorm_for_distributed
from stpp_ray.augment import half_box
from stpp_ray.losses import masked_ce
from stpp_ray.methods.online import LossTerm, StepContext, UnlabeledSet, combine, ema_decay, ema_update_
from stpp_ray.methods.u2pl import u2pl_drop_unreliable
from stpp_ray.methods.u2pl_contrastive import ClassQueues
from stpp_ray.pseudo_labels import SCHEMA, read_pseudo_items
from tests.helpers import assert_states_close, run_on_gloo_workers, write_random_images


def _images(directory, n: int, size: tuple[int, int]) -> list[str]:
    return [path for _, path in write_random_images(directory, [f"u{i}.png" for i in range(n)], size, seed=0)]


def test_unlabeled_views_per_method_are_seeded_and_mark_padding(tmp_path):
    paths = _images(tmp_path, 4, (12, 20))  # smaller than the crop: padding
    keys = {"mean_teacher": {"weak", "ignore", "strong1", "ignore1"},
            "u2pl": {"weak", "ignore", "box1", "mix_weak", "mix_ignore"},
            "unimatch": {"weak", "ignore", "strong1", "strong2", "box1", "box2", "mix_weak", "mix_ignore",
                         "mix_strong1", "mix_strong2"}}
    for method, expected in keys.items():
        a, b = UnlabeledSet(paths, method, 24, seed=3), UnlabeledSet(paths, method, 24, seed=3)
        b[2]  # another access history must not matter
        before = torch.get_rng_state()
        item = a[1]
        assert torch.equal(torch.get_rng_state(), before), "loading must leave the global RNG alone"
        assert set(item) == expected, method
        assert all(torch.equal(item[k], b[1][k]) for k in item), method
        assert item["weak"].shape == (3, 24, 24) and item["ignore"].shape == (24, 24)
        # At most 20 x 20 of the 24 x 24 crop is image (scale <= 2 of 12 x 20 then cropped).
        assert (item["ignore"] == 255).any() and set(item["ignore"].unique().tolist()) <= {0, 255}
        a.set_epoch(1)
        assert not torch.equal(a[1]["weak"], item["weak"]), method
    mt = UnlabeledSet(paths, "mean_teacher", 24, seed=3)[0]
    assert not torch.equal(mt["strong1"], mt["weak"])
    assert ((mt["ignore"] == 255) <= (mt["ignore1"] == 255)).all(), "the strong view keeps the padding ignored"


@pytest.mark.parametrize("method", ["mean_teacher", "u2pl", "unimatch"])
def test_unlabeled_keys_carry_their_epoch(tmp_path, method):
    """An (epoch, index) key gives the views a plain index gives after set_epoch(epoch), so a
    DataLoader process's copy (which never sees set_epoch) augments each epoch anew."""
    paths = _images(tmp_path, 4, (20, 20))
    copy, main = UnlabeledSet(paths, method, 16, seed=3), UnlabeledSet(paths, method, 16, seed=3)
    main.set_epoch(7)
    tagged, plain = copy[(7, 2)], main[2]
    assert all(torch.equal(tagged[k], plain[k]) for k in plain), method
    assert not torch.equal(copy[(8, 2)]["weak"], tagged["weak"]), method


def test_cutmix_boxes():
    torch.manual_seed(0)
    assert not cutmix_box(16, p=0.0).any() and not half_box(16, p=0.0).any()
    areas = [cutmix_box(40, p=1.0).float().mean().item() for _ in range(50)]
    assert all(0.0 < a <= 0.41 for a in areas)  # 2-40% of the crop (integer box sides)
    halves = [half_box(40, p=1.0).float().mean().item() for _ in range(50)]
    assert all(abs(a - 0.5) < 0.05 for a in halves)


def test_combine_normalises_each_term_by_its_global_count():
    terms = [LossTerm("x", torch.tensor(6.0), torch.tensor(3), 0.5), LossTerm("u", torch.tensor(4.0), torch.tensor(8), 2.0),
             LossTerm("u2pl", torch.tensor(2.0), torch.tensor(4), 1.0, pixels=torch.tensor(16.0))]
    loss, shares = combine(terms, world=1)
    # 0.5 * 6/3 + 2 * 4/8 + 1 * (2/4) * (16/4)
    assert float(loss) == pytest.approx(1.0 + 1.0 + 2.0)
    assert [float(s) for s in shares] == pytest.approx([2.0, 0.5, 2.0])


def test_masked_ce_sums_only_kept_pixels():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]])  # B=1, C=2, H=1, W=2
    target = torch.tensor([[[0, 255]]])
    keep = target != 255
    assert float(masked_ce(logits, target, keep)) == pytest.approx(math.log(1 + math.exp(-2.0)))


def test_ema_decay_warms_up_then_stays():
    assert [ema_decay(s, 0.99) for s in (0, 1, 3)] == pytest.approx([0.0, 0.5, 0.75])
    assert ema_decay(10_000, 0.99) == 0.99


def test_u2pl_filter_accepts_a_pooled_quantile():
    pseudo = torch.tensor([[[0, 1]]])
    probs = torch.tensor([[[[0.9, 0.5]], [[0.1, 0.5]]]])
    out = u2pl_drop_unreliable(pseudo, probs, 50.0, quantile=lambda values, q: None)
    assert torch.equal(out, pseudo), "no threshold (no valid pixel anywhere): nothing dropped"
    out = u2pl_drop_unreliable(pseudo, probs, 50.0, quantile=lambda values, q: values.max())
    assert out.tolist() == [[[0, 255]]]


def _semi(**changes) -> SemiConfig:
    return SemiConfig(**changes)


def _batch(b: int = 4, size: int = 16, seed: int = 0, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, size, size, generator=g)
    y = torch.randint(0, classes, (b, size, size), generator=g)
    y[:, :2] = 255
    u = {k: torch.randn(b, 3, size, size, generator=g) for k in ("weak", "strong1", "strong2", "mix_weak",
                                                                  "mix_strong1", "mix_strong2")}
    for k in ("ignore", "ignore1", "mix_ignore"):
        u[k] = torch.zeros(b, size, size, dtype=torch.long)
        u[k][:, -3:] = 255
    u["box1"] = torch.zeros(b, size, size, dtype=torch.bool)
    u["box1"][::2, 4:10, 4:10] = True
    u["box2"] = u["box1"].flip(-1)
    return x, y, u


def test_unimatch_step_with_nothing_confident_keeps_only_the_labeled_loss():
    torch.manual_seed(0)
    model = build_model("deeplabv3plus", "tiny", 3, output_stride=8, aspp_channels=8)
    x, y, u = _batch()
    ctx = StepContext(model, None, 0.0, 1, 1, False, _semi(confidence_threshold=1.0))
    terms = get_method("unimatch").step(ctx, x, y, u)
    assert [t.name for t in terms] == ["loss_x", "loss_s1", "loss_s2", "loss_fp"]
    assert [t.weight for t in terms] == [0.5, 0.125, 0.125, 0.25]  # (x + s1/4 + s2/4 + fp/2) / 2
    assert all(float(t.total.detach()) == 0.0 for t in terms[1:])
    valid = int((u["ignore"] != 255).sum())
    assert int(terms[3].count) == valid, "divided by every valid pixel, confident or not"


@pytest.mark.parametrize("method", ["mean_teacher", "u2pl", "unimatch"])
def test_online_step_trains_the_student_only(method):
    torch.manual_seed(0)
    model = build_model("deeplabv3plus", "tiny", 3, output_stride=8, aspp_channels=8)
    ema = build_model("deeplabv3plus", "tiny", 3, output_stride=8, aspp_channels=8).requires_grad_(False)
    x, y, u = _batch()
    ctx = StepContext(model, ema, 0.5, 1, 2, False, _semi(confidence_threshold=0.0))
    loss, _ = combine(get_method(method).step(ctx, x, y, u), world=1)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in ema.parameters())
    assert math.isfinite(float(loss.detach())) and float(loss.detach()) > 0


_HEAD = {"mean_teacher": "stpp", "u2pl": "stpp", "unimatch": "unimatch"}  # model.head=auto


@pytest.mark.parametrize("method", ["mean_teacher", "u2pl", "unimatch"])
@pytest.mark.parametrize("labeled,unlabeled", [(2, 3), (3, 2)])
def test_online_step_with_unequal_labeled_and_unlabeled_batches(method, labeled, unlabeled):
    torch.manual_seed(0)
    projection = 8 if method == "u2pl" else 0  # U2PL with its contrastive term
    model = build_model("deeplabv3plus", "tiny", 3, output_stride=8, aspp_channels=8, head=_HEAD[method],
                        projection_channels=projection)
    ema = build_model("deeplabv3plus", "tiny", 3, output_stride=8, aspp_channels=8,
                      projection_channels=projection).requires_grad_(False)
    x, y, _ = _batch(labeled)
    _, _, u = _batch(unlabeled, seed=1)
    ctx = StepContext(model, ema, 0.5, 1, 2, False, _semi(confidence_threshold=0.0, u2pl_low_rank=1),
                      state=ClassQueues([100] * 3, 8) if projection else None)
    terms = get_method(method).step(ctx, x, y, u)
    loss, _ = combine(terms, world=1)
    loss.backward()
    assert math.isfinite(float(loss.detach()))
    assert int(terms[0].count) == int((y != 255).sum()), "the supervised term covers the labeled batch"
    valid_u = u["ignore1" if method == "mean_teacher" else "ignore"] != 255
    if method == "unimatch":
        assert int(terms[-1].count) == int(valid_u.sum()), "loss_fp over the whole unlabeled batch"
    elif method == "mean_teacher":
        assert int(terms[1].count) == int(valid_u.sum()), "the consistency term over the unlabeled batch"
    else:
        assert int(terms[1].pixels) == valid_u.numel(), "U2PL's pixels: the whole unlabeled batch"


def _ddp_online_steps(world: int, rank: int, method: str, unlabeled: int = 4, contrastive: bool = False) -> dict:
    from stpp_ray.training import build_optimizer, poly_scheduler
    from stpp_ray.models import split_parameters
    from stpp_ray.methods.online import train_online_epoch

    torch.manual_seed(0)
    model = build_model("deeplabv3plus", "tiny", 3, output_stride=8, aspp_channels=8, head=_HEAD[method],
                        projection_channels=8 if contrastive else 0)
    for m in model.modules():  # dropout masks are drawn per worker: equal in law, not bitwise
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = 0.0
    backbone, head = split_parameters(model)
    if world > 1:
        model = convert_batchnorm_for_distributed(model, "cpu")
    ema = None
    if method != "unimatch":
        import copy
        ema = copy.deepcopy(model).requires_grad_(False)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    # The cosine similarity's gradient grows as the projection's features shrink: a smaller step
    # keeps the contrastive runs in a range where float sums in another order stay close.
    opt = build_optimizer(backbone, head, lr=0.005 if contrastive else 0.05, head_lr_multiplier=10, momentum=0.9,
                          weight_decay=1e-4)
    sched = poly_scheduler(opt, 10, 0.9)
    x, y, _ = _batch()
    _, _, u = _batch(unlabeled, seed=1)
    part = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    upart = slice(rank * unlabeled // world, (rank + 1) * unlabeled // world)
    labeled = iter([(x[part], y[part])] * 3)
    unlabeled = [{k: v[upart] for k, v in u.items()}] * 3
    # 3 classes: r_l = 1 leaves a rank window [1, 3) for the unlabeled negatives.
    cfg = _semi(confidence_threshold=0.3, feature_dropout=0.0, rampup_fraction=0.5, u2pl_num_queries=16,
                u2pl_num_negatives=4, u2pl_low_rank=1)
    # U2PL's memory banks (contrastive term), small enough to drop their oldest rows here.
    banks = ClassQueues([300, 200, 200], 8) if contrastive else None
    stats = train_online_epoch(get_method(method), model, ema, labeled, unlabeled, opt, sched, torch.device("cpu"), cfg,
                               epoch=1, epochs=2, steps_done=0, total_steps=6, warmup_steps=1, seed=3, state=banks)
    kept = ema if ema is not None else getattr(model, "module", model)
    return {"loss": stats["loss"], "state": {k: v.clone() for k, v in kept.state_dict().items()},
            "loss_c": stats.get("loss_c"), "banks": banks.queues if banks else None}


@pytest.mark.multiprocess
@pytest.mark.parametrize("method,unlabeled,contrastive", [
    ("mean_teacher", 4, False), ("u2pl", 4, False), ("unimatch", 4, False), ("u2pl", 2, False), ("unimatch", 2, False),
    ("u2pl", 4, True), ("u2pl", 2, True)])
def test_online_methods_take_the_same_steps_on_two_workers_as_on_one(tmp_path, method, unlabeled, contrastive):
    """Global counts, the pooled U2PL percentile and synchronised BN: 2 x 2 images == 1 x 4
    (students and EMA teachers alike; feature dropout off, its masks differ per worker), also
    with an unlabeled batch of another size. U2PL's contrastive term too: memory banks filled
    from the gathered global batch in one worker's order, anchors and negatives drawn alike."""
    single = _ddp_online_steps(1, 0, method, unlabeled, contrastive)
    two = run_on_gloo_workers(_ddp_online_steps, 2, tmp_path / "two.pt", method, unlabeled, contrastive)
    assert two["loss"] == pytest.approx(single["loss"], rel=1e-4)
    assert_states_close(two["state"], single["state"])
    if contrastive:
        assert single["loss_c"] > 0 and two["loss_c"] == pytest.approx(single["loss_c"], rel=1e-4)
        assert [len(q) for q in single["banks"]] == [len(q) for q in two["banks"]] and max(map(len, single["banks"])) > 0
        for a, b in zip(two["banks"], single["banks"]):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_dmt_loss_weights_pseudo_pixels_and_not_ground_truth():
    # Two pixels, two classes. Current model: softmax(log 0.8, log 0.2) = (0.8, 0.2) on both.
    logits = torch.log(torch.tensor([[[[0.8, 0.8]], [[0.2, 0.2]]]]))
    mask = torch.tensor([[[0, 1]]])
    # pixel 0: ground truth (weight 1); pixel 1: pseudo-label 1 at confidence 254/254 = 1.0,
    # the model disagrees and is less confident (0.8 < 1.0): weight p^gamma2 = 0.2^2.
    confidence = torch.tensor([[[NO_CONFIDENCE, 254]]], dtype=torch.uint8)
    total, count = dmt_loss_sum(logits, mask, confidence, (3.0, 2.0))
    expected = -math.log(0.8) * 1.0 + -math.log(0.2) * 0.2 ** 2
    assert float(total) == pytest.approx(expected) and int(count) == 2


def test_curriculum_items_keep_the_top_ratio_of_each_class(tmp_path):
    mask = np.array([[0, 0, 0, 0, 1, 1]], dtype=np.uint8)
    conf = np.array([[10, 20, 30, 40, 100, 200]], dtype=np.uint8)
    table = pa.table({"image_id": ["a"], "mask_png": [encode_mask_png(mask)], "confidence_png": [encode_mask_png(conf)],
                      "stability": [float("nan")], "ckpt_miou": [[]], "ckpt_epochs": [[]], "confidence": [0.5],
                      "entropy": [0.1], "height": [1], "width": [6], "image_path": ["a.jpg"]}, schema=SCHEMA)
    pq.write_table(table, tmp_path / "part.parquet")
    items, levels = read_curriculum_items(read_pseudo_items(tmp_path, ["a"]), 0.5, 2)
    # class 0: 4 pixels, keep floor(4 * 0.5) + 1 = 3 -> level 20; class 1: 2 pixels -> keep 2 -> level 100
    assert levels == [20, 100]
    _, mask, confidence = item_data(items[0], "voc", with_confidence=True)
    assert mask.tolist() == [[255, 0, 0, 0, 1, 1]] and confidence.tolist() == conf.tolist()
    assert items[0].mask_png is None and not items[0].strong, "read when the item is loaded"
    assert class_balanced_thresholds(np.array([[0, 3], [0, 0]]), 0.2).tolist() == [1, 0]


def test_train_set_moves_confidence_with_the_mask(tmp_path):
    path = _images(tmp_path, 1, (10, 14))[0]
    mask = np.zeros((10, 14), dtype=np.uint8)
    conf = np.full((10, 14), 100, dtype=np.uint8)
    conf[:, :7] = 200
    mask[:, :7] = 1
    items = [TrainItem("p", path, mask_png=encode_mask_png(mask), conf_png=encode_mask_png(conf)),
             TrainItem("g", path, mask_png=encode_mask_png(mask))]
    ds = TrainSet(items, "voc", 16, seed=0, with_confidence=True)
    _, m, c = ds[0]
    assert m.shape == c.shape == (16, 16)
    assert torch.equal(c[m == 255], torch.full_like(c[m == 255], NO_CONFIDENCE)), "padding carries no confidence"
    assert set(c[m == 1].unique().tolist()) <= {200} and set(c[m == 0].unique().tolist()) <= {100}
    _, _, c_gt = ds[1]
    assert (c_gt == NO_CONFIDENCE).all()


def test_ema_teacher_follows_the_student():
    torch.manual_seed(0)
    student = build_model("deeplabv3plus", "tiny", 3, output_stride=8, aspp_channels=8)
    teacher = build_model("deeplabv3plus", "tiny", 3, output_stride=8, aspp_channels=8)
    before = [p.clone() for p in teacher.parameters()]
    ema_update_(teacher, student, ema_decay(1, 0.99))
    for b, t, s in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, 0.5 * b + 0.5 * s)


def test_feature_dropout_returns_clean_and_perturbed_logits():
    torch.manual_seed(0)
    model = build_model("deeplabv3plus", "tiny", 3, output_stride=8, aspp_channels=8).eval()
    x = torch.randn(2, 3, 16, 16)
    clean, perturbed = model(x, feature_dropout=0.5)
    assert clean.shape == perturbed.shape == (2, 3, 16, 16)
    assert not torch.allclose(clean, perturbed)
    same, also = model(x, feature_dropout=0.0)
    torch.testing.assert_close(same, also)


def test_a_stage_can_start_from_saved_weights(tmp_path):
    from stpp_ray.weights import architecture, save_weights
    from stpp_ray.config import Config
    from stpp_ray.stage_setup import setup_rank

    cfg = Config.model_validate({"model": {"backbone": "tiny", "output_stride": 8, "aspp_channels": 8},
                                 "data": {"num_classes": 3, "crop_size": 16}, "train": {"batch_size": 2}})
    torch.manual_seed(123)
    source = build_model("deeplabv3plus", "tiny", 3, output_stride=8, aspp_channels=8)
    save_weights(tmp_path / "w.pt", source, architecture(cfg.model, 3))
    items = [TrainItem("a", "unused.png", "unused.png")] * 2
    fresh = setup_rank(cfg, items, [], epochs=1).model
    tuned = setup_rank(cfg, items, [], epochs=1, init_weights=str(tmp_path / "w.pt")).model
    for key, value in source.state_dict().items():
        assert torch.equal(tuned.state_dict()[key], value), key
    assert any(not torch.equal(fresh.state_dict()[k], v) for k, v in source.state_dict().items())


def test_dmt_phases_use_dmt_optimizer_recipe(tmp_path):
    """DMT's phases fine-tune with DMT's SGD (voldemortX/DST-CBC segmentation/dmt-voc-20-1.sh,
    main.py): lr 0.001 on every group, weight decay 5e-4; its teachers keep `train.*`."""
    from stpp_ray.weights import architecture, save_weights
    from stpp_ray.config import Config
    from stpp_ray.stage_setup import setup_rank

    cfg = Config.model_validate({"method": "dmt", "model": {"backbone": "tiny", "output_stride": 8, "aspp_channels": 8},
                                 "data": {"num_classes": 3, "crop_size": 16}, "train": {"batch_size": 2, "lr": 0.02}})
    assert phase_epochs(cfg) == 4
    save_weights(tmp_path / "w.pt", build_model("deeplabv3plus", "tiny", 3, output_stride=8, aspp_channels=8),
                 architecture(cfg.model, 3))
    items = [TrainItem("a", "unused.png", "unused.png")] * 2
    phase = setup_rank(cfg, items, [], epochs=1, init_weights=str(tmp_path / "w.pt"),
                       training=get_method("dmt").training(PHASE, cfg))
    groups = phase.optimizer.param_groups
    assert len(groups) == 2 and sum(len(g["params"]) for g in groups) == len(list(phase.model.parameters()))
    assert [(g["lr"], g["initial_lr"], g["weight_decay"], g["momentum"]) for g in groups] == [(0.001, 0.001, 5e-4, 0.9)] * 2
    teacher = setup_rank(cfg, items, [], epochs=1).optimizer.param_groups
    assert [(g["lr"], g["weight_decay"]) for g in teacher] == [(0.02, 1e-4), (0.2, 1e-4)]


def test_teacher_updates_follow_mean_teachers_and_u2pls_code():
    """CuriousAI/mean-teacher pytorch/main.py: alpha = min(1 - 1/(k+1), 0.999) from k = 1, so the
    first update averages half and half; Haochen-Wang409/U2PL train_semi.py: no EMA in the
    supervised epochs, the student's parameters at every step of the first semi-supervised
    epoch, then the EMA from decay 0. Neither averages the BatchNorm statistics; U2PL's first
    semi-supervised step copies them (a declared deviation)."""
    def pair():
        torch.manual_seed(0)
        student = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.BatchNorm2d(1))
        teacher = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.BatchNorm2d(1))
        student[1].running_mean.fill_(3.0)
        return student, teacher, [p.clone() for p in teacher.parameters()]

    semi = _semi()
    assert (semi.mean_teacher_ema_decay, semi.ema_decay) == (0.999, 0.99)
    student, teacher, before = pair()
    get_method("mean_teacher").update_teacher(teacher, student, 0, 0, semi)
    for t, t0, s in zip(teacher.parameters(), before, student.parameters()):
        assert torch.allclose(t, 0.5 * t0 + 0.5 * s)
    assert float(teacher[1].running_mean) == 0.0, "the teacher keeps its own BatchNorm statistics"
    assert ema_decay(1, 0.999) == 0.5 and ema_decay(10_000, 0.999) == 0.999

    u2pl = get_method("u2pl")
    student, teacher, before = pair()
    u2pl.before_step(teacher, student, 3, 4, 4)
    u2pl.update_teacher(teacher, student, 3, 4, semi)
    assert all(torch.equal(t, t0) for t, t0 in zip(teacher.parameters(), before)), "warm-up: no EMA"
    assert float(teacher[1].running_mean) == 0.0
    u2pl.before_step(teacher, student, 4, 4, 4)  # the first semi-supervised step
    assert float(teacher[1].running_mean) == 3.0, "the student's statistics, not those of the initial weights"
    teacher[1].running_mean.fill_(5.0)
    u2pl.before_step(teacher, student, 7, 4, 4)  # the last step of the first semi-supervised epoch
    assert all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters()))
    assert float(teacher[1].running_mean) == 5.0, "statistics copied once, at the first step"
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(1.0)
    u2pl.before_step(teacher, student, 8, 4, 4)  # after it: the EMA alone
    assert all(torch.equal(t, s + 1.0) for t, s in zip(teacher.parameters(), student.parameters()))
    u2pl.update_teacher(teacher, student, 8, 4, semi)  # k = 4: decay min(1 - 1/5, 0.99) = 0.8
    assert all(torch.allclose(t, s + 0.8) for t, s in zip(teacher.parameters(), student.parameters()))
