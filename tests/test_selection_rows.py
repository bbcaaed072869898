"""The select stage's recorded rows, and a plain pool's derived paths (no Ray cluster needed)."""

from pathlib import Path

import pyarrow as pa
import pytest

from bench import memory
from stpp_ray.image_pool import ImagePool, with_paths
from stpp_ray.pseudo_labels import PseudoLabelError, ShardIndex, read_selection, scores, write_selection
from stpp_ray.selection import select_reliable


@pytest.fixture
def shards(tmp_path) -> Path:
    memory.make_pool(tmp_path / "pool", 600)
    memory.make_shards(tmp_path / "shards", 600, tmp_path / "pool")  # 3 files of 256, 256, 88 rows
    return tmp_path / "shards"


def test_recorded_rows_give_the_selection_file_a_lookup_gives(shards, tmp_path):
    table = scores(shards, [1, 2])
    index = ShardIndex(shards)
    assert table.column("row").to_pylist() == list(range(600)) == list(index.rows_of(table.column("image_id").combine_chunks()))
    sel = select_reliable(table.take(pa.array([5, 300, 599, 0, 17])), 0.6)
    part = sel.part(True)
    assert part.column_names == ["image_id", "row"] and len(part) == 3
    ids = part.column("image_id").combine_chunks()
    with_rows = write_selection(tmp_path / "a", "r", shards, ids, part.column("row").to_numpy())  # unsorted ids
    looked_up = write_selection(tmp_path / "b", "r", shards, ids)
    assert Path(with_rows).name == Path(looked_up).name  # named by content: the same ids and rows
    items = read_selection(with_rows)
    assert [items[k].image_id for k in range(3)] == sorted(ids.to_pylist())
    wrong = part.column("row").to_numpy()[::-1].copy()
    with pytest.raises(PseudoLabelError, match="recorded rows of 3 images are not theirs"):
        write_selection(tmp_path / "c", "r", shards, ids, wrong)
    with pytest.raises(PseudoLabelError, match="not theirs"):
        write_selection(tmp_path / "c", "r", shards, ids, wrong + 1000)  # past the last row


def test_a_plain_pool_holds_ids_only_and_its_blocks_get_paths_where_used(tmp_path):
    memory.make_pool(tmp_path, 10)
    pool = ImagePool.read("voc", tmp_path, "unlabeled.txt")
    assert pool.template is not None
    blocks = pool.blocks(4)
    assert [b.column_names for b in blocks] == [["image_id"]] * 3 and [len(b) for b in blocks] == [4, 4, 2]
    full = with_paths(pa.concat_tables(blocks), pool.template)
    assert full.column("image_path").to_pylist() == [str(tmp_path / "JPEGImages" / f"{i}.jpg") for i in pool.image_ids()]
    subset = pool.subset(["u0000003", "u0000001"])
    assert subset.template == pool.template and [str(s.image_path) for s in subset] == \
        [str(tmp_path / "JPEGImages" / f"u000000{k}.jpg") for k in (1, 3)]
    held = ImagePool(pool.ids, pool.paths)
    assert [b.column_names for b in held.blocks(4)] == [["image_id", "image_path"]] * 3
    with pytest.raises(ValueError, match="either its paths or a path template"):
        ImagePool(pool.ids)
