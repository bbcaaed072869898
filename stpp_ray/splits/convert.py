"""Regenerate the shipped split lists from a UniMatch git mirror (not used at run time).

    python stpp_ray/splits/convert.py /work/.mirror/LiheYoung+UniMatch/repo [COMMIT]

Reads ``splits/{pascal,cityscapes}/...`` at COMMIT (default HEAD) with ``git show`` and
writes one image id per line next to this file, keeping the reference's order.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PASCAL = ["92", "183", "366", "732", "1464", "1_16", "1_8", "1_4"]
CITYSCAPES = ["1_16", "1_8", "1_4", "1_2"]
VOC_LINE = re.compile(r"JPEGImages/(\S+)\.jpg SegmentationClass/(\S+)\.png")
CITY_LINE = re.compile(r"leftImg8bit/(\S+)_leftImg8bit\.png gtFine/(\S+)_gtFine_labelTrainIds\.png")


def convert_line(dataset: str, line: str) -> str:
    pattern = VOC_LINE if dataset == "pascal" else CITY_LINE
    match = pattern.fullmatch(line.strip())
    if not match or match.group(1) != match.group(2):
        raise ValueError(f"unexpected {dataset} split line: {line!r}")
    return match.group(1)


def convert(git_dir: str, commit: str = "HEAD") -> None:
    files = [f"pascal/{n}/{k}.txt" for n in PASCAL for k in ("labeled", "unlabeled")] + ["pascal/val.txt"]
    files += [f"cityscapes/{n}/{k}.txt" for n in CITYSCAPES for k in ("labeled", "unlabeled")] + ["cityscapes/val.txt"]
    for name in files:
        text = subprocess.run(["git", "--git-dir", git_dir, "show", f"{commit}:splits/{name}"],
                              check=True, capture_output=True, text=True).stdout
        # splitlines() also keeps a last line that has no trailing newline.
        ids = [convert_line(name.split("/")[0], line) for line in text.splitlines() if line.strip()]
        out = HERE / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(ids) + "\n", encoding="utf-8")
        print(f"{name}: {len(ids)} ids")


if __name__ == "__main__":
    convert(*sys.argv[1:3])
