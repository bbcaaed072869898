"""The one-pass labeler, called directly (no Ray), and the Parquet schema."""

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from stpp_ray.augment import normalize
from stpp_ray.weights import CheckpointError
from stpp_ray.datasets import decode_mask_png
from stpp_ray.labeling import Labeler
from stpp_ray.pseudo_labels import SCHEMA
from stpp_ray.stability import stability_score
from tests.helpers import write_checkpoints, write_random_images

ARCH = {"name": "deeplabv3plus", "backbone": "mobilenet_v3_large", "output_stride": 16, "aspp_channels": 16,
        "num_classes": 4}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Three differently initialised tiny models standing in for K=3 teacher checkpoints."""
    # make predictions vary spatially and across checkpoints
    return write_checkpoints(tmp_path_factory.mktemp("ckpts"), (1, 2, 3), ARCH,
                             perturb=lambda m: m.classifier.bias.copy_(torch.randn(4)))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_random_images(tmp_path_factory.mktemp("imgs"), [f"u{i}.png" for i in range(4)],
                               [(32, 32), (32, 32), (24, 40), (32, 32)], seed=0)


def batch_of(rows):
    return {"image_id": np.array([r[0] for r in rows]), "image_path": np.array([r[1] for r in rows])}


def test_scores_equal_stability_score_of_its_own_predictions(checkpoints, images):
    labeler = Labeler(checkpoints, checkpoints[-1], num_threads=1)
    out = labeler(batch_of(images))
    assert out["image_id"] == [r[0] for r in images]
    for i, (image_id, path) in enumerate(images):
        x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None]
        with torch.inference_mode():
            preds = [m(normalize(x)).argmax(1)[0].numpy() for m in labeler.models]
        expected = stability_score(preds, 4)
        assert math.isclose(out["stability"][i], expected, rel_tol=1e-9, abs_tol=1e-12)
        assert len(out["ckpt_miou"][i]) == 2
        assert out["ckpt_epochs"][i] == [1, 2]
        mask = decode_mask_png(out["mask_png"][i])
        np.testing.assert_array_equal(mask, preds[-1])  # label model = final checkpoint, no TTA
        assert (out["height"][i], out["width"][i]) == mask.shape
        assert 0 < out["confidence"][i] <= 1 and out["entropy"][i] >= 0


def test_output_matches_the_parquet_schema(checkpoints, images):
    out = Labeler(checkpoints, checkpoints[-1], num_threads=1)(batch_of(images))
    table = pa.Table.from_pydict(out, schema=SCHEMA)
    assert table.num_rows == len(images)
    assert {"image_id", "mask_png", "stability", "ckpt_miou"} <= set(table.schema.names)
    assert table.schema.field("mask_png").type == pa.binary()
    assert table.schema.field("ckpt_miou").type == pa.list_(pa.float64())


def test_single_checkpoint_gives_nan_stability_and_tta_changes_nothing_structural(checkpoints, images):
    out = Labeler([checkpoints[0]], checkpoints[0], tta=True, tta_scales=[0.5, 1.0], num_threads=1)(batch_of(images))
    assert all(math.isnan(s) for s in out["stability"])
    assert all(c == [] for c in out["ckpt_miou"])
    for i in range(len(images)):
        mask = decode_mask_png(out["mask_png"][i])
        assert mask.shape == (out["height"][i], out["width"][i])
        assert mask.max() < 4


def test_checkpoint_of_another_class_count_is_refused(checkpoints):
    wrong = dict(ARCH, num_classes=21)
    with pytest.raises(CheckpointError, match="num_classes"):
        Labeler(checkpoints, checkpoints[-1], expect_arch=wrong)


@pytest.fixture(scope="module")
def mixed_images(tmp_path_factory):
    """Landscape, portrait, square, a gray (mode L) and a palette (mode P) image in one batch."""
    root = tmp_path_factory.mktemp("mixed")
    rows = write_random_images(root, ["land.png", "port.png", "sq.png", "land2.png"],
                               [(24, 40), (40, 24), (32, 32), (24, 40)], seed=1)
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 255, (36, 28), dtype=np.uint8), mode="L").save(root / "gray.png")
    Image.fromarray(rng.integers(0, 255, (28, 36, 3), dtype=np.uint8)).convert("P").save(root / "pal.png")
    return rows[:2] + [("gray", str(root / "gray.png"))] + rows[2:] + [("pal", str(root / "pal.png"))]


@pytest.mark.parametrize("tta", [False, True])
def test_a_batch_of_mixed_sizes_and_modes_equals_labeling_one_by_one(checkpoints, mixed_images, tta):
    labeler = Labeler(checkpoints, checkpoints[-1], tta=tta, tta_scales=[0.5, 1.0, 1.5], num_threads=1)
    together = labeler(batch_of(mixed_images))
    assert together["image_id"] == [r[0] for r in mixed_images]
    for i, row in enumerate(mixed_images):
        alone = labeler(batch_of([row]))
        for key in ("mask_png", "height", "width", "ckpt_miou", "stability"):
            assert together[key][i] == alone[key][0], (row[0], key)
        assert together["confidence"][i] == pytest.approx(alone["confidence"][0], rel=1e-6)
        h, w = np.asarray(Image.open(row[1])).shape[:2]
        assert decode_mask_png(together["mask_png"][i]).shape == (h, w)


def _shard(path, ids, masks):
    import pyarrow.parquet as pq
    from stpp_ray.datasets import encode_mask_png
    from stpp_ray.pseudo_labels import ROWS_PER_GROUP

    n = len(ids)
    table = pa.table({"image_id": ids, "mask_png": [encode_mask_png(m) for m in masks],
                      "confidence_png": [encode_mask_png(np.full(m.shape, 7, np.uint8)) for m in masks],
                      "stability": [0.0] * n, "ckpt_miou": [[]] * n, "ckpt_epochs": [[]] * n, "confidence": [0.5] * n,
                      "entropy": [0.1] * n, "height": [m.shape[0] for m in masks], "width": [m.shape[1] for m in masks],
                      "image_path": [f"{i}.jpg" for i in ids]}, schema=SCHEMA)
    pq.write_table(table, path, row_group_size=ROWS_PER_GROUP)


def test_students_read_each_pseudo_label_from_its_row_group_when_loaded(tmp_path):
    """Items are an id and a row number, made when indexed: a worker's memory holds neither the
    pool's masks nor its image paths, and each load decodes one row group of its shard."""
    import pickle

    from stpp_ray.datasets import encode_mask_png
    from stpp_ray.pseudo_labels import ROWS_PER_GROUP, PseudoLabelError, ShardIndex, read_pseudo_items
    from stpp_ray.training import item_data

    rng = np.random.default_rng(0)
    ids = [f"u{i:03d}" for i in range(53)]
    masks = {i: rng.integers(0, 6, (30 + k % 4, 40), dtype=np.uint8) for k, i in enumerate(ids)}  # ~1 KB as PNG
    _shard(tmp_path / "a.parquet", ids[:40], [masks[i] for i in ids[:40]])  # 3 groups: 16, 16, 8 rows
    _shard(tmp_path / "b.parquet", ids[40:], [masks[i] for i in ids[40:]])
    wanted = ids[5:50][::-1] + ids[5:7]  # any order, repeats
    items = read_pseudo_items(tmp_path, wanted)
    assert not isinstance(items, list) and len(items) == 45
    assert [i.image_id for i in items] == ids[5:50] and all(i.mask_png is None and i.strong for i in items)
    assert all(i.image_path is None for i in items), "the path is read with the mask"
    for item in items:
        path, mask, conf = item_data(item, "voc")
        np.testing.assert_array_equal(mask, masks[item.image_id])
        assert path == f"{item.image_id}.jpg" and conf is None
    assert (item_data(items[0], "voc", with_confidence=True)[2] == 7).all()
    index = items[0].shards
    assert isinstance(index, ShardIndex) and index.group_starts == [[0, 16, 32], [0]] and index.file_starts == [0, 40]
    per_item = (len(pickle.dumps(items)) - len(pickle.dumps(index))) / len(items)
    assert per_item < 150 < min(len(encode_mask_png(m)) for m in masks.values()), "an item is a row number, not a mask"
    assert ROWS_PER_GROUP == 16
    with pytest.raises(PseudoLabelError, match=r"no pseudo-label for 1 images \(e.g. \['stranger'\]\)"):
        read_pseudo_items(tmp_path, [*wanted, "stranger"])


def test_completeness_check_names_missing_duplicated_and_unexpected_images():
    from stpp_ray.pseudo_labels import PseudoLabelError, check_complete

    check_complete(pa.table({"image_id": ["b", "a"]}), ["a", "b"], "shards")
    with pytest.raises(PseudoLabelError, match=r"shards: pseudo-labels incomplete: 2 missing, 1 duplicated, 1 "
                                               r"unexpected \(e.g. \['c', 'd', 'a'\]\)"):
        check_complete(pa.table({"image_id": ["a", "a", "x"]}), ["d", "a", "c"], "shards")


def test_a_selection_file_holds_ids_rows_and_the_index_so_workers_read_one_file(tmp_path):
    from stpp_ray.pseudo_labels import read_pseudo_items, read_selection, write_selection
    from stpp_ray.training import item_data

    ids = [f"u{i:03d}" for i in range(40)]
    masks = [np.full((3, 4), k % 7, np.uint8) for k in range(40)]
    (tmp_path / "shards").mkdir()
    _shard(tmp_path / "shards" / "a.parquet", ids[20:], masks[20:])  # not in id order across files
    _shard(tmp_path / "shards" / "b.parquet", ids[:20], masks[:20])
    wanted = ["u031", "u002", "u017", "u002", "u025"]
    path = write_selection(tmp_path / "sel", "label_teacher", tmp_path / "shards", wanted)
    assert path.endswith(".arrow") and path.split("/")[-1].startswith("label_teacher-")
    stamp = (tmp_path / "sel").stat().st_mtime_ns, len(list((tmp_path / "sel").iterdir()))
    assert write_selection(tmp_path / "sel", "label_teacher", tmp_path / "shards", wanted[::-1]) == path
    assert ((tmp_path / "sel").stat().st_mtime_ns, len(list((tmp_path / "sel").iterdir()))) == stamp
    assert write_selection(tmp_path / "sel", "label_teacher", tmp_path / "shards", wanted[:2]) != path
    items, direct = read_selection(path), read_pseudo_items(tmp_path / "shards", wanted)
    assert [i.image_id for i in items] == ["u002", "u017", "u025", "u031"] == [i.image_id for i in direct]
    assert items.rows.tolist() == direct.rows.tolist() == [22, 37, 5, 11]
    assert items.index.to_dict() == direct.index.to_dict()
    for item in items:
        image_path, mask, _ = item_data(item, "voc")
        assert image_path == f"{item.image_id}.jpg" and (mask == int(item.image_id[1:]) % 7).all()


def test_shards_of_an_older_layout_are_one_error_naming_the_file(tmp_path):
    import pyarrow.parquet as pq
    from stpp_ray.pseudo_labels import PseudoLabelError, ShardIndex

    old = pa.schema([f for f in SCHEMA if f.name != "image_path"])
    pq.write_table(pa.Table.from_pylist([{"image_id": "a"}], schema=old), tmp_path / "part-0.parquet")
    with pytest.raises(PseudoLabelError, match=r"part-0.parquet: a shard without image paths .* delete .* to label again"):
        ShardIndex(tmp_path)
