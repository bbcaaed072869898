from pathlib import Path

import pytest
import yaml

from stpp_ray.config import Config, ConfigError, checkpoint_epochs, load_config, reference_markdown

JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.yaml"))


def write(tmp_path, data) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_every_shipped_job_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_shipped_configs_include_the_contract_ones():
    names = {p.name for p in JOBS}
    assert {"demo.yaml", "smoke.yaml"} <= names


def test_overrides_set_nested_keys_with_yaml_types(tmp_path):
    cfg = load_config(write(tmp_path, {"train": {"epochs": 9}}),
                      ["train.epochs=12", "selection.reliable_fraction=0.25", "ray.use_gpu=false",
                       "label.tta_scales=[1.0, 2.0]", "run.output_dir=/tmp/x"])
    assert cfg.train.epochs == 12
    assert cfg.selection.reliable_fraction == 0.25
    assert cfg.label.tta_scales == [1.0, 2.0]
    assert cfg.run.output_dir == "/tmp/x"


def test_unknown_key_is_rejected_naming_key_and_file(tmp_path):
    path = write(tmp_path, {"train": {"epoch": 3}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.epoch" in str(err.value) and "unknown key" in str(err.value)
    assert str(path) in str(err.value)


def test_unknown_override_section_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="trian"):
        load_config(None, ["trian.epochs=3"])


@pytest.mark.parametrize("override, fragment", [
    ("selection.reliable_fraction=0", "selection.reliable_fraction"),
    ("selection.reliable_fraction=1.5", "selection.reliable_fraction"),
    ("selection.num_checkpoints=5", "must not exceed train.epochs"),
    ("train.batch_size=15", "divisible by ray.num_workers"),
    ("model.backbone=vgg", "model.backbone"),
    ("method=magic", "method"),
])
def test_impossible_values_are_refused(override, fragment):
    base = ["train.epochs=4", "ray.num_workers=2", "train.batch_size=16"]
    with pytest.raises(ConfigError) as err:
        load_config(None, base + [override])
    assert fragment in str(err.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_checkpoint_epochs_follow_the_paper():
    assert checkpoint_epochs(80, 3) == [26, 53, 80]
    assert checkpoint_epochs(30, 3) == [10, 20, 30]
    assert checkpoint_epochs(5, 5) == [1, 2, 3, 4, 5]
    assert checkpoint_epochs(7, 1) == [7]


def test_fingerprint_tracks_only_the_named_keys():
    a = load_config(None, ["train.epochs=10"])
    b = load_config(None, ["train.epochs=10", "ray.num_workers=2"])
    c = load_config(None, ["train.epochs=11"])
    assert a.fingerprint("train", "model") == b.fingerprint("train", "model")
    assert a.fingerprint("train") != c.fingerprint("train")
    assert a.fingerprint("model") == c.fingerprint("model")


def test_every_field_is_documented():
    table = reference_markdown()
    assert "| `selection.reliable_fraction` |" in table
    assert "None |" not in table  # a field without a description would render 'None'


def test_readme_configuration_reference_is_in_sync():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert reference_markdown() in readme, "README is stale: paste the output of python -c 'from stpp_ray.config import reference_markdown as r; print(r())'"
