"""The shipped standard split lists (stpp_ray/splits, `builtin:`) and `stpp-ray splits`. No Ray."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from stpp_ray.cli import main
from stpp_ray.datasets import (
    BUILTIN_SPLIT_LAYOUTS,
    BUILTIN_SPLITS_DIR,
    DatasetError,
    build_samples,
    builtin_split_names,
    read_split,
    resolve_path,
)

REPO = Path(__file__).resolve().parents[1]
# Published sizes (ST++ / UniMatch papers): labeled counts per split and the training set.
PASCAL_TRAIN, PASCAL_VAL, CITYSCAPES_TRAIN, CITYSCAPES_VAL = 10582, 1449, 2975, 500
LABELED = {
    "pascal/92": 92, "pascal/183": 183, "pascal/366": 366, "pascal/732": 732, "pascal/1464": 1464,
    "pascal/1_16": 662, "pascal/1_8": 1323, "pascal/1_4": 2646,
    "cityscapes/1_16": 186, "cityscapes/1_8": 372, "cityscapes/1_4": 744, "cityscapes/1_2": 1488,
}
TRAIN_SIZE = {"pascal": PASCAL_TRAIN, "cityscapes": CITYSCAPES_TRAIN}
VAL_SIZE = {"pascal": PASCAL_VAL, "cityscapes": CITYSCAPES_VAL}
EXPECTED_NAMES = sorted([f"{s}/{k}.txt" for s in LABELED for k in ("labeled", "unlabeled")]
                        + ["pascal/val.txt", "cityscapes/val.txt"])
JOBS = sorted((REPO / "jobs").glob("*.yaml"))
SPLIT_KEYS = ("labeled_split", "unlabeled_split", "val_split")


def ids(name: str) -> list[str]:
    return read_split("/nonexistent-root", f"builtin:{name}")


def test_exactly_the_published_lists_are_shipped():
    assert builtin_split_names() == EXPECTED_NAMES


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_every_list_parses_as_one_id_per_line(name):
    entries = ids(name)
    assert all(len(e.split()) == 1 for e in entries)
    text = (BUILTIN_SPLITS_DIR / name).read_text(encoding="utf-8")
    assert text.endswith("\n") and len(text.splitlines()) == len(entries)  # nothing but ids


@pytest.mark.parametrize("split", sorted(LABELED))
def test_counts_disjoint_and_cover_the_training_set(split):
    dataset = split.split("/")[0]
    labeled, unlabeled = set(ids(f"{split}/labeled.txt")), set(ids(f"{split}/unlabeled.txt"))
    assert len(labeled) == LABELED[split]
    assert len(unlabeled) == TRAIN_SIZE[dataset] - LABELED[split]
    assert not labeled & unlabeled
    # The same training set for every split of a dataset.
    reference = set(ids(f"{dataset}/1_16/labeled.txt")) | set(ids(f"{dataset}/1_16/unlabeled.txt"))
    assert labeled | unlabeled == reference
    assert len(reference) == TRAIN_SIZE[dataset]


@pytest.mark.parametrize("dataset", ["pascal", "cityscapes"])
def test_val_is_disjoint_from_train(dataset):
    val = ids(f"{dataset}/val.txt")
    assert len(set(val)) == len(val) == VAL_SIZE[dataset]
    train = set(ids(f"{dataset}/1_16/labeled.txt")) | set(ids(f"{dataset}/1_16/unlabeled.txt"))
    assert not train & set(val)


@pytest.mark.parametrize("size", ["92", "183", "366", "732"])
def test_classic_labeled_images_have_fine_masks(size):
    assert set(ids(f"pascal/{size}/labeled.txt")) <= set(ids("pascal/1464/labeled.txt"))


@pytest.mark.parametrize("name", [n for n in EXPECTED_NAMES if n.startswith("pascal/")])
def test_voc_ids_map_to_voc_paths(name, tmp_path):
    for image_id in ids(name):
        assert len(image_id) == 11 and image_id[4] == "_" and image_id.replace("_", "").isdigit(), image_id
    with pytest.raises(DatasetError) as err:
        build_samples("voc", tmp_path, f"builtin:{name}", with_masks=True)
    first = ids(name)[0]
    assert f"{tmp_path}/JPEGImages/{first}.jpg: missing image file" in err.value.problems
    assert f"{tmp_path}/SegmentationClass/{first}.png: missing mask file" in err.value.problems


@pytest.mark.parametrize("name", [n for n in EXPECTED_NAMES if n.startswith("cityscapes/")])
def test_cityscapes_ids_map_to_cityscapes_paths(name, tmp_path):
    subset = "val" if name.endswith("val.txt") else "train"
    for image_id in ids(name):
        top, city, stem = image_id.split("/")
        assert top == subset and re.fullmatch(rf"{re.escape(city)}_\d{{6}}_\d{{6}}", stem), image_id
    with pytest.raises(DatasetError) as err:
        build_samples("cityscapes", tmp_path, f"builtin:{name}", with_masks=True)
    first = ids(name)[0]
    assert f"{tmp_path}/leftImg8bit/{first}_leftImg8bit.png: missing image file" in err.value.problems
    assert f"{tmp_path}/gtFine/{first}_gtFine_labelIds.png: missing mask file" in err.value.problems


def test_unknown_builtin_name_lists_the_shipped_ones(tmp_path):
    with pytest.raises(DatasetError) as err:
        read_split(tmp_path, "builtin:pascal/93/labeled.txt")
    message = str(err.value)
    assert "unknown builtin split 'builtin:pascal/93/labeled.txt'" in message
    assert "builtin:pascal/92/labeled.txt" in message and "builtin:cityscapes/val.txt" in message


def test_builtin_names_cannot_leave_the_split_folder(tmp_path):
    (tmp_path / "secret.txt").write_text("x\n")
    escape = os.path.relpath(tmp_path / "secret.txt", BUILTIN_SPLITS_DIR)
    with pytest.raises(DatasetError, match="unknown builtin split"):
        resolve_path(tmp_path, "builtin:" + escape)


def test_builtin_resolves_to_the_package_folder_whatever_the_root(tmp_path):
    assert resolve_path(tmp_path, "builtin:pascal/val.txt") == BUILTIN_SPLITS_DIR / "pascal/val.txt"
    assert BUILTIN_SPLITS_DIR == REPO / "stpp_ray" / "splits"


def _job_splits():
    cases = []
    for path in JOBS:
        data = (yaml.safe_load(path.read_text()) or {}).get("data", {})
        for key in SPLIT_KEYS:
            value = data.get(key, "")
            if value.startswith("builtin:"):
                cases.append(pytest.param(data.get("layout", "voc"), value, id=f"{path.name}:{key}"))
    return cases


def test_the_paper_job_configs_use_shipped_splits():
    configs = {p.name for p in JOBS if p.name.startswith(("voc_classic_", "voc_blended_", "cityscapes_"))}
    using = {c.id.split(":")[0] for c in _job_splits()}
    assert len(configs) == 12 and configs <= using


@pytest.mark.parametrize("layout, value", _job_splits())
def test_job_config_splits_exist_and_match_its_layout(layout, value):
    name = value[len("builtin:"):]
    assert (BUILTIN_SPLITS_DIR / name).is_file()
    assert BUILTIN_SPLIT_LAYOUTS[name.split("/")[0]] == layout


@pytest.mark.parametrize("path", [p for p in JOBS if p.name.startswith(("voc_", "cityscapes_"))],
                         ids=lambda p: p.name)
def test_job_config_labeled_and_unlabeled_are_one_split(path):
    data = yaml.safe_load(path.read_text())["data"]
    labeled, unlabeled = data["labeled_split"], data["unlabeled_split"]
    assert labeled.endswith("/labeled.txt") and unlabeled == labeled.replace("/labeled.txt", "/unlabeled.txt")
    stem = path.stem.removeprefix("voc_classic_").removeprefix("voc_blended_").removeprefix("cityscapes_")
    assert labeled.split("/")[-2] == stem


# ---- the CLI -----------------------------------------------------------------


def test_cli_lists_every_split_with_counts_and_config_values(capsys):
    assert main(["splits"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("pascal/", "cityscapes/"))}
    for split, labeled in LABELED.items():
        dataset = split.split("/")[0]
        name, layout, n_labeled, n_unlabeled, *config = rows[split]
        assert layout == BUILTIN_SPLIT_LAYOUTS[dataset]
        assert int(n_labeled) == labeled and int(n_unlabeled) == TRAIN_SIZE[dataset] - labeled
        assert config == [f"data.labeled_split=builtin:{split}/labeled.txt",
                          f"data.unlabeled_split=builtin:{split}/unlabeled.txt"]
    assert rows["pascal/val"][2:] == [str(PASCAL_VAL), "-", "data.val_split=builtin:pascal/val.txt"]
    assert rows["cityscapes/val"][2:] == [str(CITYSCAPES_VAL), "-", "data.val_split=builtin:cityscapes/val.txt"]


def test_cli_explains_both_dataset_layouts(capsys):
    assert main(["splits"]) == 0
    out = capsys.readouterr().out
    for fragment in ["JPEGImages/<id>.jpg", "SegmentationClass/<id>.png", "SBD",
                     "leftImg8bit/{train,val}/<city>/", "_gtFine_labelIds.png", "_gtFine_labelTrainIds.png"]:
        assert fragment in out
