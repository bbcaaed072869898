"""`stpp-ray` command line: demo-data, run, compare, sweep, predict, splits."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from .methods import names as method_names



def _cmd_demo_data(args: argparse.Namespace) -> int:
    from .demo_data import generate_demo_dataset

    out = generate_demo_dataset(args.out, seed=args.seed)
    print(f"demo dataset written to {out}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .orchestration.pipeline import Pipeline
    from .storage import location

    cfg = load_config(args.config, args.overrides)
    report = Pipeline(cfg).run()
    out = location(cfg.run.output_dir).resolve()
    teacher, final = report["teacher"].get("miou"), report["final"].get("miou")
    print(f"\n{cfg.method}: teacher val mIoU {100 * teacher:.2f}, final ({report['final']['stage']}) "
          f"val mIoU {100 * final:.2f}\nreport: {out / 'report.md'}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .orchestration.compare import render_table, run_compare
    from .config import load_config

    seeds, methods, overrides = _compare_lists(args)
    cfg = load_config(args.config, overrides)
    result = run_compare(cfg, seeds, Path(args.out), args.oracle_split or None, methods=methods)
    print("\n" + render_table(result["summary"]) + f"\n\ntable: {Path(args.out).resolve() / 'compare.md'}")
    return 0


def _compare_lists(args: argparse.Namespace) -> tuple[list[int], tuple[str, ...], list[str]]:
    """`--seeds` and `--methods` take every word after them, so overrides written after the
    lists (`--seeds 0 1 2 ray.num_workers=1`) are moved back to the overrides."""
    overrides = list(args.overrides)
    seeds, methods = [], []
    for words, out in ((args.seeds, seeds), (args.methods, methods)):
        for word in words:
            (overrides if "=" in word else out).append(word)
    bad = [s for s in seeds if not s.lstrip("-").isdigit()]
    if bad:
        raise ValueError(f"--seeds: not an integer: {bad[0]!r}")
    unknown = [m for m in methods if m not in method_names()]
    if unknown:
        raise ValueError(f"--methods: unknown method {unknown[0]!r} (known: {', '.join(method_names())})")
    return [int(s) for s in seeds], tuple(methods), overrides


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .cluster.tune import run_sweep

    summary = run_sweep(args.config, args.overrides, retry_failed=args.retry_failed)
    print(f"\nsweep: {len(summary['trials'])} trials ({summary['counts']}), "
          f"teacher trainings: {summary['teacher_trainings']}")
    if summary["best"]:
        best = summary["best"]
        print(f"best {summary['metric']} {100 * best[summary['metric']]:.2f} ({best['name']}); to run it:\n  {best['command']}")
    print(f"table: {Path(summary['sweep_dir']) / 'sweep.md'}")
    return 0 if summary["best"] else 1


SPLITS_LAYOUT_GUIDE = """\
Dataset layout on disk (data.root). Split ids name files under data.root:

Pascal VOC  (data.layout: voc, data.num_classes: 21)
  data.root is the VOC2012 folder of VOCtrainval_11-May-2012.tar (VOCdevkit/VOC2012):
    JPEGImages/<id>.jpg          e.g. JPEGImages/2007_000032.jpg
    SegmentationClass/<id>.png   class-index masks (palette or grayscale PNG, 255 = ignore)
  Use the SBD-augmented masks as SegmentationClass/: the "Pascal SegmentationClass" download
  linked from the ST++ and UniMatch README.md (the masks their split lists, shipped here, name).
  VOC's own SegmentationClass has only the 1464 train + 1449 val fine masks: enough for the
  classic splits (pascal/92 ... pascal/1464, unlabeled masks are never read) and val, not for
  the blended ones (pascal/1_16, 1_8, 1_4), whose labeled images come from SBD.

Cityscapes  (data.layout: cityscapes, data.num_classes: 19)
  data.root holds leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip unpacked:
    leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png   (mapped to the 19 train ids)
  The id train/jena/jena_000078_000019 names both files. The preprocessed gtFine of ST++ and
  UniMatch (*_gtFine_labelTrainIds.png, already train ids, used as they are) works too: it is
  taken when the labelIds file is absent.

Your own lists: one id per line (or the ST++/UniMatch two-column form 'image_path mask_path'),
relative to data.root unless absolute; 'builtin:NAME' names a shipped list.
"""


def _split_sort_key(name: str) -> tuple:
    # pascal/92 < pascal/1464 < pascal/1_16 < pascal/1_4 < pascal/val
    dataset, _, rest = name.partition("/")
    size = rest.split("/")[0]
    if size == "val.txt":
        return dataset, 2, 0.0
    if "_" in size:
        num, den = size.split("_", 1)
        return dataset, 1, int(num) / int(den)
    return dataset, 0, float(size)


def _cmd_splits(args: argparse.Namespace) -> int:
    from .datasets import BUILTIN_PREFIX, BUILTIN_SPLIT_LAYOUTS, BUILTIN_SPLITS_DIR, builtin_split_names, read_split

    def count(name: str) -> int:
        return len(read_split(BUILTIN_SPLITS_DIR, BUILTIN_PREFIX + name))

    names = set(builtin_split_names())
    rows = []
    for name in sorted(names, key=_split_sort_key):
        dataset, _, rest = name.partition("/")
        layout = BUILTIN_SPLIT_LAYOUTS.get(dataset, "?")
        if rest == "val.txt":
            rows.append((f"{dataset}/val", layout, str(count(name)), "-", f"data.val_split={BUILTIN_PREFIX}{name}"))
        elif rest.endswith("/labeled.txt"):
            unlabeled = name[: -len("labeled.txt")] + "unlabeled.txt"
            n_unlabeled = str(count(unlabeled)) if unlabeled in names else "-"
            value = f"data.labeled_split={BUILTIN_PREFIX}{name}"
            if unlabeled in names:
                value += f" data.unlabeled_split={BUILTIN_PREFIX}{unlabeled}"
            rows.append((name[: -len("/labeled.txt")], layout, str(count(name)), n_unlabeled, value))
    header = ("name", "layout", "labeled", "unlabeled", "config (key=value, as in a YAML config or an override)")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    print(f"Shipped split lists ({BUILTIN_SPLITS_DIR}; source and license: SOURCE.md there).")
    print("val lists: 'labeled' is the number of val images.\n")
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]), row[3].rjust(widths[3])]
        print("  ".join(cells + [row[4]]))
    print("\n" + SPLITS_LAYOUT_GUIDE, end="")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .predict import predict_images

    rows = predict_images(args.checkpoint, args.images, args.out, tta=args.tta, device=args.device, window=args.window)
    for row in rows:
        print(f"{row['image']} -> {row['mask']}, {row['overlay']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stpp-ray", description="ST++ semi-supervised segmentation on Ray.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", help="write the embedded demo dataset (VOC layout)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.set_defaults(func=_cmd_demo_data)

    p = sub.add_parser("run", help=f"run the pipeline of the config's method ({', '.join(method_names())})")
    p.add_argument("-c", "--config", required=True, help="YAML config file (see jobs/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=10")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("compare", help="the methods and the oracle over several seeds, one table")
    p.add_argument("-c", "--config", required=True, help="YAML config file (e.g. jobs/demo.yaml)")
    p.add_argument("--seeds", nargs="+", default=["0", "1", "2"], help="values of run.seed (default 0 1 2)")
    p.add_argument("--out", default="runs/compare", help="output directory (default runs/compare)")
    p.add_argument("--methods", nargs="+", default=list(method_names()), metavar="METHOD",
                   help=f"methods to run: {', '.join(method_names())} (default: all of them)")
    p.add_argument("--oracle-split", default="ImageSets/Segmentation/full/labeled.txt",
                   help="labeled split of the oracle ('' to skip it)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("sweep", help="Ray Tune sweep (R and K by default) sharing one teacher")
    p.add_argument("-c", "--config", required=True, help="YAML config file with a sweep: section (e.g. jobs/sweep_demo.yaml)")
    p.add_argument("--retry-failed", action="store_true", help="when resuming, run failed trials again")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the base config")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("predict", help="write masks and colour overlays for images")
    p.add_argument("--checkpoint", required=True, help="a weight file (e.g. RUN/student2/final.pt)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tta", action="store_true", help="multi-scale + flip test-time augmentation")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--window", type=int, default=0,
                   help="sliding-window inference with square windows of this many pixels (0 = whole image)")
    p.add_argument("images", nargs="+", help="image files")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("splits", help="list the shipped standard splits (builtin:NAME) and the dataset layouts on disk")
    p.set_defaults(func=_cmd_splits)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one readable line unless --debug
        if debug:
            traceback.print_exc()
        else:
            print(f"error: {err}\n(run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
