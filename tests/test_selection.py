import json
import math

import pytest

from stpp_ray.selection import Selection, num_reliable, select_reliable, selection_from_json, selection_to_json


def test_top_fraction_sorted_by_score():
    scores = {"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.7}
    sel = select_reliable(scores, 0.5)
    assert sel.reliable == ["b", "d"] and sel.unreliable == ["c", "a"]
    assert sel.reliable_fraction == 0.5 and sel.scores == scores


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


def test_json_round_trip_with_nan():
    sel = select_reliable({"a": 0.25, "b": math.nan, "c": 0.75}, 0.5)
    text = json.dumps(selection_to_json(sel), allow_nan=False)
    back = selection_from_json(json.loads(text))
    assert isinstance(back, Selection)
    assert back.reliable == sel.reliable and back.unreliable == sel.unreliable
    assert back.reliable_fraction == sel.reliable_fraction
    assert back.scores["a"] == 0.25 and math.isnan(back.scores["b"])


def test_from_json_rejects_inconsistent():
    d = selection_to_json(select_reliable({"a": 0.1, "b": 0.2}, 0.5))
    d["unreliable"] = []
    with pytest.raises(ValueError):
        selection_from_json(d)
    with pytest.raises(ValueError):
        selection_from_json({"reliable": []})
