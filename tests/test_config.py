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
    ("train.batch_size=1", "smaller than ray.num_workers (2)"),
    ("ray.num_workers=[4,2]", "a range [min, max] with 1 <= min <= max"),
    ("ray.num_workers=[1,32]", "smaller than ray.num_workers (32)"),
    ("model.backbone=vgg", "model.backbone"),
    ("method=magic", "method"),
    ("sweep.trial_cpus=0", "sweep.trial_cpus = 0 needs sweep.trial_memory_mib > 0"),
])
def test_impossible_values_are_refused(override, fragment):
    base = ["train.epochs=4", "ray.num_workers=2", "train.batch_size=16"]
    with pytest.raises(ConfigError) as err:
        load_config(None, base + [override])
    assert fragment in str(err.value)


def test_a_worker_range_is_elastic_and_a_batch_need_not_divide():
    elastic = load_config(None, ["ray.num_workers=[1, 8]"]).ray
    assert elastic.num_workers == (1, 8) and elastic.worker_range() == (1, 8) and elastic.max_workers == 8
    assert load_config(None, ["ray.num_workers=3", "train.batch_size=16"]).ray.worker_range() == (3, 3)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])


def test_max_images_defaults_to_every_image_and_refuses_negatives():
    assert load_config(None).data.max_images == 0
    assert load_config(None, ["data.max_images=16"]).data.max_images == 16
    with pytest.raises(ConfigError, match="data.max_images"):
        load_config(None, ["data.max_images=-1"])


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


RECIPE_JOBS = [p for p in JOBS if p.name.startswith(("voc_", "cityscapes_"))]


@pytest.mark.parametrize("path", RECIPE_JOBS, ids=[p.name for p in RECIPE_JOBS])
def test_shipped_recipes_use_st_plus_plus_output_stride(path):
    """ST++'s code: ResNet with replace_stride_with_dilation=[False, True, True] (stride 8)
    and ASPP rates (12, 24, 36) (LiheYoung/ST-PlusPlus model/backbone/resnet.py, deeplabv3plus.py)."""
    cfg = load_config(path)
    assert cfg.method == "stpp" and cfg.model.output_stride == 8
    assert "output stride 8 with ASPP rates (12, 24, 36)" in path.read_text()


@pytest.mark.parametrize("overrides, refused", [
    (["train.batch_size=1"], True),
    (["train.batch_size=2", "ray.num_workers=2", "train.sync_batchnorm=false"], True),
    (["train.batch_size=2", "ray.num_workers=2"], False),  # synchronised BN: 2 images per BatchNorm
    (["method=u2pl", "train.batch_size=1"], True),  # its warm-up epochs train on the labeled batch alone
    (["method=u2pl", "train.batch_size=1", "semi.u2pl_warmup_epochs=0"], False),
    (["method=unimatch", "train.batch_size=1"], False),  # labeled and unlabeled images share each forward
    (["method=mean_teacher", "train.batch_size=1"], False),
])
def test_one_image_per_batchnorm_is_refused_where_it_occurs(overrides, refused):
    base = ["train.epochs=4", "selection.num_checkpoints=2"]
    if not refused:
        load_config(None, base + overrides)
        return
    with pytest.raises(ConfigError, match="needs at least 2 images per BatchNorm") as err:
        load_config(None, base + overrides)
    assert len(str(err.value).splitlines()) == 2, "one message"


def test_model_head_auto_follows_the_method():
    from stpp_ray.weights import architecture

    assert load_config(None, []).model.resolved_head() == "stpp"
    assert load_config(None, ["method=unimatch"]).model.resolved_head() == "unimatch"
    assert load_config(None, ["method=unimatch", "model.head=stpp"]).model.resolved_head() == "stpp"
    assert load_config(None, ["method=dmt", "model.head=unimatch"]).model.resolved_head() == "unimatch"
    cfg = load_config(None, [])
    cfg.method = "unimatch"  # validated assignment re-resolves
    assert architecture(cfg.model, 3)["head"] == "unimatch"
    assert Config.model_validate(cfg.model_dump()).model.resolved_head() == "unimatch"
    assert cfg.model_copy(deep=True).model.resolved_head() == "unimatch"


def test_dmt_defaults_are_dmt_recipe():
    """voldemortX/DST-CBC segmentation/dmt-voc-20-1.sh (ep=4, lr=0.001) and main.py
    (--weight-decay 0.0005, one learning rate for backbone and classifier)."""
    cfg = load_config(None, ["method=dmt"])
    assert (cfg.semi.dmt_phase_epochs, cfg.semi.dmt_lr, cfg.semi.dmt_head_lr_multiplier,
            cfg.semi.dmt_weight_decay) == (4, 0.001, 1.0, 5e-4)
    from stpp_ray.methods.dmt import phase_epochs

    assert phase_epochs(cfg) == 4
