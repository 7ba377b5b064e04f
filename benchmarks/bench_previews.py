"""What the editor's pictures cost: the thumbnail tiles each node writes and the live loss curve, against the
step they show.

Usage: .venv/bin/python benchmarks/bench_previews.py [--faces ../shared/faces] [--repeat 5]
FaceAlign runs on four real photos (three of one person and a group photo it skips); the tiles are made and
written as the nodes do (previews.py, PNG into a temp folder). Medians of --repeat runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_paths import SHARED_FACES  # noqa: E402  (puts the checkout on sys.path)

from facechain_core import previews  # noqa: E402
from facechain_core.align import AlignSettings, align_photos  # noqa: E402
from facechain_core.images import load_photo  # noqa: E402

PHOTOS = ["katy_perry/img26.jpg", "katy_perry/img27.jpg", "katy_perry/img28.jpg", "hard/two_people.jpg"]


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def write_all(pictures, folder: Path) -> None:
    for i, p in enumerate(pictures):
        previews.write_png(folder / f"facechain_bench_{i:03d}.png", p)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--faces", type=Path, default=SHARED_FACES)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    photos = [(rel.split("/")[-1], load_photo(args.faces / rel)) for rel in PHOTOS]
    align_photos(photos, AlignSettings())  # load the models once
    result = None

    def align():
        nonlocal result
        result = align_photos(photos, AlignSettings())

    align_ms = median_ms(align, args.repeat)
    crops = [(a.name, a.image) for a in result.aligned]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tiles_ms = median_ms(lambda: write_all(previews.aligned_pictures(crops, photos, result.skipped), folder),
                             args.repeat)
        plain_ms = median_ms(lambda: write_all([previews.thumbnail(c) for _, c in crops], folder), args.repeat)
    losses = list(0.2 * np.exp(-np.arange(2000) / 500) + 0.05 * np.random.default_rng(0).random(2000))
    curve_ms = median_ms(lambda: previews.loss_curve(losses[:1000], 2000), args.repeat * 4)
    print(f"FaceAlign on {len(photos)} photos ({len(crops)} kept, {len(result.skipped)} skipped): {align_ms:.0f} ms")
    print(f"  its tiles ({len(crops) + len(result.skipped)}, made and written): {tiles_ms:.1f} ms "
          f"= {100 * tiles_ms / align_ms:.1f} % of the step")
    print(f"plain thumbnails of {len(crops)} crops (HumanParse, SkinRetouch): {plain_ms:.1f} ms")
    print(f"loss curve of 1000 of 2000 steps: {curve_ms:.2f} ms (drawn at most every "
          f"{previews.look()['curve_every_s']} s while training)")


if __name__ == "__main__":
    main()
