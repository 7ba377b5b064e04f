"""HumanParse's embedded default on one 512 crop: face mesh + person mask + head rule (goal: under 60 ms on
2 CPU cores). Crops are FaceAlign's, of every single-face photo of ../shared/faces; file reading and
alignment are excluded.

Usage: .venv/bin/python benchmarks/bench_human_parse.py [--faces ../shared/faces] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import cv2

from bench_paths import SHARED_FACES  # noqa: E402  (puts the checkout on sys.path)

from facechain_core.align import AlignSettings, align_photo  # noqa: E402
from facechain_core.face_mesh import face_mesh  # noqa: E402
from facechain_core.images import load_photo  # noqa: E402
from facechain_core.parse import parse_crop  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--faces", type=Path, default=SHARED_FACES)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    crops = []
    for path in sorted(args.faces.glob("*/*.jpg")):
        aligned, _ = align_photo(load_photo(path), path.name, AlignSettings())
        if aligned is not None:
            crops.append((aligned.image, aligned.face.keypoints))
    parse_crop(*crops[0])  # load both nets once
    stages = {"mesh": [], "parse": [], "total": []}
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(args.repeat):
        for img, kps in crops:
            t0 = time.perf_counter()
            mesh = face_mesh(img, kps).points
            t1 = time.perf_counter()
            parse_crop(img, kps, mesh=mesh)
            t2 = time.perf_counter()
            stages["mesh"].append(t1 - t0)
            stages["parse"].append(t2 - t1)
            stages["total"].append(t2 - t0)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    n = len(crops) * args.repeat
    print(f"cv2 threads: {cv2.getNumThreads()}, CPUs: {os.cpu_count()}, load average: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}, crops: {len(crops)} x {args.repeat}")
    for stage, values in stages.items():
        print(f"{stage:>6}: median {1000 * statistics.median(values):6.1f} ms  (min {1000 * min(values):.1f})")
    print(f"per crop: {1000 * wall / n:.1f} ms wall, {1000 * cpu / n:.1f} ms of CPU time (both cores together; "
          f"on a shared machine the wall time grows with the other load, the CPU time much less)")


if __name__ == "__main__":
    main()
