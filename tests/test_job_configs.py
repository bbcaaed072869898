"""Every shipped job config runs end to end, with its own settings, on the shared Ray test cluster.

One test per file under jobs/ (and per KubeRay manifest, whose entrypoint command is read
from the manifest): the same `stpp-ray run` (or `stpp-ray sweep`) a user types, on CPU, a
few steps of every stage. Only these are overridden: the data root (a small generated data
set in the config's layout, for the first `MAX_IMAGES` ids of each of the config's own split
lists, through `data.max_images`), the image size, the epochs (the teacher keeps K epochs so
that its K checkpoints exist), the worker count and resources (to fit 2 one-CPU nodes), and
the output directory. Model, backbone (ImageNet weights: a fake file in the torchvision
cache, see `fake_imagenet`), output stride, loader workers, TTA, evaluation and split files
are the config's. The recorded config must equal the file's except for those keys.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from stpp_ray.cli import build_parser, main
from stpp_ray.config import DataConfig, load_config
from stpp_ray.datasets import CITYSCAPES_LUT, check_samples, read_mask, read_split, split_entry_id
from stpp_ray.orchestration.pipeline import Pipeline

from tests.helpers.layout_data import LayoutData, LayoutMismatch

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
MAX_IMAGES = 16          # >= the shipped configs' global batch of 16, so that every stage takes a step
# Training crop and data.base_size per layout, in the proportions of the real data (see
# layout_data for the image sizes): VOC photos up to 500 pixels, base 400, crop 321 (here up to
# 48, base 40, crop 32); Cityscapes frames of 1024 x 2048, base 2048, crop 721 (here 32 x 64,
# base 64, crop 24): the crop, and Cityscapes' sliding window, stay smaller than the image.
CROP_AND_BASE = {"voc": (32, 40), "cityscapes": (24, 64)}
TEST_WORKERS = 2         # the test cluster: two nodes of one CPU each
# Files whose resolved configs differ only in their split lists (the VOC files, the Cityscapes
# files) run the pipeline once per family; the others generate the data of their own split lists
# and run the data stage on it (every file and image checked), no training. Nothing else differs:
# each split is cut to MAX_IMAGES ids, so a family's runs would train on the same counts with the
# same settings. `STPP_JOB_CONFIGS=all` trains every file (36 minutes on this 2-core machine at 93c354c).
FAMILIES = os.environ.get("STPP_JOB_CONFIGS", "families") == "families"
FAKE_WEIGHTS_SEED = 20240601
# The fake file's BatchNorm layers have counted this many batches; training adds its steps, so a
# trained model's count shows that it started from the file (a fresh init starts at 0).
FAKE_BATCHES_TRACKED = 7_000_000

# torchvision reads ImageNet weights from $TORCH_HOME/hub/checkpoints/<file name of the url>
# when that file exists, without downloading (torch.hub.load_state_dict_from_url checks the
# hash only of a download). Ray's worker processes inherit the environment of the nodes,
# which start with the first test that uses Ray, after collection: hence at import time.
FAKE_TORCH_HOME = Path(tempfile.gettempdir()) / f"stpp_ray_test_torch_home_{os.getpid()}"
os.environ["TORCH_HOME"] = str(FAKE_TORCH_HOME)


def _cases() -> list:
    # The smoke file's run is `make test-fast`'s one pipeline end to end.
    cases = [pytest.param(("file", str(p)), id=p.name, marks=[pytest.mark.smoke] if p.name == "smoke.yaml" else [])
             for p in sorted(JOBS.glob("*.yaml"))]
    cases += [pytest.param(("manifest", str(p)), id=f"kuberay/{p.name}") for p in sorted((JOBS / "kuberay").glob("*.yaml"))]
    return cases


def command_of(case: tuple[str, str]) -> tuple[str, Path, list[str]]:
    """(subcommand, config path, the command's own overrides) a user runs for this file.
    A config with a `sweep:` section is run by `stpp-ray sweep`; a manifest by its entrypoint."""
    kind, path = case
    if kind == "file":
        raw = yaml.safe_load(Path(path).read_text())
        return ("sweep" if "sweep" in raw else "run"), Path(path), []
    (job,) = [d for d in yaml.safe_load_all(Path(path).read_text()) if d and d.get("kind") == "RayJob"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "stpp-ray", f"{path}: the entrypoint is not an stpp-ray command: {argv}"
    args = build_parser().parse_args(argv[1:])
    # The job runs in its runtime env's working_dir, the image's copy of this repository.
    working_dir = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"]
    assert working_dir == "/home/ray/stpp_ray", f"{path}: unexpected working_dir {working_dir}"
    return args.command, REPO / args.config, list(args.overrides)


# ---- session-wide: fake ImageNet weights, generated data sets --------------------------------

@pytest.fixture(scope="session")
def fake_imagenet(ray_local):
    """`weights(backbone)` writes (once) a randomly initialised torchvision state dict where
    torchvision looks for that backbone's ImageNet weights, and returns it."""
    from stpp_ray.models import _TORCHVISION  # the constructors and weights enums models.py loads

    @ray_local.remote
    def torch_home() -> str | None:
        return os.environ.get("TORCH_HOME")

    assert ray_local.get(torch_home.remote()) == str(FAKE_TORCH_HOME), (
        "the Ray nodes started before this module set TORCH_HOME; their workers would not find the fake weights")
    written: dict[str, dict] = {}

    def weights(backbone: str) -> dict:
        if backbone not in written:
            ctor, enum = _TORCHVISION[backbone]
            path = FAKE_TORCH_HOME / "hub" / "checkpoints" / Path(urlparse(enum.url).path).name
            torch.manual_seed(FAKE_WEIGHTS_SEED)
            state = ctor(weights=None).state_dict()
            for key in state:
                if key.endswith("num_batches_tracked"):
                    state[key] = torch.tensor(FAKE_BATCHES_TRACKED)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, path)
            written[backbone] = state
        return written[backbone]

    yield weights
    shutil.rmtree(FAKE_TORCH_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def layout_data(tmp_path_factory) -> LayoutData:
    return LayoutData(tmp_path_factory.mktemp("layout_data"))


@pytest.fixture(scope="session")
def finished_runs() -> dict[str, Path]:
    """Run directories of the configs run so far, by their resolved config (output dir aside),
    and by their family (the resolved config without split lists)."""
    return {}


@pytest.fixture(scope="session")
def demo_roots(tmp_path_factory):
    """One directory per distinct demo data set (the demo configs generate theirs there)."""
    base = tmp_path_factory.mktemp("demo_data")

    def root(d: DataConfig) -> Path:
        return base / f"seed{d.demo_seed}_{d.demo_num_train}_{d.demo_num_val}_{d.demo_image_size}"

    return root


# ---- the overrides ------------------------------------------------------------------------

def max_checkpoints(command: str, cfg) -> int:
    """K, or in a sweep the largest K of the grid: the teacher's epochs, so that each checkpoint exists."""
    ks = [cfg.selection.num_checkpoints]
    if command == "sweep":
        ks += list(cfg.sweep.params.get("selection.num_checkpoints", []))
    return max(ks)


def overrides_for(command: str, cfg, root: Path, out: Path) -> dict[str, object]:
    """The keys this test changes, and to what."""
    o: dict[str, object] = {
        "data.root": str(root),
        "data.max_images": MAX_IMAGES,
        "train.epochs": max_checkpoints(command, cfg),
        "train.student_epochs": 1,
        "semi.epochs": 1,
        "ray.num_workers": min(cfg.ray.max_workers, TEST_WORKERS),
        "ray.use_gpu": False,
        "ray.cpus_per_worker": 1,
        "label.cpus_per_actor": 1,
        "run.output_dir": str(out),
    }
    if not cfg.data.demo:  # the demo configs' generated images are already small
        o["data.crop_size"], base = CROP_AND_BASE[cfg.data.layout]
        if "base_size" in DataConfig.model_fields:
            o["data.base_size"] = base
    if command == "sweep":
        # The test cluster's CPUs are all its workers' (a 0-CPU head and two 1-CPU nodes): drivers that
        # hold none let the config's own max_concurrent_trials run at once.
        o["sweep.trial_cpus"], o["sweep.trial_memory_mib"] = 0, 512
    return o


def as_args(overrides: dict[str, object]) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in overrides.items()]


def flat(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "params":  # sweep.params is one value
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def jsonable(cfg) -> dict:
    return json.loads(json.dumps(cfg.model_dump(), default=str))


# ---- what a finished run must show -------------------------------------------------------

STAGES = {
    "supervised": ["check_data", "teacher"],
    "st": ["check_data", "teacher", "label_teacher", "student"],
    "stpp": ["check_data", "teacher", "label_teacher", "select", "student1", "label_student1", "student2"],
}
TRAIN_STAGES = ("teacher", "student", "student1", "student2")


def parquet_ids(directory: Path) -> list[str]:
    files = sorted(directory.glob("*.parquet"))
    assert files, f"no pseudo-label shards in {directory}"
    return [i for f in files for i in pq.read_table(f, columns=["image_id"]).column("image_id").to_pylist()]


def batches_tracked(state: dict, prefix: str = "") -> int:
    """The first BatchNorm's batch count."""
    return int(next(v for k, v in state.items() if k.startswith(prefix) and k.endswith("num_batches_tracked")))


def check_run(run_dir: Path, cfg, own_cfg, changed: set[str], ids: dict[str, list[str]], fake_state: dict | None,
              shared_dir: Path | None = None, reused: bool = False) -> dict:
    """Assertions on one finished run directory (a trial's, in a sweep: `shared_dir` then
    holds its teacher and teacher labels). `reused`: every stage was done by an earlier run."""
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "complete" and report["method"] == own_cfg.method
    recorded = flat(report["config"])
    assert recorded == flat(jsonable(cfg)), "the run's recorded config is not the file's with the test's overrides"
    differs = {k for k, v in flat(jsonable(own_cfg)).items() if recorded[k] != v}
    assert differs <= changed, f"keys other than the test's overrides differ from the file: {differs - changed}"
    if "eval" in report:  # how the mIoU was measured, e.g. Cityscapes' sliding window
        assert report["eval"]["mode"] == recorded["eval.mode"] == report["final"]["eval_mode"]

    names = [s["name"] for s in report["stages"]]
    assert names == STAGES[cfg.method], names
    if shared_dir is None:
        assert all(s["reused"] == reused for s in report["stages"]), report["stages"]
    home = {name: (shared_dir if shared_dir and name in ("check_data", "teacher", "label_teacher") else run_dir)
            for name in names}
    results = {}
    for name in names:
        manifest = json.loads((home[name] / "manifest.json").read_text())["stages"]
        results[name] = manifest[name]["result"]
    assert (results["check_data"]["labeled"], results["check_data"]["val"]) == (len(ids["labeled"]), len(ids["val"]))
    for name in names:
        if name in TRAIN_STAGES:
            records = [json.loads(line) for line in (home[name] / name / "metrics.jsonl").read_text().splitlines()]
            assert [r["epoch"] for r in records] == list(range(1, results[name]["planned_epochs"] + 1)), name
            images = sum(r["images_per_s"] * r["train_seconds"] for r in records)
            assert images >= cfg.train.batch_size * len(records) - 1e-6, f"{name}: no full step in an epoch"
            assert "val_miou" in records[-1], f"{name}: the last epoch was not validated"
            if fake_state is not None and not reused:  # (a reused run's weights are dropped)
                # The Train workers built the backbone from the fake ImageNet file, then trained it.
                trained = torch.load(home[name] / name / "final.pt", weights_only=True)["model"]
                steps = round(images / cfg.train.batch_size)
                assert batches_tracked(trained, "backbone.") == batches_tracked(fake_state) + steps, \
                    f"{name}: the backbone did not start from the fake ImageNet weights"
        elif name.startswith("label_"):
            assert results[name]["images"] > 0, name
    if cfg.method in ("st", "stpp"):
        assert results["check_data"]["unlabeled"] == len(ids["unlabeled"])
        assert sorted(parquet_ids(home["label_teacher"] / "pseudo_labels" / "teacher")) == sorted(ids["unlabeled"])
    if cfg.method == "stpp":
        selection = json.loads((run_dir / "selection.json").read_text())
        assert len(selection["reliable"]) == int(cfg.selection.reliable_fraction * len(ids["unlabeled"]))
        assert sorted(parquet_ids(run_dir / "pseudo_labels" / "student1")) == sorted(selection["unreliable"])
    return report


# ---- the generated data ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["voc_classic_92.yaml", "cityscapes_1_16.yaml"])
def test_generated_data_is_valid_and_mixes_what_real_data_sets_mix(tmp_path, name):
    from PIL import Image

    data = LayoutData(tmp_path / "data")
    own = load_config(JOBS / name)
    cfg = load_config(JOBS / name, [f"data.root={data.root(own.data.layout)}", f"data.max_images={MAX_IMAGES}",
                                    f"run.output_dir={tmp_path / 'run'}"])
    ids = data.prepare(cfg, MAX_IMAGES)
    pipeline = Pipeline(cfg)
    pipeline.prepare_data()  # the pipeline finds every file where its layout puts it
    for role, samples in (("labeled", pipeline.labeled), ("unlabeled", pipeline.unlabeled), ("val", pipeline.val)):
        assert [s.image_id for s in samples] == ids[role]
        check_samples(samples, cfg.data.num_classes, cfg.data.layout)  # sizes match, classes < num_classes
    images = [Image.open(s.image_path) for s in pipeline.labeled + pipeline.val]
    masks = [read_mask(s.mask_path, cfg.data.layout) for s in pipeline.labeled]
    assert any((m == 255).any() for m in masks) and all(((m > 0) & (m < 255)).any() for m in masks)
    if cfg.data.layout == "voc":
        assert {i.width > i.height for i in images} == {True, False} and len({i.size for i in images}) >= 4
        assert {i.mode for i in images} == {"RGB", "L"}
        assert {Image.open(s.mask_path).mode for s in pipeline.labeled} == {"P"}
    else:
        assert {i.size for i in images} == {(64, 32)}  # Cityscapes frames share one size
        raw = [np.asarray(Image.open(s.mask_path)) for s in pipeline.labeled]
        assert all((CITYSCAPES_LUT[r] == 255).any() and (CITYSCAPES_LUT[r] < 255).any() for r in raw)


@pytest.mark.parametrize("layout, line, role, message", [
    ("cityscapes", "jena_000078_000019", "labeled", "not a Cityscapes id"),
    ("cityscapes", "val/frankfurt/frankfurt_000001_062250", "labeled", "not in Cityscapes' train/ split"),
    ("cityscapes", "train/jena/jena_000078_000019", "val", "not in Cityscapes' val/ split"),
    ("cityscapes", "2007_000032", "labeled", "not a Cityscapes id"),
    ("voc", "train/jena/jena_000078_000019", "labeled", "not a VOC id"),
    ("voc", "JPEGImages/2007_000032.jpg SegmentationClassAug/2007_000032.png", "val", "not a VOC id"),
])
def test_a_split_list_that_does_not_fit_its_layout_fails_naming_file_and_line(tmp_path, layout, line, role, message):
    def good(r: str) -> str:  # a fitting line of split r
        return {"voc": "2007_000033", "cityscapes": f"{'val' if r == 'val' else 'train'}/jena/jena_000001_000019"}[layout]

    splits = {}
    for r in ("labeled", "unlabeled", "val"):
        splits[r] = tmp_path / f"{r}.txt"
        splits[r].write_text(f"{good(r)}\n{line}\n" if r == role else f"{good(r)}\n")
    split = splits[role]
    cfg = load_config(None, [f"data.layout={layout}", *(f"data.{r}_split={p}" for r, p in splits.items())])
    with pytest.raises(LayoutMismatch, match=f"{split}:2: .*{message}"):
        LayoutData(tmp_path / "data").prepare(cfg, MAX_IMAGES)


# ---- the test ---------------------------------------------------------------------------------

@pytest.mark.ray
@pytest.mark.parametrize("case", _cases())
def test_job_config_runs_with_its_own_settings(case, ray_local, fake_imagenet, layout_data, demo_roots, finished_runs,
                                               tmp_path, capfd):
    command, path, own_overrides = command_of(case)
    own = load_config(path, own_overrides)
    root = demo_roots(own.data) if own.data.demo else layout_data.root(own.data.layout)
    # A command whose resolved config ran already (the KubeRay entrypoint runs a shipped file
    # as it is) runs again in that run directory: it must find every stage done.
    same = jsonable(load_config(path, [*own_overrides, *as_args(overrides_for(command, own, root, Path("/unused")))]))
    same["run"]["output_dir"] = None
    key = json.dumps([command, same], sort_keys=True)
    reused = key in finished_runs
    out = finished_runs.get(key, tmp_path / "run")
    family = json.dumps([command, {**same, "data": {k: v for k, v in same["data"].items() if not k.endswith("_split")}}],
                        sort_keys=True)
    overrides = overrides_for(command, own, root, out)
    args = [*own_overrides, *as_args(overrides)]
    cfg = load_config(path, args)
    if own.data.demo:
        from stpp_ray.demo_data import ensure_demo_dataset
        d = own.data
        ensure_demo_dataset(root, seed=d.demo_seed, num_train=d.demo_num_train, num_val=d.demo_num_val,
                            image_size=d.demo_image_size)
        roles = {"labeled": d.labeled_split, "val": d.val_split, "unlabeled": d.unlabeled_split}
        ids = {r: [split_entry_id(e) for e in read_split(root, s)[:MAX_IMAGES]] for r, s in roles.items()}
    else:
        ids = layout_data.prepare(cfg, MAX_IMAGES)  # fails on a split list that does not fit the layout
    assert len(ids["labeled"]) >= cfg.train.batch_size
    fake_state = fake_imagenet(own.model.backbone) if own.model.pretrained == "imagenet" else None
    if FAMILIES and not reused and family in finished_runs:
        pipeline = Pipeline(cfg)
        pipeline.prepare_data()
        result = pipeline.data().run()  # reads and checks every image and mask
        assert (result["labeled"], result["val"], result["unlabeled"]) == \
            (len(ids["labeled"]), len(ids["val"]), len(ids.get("unlabeled", [])))
        return

    rc = main(["--debug", command, "-c", str(path), *args])
    assert rc == 0, f"stpp-ray {command} -c {path} failed:\n{capfd.readouterr().err[-4000:]}"
    finished_runs[key] = finished_runs[family] = out

    if command == "run":
        check_run(out, cfg, own, set(overrides), ids, fake_state, reused=reused)
        drop_weights(out)
        return
    summary = json.loads((out / "sweep.json").read_text())
    params = cfg.sweep.params
    grid = [dict(zip(params, values)) for values in itertools.product(*params.values())]
    assert sorted(json.dumps(t["params"], sort_keys=True) for t in summary["trials"]) == \
        sorted(json.dumps(g, sort_keys=True) for g in grid), "the sweep did not run the config's own grid"
    assert all(t["status"] == "completed" for t in summary["trials"]), summary["counts"]
    assert summary["teacher_trainings"] == 1
    (shared,) = [p for p in (out / "shared").iterdir() if p.is_dir()]
    for trial in summary["trials"]:
        trial_args = [*args, *(f"{k}={v}" for k, v in trial["params"].items()),
                      f"selection.extra_checkpoint_counts={sorted(set(params.get('selection.num_checkpoints', [])))}",
                      f"run.output_dir={out / 'trials' / trial['name']}"]
        trial_cfg = load_config(path, trial_args)
        changed = set(overrides) | set(trial["params"]) | {"selection.extra_checkpoint_counts"}
        report = check_run(out / "trials" / trial["name"], trial_cfg, own, changed, ids, None, shared_dir=shared)
        reused = {s["name"]: s["reused"] for s in report["stages"]}
        assert reused["teacher"] and reused["label_teacher"] and not reused["student2"]
    drop_weights(out)


def drop_weights(run_dir: Path) -> None:
    """Delete a checked run's weight files and Ray Train checkpoints: a ResNet-50 run writes about
    3 GB of them (the whole file about 40 GB). Rerunning the run's command needs none of them."""
    for path in list(run_dir.rglob("ray_train")):
        shutil.rmtree(path)
    for path in run_dir.rglob("*.pt"):
        path.unlink()
