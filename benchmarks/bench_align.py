"""Embedded FaceAlign speed on this machine: seconds per 1-megapixel photo (goal: under 0.5 s on 2 cores).

Usage: .venv/bin/python benchmarks/bench_align.py [--faces ../shared/faces] [--repeat 3]
Every single-person photo is resized to one megapixel (aspect kept) and aligned to a 512 crop.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import cv2

from bench_paths import SHARED_FACES  # noqa: E402  (puts the checkout on sys.path)

from facechain_core.align import AlignSettings, align_photo  # noqa: E402
from facechain_core.detect import get_detector  # noqa: E402
from facechain_core.images import load_photo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--faces", type=Path, default=SHARED_FACES)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    photos = []
    for person in ("obama", "biden", "rose_leslie"):
        for path in sorted((args.faces / person).glob("*.jpg")):
            img = load_photo(path)
            k = (1_000_000 / (img.shape[0] * img.shape[1])) ** 0.5
            photos.append((path.name, cv2.resize(img, None, fx=k, fy=k, interpolation=cv2.INTER_CUBIC)))
    get_detector("embedded")  # model load is once per process, not per photo
    settings = AlignSettings()
    times = []
    for _ in range(args.repeat):
        for name, img in photos:
            t = time.perf_counter()
            aligned, why = align_photo(img, name, settings)
            times.append(time.perf_counter() - t)
            assert aligned is not None, why
    print(f"cv2 threads: {cv2.getNumThreads()}, photos: {len(photos)} x {args.repeat}, "
          f"size ~{photos[0][1].shape[1]}x{photos[0][1].shape[0]}")
    print(f"FaceAlign (embedded) per 1-MP photo: mean {statistics.mean(times):.3f} s, "
          f"median {statistics.median(times):.3f} s, max {max(times):.3f} s")


if __name__ == "__main__":
    main()
