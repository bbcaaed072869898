"""`report.json`, `report.md` and the pictures of a run directory."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..config import Config
from ..files import write_json_atomic
from ..methods import get_method


def final_stage(cfg: Config) -> str:
    """The stage whose model is the method's result."""
    return get_method(cfg.method).final_stage(cfg)


def teacher_stage(cfg: Config) -> str:
    """The stage reported as `teacher` (`Method.teacher_stage`)."""
    return get_method(cfg.method).teacher_stage(cfg)


VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle")


def class_names(cfg: Config) -> list[str]:
    """Readable class names where the layout defines them, else class_<i>."""
    n = cfg.data.num_classes
    if cfg.data.demo:
        from ..demo_data import DEMO_CLASSES
        if len(DEMO_CLASSES) == n:
            return list(DEMO_CLASSES)
    known = {"voc": VOC_CLASSES, "cityscapes": CITYSCAPES_CLASSES}.get(cfg.data.layout)
    if known is not None and len(known) == n:
        return list(known)
    return [f"class_{i}" for i in range(n)]


def _model_summary(result: dict | None) -> dict:
    if not result:
        return {}
    keys = ("miou", "student_miou", "best_miou", "per_class_iou", "wall_s", "epochs", "steps", "train_images",
            "train_images_per_s", "final_checkpoint")
    return {k: result.get(k) for k in keys}


def _selection(results: dict):
    """The select stage's ranking (`selection.arrow`): ids and scores, best first."""
    from ..selection import read_ranking

    return read_ranking(results["select"]["ranking"])


def _selection_summary(cfg: Config, results: dict, run_dir: Path) -> dict | None:
    if not results.get("select"):
        return None
    from ..plots import score_histogram, score_histogram_counts

    sel = _selection(results)
    values = sel.ranked.column("score").to_numpy()
    reliable = values[:sel.num_reliable]
    threshold = float(np.nanmin(reliable)) if np.isfinite(reliable).any() else None  # the lowest reliable score
    score_histogram(values, run_dir / "stability_histogram.png", threshold=threshold,
                    title=f"Stability scores (R={cfg.selection.reliable_fraction}, K={cfg.selection.num_checkpoints})")
    finite = values[np.isfinite(values)]
    return {
        "reliable": sel.num_reliable, "unreliable": len(values) - sel.num_reliable, "threshold": threshold,
        "score_mean": math.fsum(finite) / len(finite) if len(finite) else None,  # fsum: independent of the order
        "histogram": score_histogram_counts(values),
        "picture": "stability_histogram.png",
    }


def _pseudo_label_grid(results: dict, out_png: Path) -> None:
    from ..datasets import decode_mask_png, read_image
    from ..plots import pseudo_label_grid
    from ..pseudo_labels import read_rows

    sel = _selection(results)
    cut = sel.num_reliable
    picked = list(range(min(cut, 8))) + list(range(max(cut, len(sel.ranked) - 8), len(sel.ranked)))  # ranks
    chosen = sel.ranked.take(picked)
    found = read_rows(results["label_teacher"]["parquet_dir"], chosen.column("image_id").to_pylist(),
                      ["image_path", "mask_png"])
    rows = [{"image": read_image(found[i][0]), "mask": decode_mask_png(found[i][1]), "image_id": i, "score": score,
             "reliable": rank < cut}
            for rank, i, score in zip(picked, chosen.column("image_id").to_pylist(), chosen.column("score").to_pylist())]
    pseudo_label_grid(rows, out_png, title="Teacher pseudo-labels: most and least stable images")


def _pictures(cfg: Config, results: dict, run_dir: Path, names: list[str], final_name: str) -> list[str]:
    from ..plots import per_class_iou_chart

    made = []
    teacher, final = results.get(teacher_stage(cfg)), results.get(final_name)
    if teacher and final and final_name != teacher_stage(cfg):
        per_class_iou_chart(names, {"teacher (SupOnly)": teacher["per_class_iou"],
                                    f"final ({final_name})": final["per_class_iou"]},
                            run_dir / "per_class_iou.png", title="Per-class IoU on the validation set")
        made.append("per_class_iou.png")
    if results.get("select"):
        _pseudo_label_grid(results, run_dir / "pseudo_labels_grid.png")
        made.append("pseudo_labels_grid.png")
    return made


def eval_summary(cfg: Config) -> dict:
    """How the validation mIoU figures were measured (`eval.mode`, window and stride in pixels)."""
    options = cfg.eval.options(cfg.data.crop_size)
    summary = {"mode": options["mode"]}
    if options["mode"] == "sliding":
        from ..evaluation import window_stride  # torch is imported only where a summary needs it
        summary.update(window=options["window"], stride=window_stride(options["window"]))
    elif options["mode"] == "center_crop":
        summary["window"] = options["window"]
    return summary


def describe_eval(summary: dict) -> str:
    """One line for people: how the mIoU was measured."""
    if summary["mode"] == "sliding":
        return f"sliding-window inference over the full image ({summary['window']} px windows, stride {summary['stride']})"
    if summary["mode"] == "center_crop":
        return f"inference on the central {summary['window']} x {summary['window']} crop of each image only"
    return "one forward pass over each full image"


def write_report(cfg: Config, run_dir: Path, results: dict, timeline: list[dict], partial: bool) -> dict:
    """Write report.json and report.md (pictures only once the run is complete)."""
    final_name = final_stage(cfg)
    names = class_names(cfg)
    evaluation = eval_summary(cfg)
    report = {
        "method": cfg.method,
        "status": "partial" if partial else "complete",
        "eval": evaluation,
        "teacher": {"stage": teacher_stage(cfg), **_model_summary(results.get(teacher_stage(cfg))),
                    "eval_mode": evaluation["mode"]},
        "final": {"stage": final_name, **_model_summary(results.get(final_name)), "eval_mode": evaluation["mode"]},
        "stages": timeline,
        "total_wall_s": sum(s.get("wall_s") or 0.0 for s in timeline if not s.get("reused")),
        "class_names": names,
        "labeling": {k: v for k, v in results.items() if k.startswith("label_")},
        "config": cfg.model_dump(),
    }
    if not partial:
        report["selection"] = _selection_summary(cfg, results, run_dir)
        report["pictures"] = _pictures(cfg, results, run_dir, names, final_name)
    write_json_atomic(run_dir / "report.json", report)
    (run_dir / "report.md").write_text(render_markdown(report))
    return report


def _pct(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def render_markdown(report: dict) -> str:
    lines = [f"# stpp_ray run: {report['method']} ({report['status']})", ""]
    who = "SupOnly" if report["teacher"].get("stage", "teacher") == "teacher" else "the online method's teacher"
    lines += [f"- teacher ({who}) val mIoU: **{_pct(report['teacher'].get('miou'))}**",
              f"- final model ({report['final']['stage']}) val mIoU: **{_pct(report['final'].get('miou'))}**"
              + (f" (its student: {_pct(report['final']['student_miou'])})" if report['final'].get('student_miou') else ""),
              f"- validation mIoU measured by {describe_eval(report['eval'])}",
              f"- compute wall time this invocation: {report['total_wall_s']:.1f} s", ""]
    lines += ["## Stages", "", "| stage | wall s | val mIoU | images/s | reused |", "|---|---|---|---|---|"]
    for s in report["stages"]:
        ips = s.get("train_images_per_s", s.get("images_per_s"))
        lines.append(f"| {s['name']} | {s.get('wall_s', 0):.1f} | {_pct(s.get('miou'))} | "
                     f"{'' if ips is None else f'{ips:.1f}'} | {'yes' if s.get('reused') else ''} |")
    sel = report.get("selection")
    if sel:
        lowest = ("no reliable image has a stability score (K = 1 scores none)" if sel["threshold"] is None
                  else f"lowest reliable stability score {sel['threshold']:.3f}")
        lines += ["", "## Selection", "", f"{sel['reliable']} reliable / {sel['unreliable']} unreliable images; {lowest}.", "",
                  f"![stability histogram]({sel['picture']})"]
    teacher_iou, final_iou = report["teacher"].get("per_class_iou"), report["final"].get("per_class_iou")
    if teacher_iou and final_iou:
        lines += ["", "## Per-class IoU", "", "| class | teacher | final |", "|---|---|---|"]
        for name, t, f in zip(report["class_names"], teacher_iou, final_iou):
            lines.append(f"| {name} | {_pct(t)} | {_pct(f)} |")
    for pic in report.get("pictures", []):
        lines += ["", f"![{pic}]({pic})"]
    return "\n".join(lines) + "\n"
