"""The benchmark's comparators do the same work as the product, and its reports say what was measured."""

import json
import math

import numpy as np
import pytest

from bench import e2e, labeling, render, scale
from stpp_ray.config import Config
from stpp_ray.labeling import Labeler
from stpp_ray.pseudo_labels import read_table
from stpp_ray.cluster.train import summarize_stage
from tests.helpers import write_checkpoints, write_random_images

ARCH = {"name": "deeplabv3plus", "backbone": "tiny", "output_stride": 8, "aspp_channels": 8, "num_classes": 4}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    # predictions that vary across the image and across checkpoints
    return write_checkpoints(tmp_path_factory.mktemp("ckpts"), (2, 4, 6), ARCH,
                             perturb=lambda m: m.classifier.weight.mul_(100.0))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_random_images(tmp_path_factory.mktemp("imgs"), [f"u{i}.jpg" for i in range(10)], (32, 32), seed=1)


def test_reference_procedure_scores_like_the_labeler_and_writes_one_png_per_image(checkpoints, images, tmp_path):
    seconds, scores = labeling.reference_procedure(images, checkpoints, checkpoints[-1], tmp_path / "ref", threads=1)
    out = Labeler(checkpoints, checkpoints[-1], num_threads=1)(
        {"image_id": np.array([i for i, _ in images]), "image_path": np.array([p for _, p in images])})
    assert seconds > 0
    assert len(set(np.round(list(scores.values()), 6))) > 1, "the fixture should give varied scores"
    for image_id, stability in zip(out["image_id"], out["stability"]):
        assert scores[image_id] == pytest.approx(stability, abs=1e-6)
    assert sorted(p.stem for p in (tmp_path / "ref").glob("*.png")) == sorted(i for i, _ in images)
    reliable = (tmp_path / "ref" / "reliable_ids.txt").read_text().split()
    assert reliable == sorted(scores, key=scores.get, reverse=True)[:5]


def test_bare_loop_writes_every_image_once_in_the_shard_schema(checkpoints, images, tmp_path):
    cfg = Config.model_validate({"label": {"batch_size": 4, "rows_per_file": 6}})
    seconds = labeling.bare_loop(cfg, images, checkpoints, tmp_path / "bare", threads=1)
    table = read_table(tmp_path / "bare")
    assert seconds > 0
    assert sorted(table.column("image_id").to_pylist()) == sorted(i for i, _ in images)
    assert len(list((tmp_path / "bare").glob("*.parquet"))) == 2  # 4+4 rows, then the last 2


def test_end_to_end_bench_relabels_the_unreliable_images_the_pipeline_chose(checkpoints, images, tmp_path,
                                                                           monkeypatch):
    import pyarrow as pa
    from types import SimpleNamespace

    from stpp_ray.image_pool import ImagePool

    unreliable = [images[1][0], images[4][0], images[7][0]]
    labeled: list = []
    pipeline = SimpleNamespace(
        cfg=Config(), unlabeled=ImagePool(pa.array([i for i, _ in images]), pa.array([p for _, p in images])),
        results={"student1": {"final_checkpoint": checkpoints[-1]}},
        selected=lambda reliable: pa.table({"image_id": pa.array([] if reliable else unreliable, pa.string())}))
    monkeypatch.setattr(e2e, "bare_loop", lambda cfg, imgs, ckpts, out, threads: labeled.append((imgs, ckpts)) or 1.5)
    assert e2e._bare_labeling(pipeline, "label_student1", 1, tmp_path) == 1.5
    assert labeled == [([images[1], images[4], images[7]], [checkpoints[-1]])]


def _results(ray_rate: float, ref_rate: float, train_ratio: float, startup: float) -> dict:
    seconds = lambda v: {"median": v, "min": v, "max": v, "runs": [v]}  # noqa: E731
    return {
        "machine": {"cores": 2, "cpu_model": "cpu", "memory_gib": 1.0, "gpu": None, "torch": "t", "torch_threads": 2,
                    "ray": "r", "python": "p", "cpu_steal_pct": 50.0},
        "command": "python -m bench.run", "date": "today", "total_wall_s": 60.0, "ray_init_s": 5.0,
        "labeling": {"images": 100, "small_images": 25, "reference_images": 10, "checkpoints": 3, "batch_size": 8,
                     "model": "m", "image_size": 64,
                     "seconds": {"ray": seconds(100 / ray_rate), "ray_small": seconds(1.0), "bare": seconds(1.0),
                                 "reference": seconds(10 / ref_rate)},
                     "images_per_s": {"ray": ray_rate, "ray_small": 25.0, "bare": 100.0, "reference": ref_rate},
                     "ray_extra_seconds": seconds(0.8), "ray_extra_usable_median_s": 0.8, "ray_marginal_noisy": False,
                     "ray_marginal_images_per_s": 95.0, "ray_fixed_s": 0.1, "ray_vs_bare": ray_rate / 100.0,
                     "ray_marginal_vs_bare": 0.95, "ray_vs_reference": ray_rate / ref_rate},
        "training": {"epochs_per_run": 3, "global_batch": 16, "model": "m", "crop": 64,
                     "bare": {"images_per_s": 50.0},
                     "startup_s": seconds(startup),
                     **{key: {"images_per_s": 50.0 * train_ratio, "vs_bare": train_ratio,
                              "startup_s": seconds(startup), "teardown_s": seconds(1.0)}
                        for key in ("ray_1", "ray_2", "ray_2_local_bn")}},
    }


@pytest.mark.parametrize("ray_rate,ref_rate,train_ratio,startup,met", [
    (95.0, 30.0, 0.95, 10.0, ["yes"] * 6),
    (80.0, 30.0, 0.80, 20.0, ["no"] * 6),
])
def test_targets_are_judged_on_the_measured_figures(ray_rate, ref_rate, train_ratio, startup, met):
    rows = render.targets(_results(ray_rate, ref_rate, train_ratio, startup))
    assert [r[-1] for r in rows] == met
    markdown = render.render_markdown(_results(ray_rate, ref_rate, train_ratio, startup))
    assert f"{ray_rate / 100:.2f}" in markdown and "50% CPU steal" in markdown


def test_update_doc_replaces_only_the_marked_block(tmp_path):
    doc = tmp_path / "B.md"
    doc.write_text(f"intro\n{render.BEGIN}\nold\n{render.END}\noutro\n")
    render.update_doc(doc, "new table\n")
    assert doc.read_text() == f"intro\n{render.BEGIN}\nnew table\n{render.END}\noutro\n"
    (tmp_path / "plain.md").write_text("no markers")
    with pytest.raises(ValueError, match="no <!-- bench:begin -->"):
        render.update_doc(tmp_path / "plain.md", "x")


def test_scale_model_uses_at_most_the_global_batch_of_train_workers_and_gets_faster():
    rows = scale.project(train_gf=200.0, infer_gf=100.0, train_start_s=20.0, label_fixed_s=10.0)
    assert [r["train_workers"] for r in rows] == [1, 8, 16]
    totals = [r["total_h"] for r in rows]
    assert totals[0] > totals[1] > totals[2]
    # teacher on one GPU: 80 epochs x 662 images x 200 GFLOP + 16 evals x 1449 x 100 GFLOP at 25 TFLOP/s, + start-up
    expected = (80 * 662 * 200 + 16 * 1449 * 100) / 25e3 + 20.0
    assert rows[0]["teacher"] == pytest.approx(expected / 3600)


def test_million_image_pool_scales_labeling_with_gpus_and_memory_along_the_measured_slopes():
    rows = scale.project_pool(train_gf=200.0, infer_gf=100.0)
    eight, thirty_two = rows
    assert (eight["gpus"], thirty_two["gpus"]) == (8, 32) and thirty_two["train_workers"] == 16
    assert eight["label_teacher_h"] == pytest.approx(4 * thirty_two["label_teacher_h"])
    # 1M x (K + TTA views) x 100 GFLOP on 8 GPUs at 25 TFLOP/s and 95 % efficiency
    assert eight["label_teacher_h"] == pytest.approx(1e6 * (3 + 16.125) * 100 / (25e3 * 8 * 0.95) / 3600)
    measured = scale.MEASURED_MEMORY
    assert eight["worker_mib"] == pytest.approx(measured["peak_mib"]["worker"][0] + measured["slope_mib_per_100k"]["worker"] * 9.9) \
        == thirty_two["worker_mib"]
    assert eight["worker_eager_mib"] > 5 * eight["worker_mib"]  # 8 KB masks held for a million images
    assert eight["shards"] == 3907 and eight["shards_gib"] == pytest.approx(1e6 * 8120 / 2**30)
    own = {**scale.MEASURED_MEMORY, "slope_mib_per_100k": {"worker": 1.0, "worker_eager": 1.0, "driver": 2.0}}
    assert scale.project_pool(200.0, 100.0, own)[0]["driver_mib"] == pytest.approx(measured["peak_mib"]["driver"][0] + 2.0 * 9.9)
    text = scale.render_pool(rows, scale.MEASURED_MEMORY)
    assert "| 8 | " in text and "one selection file (ids and shard rows, 23 bytes an image: 22 MiB" in text


def test_stage_summary_splits_wall_time_into_compute_startup_and_teardown(tmp_path):
    called = 1000.0
    records = [{"epoch": 1, "images_per_s": 10.0, "train_seconds": 4.0, "started_at": called + 3.0},
               {"epoch": 2, "images_per_s": 10.0, "train_seconds": 4.0, "started_at": called + 8.0,
                "eval_seconds": 1.0, "val_miou": 0.5, "val_iou": [0.5]}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    s = summarize_stage(tmp_path, wall_s=15.0, called_at=called)
    assert s["compute_s"] == pytest.approx(9.0)
    assert s["startup_s"] == pytest.approx(3.0)
    assert s["teardown_s"] == pytest.approx(15.0 - 13.0)
    # a resumed stage: epochs of an earlier call do not count toward this call's breakdown
    s = summarize_stage(tmp_path, wall_s=10.0, called_at=called + 5.0)
    assert s["compute_s"] == pytest.approx(5.0) and s["startup_s"] == pytest.approx(3.0)
    assert math.isclose(summarize_stage(tmp_path, 1.0)["miou"], 0.5) and "compute_s" not in summarize_stage(tmp_path, 1.0)


def test_memory_pool_is_what_students_read_and_its_table_gives_the_slopes(tmp_path):
    from bench import memory
    from stpp_ray.datasets import build_samples
    from stpp_ray.image_pool import ImagePool, read_pool, write_pool
    from stpp_ray.pseudo_labels import read_selection
    from stpp_ray.training import TrainSet, item_data

    memory.make_pool(tmp_path / "pool", 40)
    assert memory.make_shards(tmp_path / "shards", 40, tmp_path / "pool") > 50
    samples = build_samples("voc", tmp_path / "pool", "unlabeled.txt", with_masks=False)
    items = read_selection(memory.selection_file(tmp_path / "shards"))
    assert [i.image_id for i in items] == [s.image_id for s in samples]
    assert item_data(items[7], "voc")[0] == str(samples[7].image_path)
    image, mask = TrainSet(items, "voc", memory.MASK_SIZE, seed=0)[39]
    write_pool(tmp_path / "shards_pool", "unlabeled", ImagePool.read("voc", tmp_path / "pool", "unlabeled.txt"))
    assert list(read_pool(memory.pool_file(tmp_path / "shards"))) == samples  # what the online probes read
    assert len(items) == 40 and image.shape[-2:] == mask.shape == (memory.MASK_SIZE, memory.MASK_SIZE)
    memory.make_shards(memory.student1_shards(tmp_path / "shards"), 40, tmp_path / "pool", first=20)
    steps = []
    memory.driver(tmp_path / "pool", tmp_path / "shards", steps.append)  # the pipeline's own select stage and selection files
    assert steps == list(memory.DRIVER_STEPS)
    selection = json.loads((tmp_path / "shards_run" / "selection.json").read_text())
    assert len(selection["reliable"]) == len(selection["unreliable"]) == 20 and len(selection["scores"]) == 40
    # the reliable images (students 1 and 2: one file, named by content) and the unreliable ones
    assert len(list((tmp_path / "shards_run" / "selections").glob("*.arrow"))) == 2
    result = {"sizes": [10, 30], "mask_size": 64, "mask_png_bytes": 150.0, "wall_s": 1.0,
              "peak_mib": {"worker": [100.0, 101.0], "worker_eager": [100.0, 120.0], "driver": [90.0, 90.5],
                           "online_worker": [95.0, 95.0], "online_worker_list": [95.0, 96.0], "floor": [80.0, 80.0]}}
    result["slope_mib_per_100k"] = {k: memory._slope(result["sizes"], v) for k, v in result["peak_mib"].items()}
    table = memory.markdown(result)
    assert result["slope_mib_per_100k"]["worker_eager"] == pytest.approx(100_000.0)
    assert "| student Train worker (ids and rows; path and mask read when loaded) | 100 | 101 | 5000.0 |" in table
    assert "| online method's Train worker, every path in a list (before) | 95 | 96 | 5000.0 |" in table
    result["driver_steps_mib"] = {step: [90.0, 90.2] for step in memory.DRIVER_STEPS}
    assert f"| {memory.DRIVER_STEPS['select']} | 90 | 90 | 1000.0 |" in memory.markdown(result)


def test_scale_model_counts_the_flops_of_resnet101_deeplabv3plus():
    """`make bench` ends with this count; a training-mode forward of one image failed in BatchNorm."""
    train, infer = scale.count_flops()
    assert train == pytest.approx(223.1, abs=0.5) and infer == pytest.approx(130.9, abs=0.5)


def test_data_check_bench_times_the_loop_and_the_ray_pass_on_one_pool(ray_local, tmp_path):
    from bench import data_check

    result = data_check.run(tmp_path, 40, say=lambda _: None)
    assert result["images"] == 40 and result["cluster_cpus"] == 2
    assert result["loop_s"] > 0 and result["ray_s"] > 0 and result["ray_images_per_s"] == pytest.approx(40 / result["ray_s"])
    table = data_check.markdown({**result, "loop_s": 2.0, "ray_s": 1.0, "loop_images_per_s": 20.0, "ray_images_per_s": 40.0})
    assert "| Ray Data pass on 2 CPUs (`cluster.check`) | 1.0 | 40 | 2.00x |" in table


def test_labeling_at_scale_bench_labels_the_pool_three_ways_and_splits_the_loops_time(ray_local, tmp_path):
    from bench import labeling_scale, workload

    cfg = workload.bench_config(tmp_path / "demo", ["label.batch_size=16", "model.aspp_channels=8"])
    m = labeling_scale.run(cfg, tmp_path, 48, 8, bare_images=32, reference_images=8, cores=2, say=lambda _: None)
    assert (m["images"], m["bare_images"], m["reference_images"], m["checkpoints"]) == (48, 32, 8, 3)
    assert m["shards"] >= 1 and all(v > 0 for v in m["images_per_s"].values())
    assert set(m["breakdown_s"]) == {"decode", "forward", "png_encode", "arrow", "parquet_write"}
    assert all(v >= 0 for v in m["breakdown_s"].values()) and m["breakdown_s"]["forward"] > 0
    text = labeling_scale.markdown(m)
    assert "| Ray Data pass (the product" in text and "| 48 |" in text and "| PNG encoding" in text
