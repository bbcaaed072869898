"""Run directories and datasets in an object store, against the session's local S3 server
(moto, with credentials checked; `s3_store` in conftest.py). The smoke ST++ run killed and
resumed in the bucket is tests/test_pipeline.py's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from pyarrow import fs as pafs

from stpp_ray import storage
from stpp_ray.cli import main
from stpp_ray.datasets import build_samples, read_image
from stpp_ray.files import write_json_atomic
from stpp_ray.pseudo_labels import SCHEMA, read_table, scores
from stpp_ray.storage import BucketPath, StorageError, location, publish_tree
from stpp_ray.weights import architecture, read_weights, save_weights
from tests.helpers import SMOKE, smoke_config


def bucket(s3_store, *parts: str) -> BucketPath:
    return BucketPath(f"s3://{s3_store.bucket}/" + "/".join(parts))


def upload(local: Path, target: BucketPath) -> None:
    pafs.copy_files(str(local), target.fs_path, destination_filesystem=target.fs)


@pytest.fixture
def fresh_filesystems():
    """Each S3 filesystem object keeps the credentials it was made with: drop them around a test
    that changes the environment."""
    storage._process_filesystem.cache_clear()
    yield
    storage._process_filesystem.cache_clear()


def test_a_bucket_path_reads_writes_lists_and_deletes(s3_store):
    root = bucket(s3_store, "paths")
    assert not root.exists() and location(str(root)) == root and storage.is_uri(str(root))
    (root / "a" / "x.txt").write_text("one")
    (root / "a" / "y.parquet").write_bytes(b"")
    (root / "b.json").write_text("{}")
    assert (root / "a" / "x.txt").read_text() == "one" and (root / "a" / "x.txt").is_file()
    assert (root / "a").is_dir() and not (root / "a").is_file()
    assert [p.name for p in (root / "a").glob("*.parquet")] == ["y.parquet"]
    assert [p.name for p in root.iterdir()] == ["a", "b.json"]
    assert root.files_under() == {"a/x.txt", "a/y.parquet", "b.json"}
    assert (root / "a" / "x.txt").parent == root / "a" and (root / "b.json").with_suffix(".lock").name == "b.lock"
    assert str((root / "a").relative_to(root)) == "a"
    publish_tree(root / "a", root / "c")
    assert root.files_under() == {"b.json", "c/x.txt", "c/y.parquet"}
    with storage.local_copy(root / "c" / "x.txt") as local:
        assert isinstance(local, Path) and local.read_text() == "one"
    (root / "c").rmtree()
    (root / "b.json").unlink()
    assert root.files_under() == set()  # (pyarrow leaves an empty marker of the deleted prefixes' parent)
    with pytest.raises(FileNotFoundError):
        (root / "b.json").read_text()


def test_a_write_that_fails_midway_leaves_the_previous_object(s3_store, tmp_path):
    manifest = bucket(s3_store, "atomic", "manifest.json")
    write_json_atomic(manifest, {"stages": {"teacher": 1}})
    with pytest.raises(RuntimeError), manifest.open("wb") as f:
        f.write(b'{"stages": {"teach')
        raise RuntimeError("the process dies here")
    assert json.loads(manifest.read_text()) == {"stages": {"teacher": 1}}

    import torch
    weights = bucket(s3_store, "atomic", "final.pt")
    arch = architecture(smoke_config(tmp_path, tmp_path).model, 6)
    model = torch.nn.Conv2d(3, 6, 1)
    save_weights(weights, model, arch, epoch=1)
    def dies_midway(obj, f):
        f.write(b"PK\x03\x04 half an archive")
        raise OSError("the process dies here")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "save", dies_midway)
        with pytest.raises(OSError, match="dies here"):
            save_weights(weights, torch.nn.Conv2d(3, 6, 1), arch, epoch=2)
    blob = read_weights(weights)
    assert blob["meta"]["epoch"] == 1 and torch.equal(blob["model"]["weight"], model.weight.detach())


def test_shards_and_a_dataset_in_a_bucket_are_read_with_one_listing(s3_store, smoke_data, monkeypatch):
    shards = bucket(s3_store, "shards")
    rows = {name: [] for name in SCHEMA.names}
    for i in range(3):
        rows["image_id"].append(f"im{i}")
        rows["ckpt_miou"].append([0.5 + i / 10])
        rows["ckpt_epochs"].append([1])
        for col in ("mask_png", "confidence_png"):
            rows[col].append(b"")
        for col in ("stability", "confidence", "entropy"):
            rows[col].append(0.0)
        rows["height"].append(1)
        rows["width"].append(1)
        rows["image_path"].append(f"im{i}.jpg")
    with shards.fs.open_output_stream((shards / "part-0.parquet").fs_path) as f:
        pq.write_table(pa.Table.from_pydict(rows, schema=SCHEMA), f)
    assert sorted(read_table(shards, ["image_id"]).column("image_id").to_pylist()) == ["im0", "im1", "im2"]
    assert scores(shards, [1, 2]).to_pydict() == {"image_id": ["im0", "im1", "im2"], "score": pytest.approx([0.5, 0.6, 0.7]),
                                                  "row": [0, 1, 2]}

    root = bucket(s3_store, "datasets", "smoke")
    upload(smoke_data, root)
    monkeypatch.setattr(BucketPath, "is_file", lambda self: pytest.fail(f"a request per file: {self}"))
    samples = build_samples("voc", str(root), "ImageSets/Segmentation/val.txt", with_masks=True)
    local = build_samples("voc", smoke_data, "ImageSets/Segmentation/val.txt", with_masks=True)
    assert [s.image_id for s in samples] == [s.image_id for s in local]
    assert samples[0].image_path == root / "JPEGImages" / f"{samples[0].image_id}.jpg"
    np.testing.assert_array_equal(read_image(samples[0].image_path), read_image(local[0].image_path))
    (root / "SegmentationClass" / f"{samples[1].image_id}.png").unlink()
    with pytest.raises(ValueError, match=f"{root}/SegmentationClass/{samples[1].image_id}.png: missing mask file"):
        build_samples("voc", str(root), "ImageSets/Segmentation/val.txt", with_masks=True)


def test_an_online_stages_pool_file_and_its_images_are_read_from_a_bucket(s3_store, smoke_data):
    """An online method's spec names `write_pool`'s file in the run directory (a bucket here);
    its Train workers read it back and load each image by its bucket path."""
    from stpp_ray.image_pool import ImagePaths, ImagePool, read_pool, write_pool
    from stpp_ray.methods.online import UnlabeledSet

    root = bucket(s3_store, "datasets", "pool")
    upload(smoke_data / "JPEGImages", root / "JPEGImages")
    pool = ImagePool.read("voc", smoke_data, "ImageSets/Segmentation/val.txt")
    ids = pool.ids.slice(0, 3)
    in_bucket = ImagePool(ids, pa.array([str(root / "JPEGImages" / f"{i}.jpg") for i in ids.to_pylist()]))
    path = write_pool(bucket(s3_store, "run", "selections"), "unlabeled", in_bucket)
    assert path.startswith("s3://") and location(path).exists()
    paths = ImagePaths(read_pool(path))
    assert list(paths) == in_bucket.paths.to_pylist()
    np.testing.assert_array_equal(read_image(paths[1]), read_image(smoke_data / "JPEGImages" / f"{ids[1]}.jpg"))
    views = UnlabeledSet(paths, "unimatch", 32, seed=0)[2]
    assert views["weak"].shape[-2:] == (32, 32)


def _bucket_config(tmp_path: Path, out: str, root: str) -> Path:
    raw = yaml.safe_load(Path(SMOKE).read_text())
    raw["data"].update(root=root, demo=False)
    raw["run"]["output_dir"] = out
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_an_unknown_bucket_is_one_error_naming_it(s3_store, tmp_path, capsys):
    config = _bucket_config(tmp_path, "s3://no-such-bucket/runs/a", str(tmp_path))
    assert main(["run", "-c", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: run.output_dir=s3://no-such-bucket/runs/a: cannot write there: AWS Error "
                          "NO_SUCH_BUCKET") and "bucket does not exist" in err, err
    assert err.count("\n") == 2 and "Traceback" not in err


def test_missing_credentials_are_one_error_that_prints_no_secret(s3_store, tmp_path, monkeypatch, capsys,
                                                                fresh_filesystems):
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-key")
    config = _bucket_config(tmp_path, f"s3://{s3_store.bucket}/runs/denied", str(tmp_path))
    assert main(["run", "-c", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: run.output_dir=s3://{s3_store.bucket}/runs/denied: cannot write there: "
                          "AWS Error INVALID_ACCESS_KEY_ID"), err
    assert "AWS_ACCESS_KEY_ID" in err and "not-the-key" not in err and secret not in err
    assert err.count("\n") == 2
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws either
    storage._process_filesystem.cache_clear()
    with pytest.raises(StorageError, match=f"s3://{s3_store.bucket}/runs/denied: cannot write there: .*Credentials come"):
        storage.check_writable(f"s3://{s3_store.bucket}/runs/denied")


def test_other_schemes_are_refused_by_name_and_file_uris_are_local_paths():
    with pytest.raises(StorageError, match="gs://b/x: gs:// is not supported; s3:// is"):
        location("gs://b/x")
    assert location("file:///tmp/x") == Path("/tmp/x") and location("runs/x") == Path("runs/x")


def test_sweeps_and_comparisons_refuse_a_bucket_by_name(tmp_path):
    from stpp_ray.cluster.tune import run_sweep
    from stpp_ray.orchestration.compare import run_compare

    with pytest.raises(StorageError, match="run.output_dir=s3://b/sweep: a sweep needs a directory"):
        run_sweep(str(Path(SMOKE).parent / "sweep_demo.yaml"), ["run.output_dir=s3://b/sweep"])
    with pytest.raises(StorageError, match="out=s3://b/cmp: a comparison needs a directory"):
        run_compare(smoke_config(tmp_path, tmp_path), [0], "s3://b/cmp", None)
