"""What a person checks on a fused face, as numbers, and the contact sheets to look at.

Measured on the images the host returned: the face found again on the result (exactly one), the mesh on
the result against the mesh on the original (no point outside the inner face may move far), the eyes'
sharpness (Laplacian variance in the eye boxes) and the recogniser's likeness to the person's other photos.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageDraw

from facechain_core import face_mesh as fm
from facechain_core.fusion_geometry import FaceShape, settings_data
from facechain_core.recognition import cosine, embed_face
from facechain_core.threads import detect_faces_per_thread


def embedding(rgb: np.ndarray) -> np.ndarray:
    faces = detect_faces_per_thread(rgb)
    assert faces, "no face found"
    return embed_face(rgb, faces[0])


def likeness(rgb: np.ndarray, others: list[np.ndarray]) -> float:
    """Mean cosine similarity of the face in ``rgb`` to the embeddings ``others``."""
    e = embedding(rgb)
    return float(np.mean([cosine(e, o) for o in others]))


def eye_boxes(points: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Each eye's contour box, padded by 0.15 of the inter-ocular distance."""
    r, left = fm.contour(points, "right_eye"), fm.contour(points, "left_eye")
    pad = 0.15 * float(np.linalg.norm(left.mean(axis=0) - r.mean(axis=0)))
    return [(int(e[:, 0].min() - pad), int(e[:, 1].min() - pad), int(e[:, 0].max() + pad), int(e[:, 1].max() + pad))
            for e in (r, left)]


def laplacian_variance(rgb: np.ndarray, boxes) -> float:
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return float(np.mean([cv2.Laplacian(grey[max(0, y0):y1, max(0, x0):x1], cv2.CV_64F).var()
                          for x0, y0, x1, y1 in boxes]))


FRINGE_MAX = 3.0  # L* - C* units: a band above the brows paler than the forehead, beyond the original's
DARKENING_MAX = 8.0  # L*: brows this much darker against the forehead than before look drawn on


def _lab(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)


def _strip(shape, edge: np.ndarray, up: np.ndarray, near: float, far: float) -> np.ndarray:
    """Boolean mask of the strip between ``edge`` moved ``near`` and ``far`` pixels along ``up``."""
    poly = np.vstack([edge + up * near, (edge + up * far)[::-1]])
    mask = np.zeros(shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 1)
    return mask > 0


def _paleness(lab: np.ndarray) -> np.ndarray:
    """Lightness minus chroma (L*, C*): skin turns pale by getting lighter or greyer."""
    return lab[..., 0] - np.hypot(lab[..., 1], lab[..., 2])


def brow_measures(before: np.ndarray, after: np.ndarray, points: np.ndarray) -> tuple[float, float]:
    """What makes fused brows look made-up, measured against the original (the mesh ``points`` of ``before``):

    - fringe: a pale band along a brow's upper edge. Paleness (L* minus C*: lighter or greyer skin) changes
      (after - before) in thin strips stepping up from each of the brow's 4 upper-edge segments (0 to 0.16
      IOD, 0.03 IOD each), set against the change on the forehead above them (0.28-0.38 IOD); the palest
      strip's excess over both brows. Darker strips are the fused brow itself (the second measure).
    - darkening: how much darker than the forehead skin the brows became (L*: forehead median minus the
      brow contour's mean, after minus before); the larger of the two brows."""
    shape = FaceShape.of(points)
    right = (fm.contour(points, "left_eye").mean(axis=0) - fm.contour(points, "right_eye").mean(axis=0))
    right /= np.linalg.norm(right)
    up = np.array([right[1], -right[0]])
    if np.dot(fm.point(points, "nose_tip") - shape.centre, up) > 0:
        up = -up
    lab0, lab1 = _lab(before), _lab(after)
    pale = _paleness(lab1) - _paleness(lab0)
    fringes, darker = [0.0], [0.0]
    for name in ("right_brow", "left_brow"):
        upper = fm.contour(points, name)[:5].astype(np.float64)  # the brow's upper edge, outer to inner
        forehead = _strip(before.shape, upper, up, 0.28 * shape.iod, 0.38 * shape.iod)
        brow = fm.fill_contours(before.shape, points, [name]) > 0
        if forehead.sum() < 8 or brow.sum() < 8:
            continue
        for seg in range(4):
            for k in np.arange(0.0, 0.16, 0.03):
                strip = _strip(before.shape, upper[seg:seg + 2], up, k * shape.iod, (k + 0.03) * shape.iod)
                if strip.sum() >= 4:
                    fringes.append(float(pale[strip].mean() - pale[forehead].mean()))
        l0, l1 = lab0[..., 0], lab1[..., 0]
        darker.append(float((np.median(l1[forehead]) - l1[brow].mean()) - (np.median(l0[forehead]) - l0[brow].mean())))
    return max(fringes), max(darker)


@dataclass
class Naturalness:
    faces_found: int
    eye_sharpness: float  # after / before
    outline_shift: float  # largest move of a mesh point outside the inner face, in inter-ocular distances
    boxes: list
    brow_fringe: float = 0.0  # see brow_measures
    brow_darkening: float = 0.0

    def problems(self, sharp_min: float = 0.8, shift_max: float = 0.1, fringe_max: float = FRINGE_MAX,
                 darkening_max: float = DARKENING_MAX) -> list[str]:
        out = []
        if self.faces_found != 1:
            out.append(f"{self.faces_found} faces found on the result")
        if self.eye_sharpness < sharp_min:
            out.append(f"eye sharpness after/before {self.eye_sharpness:.2f} < {sharp_min}")
        if self.outline_shift > shift_max:
            out.append(f"outline moved {self.outline_shift:.3f} IOD > {shift_max}")
        if self.brow_fringe > fringe_max:
            out.append(f"a pale band above the brows ({self.brow_fringe:+.1f} L*-C* against the forehead) "
                       f"> {fringe_max}")
        if self.brow_darkening > darkening_max:
            out.append(f"brows {self.brow_darkening:.1f} L* darker against the skin than before > {darkening_max}")
        return out


def naturalness(before: np.ndarray, after: np.ndarray) -> Naturalness:
    f0 = detect_faces_per_thread(before)[0]
    found = detect_faces_per_thread(after)
    m0 = fm.face_mesh(before, f0.keypoints).points
    shape0 = FaceShape.of(m0)
    # the result's own face and mesh, found from scratch on the result
    m1 = fm.face_mesh(after, found[0].keypoints).points if found else m0 + 1e6
    idx = shape0.outside_inner(settings_data()["inner_face"]["inner_scale"])
    shift = float(np.max(np.linalg.norm(m1[idx] - m0[idx], axis=1)) / shape0.iod)
    boxes = eye_boxes(m0)
    sharp = laplacian_variance(after, boxes) / max(1e-6, laplacian_variance(before, boxes))
    fringe, darkening = brow_measures(before, after, m0)
    return Naturalness(len(found), sharp, shift, boxes, fringe, darkening)


def _fit(img: np.ndarray, size: int) -> Image.Image:
    im = Image.fromarray(img)
    k = size / max(im.width, im.height)  # enlarged too: a small face's eyes must be judged at a readable size
    im = im.resize((max(1, round(im.width * k)), max(1, round(im.height * k))), Image.LANCZOS)
    canvas = Image.new("RGB", (size, size), (30, 30, 30))
    canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return canvas


def _crop(img: np.ndarray, box) -> np.ndarray:
    x0, y0, x1, y1 = (int(v) for v in box)
    h, w = img.shape[:2]
    return img[max(0, y0):min(h, y1), max(0, x0):min(w, x1)]


def sheet_row(name: str, template: np.ndarray, before: np.ndarray, after: np.ndarray, note: str,
              size: int = 300) -> Image.Image:
    """Template | before face | after face | before eyes | after eyes | before mouth | after mouth, and the note."""
    f0 = detect_faces_per_thread(before)[0]
    m0 = fm.face_mesh(before, f0.keypoints).points
    lo, hi = m0.min(axis=0), m0.max(axis=0)
    pad = 0.15 * (hi - lo)
    face_box = (*(lo - pad), *(hi + pad))
    eyes = np.vstack([fm.contour(m0, n) for n in ("right_eye", "left_eye", "right_brow", "left_brow")])
    e_lo, e_hi = eyes.min(axis=0) - 0.1 * (hi - lo), eyes.max(axis=0) + 0.1 * (hi - lo)
    mouth = fm.contour(m0, "lips_outer")
    mo_lo, mo_hi = mouth.min(axis=0) - 0.12 * (hi - lo), mouth.max(axis=0) + 0.12 * (hi - lo)
    tiles = [_fit(template, size)]
    for box in (face_box, (*e_lo, *e_hi), (*mo_lo, *mo_hi)):
        tiles += [_fit(_crop(before, box), size), _fit(_crop(after, box), size)]
    row = Image.new("RGB", (size * len(tiles), size + 40), (0, 0, 0))
    for i, t in enumerate(tiles):
        row.paste(t, (i * size, 0))
    ImageDraw.Draw(row).text((6, size + 4), f"{name}: {note}"[:260], fill=(255, 255, 0))
    return row


def write_sheet(rows: list[Image.Image], path) -> None:
    """Rows stacked into one PNG (written under a temporary name, then renamed)."""
    width = max(r.width for r in rows)
    sheet = Image.new("RGB", (width, sum(r.height for r in rows)), (0, 0, 0))
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    sheet.save(tmp)
    tmp.replace(path)
