import math

import pytest

from stpp_ray.orchestration.compare import oracle_epochs, render_table, summarize
from stpp_ray.config import load_config


def test_summary_statistics_per_method():
    rows = [{"seed": seed, "method": "stpp", "miou": v, "wall_s": 10.0} for seed, v in enumerate((0.40, 0.44, 0.42))]
    rows.append({"seed": 1, "method": "supervised", "miou": 0.30, "wall_s": 5.0})
    summary = {s["method"]: s for s in summarize(rows)}
    assert summary["stpp"]["miou_mean"] == pytest.approx(0.42)
    assert summary["stpp"]["miou_std"] == pytest.approx(0.02)
    assert (summary["stpp"]["miou_min"], summary["stpp"]["miou_max"]) == (0.40, 0.44)
    assert math.isnan(summary["supervised"]["miou_std"])  # one seed: no spread
    assert summary["stpp"]["gains"] == [pytest.approx(0.14)] and summary["supervised"]["gains"] == []  # seed 1 only
    table = render_table(summarize(rows))
    assert "| ST++ | 42.00 ± 2.00 | 40.00 – 44.00 | +14.0 | 3 | – | – | 10 s |" in table  # rows without budgets
    assert table.index("SupOnly") < table.index("ST++")


def test_rows_state_their_budget_and_the_long_suponly_matches_the_longest_method(tmp_path):
    from stpp_ray.orchestration.compare import LONG_SUPONLY, _budget, _write, long_suponly_epochs

    report = {"stages": [{"name": "check_data", "wall_s": 1.0},
                         {"name": "teacher", "wall_s": 50.0, "steps": 200, "train_images": 3200, "reused": True},
                         {"name": "student1", "wall_s": 30.0, "steps": 300, "train_images": 4800}]}
    assert _budget(report) == {"wall_s": 81.0, "steps": 500, "images_per_step": 16.0}
    rows = [{"seed": 0, "method": "supervised", "miou": 0.30, **_budget({"stages": report["stages"][:2]})},
            {"seed": 0, "method": "stpp", "miou": 0.40, **_budget(report)},
            {"seed": 0, "method": LONG_SUPONLY, "miou": 0.33, "wall_s": 60.0, "steps": 500, "images_per_step": 16.0}]
    table = render_table(summarize(rows))
    assert "| SupOnly (teacher) | 30.00 | 30.00 – 30.00 | – | 1 | 200 | 16.0 | 51 s |" in table
    assert "| SupOnly, as many steps as the longest method | 33.00 | 33.00 – 33.00 | +3.0 | 1 | 500 | 16.0 | 60 s |" in table
    cfg = load_config(None, ["train.epochs=100"])
    assert long_suponly_epochs(cfg, 200, 500) == 250 and long_suponly_epochs(cfg, 200, 150) == 100
    _write(tmp_path, cfg, rows, [0])
    assert (tmp_path / "compare.png").stat().st_size > 1000 and "![mean ± std per method](compare.png)" in \
        (tmp_path / "compare.md").read_text()


def test_oracle_gets_as_many_steps_as_the_teacher(tmp_path):
    (tmp_path / "l.txt").write_text("\n".join(f"a{i}" for i in range(32)))
    (tmp_path / "f.txt").write_text("\n".join(f"a{i}" for i in range(512)))
    cfg = load_config(None, ["data.labeled_split=l.txt", "train.epochs=100"])
    # The teacher lists its 32 images twice (ST++ below 200), the oracle its 512 once:
    # 100 epochs x 64 = 6400 images = 12.5 oracle epochs.
    assert oracle_epochs(cfg, tmp_path, "f.txt") == round(100 * 64 / 512)
    (tmp_path / "f.txt").write_text("\n".join(f"a{i}" for i in range(150)))
    assert oracle_epochs(cfg, tmp_path, "f.txt") == round(100 * 64 / 300)  # both lists doubled


def test_oracle_epochs_count_only_the_images_a_subset_keeps(tmp_path):
    (tmp_path / "l.txt").write_text("\n".join(f"a{i}" for i in range(300)))
    (tmp_path / "f.txt").write_text("\n".join(f"a{i}" for i in range(900)))
    cfg = load_config(None, ["data.labeled_split=l.txt", "train.epochs=80", "data.max_images=16"])
    assert oracle_epochs(cfg, tmp_path, "f.txt") == 80  # both lists cut to 16 images


def test_overrides_may_follow_the_seed_and_method_lists():
    """The README's `stpp-ray compare ... --seeds 0 1 2 ray.num_workers=1 ...`: argparse gives
    every word after `--seeds` to the seeds."""
    from stpp_ray.cli import _compare_lists, build_parser

    parse = lambda *argv: _compare_lists(build_parser().parse_args(["compare", "-c", "x.yaml", *argv]))  # noqa: E731
    assert parse("--seeds", "0", "1", "ray.num_workers=1", "ray.cpus_per_worker=2") == (
        [0, 1], tuple(parse()[1]), ["ray.num_workers=1", "ray.cpus_per_worker=2"])
    assert parse("train.epochs=3", "--methods", "stpp", "u2pl", "semi.epochs=2", "--seeds", "4") == (
        [4], ("stpp", "u2pl"), ["train.epochs=3", "semi.epochs=2"])
    with pytest.raises(ValueError, match="--seeds: not an integer: 'x'"):
        parse("--seeds", "0", "x")
    with pytest.raises(ValueError, match="--methods: unknown method 'nope'"):
        parse("--methods", "nope")
