"""Peak resident memory against the unlabeled pool's size |U|: a student Train worker's and the driver's.

Each figure is the peak RSS (VmHWM) of a fresh process (`python -m bench.memory --probe ...`), its
high-water mark reset once the imports are done:

- `worker`: what a student rank builds from its stage spec: the training items of a
  selection file of |U| images (`pseudo_labels.read_selection`: an id and a row number each,
  the image path and mask read when an item is loaded) behind one repeated labeled item,
  and a TrainSet, then 64 items loaded.
- `online_worker`: what an online method's rank (Mean Teacher here) builds from its stage spec:
  the unlabeled pool read from the spec's pool file (`image_pool.read_pool`: ids, paths made
  when indexed), its `UnlabeledSet` and `GlobalBatchSampler`, then 64 images' views loaded.
- `online_worker_list`: the same with the pool's paths as a Python list, as the spec carried
  them before the pool file.
- `worker_eager`: every mask's PNG bytes and image path held in the items, as before the
  lazy reads (the shards' mask column read whole).
- `driver`: ST++'s per-image work on the driver, through the pipeline's own code (`driver`):
  `Pipeline.prepare_data` (the unlabeled pool, the split-overlap check), the teacher's labeling
  input blocks and its shards' completeness check, the select stage (scores read from the
  shards, ranked, written as `selection.json` and `selection.arrow`), student 1's selection
  file (the reliable images at the rows the ranking recorded) and labeling input (the
  unreliable images), and student 2's two selection files; each stage's objects freed as the
  pipeline frees them. The Ray passes and Train stages themselves are not run.
- `driver_steps`: the driver probe again, its high-water mark reset after each step: each step's
  own peak.
- `floor`: a process that imports the same modules and does nothing else (what the imports keep).

The pool: |U| copies of one `MASK_SIZE` px JPEG under the VOC layout (beside a labeled split of
2 images and a val split of 1) and pseudo-label shards of its masks (256 rows a file,
`ROWS_PER_GROUP` rows a group), generated in seconds.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MASK_SIZE = 64
ROWS_PER_FILE = 256
PROBES = ("floor", "worker", "worker_eager", "online_worker", "online_worker_list", "driver")
DRIVER_STEPS = {  # the `driver` probe's steps, as the pipeline runs them
    "pool": "the unlabeled pool read, the split-overlap check (`prepare_data`)",
    "label_teacher": "the teacher's labeling input and its shards' completeness check",
    "select": "the select stage: scores from the shards, ranking, `selection.json`, `selection.arrow`",
    "student1": "student 1's selection file (the reliable images)",
    "label_student1": "student 1's labeling input (the unreliable images) and completeness check",
    "student2": "student 2's two selection files",
}


def _ids(n: int) -> list[str]:
    return [f"u{i:07d}" for i in range(n)]


def make_pool(root: Path, n: int, size: int = MASK_SIZE) -> None:
    """|U| image files of `size` px and the split list naming them (one JPEG's bytes, written n
    times; files already there are kept, so give each size its own root)."""
    from PIL import Image

    images = root / "JPEGImages"
    images.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "JPEG")
    jpeg = buf.getvalue()
    for image_id in _ids(n):
        path = images / f"{image_id}.jpg"
        if not path.exists():
            path.write_bytes(jpeg)
    (root / "unlabeled.txt").write_text("".join(f"{i}\n" for i in _ids(n)))
    (root / "SegmentationClass").mkdir(exist_ok=True)
    for split, split_ids in (("labeled.txt", ["l0", "l1"]), ("val.txt", ["v0"])):  # the driver's other splits
        for image_id in split_ids:
            (images / f"{image_id}.jpg").write_bytes(jpeg)
            Image.fromarray(np.zeros((size, size), np.uint8)).save(root / "SegmentationClass" / f"{image_id}.png")
        (root / split).write_text("".join(f"{i}\n" for i in split_ids))


def make_shards(out: Path, n: int, root: Path, first: int = 0) -> float:
    """Pseudo-label shards of the pool at `root`'s images `first` .. n - 1, and the selection
    file naming them all (`selection_file`); returns the mean PNG bytes of a mask."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stpp_ray.datasets import encode_mask_png
    from stpp_ray.pseudo_labels import ROWS_PER_GROUP, SCHEMA, write_selection

    rng = np.random.default_rng(1)
    masks = []
    for _ in range(64):  # 64 different masks of a few rectangles each, used in turn
        mask = np.zeros((MASK_SIZE, MASK_SIZE), np.uint8)
        for _ in range(4):
            y, x = rng.integers(0, MASK_SIZE - 8, 2)
            mask[y:y + rng.integers(8, 40), x:x + rng.integers(8, 40)] = rng.integers(1, 21)
        masks.append(encode_mask_png(mask))
    out.mkdir(parents=True, exist_ok=True)
    ids = _ids(n)[first:]
    for f, lo in enumerate(range(0, len(ids), ROWS_PER_FILE)):
        chunk = ids[lo:lo + ROWS_PER_FILE]
        k = len(chunk)
        pngs = [masks[(lo + j) % len(masks)] for j in range(k)]
        table = pa.table({"image_id": chunk, "mask_png": pngs, "confidence_png": pngs, "stability": [0.5] * k,
                          "ckpt_miou": [[0.5]] * k, "ckpt_epochs": [[1]] * k, "confidence": [0.9] * k,
                          "entropy": [0.1] * k, "height": [MASK_SIZE] * k, "width": [MASK_SIZE] * k,
                          "image_path": [str(root / "JPEGImages" / f"{i}.jpg") for i in chunk]}, schema=SCHEMA)
        pq.write_table(table, out / f"part_{f:06d}.parquet", row_group_size=ROWS_PER_GROUP)
    write_selection(out.parent / f"{out.name}_selection", "pool", out, ids)
    return float(np.mean([len(m) for m in masks]))


def student1_shards(shards: Path) -> Path:
    """Where `run` writes student 1's shards for the teacher's `shards`: the pool's second half,
    the images a reliable fraction of 0.5 leaves unreliable (every score ties; ties go by id)."""
    return shards.parent / f"{shards.name}_student1"


def selection_file(shards: Path) -> str:
    """The selection file (`make_shards`) a student's stage spec names for the pool in `shards`."""
    return str(next((shards.parent / f"{shards.name}_selection").glob("pool-*.arrow")))


def pool_file(shards: Path) -> str:
    """The pool file (`image_pool.write_pool`) an online stage's spec names for the pool of `shards`."""
    return str(next((shards.parent / f"{shards.name}_pool").glob("unlabeled-*.arrow")))


def probe(kind: str, root: Path, shards: Path, n: int) -> None:
    """Runs in the measured process: build what `kind` holds, then print the peak RSS in MiB."""
    from stpp_ray.config import load_config  # noqa: F401  (the driver's; imported here so the floor has them)
    from stpp_ray.image_pool import ImagePaths, read_pool
    from stpp_ray.methods.online import UnlabeledSet
    from stpp_ray.methods.base import SUPERVISED, PseudoLabels
    from stpp_ray.orchestration.pipeline import Pipeline  # noqa: F401
    from stpp_ray.pseudo_labels import read_table
    from stpp_ray.stage_setup import StageSpec, build_train_items
    from stpp_ray.training import GlobalBatchSampler, TrainItem, TrainSet

    # Imports peak above what they keep (shared libraries being loaded): reset the high-water
    # mark so that the figure is the peak of what this process builds, on top of what it imported.
    _reset_peak()
    if kind in ("worker", "worker_eager"):
        if kind == "worker":  # what a student rank does with its stage spec
            spec = StageSpec("student", str(shards), "fp", labeled=[["l0", "l0.jpg", "l0.png"]], val=[],
                             method="stpp", kind=SUPERVISED, epochs=1, pseudo=[PseudoLabels(str(shards), selection_file(shards), n)])
            items = build_train_items(StageSpec.from_dict(spec.to_dict()))  # l0 n times, then the pool
        else:
            paths = {i: str(root / "JPEGImages" / f"{i}.jpg") for i in _ids(n)}
            table = read_table(shards, ["image_id", "mask_png"])
            masks = dict(zip(table.column("image_id").to_pylist(), table.column("mask_png").to_pylist()))
            del table
            items = [TrainItem(i, p, mask_png=masks[i], strong=True) for i, p in sorted(paths.items())]
        train_set = TrainSet(items, "voc", MASK_SIZE, seed=0)
        for k in range(64):
            train_set[len(items) - n + k * (n // 64)]
    elif kind in ("online_worker", "online_worker_list"):
        spec = StageSpec("mean_teacher", str(shards), "fp", labeled=[["l0", "l0.jpg", "l0.png"]], val=[],
                         method="mean_teacher", kind="online", epochs=1, unlabeled=pool_file(shards))
        spec = StageSpec.from_dict(spec.to_dict())
        paths = ImagePaths(read_pool(spec.unlabeled))
        if kind == "online_worker_list":
            paths = list(paths)
        unlabeled = UnlabeledSet(paths, "mean_teacher", MASK_SIZE, seed=0)
        sampler = GlobalBatchSampler(len(unlabeled), 8, 0, 1, 0, with_epoch=True)
        for k in range(64):
            unlabeled[k * (n // 64)]
        assert len(sampler) and len(unlabeled) == n
    elif kind == "driver":
        driver(root, shards)
    elif kind == "driver_steps":  # each step's own peak: the high-water mark reset after each
        peaks = {}

        def step_done(name: str) -> None:
            peaks[name] = _peak_mib()
            _reset_peak()

        driver(root, shards, step_done)
        print(json.dumps(peaks))
        return
    print(_peak_mib())


def driver(root: Path, shards: Path, step_done=lambda name: None) -> None:
    """The `driver` probe: ST++'s stages on the driver, Ray passes left out (a labeling stage's
    driver work, `run_labeling`'s input blocks and completeness check, done on prepared shards).
    `step_done(name)` is called after each step (`DRIVER_STEPS`)."""
    from stpp_ray.config import load_config
    from stpp_ray.image_pool import release_arrow_memory
    from stpp_ray.orchestration.pipeline import Pipeline, _ids_and_rows
    from stpp_ray.pseudo_labels import check_complete, read_table

    cfg = load_config(None, ["method=stpp", "data.layout=voc", f"data.root={root}", "data.labeled_split=labeled.txt",
                             "data.unlabeled_split=unlabeled.txt", "data.val_split=val.txt", "train.epochs=2",
                             "train.batch_size=2", "selection.num_checkpoints=2", "selection.reliable_fraction=0.5",
                             f"run.output_dir={shards.parent / (shards.name + '_run')}"])
    pipeline = Pipeline(cfg)
    pipeline.run_dir.mkdir(parents=True, exist_ok=True)

    def label(name: str, images, parquet_dir: Path) -> None:  # Pipeline.label's run without its Ray pass
        pool = pipeline.unlabeled.subset(_ids_and_rows(images)[0])
        blocks = pool.blocks(ROWS_PER_FILE)
        assert sum(map(len, blocks)) == len(pool)
        check_complete(read_table(parquet_dir, ["image_id"]), pool.ids, str(parquet_dir))
        pipeline.results[name] = {"parquet_dir": str(parquet_dir)}

    def stage_done(name: str) -> None:
        release_arrow_memory()  # as `_run_stage` after each stage
        step_done(name)

    pipeline.prepare_data()  # (releases on its own)
    step_done("pool")
    label("label_teacher", pipeline.unlabeled_ids(), shards)
    stage_done("label_teacher")
    pipeline.results["select"] = pipeline.select("fp", "label_teacher").run()
    stage_done("select")
    student1 = [pipeline.pseudo_labels("label_teacher", pipeline.selected(True))]  # student 1's spec
    stage_done("student1")
    label("label_student1", pipeline.selected(False), student1_shards(shards))
    stage_done("label_student1")
    student2 = [pipeline.pseudo_labels("label_teacher", pipeline.selected(True)),
                pipeline.pseudo_labels("label_student1", pipeline.selected(False))]
    step_done("student2")
    assert sum(s.count for s in student2) == len(pipeline.unlabeled) and student1[0].count == student2[0].count


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: resets VmHWM, the peak resident set size
    except OSError:
        pass


def _peak_mib() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(kind: str, root: Path, shards: Path, n: int):
    """The probe's last line: a figure, or for `driver_steps` a JSON object."""
    done = subprocess.run([sys.executable, "-m", "bench.memory", "--probe", kind, str(root), str(shards), str(n)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode:
        raise RuntimeError(f"memory probe {kind} at |U| = {n} failed: {done.stderr.strip()[-2000:]}")
    last = done.stdout.strip().splitlines()[-1]
    return json.loads(last) if kind == "driver_steps" else float(last)


def _slope(sizes: list[int], values: list[float]) -> float:
    """Least-squares MiB per 100k images."""
    return float(np.polyfit(np.asarray(sizes, float), np.asarray(values, float), 1)[0]) * 100_000


def run(scratch: Path, sizes: list[int], say=print) -> dict:
    """Peak RSS of each probe at each |U| (one pool, generated for the largest)."""
    from stpp_ray.image_pool import ImagePool, write_pool

    start = time.perf_counter()
    root, largest = scratch / "memory_pool", max(sizes)
    make_pool(root, largest)
    out: dict = {"sizes": sizes, "mask_size": MASK_SIZE, "peak_mib": {p: [] for p in PROBES},
                 "generate_s": 0.0}
    for n in sizes:
        shards = scratch / f"memory_shards_{n}"
        (root / "unlabeled.txt").write_text("".join(f"{i}\n" for i in _ids(n)))
        out["mask_png_bytes"] = make_shards(shards, n, root)
        make_shards(student1_shards(shards), n, root, first=n // 2)
        write_pool(shards.parent / f"{shards.name}_pool", "unlabeled", ImagePool.read("voc", root, "unlabeled.txt"))
        for kind in PROBES:
            out["peak_mib"][kind].append(_measure(kind, root, shards, n))
        for step, peak in _measure("driver_steps", root, shards, n).items():
            out.setdefault("driver_steps_mib", {}).setdefault(step, []).append(peak)
        say(f"memory at |U| = {n}: " + ", ".join(f"{k} {v[-1]:.0f} MiB" for k, v in out["peak_mib"].items()))
    out["slope_mib_per_100k"] = {k: _slope(sizes, v) for k, v in out["peak_mib"].items()}
    out["wall_s"] = time.perf_counter() - start
    return out


def markdown(m: dict) -> str:
    sizes, peak = m["sizes"], m["peak_mib"]
    lines = [f"Peak resident memory (MiB, VmHWM of a fresh process, reset after its imports) against |U|; masks {m['mask_size']} px, "
             f"{m['mask_png_bytes']:.0f} bytes as PNG; {m['wall_s']:.0f} s in all.", "",
             "| process | " + " | ".join(f"|U| = {n:,}" for n in sizes) + " | slope (MiB per 100k images) |",
             "|---|" + "---|" * (len(sizes) + 1)]
    names = {"worker": "student Train worker (ids and rows; path and mask read when loaded)",
             "worker_eager": "student Train worker, every mask held (before)",
             "online_worker": "online method's Train worker (pool file: ids, paths made when indexed)",
             "online_worker_list": "online method's Train worker, every path in a list (before)",
             "driver": "driver (pool, checks, selection, selection files)", "floor": "imports only"}
    for kind in ("worker", "worker_eager", "online_worker", "online_worker_list", "driver", "floor"):
        lines.append(f"| {names[kind]} | " + " | ".join(f"{v:.0f}" for v in peak[kind])
                     + f" | {m['slope_mib_per_100k'][kind]:.1f} |")
    if "driver_steps_mib" in m:
        lines += ["", "The driver's peak in each step (MiB; one more process, its high-water mark reset after each step):", "",
                  "| step | " + " | ".join(f"|U| = {n:,}" for n in sizes) + " | slope (MiB per 100k images) |",
                  "|---|" + "---|" * (len(sizes) + 1)]
        for step, values in m["driver_steps_mib"].items():
            lines.append(f"| {DRIVER_STEPS[step]} | " + " | ".join(f"{v:.0f}" for v in values)
                         + f" | {_slope(sizes, values):.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0])
    p.add_argument("--probe", nargs=4, metavar=("KIND", "ROOT", "SHARDS", "N"))
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    p.add_argument("--scratch", type=Path, default=Path("bench/out/scratch"))
    args = p.parse_args(argv)
    if args.probe:
        kind, root, shards, n = args.probe
        probe(kind, Path(root), Path(shards), int(n))
        return 0
    print(markdown(run(args.scratch, args.sizes)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
