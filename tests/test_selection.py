import json
import math

import pytest

from stpp_ray.selection import Selection, num_reliable, select_reliable, selection_from_json, write_selection_json


def test_top_fraction_sorted_by_score():
    scores = {"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.7}
    sel = select_reliable(scores, 0.5)
    assert sel.reliable == ["b", "d"] and sel.unreliable == ["c", "a"]
    assert sel.reliable_fraction == 0.5 and sel.scores == scores and sel.num_reliable == 2


def test_fraction_one_selects_everything():
    sel = select_reliable({"x": 0.2, "y": 0.3}, 1.0)
    assert sel.reliable == ["y", "x"] and sel.unreliable == []


def test_single_image():
    # floor(1 * 1) = 1: the image is reliable
    assert select_reliable({"only": 0.4}, 1.0).reliable == ["only"]
    # floor(0.5 * 1) = 0: the paper's floor rule selects nothing; the image stays unreliable
    sel = select_reliable({"only": 0.4}, 0.5)
    assert sel.reliable == [] and sel.unreliable == ["only"]


def test_floor_and_float_artefacts():
    assert num_reliable(7, 0.5) == 3
    assert num_reliable(100, 0.29) == 29  # 0.29 * 100 == 28.999999999999996 in floats
    assert num_reliable(10, 0.3) == 3


def test_ties_broken_by_id():
    sel = select_reliable({"img3": 0.5, "img1": 0.5, "img2": 0.5, "img0": 0.9}, 0.5)
    assert sel.reliable == ["img0", "img1"] and sel.unreliable == ["img2", "img3"]


def test_nan_scores_sort_last_by_id():
    sel = select_reliable({"z": math.nan, "b": math.nan, "a": 0.0, "c": 0.3}, 0.75)
    assert sel.reliable == ["c", "a", "b"] and sel.unreliable == ["z"]
    assert select_reliable({"n": math.nan, "m": math.nan}, 1.0).reliable == ["m", "n"]


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.01, math.nan])
def test_fraction_out_of_range(fraction):
    with pytest.raises(ValueError, match="reliable_fraction"):
        select_reliable({"a": 1.0}, fraction)


def test_empty_scores():
    with pytest.raises(ValueError):
        select_reliable({}, 0.5)


def _json(sel, tmp_path) -> dict:
    write_selection_json(sel, tmp_path / "selection.json")
    return json.loads((tmp_path / "selection.json").read_text(), parse_constant=pytest.fail)  # no NaN literal


@pytest.mark.parametrize("fraction", [0.5, 0.25, 1.0])
def test_json_round_trip_with_nan_written_in_chunks(tmp_path, monkeypatch, fraction):
    from stpp_ray import selection

    monkeypatch.setattr(selection, "CHUNK", 2)  # several chunks from 5 images
    sel = select_reliable({"a": 0.25, "b": math.nan, "c": 0.75, 'd"q': 0.5, "é": 0.1}, fraction)
    d = _json(sel, tmp_path)
    assert list(d) == ["reliable", "unreliable", "scores", "reliable_fraction"] and list(d["scores"]) == sel.reliable + sel.unreliable
    back = selection_from_json(d)
    assert isinstance(back, Selection)
    assert back.reliable == sel.reliable and back.unreliable == sel.unreliable
    assert back.reliable_fraction == sel.reliable_fraction == fraction
    assert back.scores["a"] == 0.25 and math.isnan(back.scores["b"]) and d["scores"]["b"] is None


def test_from_json_rejects_inconsistent(tmp_path):
    d = _json(select_reliable({"a": 0.1, "b": 0.2}, 0.5), tmp_path)
    d["unreliable"] = []
    with pytest.raises(ValueError):
        selection_from_json(d)
    with pytest.raises(ValueError):
        selection_from_json({"reliable": []})


def _reference_order(scores: dict) -> list[str]:
    """The ranking as a Python sort: NaN last, score descending, ties by id."""
    return sorted(scores, key=lambda i: (math.isnan(scores[i]), 0.0 if math.isnan(scores[i]) else -scores[i], i))


def test_a_table_of_scores_ranks_as_the_python_sort_with_ties_nans_and_unicode_ids():
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(0)
    ids = [f"im{i:03d}" for i in range(300)] + ["Zürich_1", "zurich_2", "ß", "a b"]
    values = rng.choice([0.1, 0.25, 0.5, 0.75, math.nan, 0.0], len(ids)).tolist()  # many ties
    scores = dict(zip(ids, values))
    order = _reference_order(scores)
    table = pa.table({"image_id": ids, "score": values})
    for fraction in (0.1, 0.5, 0.97, 1.0):
        for sel in (select_reliable(scores, fraction), select_reliable(table, fraction)):
            assert sel.reliable + sel.unreliable == order and len(sel.reliable) == num_reliable(len(ids), fraction)
            assert sel.ids(True).to_pylist() == sel.reliable and sel.ids(False).to_pylist() == sel.unreliable


def test_the_ranking_file_gives_the_same_selection_back(tmp_path):
    from stpp_ray.selection import read_ranking, write_ranking

    sel = select_reliable({"a": 0.25, "b": math.nan, "c": 0.75, "d": 0.5}, 0.5)
    back = read_ranking(write_ranking(sel, tmp_path / "selection.arrow"))
    assert (back.reliable, back.unreliable, back.reliable_fraction) == (["c", "d"], ["a", "b"], 0.5)
    assert back.scores.keys() == sel.scores.keys() and math.isnan(back.scores["b"]) and back.scores["c"] == 0.75


def test_a_select_stage_recorded_without_its_ranking_file_runs_again(tmp_path, capsys):
    """An older stpp_ray recorded the ids in the manifest, not `selection.arrow`: the stage
    reruns (it is cheap and deterministic) instead of failing the students downstream."""
    from stpp_ray.methods.base import Stage
    from stpp_ray.orchestration.manifest import Manifest

    manifest = Manifest(tmp_path / "manifest.json")
    stage = Stage("select", "fp", dict, needs=("ranking",))
    manifest.record(stage, {"reliable": ["a"], "unreliable": ["b"], "path": "selection.json"})
    assert Manifest(tmp_path / "manifest.json").done(stage) is None
    assert "recorded by an older stpp_ray (no ranking): recomputing it" in capsys.readouterr().out
    manifest.record(stage, {"ranking": "selection.arrow"})
    assert Manifest(tmp_path / "manifest.json").done(stage) == {"ranking": "selection.arrow"}
