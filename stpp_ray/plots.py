"""Pictures for a run directory: pseudo-label grids, score histograms, per-class IoU.

Everything renders with matplotlib's non-interactive "Agg" backend and closes its
figures, so these functions are safe in worker processes without a display.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from .datasets import VOC_COLORS  # noqa: E402
from .files import atomic_output  # noqa: E402
from .storage import location  # noqa: E402

THUMB_SIZE = 256
PAIRS_PER_ROW = 4
CAPTION_FONTSIZE = 7




def colorize(mask: np.ndarray) -> np.ndarray:
    """HxW uint8 class ids -> HxWx3 uint8 RGB in the VOC palette (255 -> (224,224,192))."""
    return VOC_COLORS[np.asarray(mask, dtype=np.uint8)]


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the mask colours into the image; background (class 0) pixels stay as they were."""
    image = np.asarray(image, dtype=np.uint8)
    mask = np.asarray(mask, dtype=np.uint8)
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} sizes differ")
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colorize(mask).astype(np.float32)
    out = image.copy()
    fg = mask != 0
    out[fg] = np.clip(np.rint(blended[fg]), 0, 255).astype(np.uint8)
    return out


def _prepare(out_png) -> Path:
    path = location(out_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _save(fig, path: Path, dpi: int = 100) -> Path:
    try:
        with atomic_output(path) as f:
            fig.savefig(f, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return path


def _thumb(array: np.ndarray, size: int = THUMB_SIZE) -> np.ndarray:
    """Shrink an RGB array so its longer side is at most `size` pixels."""
    img = Image.fromarray(array)
    img.thumbnail((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img)


def _score_text(score) -> str:
    if score is None or not math.isfinite(float(score)):
        return "score n/a"
    return f"score {float(score):.3f}"


def _sort_key(row: dict, highest_first: bool) -> tuple[bool, float]:
    """Sort by score, NaN scores last either way."""
    score = row.get("score")
    missing = score is None or not math.isfinite(float(score))
    value = 0.0 if missing else float(score)
    return (missing, -value if highest_first else value)


def _select_groups(rows: list[dict], max_per_group: int) -> list[tuple[str, list[dict]]]:
    reliable = sorted((r for r in rows if r.get("reliable")), key=lambda r: _sort_key(r, True))
    unreliable = sorted((r for r in rows if not r.get("reliable")), key=lambda r: _sort_key(r, False))
    return [
        ("reliable (highest scores)", reliable[:max_per_group]),
        ("unreliable (lowest scores)", unreliable[:max_per_group]),
    ]


def _draw_group(subfig, label: str, rows: list[dict]) -> None:
    subfig.suptitle(f"{label} - {len(rows)} shown", fontsize=10, fontweight="bold")
    if not rows:
        ax = subfig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, "none", ha="center", va="center", fontsize=9, color="gray")
        return
    ncols = PAIRS_PER_ROW
    nrows = math.ceil(len(rows) / ncols)
    axes = np.asarray(subfig.subplots(nrows, 2 * ncols, squeeze=False))
    for ax in axes.flat:
        ax.axis("off")
    for k, row in enumerate(rows):
        ax_img, ax_ovl = axes[k // ncols, 2 * (k % ncols)], axes[k // ncols, 2 * (k % ncols) + 1]
        ax_img.imshow(_thumb(np.asarray(row["image"], dtype=np.uint8)))
        ax_img.set_title(str(row.get("image_id", "")), fontsize=CAPTION_FONTSIZE)
        ax_ovl.imshow(_thumb(overlay(row["image"], row["mask"])))
        ax_ovl.set_title(_score_text(row.get("score")), fontsize=CAPTION_FONTSIZE)


def pseudo_label_grid(rows: list[dict], out_png, *, title: str = "", max_per_group: int = 8) -> Path:
    """Image | pseudo-label pairs for the most and least stable images, in two labelled groups."""
    path = _prepare(out_png)
    groups = _select_groups(list(rows), max_per_group)
    heights = [max(1, math.ceil(len(g) / PAIRS_PER_ROW)) for _, g in groups]
    fig = plt.figure(figsize=(2 * PAIRS_PER_ROW * 1.6, 0.6 + sum(1.9 * h + 0.4 for h in heights)),
                     layout="constrained")
    if title:
        fig.suptitle(title, fontsize=12)
    subfigs = fig.subfigures(len(groups), 1, height_ratios=[h + 0.25 for h in heights])
    for subfig, (label, group) in zip(np.atleast_1d(subfigs), groups):
        _draw_group(subfig, label, group)
    return _save(fig, path)


def _finite(scores: Sequence[float]) -> np.ndarray:
    if not isinstance(scores, np.ndarray):
        scores = [np.nan if s is None else s for s in scores]
    values = np.asarray(scores, dtype=np.float64).ravel()
    return values[np.isfinite(values)]


def score_histogram(scores: Sequence[float], out_png, *, threshold: float | None = None, bins: int = 30,
                    title: str = "") -> Path:
    """Histogram of stability scores (NaN skipped), with the selection threshold as a line."""
    path = _prepare(out_png)
    values = _finite(scores)
    fig, ax = plt.subplots(figsize=(6, 4))
    in_unit = values.size == 0 or (values.min() >= 0.0 and values.max() <= 1.0)
    ax.hist(values, bins=bins, range=(0.0, 1.0) if in_unit else None, color="#4c72b0", edgecolor="white")
    if values.size == 0:
        ax.text(0.5, 0.5, "no scores", ha="center", va="center", transform=ax.transAxes, color="gray")
    if threshold is not None and math.isfinite(float(threshold)):
        ax.axvline(float(threshold), color="#c44e52", linestyle="--", label=f"threshold {float(threshold):.3f}")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel("stability score")
    ax.set_ylabel("images")
    ax.set_title(title or f"stability scores (n={values.size})")
    fig.tight_layout()
    return _save(fig, path)


def score_histogram_counts(scores: Sequence[float], bins: int = 10) -> list[dict]:
    """Histogram bins over [0, 1] as [{"lo", "hi", "count"}]; NaN skipped, outliers clipped in."""
    values = np.clip(_finite(scores), 0.0, 1.0)
    counts, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    return [
        {"lo": float(edges[i]), "hi": float(edges[i + 1]), "count": int(counts[i])}
        for i in range(bins)
    ]


def _bar_values(values: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray]:
    """(heights with missing as 0, mask of missing values)."""
    arr = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    missing = ~np.isfinite(arr)
    return np.where(missing, 0.0, arr), missing


def _draw_series(ax, x: np.ndarray, offset: float, width: float, name: str, values, color) -> float:
    heights, missing = _bar_values(values)
    ax.bar(x[~missing] + offset, heights[~missing], width, label=name, color=color)
    if missing.any():
        # Missing IoU (class absent): an empty hatched outline, so it is not mistaken for 0.
        ax.bar(x[missing] + offset, np.full(missing.sum(), 0.02), width, fill=False,
               hatch="///", edgecolor=color, linewidth=0.5)
    return float(heights.max(initial=0.0))


def per_class_iou_chart(class_names: Sequence[str], series: dict[str, Sequence[float | None]], out_png,
                        title: str = "") -> Path:
    """Grouped bar chart of per-class IoU, one bar colour per series; missing values hatched."""
    path = _prepare(out_png)
    names = list(class_names)
    for key, values in series.items():
        if len(values) != len(names):
            raise ValueError(f"series {key!r} has {len(values)} values for {len(names)} classes")
    x = np.arange(len(names), dtype=np.float64)
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(names) * max(1, len(series)) ** 0.5 + 2), 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    top = 0.0
    for k, (key, values) in enumerate(series.items()):
        offset = (k - (len(series) - 1) / 2) * width
        top = max(top, _draw_series(ax, x, offset, width, key, values, colors[k % len(colors)]))
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0.0, max(1.0, top * 1.05))
    ax.set_ylabel("IoU")
    ax.set_title(title or "per-class IoU")
    if series:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def method_bar_chart(labels: Sequence[str], means: Sequence[float], stds: Sequence[float], out_png,
                     title: str = "") -> Path:
    """One bar per method: mean mIoU (%) with a ± one standard deviation error bar (none for NaN)."""
    path = _prepare(out_png)
    y = np.arange(len(labels), dtype=np.float64)
    err = [0.0 if s is None or math.isnan(s) else 100 * s for s in stds]
    fig, ax = plt.subplots(figsize=(7.0, 0.45 * len(labels) + 1.2))
    ax.barh(y, [100 * m for m in means], xerr=err, capsize=3, color="#4c72b0")
    for yi, m in zip(y, means):
        ax.text(100 * m + 0.5, yi, f"{100 * m:.1f}", va="center", fontsize=8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("val mIoU (%)")
    ax.set_title(title or "mIoU per method")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def sweep_heatmap(r_values: Sequence[float], k_values: Sequence[int], cells: Sequence[Sequence[float | None]],
                  out_png, *, title: str = "val mIoU (%) over R and K") -> Path:
    """Heat map of a metric over (R, K): rows K, columns R; cells without a result are blank."""
    path = _prepare(out_png)
    grid = np.array([[np.nan if v is None else 100 * float(v) for v in row] for row in cells], dtype=np.float64)
    if grid.shape != (len(k_values), len(r_values)):
        raise ValueError(f"cells have shape {grid.shape}, expected {(len(k_values), len(r_values))}")
    fig, ax = plt.subplots(figsize=(1.2 * len(r_values) + 2.5, 0.9 * len(k_values) + 1.8))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto")
    finite = grid[np.isfinite(grid)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            text = "–" if np.isnan(grid[i, j]) else f"{grid[i, j]:.1f}"
            bright = np.isfinite(grid[i, j]) and grid[i, j] > middle  # viridis is light at the top
            ax.text(j, i, text, ha="center", va="center", color="black" if bright else "white", fontsize=9)
    ax.set_xticks(range(len(r_values)), [f"{r:g}" for r in r_values])
    ax.set_yticks(range(len(k_values)), [str(k) for k in k_values])
    ax.set_xlabel("R (reliable fraction)")
    ax.set_ylabel("K (checkpoints)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return _save(fig, path)
