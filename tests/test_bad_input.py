"""A corpus of broken inputs through the command line: one readable error naming the
culprit, no traceback unless --debug, exit code 1, and an earlier run left untouched."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from stpp_ray.weights import save_weights
from stpp_ray.cli import main
from stpp_ray.models import build_model

from tests.helpers import SMOKE

LABELED = "ImageSets/Segmentation/1_16/labeled.txt"
UNLABELED = "ImageSets/Segmentation/1_16/unlabeled.txt"


def ids(root: Path, split: str) -> list[str]:
    return [line.strip() for line in (root / split).read_text().splitlines() if line.strip()]


def image(root: Path, image_id: str) -> Path:
    return next((root / "JPEGImages").glob(f"{image_id}.*"))


def mask(root: Path, image_id: str) -> Path:
    return root / "SegmentationClass" / f"{image_id}.png"


def truncate_jpeg(root, cfg):
    path = image(root, ids(root, LABELED)[0])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path.name


def out_of_range_labels(root, cfg):
    path = mask(root, ids(root, LABELED)[1])
    m = np.array(Image.open(path))
    m[0, 0] = 9  # num_classes is 6
    Image.fromarray(m.astype(np.uint8), mode="L").save(path)
    return path.name


def size_mismatch(root, cfg):
    path = mask(root, ids(root, LABELED)[2])
    m = np.array(Image.open(path))
    Image.fromarray(np.ascontiguousarray(m[:, :-3]).astype(np.uint8), mode="L").save(path)
    return "differs from image size"


def rgb_mask(root, cfg):
    path = mask(root, ids(root, LABELED)[0])
    m = np.array(Image.open(path))
    Image.fromarray(np.stack([m] * 3, axis=-1).astype(np.uint8), mode="RGB").save(path)
    return "RGB mask"


def missing_file(root, cfg):
    image(root, ids(root, UNLABELED)[5]).unlink()
    return ids(root, UNLABELED)[5]


def duplicate_ids(root, cfg):
    split = root / LABELED
    first = ids(root, LABELED)[0]
    split.write_text(split.read_text() + first + "\n")
    return f"duplicate id '{first}'"


def empty_unlabeled_split(root, cfg):
    (root / UNLABELED).write_text("\n")
    return "unlabeled.txt: split file is empty"


def overlapping_splits(root, cfg):
    split = root / UNLABELED
    split.write_text(split.read_text() + ids(root, LABELED)[3] + "\n")
    return f"both labeled and unlabeled: {ids(root, LABELED)[3]}"


def non_image_file(root, cfg):
    path = image(root, ids(root, UNLABELED)[0])
    path.write_text("this is not an image\n")
    return f"{path.name}: not an image file"


def zero_byte_file(root, cfg):
    path = mask(root, ids(root, LABELED)[1])
    path.write_bytes(b"")
    return f"{path.name}: empty (zero-byte)"


def unknown_config_key(root, cfg):
    cfg["train"]["epochz"] = 3
    return "train.epochz: unknown key"


def reliable_fraction_zero(root, cfg):
    cfg["selection"]["reliable_fraction"] = 0
    return "selection.reliable_fraction"


def more_checkpoints_than_epochs(root, cfg):
    cfg["selection"]["num_checkpoints"] = 5
    return "must not exceed train.epochs (2)"


def weights_of_another_architecture(root, cfg):
    other = build_model("deeplabv3plus", "resnet18", 3, aspp_channels=8)
    path = root / "resnet18_weights.pt"
    torch.save(other.state_dict(), path)
    cfg["model"]["pretrained"] = str(path)
    return "do not fit backbone 'tiny'"


def not_a_weights_file(root, cfg):
    path = root / "weights.pt"
    path.write_text("definitely not torch")
    cfg["model"]["pretrained"] = str(path)
    return "weights.pt: not a readable PyTorch weights file"


CASES = [truncate_jpeg, out_of_range_labels, size_mismatch, rgb_mask, missing_file, duplicate_ids,
         empty_unlabeled_split, overlapping_splits, non_image_file, zero_byte_file, unknown_config_key,
         reliable_fraction_zero, more_checkpoints_than_epochs, weights_of_another_architecture, not_a_weights_file]


def digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture()
def broken_setup(smoke_data, tmp_path):
    """A private copy of the smoke data, its config, and an 'earlier run' to protect."""
    root = tmp_path / "data"
    shutil.copytree(smoke_data, root)
    cfg = yaml.safe_load(Path(SMOKE).read_text())
    out = tmp_path / "run"
    (out / "teacher").mkdir(parents=True)
    (out / "manifest.json").write_text(json.dumps({"stages": {"teacher": {"fingerprint": "x", "result": {}}}}))
    (out / "report.json").write_text('{"method": "stpp"}')
    (out / "teacher" / "final.pt").write_bytes(b"weights of an earlier run")
    cfg["data"].update(root=str(root), demo=False)
    cfg["run"]["output_dir"] = str(out)
    return root, cfg, out, tmp_path / "config.yaml"


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_broken_input_gives_one_readable_error(case, broken_setup, capsys):
    root, cfg, out, config_path = broken_setup
    before = digest(out)
    culprit = case(root, cfg)
    config_path.write_text(yaml.safe_dump(cfg))
    code = main(["run", "-c", str(config_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ") and culprit in err, err
    assert "Traceback" not in err and "--debug" in err
    assert digest(out) == before


def test_debug_shows_the_traceback(broken_setup, capsys):
    root, cfg, _, config_path = broken_setup
    truncate_jpeg(root, cfg)
    config_path.write_text(yaml.safe_dump(cfg))
    assert main(["--debug", "run", "-c", str(config_path)]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_predict_refuses_a_file_that_is_not_an_stpp_ray_checkpoint(tmp_path, capsys):
    foreign = tmp_path / "foreign.pt"
    save_weights(tmp_path / "ok.pt", build_model("deeplabv3plus", "tiny", 3, aspp_channels=8),
                 {"name": "deeplabv3plus", "backbone": "tiny", "output_stride": 16, "aspp_channels": 8, "num_classes": 3})
    torch.save({"weight": torch.zeros(2)}, foreign)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    code = main(["predict", "--checkpoint", str(foreign), "--out", str(tmp_path / "p"), str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 1 and "foreign.pt: not an stpp_ray weight file" in err and "Traceback" not in err
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())


def test_a_sampled_check_reads_the_labeled_files_and_a_seeded_share_of_the_pool(broken_setup):
    """`data.check_images: sample`: a broken unlabeled image is found only when drawn; labeled
    files are always read."""
    from stpp_ray.config import config_from_dict
    from stpp_ray.datasets import DatasetError, sample_for_check
    from stpp_ray.orchestration.pipeline import Pipeline

    root, raw, _, _ = broken_setup
    raw["data"].update(check_images="sample", check_sample_size=3)
    pipeline = Pipeline(config_from_dict(raw, "test"))
    pipeline.prepare_data()
    drawn = sample_for_check(pipeline.unlabeled, 3, pipeline.cfg.run.seed)
    assert drawn == sample_for_check(pipeline.unlabeled, 3, pipeline.cfg.run.seed) and len(drawn) == 3
    not_drawn = next(s for s in pipeline.unlabeled if s not in drawn)
    not_drawn.image_path.write_bytes(b"")
    result = pipeline.data().run()
    assert result["unlabeled_checked"] == 3 and result["unlabeled"] == len(pipeline.unlabeled)
    drawn[1].image_path.write_bytes(b"")
    with pytest.raises(DatasetError, match=drawn[1].image_path.name):
        pipeline.data().run()
    shutil.copy(image(root, ids(root, LABELED)[3]), drawn[1].image_path)  # any valid image
    truncate_jpeg(root, raw)
    with pytest.raises(DatasetError, match="dataset check failed"):
        pipeline.data().run()


def test_a_large_pool_is_checked_by_a_ray_data_pass_that_names_every_broken_file(broken_setup, ray_local, monkeypatch):
    """`data.check_on_cluster_from`: from that many unlabeled images the check runs as Ray Data
    tasks across the cluster, with the same one error listing every problem."""
    from stpp_ray.cluster import check
    from stpp_ray.config import config_from_dict
    from stpp_ray.datasets import DatasetError
    from stpp_ray.orchestration.pipeline import Pipeline

    monkeypatch.setattr(check, "MIN_IMAGES_PER_TASK", 16)  # several tasks from the smoke pool
    monkeypatch.setattr(check, "MAX_IMAGES_PER_TASK", 16)
    _, raw, _, _ = broken_setup
    raw["data"].update(check_on_cluster_from=1)
    pipeline = Pipeline(config_from_dict(raw, "test"))
    pipeline.prepare_data()
    result = pipeline.data().run()
    assert result["checked_on"] == "cluster" and result["unlabeled_checked"] == len(pipeline.unlabeled) > 16
    assert result["check_images_per_s"] > 0 and result["check_tasks"] == -(-len(pipeline.unlabeled) // 16)
    broken = [pipeline.unlabeled[3], pipeline.unlabeled[len(pipeline.unlabeled) - 1]]  # in two tasks
    for sample in broken:
        sample.image_path.write_bytes(b"")
    with pytest.raises(DatasetError, match=r"dataset check failed \(2 problem\(s\)\)") as err:
        pipeline.data().run()
    assert all(str(s.image_path) in str(err.value) for s in broken)


def test_a_check_task_is_about_a_quarter_of_a_cpus_share_within_bounds():
    from stpp_ray.cluster.check import images_per_task

    assert images_per_task(200_000, 2) == 8192 and images_per_task(200_000, 64) == 782
    assert images_per_task(1_000, 2) == 256 and images_per_task(10, 0) == 256
