"""FaceChain's photo alignment: one level, square, white-filled head-and-shoulders crop per photo.

The rules (from FaceChain's train-stage preprocessing):
1. scale the photo so its long side is 1024 and detect faces with 5 keypoints; a photo without a
   confidently upright face is tried at 90, 180 and 270 degrees and turned to the one that has it;
2. keep the largest face only if its area is at least 4x the next, else skip the photo; no face: skip.
   Beyond FaceChain: in a set, a photo with several faces keeps the one face that matches the identity
   of the set's single-face photos (``identity.py``); FaceChain's rule is the fallback;
3. level the eyes: the rotation of the similarity transform from the keypoints to a mean 5-point face,
   applied to a 1.5x white-padded square copy, then detect again (here the second detection runs on the
   output crop itself, see step 5, which is smaller and also checks the final result);
4. square crop with the face at 35-45% of the side and its centre 35-50% from the top, white outside
   the photo, resized to the output size.
All geometry is composed into one affine map from the original photo, so the crop is resampled once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from .detect import Face, choose_subject, detect_faces
from .errors import FaceChainError
from .face_regions import MEAN_FACE_5
from .identity import choose_by_identity, set_identity
from .identity import rules as subject_rules
from .images import MIN_SIDE, as_rgb_uint8
from .progress import ProgressFn, no_progress

WHITE = (255, 255, 255)


@dataclass
class AlignSettings:
    size: int = 512
    face_fraction: float = 0.40  # face side / crop side; FaceChain's band is 0.35-0.45
    centre_from_top: float = 0.42  # face centre / crop side from the top; band 0.35-0.50
    detect_long_side: int = 1024
    dominance: float = 4.0
    backend: str = "embedded"

    def check(self) -> None:
        if not 64 <= self.size <= 4096:
            raise FaceChainError(f"Crop size {self.size} is outside 64-4096 px.")
        if not 0.35 <= self.face_fraction <= 0.45:
            raise FaceChainError(f"Face fraction {self.face_fraction} is outside FaceChain's 0.35-0.45.")
        if not 0.35 <= self.centre_from_top <= 0.50:
            raise FaceChainError(f"Face centre {self.centre_from_top} is outside FaceChain's 0.35-0.50.")


@dataclass
class AlignedFace:
    image: np.ndarray  # (size, size, 3) uint8
    face: Face  # in crop coordinates
    name: str
    source_size: tuple[int, int]  # (width, height) of the original photo
    rotation: float  # degrees the photo was turned to level the eyes
    other_faces: int = 0
    source_face_px: float = 0.0  # side of the face in the original photo's pixels
    upright_turn: int = 0  # degrees clockwise the photo was turned to stand the face upright (0, 90, 180, 270)
    subject_note: str = ""  # which face was chosen among several, and why

    def to_dict(self) -> dict:
        return {"name": self.name, "source_size": list(self.source_size), "rotation": round(self.rotation, 2),
                "upright_turn": self.upright_turn, "source_face_px": round(self.source_face_px, 1),
                "size": int(self.image.shape[0]), **self.face.to_dict()}


@dataclass
class AlignResult:
    aligned: list[AlignedFace] = field(default_factory=list)
    report: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def report_text(self) -> str:
        head = f"FaceAlign: kept {len(self.aligned)} of {len(self.aligned) + len(self.skipped)} photos"
        return "\n".join([head, *self.report])


def _h(m: np.ndarray) -> np.ndarray:
    """2x3 affine -> 3x3."""
    return np.vstack([m, [0.0, 0.0, 1.0]])


def eye_level_rotation(face: Face) -> np.ndarray:
    """2x2 rotation that the similarity transform from the keypoints to the mean face applies."""
    m, _ = cv2.estimateAffinePartial2D(face.keypoints.astype(np.float32), MEAN_FACE_5.astype(np.float32),
                                       method=cv2.LMEDS)
    if m is None:  # degenerate keypoints: fall back on the eye line alone
        a = -np.radians(face.eye_angle())
        return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    c, s = m[0, 0], m[1, 0]
    n = np.hypot(c, s)
    return np.array([[c / n, -s / n], [s / n, c / n]])


def mirrored_tilt(image: np.ndarray, face: Face, backend: str = "embedded") -> float:
    """Eye-line tilt of ``face`` averaged with that of its mirror image.

    A detector's keypoints carry a pose-dependent error of a degree or two; the mirror image has the
    opposite error, so the mean is a steadier measure of how level the eyes are."""
    w = image.shape[1]
    mirror = _nearest(detect_faces(np.ascontiguousarray(image[:, ::-1]), backend),
                      np.array([w - face.centre[0], face.centre[1]]), face.size)
    return face.eye_angle() if mirror is None else (face.eye_angle() - mirror.eye_angle()) / 2


def _nearest(faces: list[Face], centre: np.ndarray, size: float) -> Face | None:
    near = [f for f in faces if np.linalg.norm(f.centre - centre) < 0.5 * size]
    return min(near, key=lambda f: np.linalg.norm(f.centre - centre)) if near else None


@dataclass
class Found:
    """A photo after step 1: turned upright, searched at the working size."""
    name: str
    rgb: np.ndarray  # the photo, turned upright
    work: np.ndarray  # the same at the working size
    faces: list[Face]  # in ``work``, largest first
    turn: int  # degrees clockwise it was turned (0, 90, 180, 270)
    source_size: tuple[int, int]  # (width, height) of the photo as given
    why: str = ""  # set when the photo is skipped at this step


def _rescore(img: np.ndarray, face: Face, r: dict, backend: str) -> float:
    """The face's detection score in a square around it at a fixed size: like for like between photos."""
    side, s = r["rescore_side"], r["rescore_context"] * face.size / r["rescore_side"]
    m = np.array([[1 / s, 0, side / 2 - face.centre[0] / s], [0, 1 / s, side / 2 - face.centre[1] / s]])
    crop = cv2.warpAffine(img, m, (side, side), flags=cv2.INTER_AREA if s > 1 else cv2.INTER_LINEAR,
                          borderValue=WHITE)
    seen = _nearest(detect_faces(crop, backend), np.array([side / 2, side / 2]), face.size / s)
    return seen.score if seen is not None else 0.0


def upright_score(img: np.ndarray, faces: list[Face], backend: str = "embedded") -> float:
    """How surely ``img`` holds an upright face: the best mean of a face's score in the photo and rescored."""
    r = subject_rules()["upright"]
    best = sorted(faces, key=lambda f: f.score, reverse=True)[: r["rescore_faces"]]
    return max(((f.score + _rescore(img, f, r, backend)) / 2 for f in best), default=0.0)


def turn_upright(work: np.ndarray, backend: str = "embedded") -> tuple[int | None, list[Face], str]:
    """(degrees clockwise, faces in the turned image, note). Degrees None: no turn shows an upright face
    surely enough (the note says why); the photo must not be used sideways."""
    r = subject_rules()["upright"]
    seen = {0: detect_faces(work, backend)}
    scores = {0: upright_score(work, seen[0], backend)}
    if scores[0] >= r["confident"]:
        return 0, seen[0], ""
    for turn in (90, 180, 270):
        turned = np.ascontiguousarray(np.rot90(work, -turn // 90))
        seen[turn] = detect_faces(turned, backend)
        scores[turn] = upright_score(turned, seen[turn], backend)
    order = sorted(scores, key=lambda t: -scores[t])
    best, runner = order[0], order[1]
    listed = ", ".join(f"{t} deg {scores[t]:.2f}" for t in order)
    if scores[best] == 0.0:
        return 0, [], ""
    if scores[best] < r["confident"] and scores[best] - scores[runner] < r["margin"]:
        return None, [], (f"no turn of the photo shows a surely upright face (upright scores {listed}; "
                          f"{r['confident']:.2f}, or a lead of {r['margin']:.2f}, needed)")
    note = "" if best == 0 else f"turned {best} deg clockwise to stand the face upright (upright scores {listed})"
    return best, seen[best], note


def find_faces(image: np.ndarray, name: str = "photo", settings: AlignSettings | None = None) -> Found:
    """Step 1: check the photo, turn it upright, detect its faces at the working size."""
    s = settings or AlignSettings()
    rgb = as_rgb_uint8(image, name)
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_SIDE:
        return Found(name, rgb, rgb, [], 0, (w, h),
                     f"too small ({w}x{h}); photos need at least {MIN_SIDE} px on the short side")
    k0 = s.detect_long_side / max(h, w)
    work = cv2.resize(rgb, (max(1, round(w * k0)), max(1, round(h * k0))),
                      interpolation=cv2.INTER_AREA if k0 < 1 else cv2.INTER_CUBIC)
    turn, faces, note = turn_upright(work, s.backend)
    if turn is None:
        return Found(name, rgb, work, [], 0, (w, h), note)
    if turn:
        rgb = np.ascontiguousarray(np.rot90(rgb, -turn // 90))
        work = np.ascontiguousarray(np.rot90(work, -turn // 90))
    return Found(name, rgb, work, faces, turn, (w, h))


def align_photo(image: np.ndarray, name: str = "photo",
                settings: AlignSettings | None = None) -> tuple[AlignedFace | None, str]:
    """Align one photo on its own (FaceChain's 4x rule for several faces). Returns (crop, "") or (None, why)."""
    s = settings or AlignSettings()
    found = find_faces(image, name, s)
    if found.why:
        return None, found.why
    subject, why = choose_subject(found.faces, s.dominance)
    if subject is None:
        return None, why
    return align_found(found, subject, s), ""


def align_found(found: Found, subject: Face, settings: AlignSettings | None = None, note: str = "") -> AlignedFace:
    """Steps 3-5 for the chosen face of a photo found by ``find_faces``."""
    s = settings or AlignSettings()
    rgb, work, faces = found.rgb, found.work, found.faces
    h, w = rgb.shape[:2]
    k0 = s.detect_long_side / max(h, w)

    # 3. level the eyes: turn about the centre of a 1.5x padded square canvas (the map only; nothing is
    # drawn until the crop, and the padding is the white border of that one warp)
    rot = eye_level_rotation(subject)
    wh, ww = work.shape[:2]
    side = int(round(1.5 * max(wh, ww)))
    c_in, c_out = np.array([ww / 2, wh / 2]), np.array([side / 2, side / 2])
    a = np.hstack([rot, (c_out - rot @ c_in)[:, None]])
    face = subject.transformed(a)
    angle = float(np.degrees(np.arctan2(rot[1, 0], rot[0, 0])))

    # 4. square crop around the face, composed with everything above into one map from the original
    crop_side = face.size / s.face_fraction
    x0 = face.centre[0] - crop_side / 2
    y0 = face.centre[1] - s.centre_from_top * crop_side
    k = s.size / crop_side
    crop = np.array([[k, 0, -k * x0], [0, k, -k * y0]])
    scale0 = np.array([[k0, 0, 0], [0, k0, 0]])
    full = (_h(crop) @ _h(a) @ _h(scale0))[:2]
    face = face.transformed(crop)
    out = _warp(rgb, full, s.size)

    # 5. refine on the crop itself: the detector sees a face a little differently at the output size, so
    # a few small corrections put its eyes level and its size and place where the rules want them. Its
    # box size jitters by several percent from one small turn to the next, so size is corrected only when
    # clearly off, and the best-measured crop is kept.
    target = np.array([s.size / 2, s.centre_from_top * s.size])
    best, gain, last_tilt = None, 1.0, 0.0
    for _ in range(4):
        seen = _nearest(detect_faces(out, s.backend), face.centre, face.size)
        if seen is None:
            break
        tilt = mirrored_tilt(out, seen, s.backend)
        fraction = seen.size / s.size
        shift = np.linalg.norm(seen.centre - target) / s.size
        miss = max(abs(tilt) / 1.0, abs(fraction - s.face_fraction) / 0.02, shift / 0.02)
        if best is None or miss < best[0]:
            best = (miss, out, seen, full, angle)
        if miss <= 1.0:
            break
        if tilt * last_tilt < 0:  # overshot: the detector's keypoints move more than the photo turned
            gain *= 0.5
        last_tilt = tilt
        grow = 1.0 if abs(fraction - s.face_fraction) < 0.015 \
            else float(np.clip(s.face_fraction / fraction, 0.85, 1.15))
        t = np.radians(-tilt * gain)
        r = grow * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
        fix = np.hstack([r, (target - r @ seen.centre)[:, None]])
        full = (_h(fix) @ _h(full))[:2]
        face = seen.transformed(fix)
        angle += tilt * gain
        out = _warp(rgb, full, s.size)
    if best is not None:
        _, out, face, full, angle = best
    source_face = face.size / float(np.hypot(full[0, 0], full[1, 0]))
    return AlignedFace(out, face, found.name, found.source_size, angle, len(faces) - 1, source_face, found.turn,
                       note)


def _warp(rgb: np.ndarray, full: np.ndarray, size: int) -> np.ndarray:
    """Resample once through ``full``; shrink first with area averaging so a large reduction does not alias."""
    h, w = rgb.shape[:2]
    total = float(np.hypot(full[0, 0], full[1, 0]))
    src = rgb
    if total < 0.75:
        src = cv2.resize(rgb, (max(1, round(w * total)), max(1, round(h * total))), interpolation=cv2.INTER_AREA)
        full = (_h(full) @ np.diag([w / src.shape[1], h / src.shape[0], 1.0]))[:2]
    return cv2.warpAffine(src, full, (size, size), flags=cv2.INTER_CUBIC, borderValue=WHITE)


def align_photos(photos: list[tuple[str, np.ndarray]], settings: AlignSettings | None = None,
                 progress: ProgressFn | None = None) -> AlignResult:
    """Align every photo; skipped ones are named in the report with the reason.

    All photos are searched first, so that a photo with several faces can keep the one face that matches
    the identity the set's single-face photos share."""
    s = settings or AlignSettings()
    s.check()
    progress = progress or no_progress
    if not photos:
        raise FaceChainError("No photos were given. Connect 3-20 photos of one person.")
    n = len(photos)
    found = []
    for i, (name, image) in enumerate(photos):
        progress(i, 2 * n, name)
        found.append(find_faces(image, name, s))
    result, identity = AlignResult(), None
    if any(len(f.faces) > 1 for f in found):  # the identity is needed (and embedded) only for group photos
        identity = set_identity([(f.name, f.work, f.faces[0]) for f in found if not f.why and len(f.faces) == 1])
        if identity is not None:
            result.report.append(f"identity of the set: {identity.describe()}")
    for i, f in enumerate(found):
        progress(n + i, 2 * n, f.name)
        subject, why = (None, f.why) if f.why else choose_by_identity(f.work, f.faces, identity, s.dominance)
        if subject is None:
            result.skipped.append((f.name, why))
            result.report.append(f"- {f.name}: skipped, {why}")
            continue
        aligned = align_found(f, subject, s, why)
        result.aligned.append(aligned)
        turned = f"turned upright by {f.turn} deg clockwise, then " if f.turn else "turned "
        result.report.append(f"- {f.name}: kept ({f.source_size[0]}x{f.source_size[1]}, {turned}"
                             f"{aligned.rotation:+.1f} deg){'; ' + why if why else ''}")
    progress(2 * n, 2 * n, None)
    if not result.aligned:
        raise FaceChainError(
            "FaceAlign found no usable face in any photo:\n" + "\n".join(result.report[-20:]) +
            "\nUse clear photos where the one person's face is visible and largest.")
    return result
