"""Embedded train-stage preprocessing of a 10-photo set on this machine (goal: under 10 s on 2 CPU cores).

FaceAlign + HumanParse + SkinRetouch + AutoTag + template face, all with their offline defaults, on the
single-person photos of ../shared/faces repeated up to 10, as decoded photos (file reading excluded).

Usage: .venv/bin/python benchmarks/bench_preprocess.py [--faces ../shared/faces] [--photos 10] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import cv2

from bench_paths import SHARED_FACES  # noqa: E402  (puts the checkout on sys.path)

from facechain_core.align import AlignSettings, align_photos  # noqa: E402
from facechain_core.detect import get_detector  # noqa: E402
from facechain_core.face_mesh import add_meshes  # noqa: E402
from facechain_core.images import load_photo  # noqa: E402
from facechain_core.parse import parse_crops  # noqa: E402
from facechain_core.quality import assess_faces  # noqa: E402
from facechain_core.retouch import retouch_crops  # noqa: E402
from facechain_core.tags import caption_photos, get_fairface  # noqa: E402


def run_once(photos) -> dict:
    times = {}
    t = time.perf_counter()
    aligned = align_photos(photos, AlignSettings()).aligned
    crops = [a.image for a in aligned]
    faces = add_meshes(crops, [a.to_dict() for a in aligned])  # as the FaceAlign node does
    times["FaceAlign"] = time.perf_counter() - t
    kps = [a.face.keypoints for a in aligned]
    meshes = [f.get("mesh") for f in faces]
    t = time.perf_counter()
    heads = [p.image for p in parse_crops(crops, kps, meshes=meshes)]
    times["HumanParse"] = time.perf_counter() - t
    t = time.perf_counter()
    retouched = [r[0] for r in retouch_crops(heads, kps, 0.6, meshes=meshes)]
    times["SkinRetouch"] = time.perf_counter() - t
    t = time.perf_counter()
    captions = caption_photos(retouched, kps, "fcsks", "a person", "auto", "none")
    times["AutoTag"] = time.perf_counter() - t
    t = time.perf_counter()
    quality = assess_faces(retouched, faces)
    times["TemplateFace"] = time.perf_counter() - t
    assert len(captions.captions) == len(photos) and quality.kept
    times["total"] = sum(times.values())
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--faces", type=Path, default=SHARED_FACES)
    ap.add_argument("--photos", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    files = [p for person in ("obama", "biden", "rose_leslie") for p in sorted((args.faces / person).glob("*.jpg"))]
    photos = [(f"{i:02d}_{files[i % len(files)].name}", load_photo(files[i % len(files)])) for i in range(args.photos)]
    get_detector("embedded")  # the detector and the subject model load once per process, not per set
    get_fairface("auto")
    runs = [run_once(photos) for _ in range(args.repeat)]
    sizes = sorted({f"{img.shape[1]}x{img.shape[0]}" for _, img in photos})
    print(f"cv2 threads: {cv2.getNumThreads()}, photos: {len(photos)} ({', '.join(sizes)}), runs: {args.repeat}")
    for stage in runs[0]:
        values = [r[stage] for r in runs]
        print(f"{stage:>12}: median {statistics.median(values):6.2f} s  (min {min(values):.2f}, max {max(values):.2f})")
    total = statistics.median(r["total"] for r in runs)
    print(f"Embedded preprocessing of {len(photos)} photos: {total:.2f} s (goal: under 10 s)")


if __name__ == "__main__":
    main()
