"""Every method is its registry entry: the config, the command line, the pipeline's graph,
the report and the comparison table ask the method, never compare its name."""

from __future__ import annotations

import pytest

from stpp_ray import methods
from stpp_ray.cli import _compare_lists, build_parser
from stpp_ray.config import ConfigError, load_config
from stpp_ray.methods.base import Stage


class RecordingBuilder:
    """A `StageBuilder` that records the stages a method asks for instead of running them."""

    def __init__(self):
        self.trained: dict[str, dict] = {}

    def data(self):
        return Stage("check_data", "fp", dict)

    def train(self, name, fingerprint, **kw):
        self.trained[name] = kw
        return Stage(name, fingerprint, dict)

    def label(self, name, fingerprint, model_stage, image_ids, scoring):
        return Stage(name, fingerprint, dict)

    def select(self, fingerprint, label_stage):
        return Stage("select", fingerprint, dict)

    def unlabeled_ids(self):
        return []


def test_registered_methods_name_themselves_and_build_their_result_stage():
    labels = set()
    for name in methods.names():
        method = methods.get_method(name)
        assert method.name == name and method.label not in labels
        labels.add(method.label)
        cfg = load_config(None, [f"method={name}", "train.epochs=4", "selection.num_checkpoints=2", "semi.dmt_ratios=[0.5,1]"])
        built = RecordingBuilder()
        names = [s.name for s in method.stages(cfg, built)]
        assert names[0] == "check_data" and method.final_stage(cfg) in names, name
        assert set(method.shared_stages) & set(names) >= {"check_data"}
        for stage, kw in built.trained.items():  # every training stage is told its kind and epochs
            assert kw["epochs"] >= 1 and method.training(kw["kind"], cfg) is not None, (name, stage)
    assert methods.online_names() == ("mean_teacher", "u2pl", "unimatch")


def test_an_unknown_method_is_one_readable_error():
    with pytest.raises(ConfigError, match="method: unknown method 'fixmatch'; expected one of supervised, st, stpp"):
        load_config(None, ["method=fixmatch"])


def test_a_new_method_is_one_registry_line(monkeypatch):
    """A method from another module, registered by one line, is accepted everywhere."""
    from stpp_ray.orchestration.compare import summarize
    from stpp_ray.orchestration.report import final_stage, teacher_stage

    monkeypatch.setitem(methods._REGISTRY, "toy", "tests.helpers.toy_method:TOY")
    cfg = load_config(None, ["method=toy", "train.epochs=3"])
    assert cfg.model.resolved_head() == "stpp" and (final_stage(cfg), teacher_stage(cfg)) == ("teacher", "teacher")
    built = RecordingBuilder()
    assert [s.name for s in methods.get_method("toy").stages(cfg, built)] == ["check_data", "teacher"]
    assert built.trained["teacher"]["epochs"] == 6
    assert _compare_lists(build_parser().parse_args(["compare", "-c", "x.yaml", "--methods", "toy", "stpp"]))[1] == ("toy", "stpp")
    rows = [{"seed": s, "method": "toy", "miou": 0.5, "wall_s": 1.0} for s in (0, 1)]
    assert summarize(rows)[0]["label"] == "SupOnly, twice the epochs"


def test_mean_teachers_own_epochs_move_its_stage_only():
    """`semi.mean_teacher_epochs` sets Mean Teacher's online epochs and fingerprint; U2PL's
    and UniMatch's stages keep `semi.epochs`."""
    def online(name, *overrides):
        built = RecordingBuilder()
        stages = {s.name: s for s in methods.get_method(name).stages(load_config(None, [f"method={name}", "semi.epochs=14", *overrides]), built)}
        return built.trained["online"]["epochs"], stages["online"].fingerprint

    assert online("mean_teacher")[0] == 14
    assert online("mean_teacher", "semi.mean_teacher_epochs=28")[0] == 28
    assert online("mean_teacher", "semi.mean_teacher_epochs=28")[1] != online("mean_teacher")[1]
    for other in ("u2pl", "unimatch"):
        assert online(other, "semi.mean_teacher_epochs=28") == online(other)
        assert online(other)[0] == 14
