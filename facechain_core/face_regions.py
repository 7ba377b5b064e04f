"""Regions of a face drawn from its 5 keypoints: the face oval, eyes, brows, lips, cheeks.

The keypoints (right eye, left eye, nose tip, right and left mouth corner, image-left first) fix the
face's scale and axis; the proportions below place the rest. They are the usual ones of an adult face
seen from the front: hairline about one eye-to-mouth distance above the eyes, chin about 0.9 of it below
the mouth, cheek to cheek about twice the eye distance. YuNet's box on FaceChain's crops matches the oval
to a few pixels. Every function here takes keypoints in the pixel frame of the image it draws on.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .errors import FaceChainError

# The usual mean 5-point face (112x112 template), in the keypoint order of detect.py: FaceAlign levels the
# eyes by it, FaceFusion places faces by it, align_112 warps every recogniser's and scorer's input onto it.
MEAN_FACE_5 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]])


@dataclass(frozen=True)
class FaceFrame:
    """The face's own axes: origin between the eyes, ``right`` along the eye line, ``down`` to the mouth."""

    keypoints: np.ndarray  # (5, 2)
    eye_centre: np.ndarray
    mouth_centre: np.ndarray
    eye_distance: float
    eye_to_mouth: float
    right: np.ndarray  # unit vector, image-left eye -> image-right eye
    down: np.ndarray  # unit vector perpendicular to ``right``, towards the chin

    @classmethod
    def from_keypoints(cls, keypoints) -> "FaceFrame":
        try:
            k = np.asarray(keypoints, dtype=np.float64)
        except (TypeError, ValueError):
            k = np.zeros(0)
        if k.shape != (5, 2) or not np.all(np.isfinite(k)):
            raise FaceChainError(f"Face keypoints must be 5 (x, y) pairs; got shape {k.shape}. Connect the "
                                 f"faces output of FaceAlign.")
        eyes, mouth = (k[0] + k[1]) / 2, (k[3] + k[4]) / 2
        d = float(np.linalg.norm(k[1] - k[0]))
        em = float(np.linalg.norm(mouth - eyes))
        if d < 2 or em < 2:
            raise FaceChainError("Face keypoints are degenerate (eyes or mouth coincide); run FaceAlign again.")
        right = (k[1] - k[0]) / d
        down = np.array([-right[1], right[0]])
        if np.dot(down, mouth - eyes) < 0:
            down = -down
        return cls(k, eyes, mouth, d, em, right, down)

    def point(self, across: float, along: float) -> np.ndarray:
        """A point ``across`` eye distances to the image-right and ``along`` eye-mouth distances down."""
        return self.eye_centre + across * self.eye_distance * self.right + along * self.eye_to_mouth * self.down

    @property
    def angle(self) -> float:
        return float(np.degrees(np.arctan2(self.right[1], self.right[0])))

    def oval(self, grow: float = 1.0) -> tuple[tuple[float, float], tuple[float, float], float]:
        """The face oval (hairline to chin, cheek to cheek) as an OpenCV ellipse ((cx, cy), (w, h), angle)."""
        top, bottom = -1.0, 1.0 + 0.9  # eye-mouth units from the eye line
        centre = self.point(0.0, (top + bottom) / 2)
        h = (bottom - top) * self.eye_to_mouth * grow
        w = 2.1 * self.eye_distance * grow
        return (float(centre[0]), float(centre[1])), (float(w), float(h)), self.angle

    @property
    def size(self) -> float:
        """A face size in pixels that does not depend on the detector's box: the oval's height."""
        return 2.9 * self.eye_to_mouth


def draw_oval(shape: tuple[int, int], frame: FaceFrame, grow: float = 1.0) -> np.ndarray:
    mask = np.zeros(shape[:2], np.uint8)
    cv2.ellipse(mask, frame.oval(grow), 255, -1)
    return mask


def _ellipse(mask: np.ndarray, centre: np.ndarray, w: float, h: float, angle: float) -> None:
    cv2.ellipse(mask, ((float(centre[0]), float(centre[1])), (max(w, 1.0), max(h, 1.0)), angle), 255, -1)


def feature_mask(shape: tuple[int, int], frame: FaceFrame) -> np.ndarray:
    """Eyes, brows and lips: the parts a skin filter must leave sharp. Generous by design."""
    mask = np.zeros(shape[:2], np.uint8)
    d, em, a = frame.eye_distance, frame.eye_to_mouth, frame.angle
    k = frame.keypoints
    for eye in (k[0], k[1]):
        _ellipse(mask, eye, 0.62 * d, 0.36 * d, a)  # eye with lids and lashes
        _ellipse(mask, eye - 0.30 * d * frame.down, 0.75 * d, 0.26 * d, a)  # brow
    mouth_w = float(np.linalg.norm(k[4] - k[3]))
    _ellipse(mask, frame.mouth_centre + 0.04 * em * frame.down, mouth_w * 1.3, 0.55 * em, a)  # lips
    return mask


def cheek_samples(rgb: np.ndarray, frame: FaceFrame) -> np.ndarray:
    """Pixels of bare skin for a colour model: the cheeks under the eyes and the bridge of the nose."""
    h, w = rgb.shape[:2]
    poly = np.array([frame.point(-0.55, 0.30), frame.point(0.55, 0.30), frame.point(0.50, 0.72),
                     frame.point(-0.50, 0.72)], np.int32)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillConvexPoly(mask, poly, 255)
    mask[feature_mask((h, w), frame) > 0] = 0
    return rgb[mask > 0]


def soft_inside(mask: np.ndarray, feather: int) -> np.ndarray:
    """A 0-1 weight that fades in over ``feather`` pixels from the mask's edge and is exactly 0 outside it."""
    if feather <= 1:
        return (mask > 0).astype(np.float32)
    inner = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (feather, feather)))
    soft = cv2.GaussianBlur(inner.astype(np.float32) / 255.0, (0, 0), feather / 2.0)
    soft[mask == 0] = 0.0
    return soft


def align_112(rgb: np.ndarray, keypoints, size: int = 112, border: str = "white") -> np.ndarray:
    """The face warped onto the usual 112x112 five-point template (what FairFace, FQA and the ArcFace family
    were trained on). ``border``: "white" (FaceChain's fill) or "replicate" (edge pixels, for recognisers)."""
    src = np.asarray(keypoints, np.float32)
    dst = (MEAN_FACE_5 * (size / 112.0)).astype(np.float32)
    m, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.LMEDS)
    if m is None:
        raise FaceChainError("Face keypoints are degenerate; run FaceAlign again.")
    if border == "replicate":
        return cv2.warpAffine(rgb, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return cv2.warpAffine(rgb, m, (size, size), flags=cv2.INTER_LINEAR, borderValue=(255, 255, 255))


def faces_for_images(faces, n_images: int, step: str) -> list[dict]:
    """The FACECHAIN_FACES entries for a batch of ``n_images`` crops, checked: one per crop, 5 keypoints each."""
    if not isinstance(faces, (list, tuple)) or not all(isinstance(f, dict) for f in faces):
        raise FaceChainError(f"{step} needs the faces output of FaceAlign (FACECHAIN_FACES), got "
                             f"{type(faces).__name__}.")
    if n_images == 0:
        raise FaceChainError(f"{step} got no images. Connect the aligned crops of FaceAlign.")
    if len(faces) != n_images:
        raise FaceChainError(f"{step} got {n_images} images but face data for {len(faces)}; connect the faces "
                             f"output that belongs to these images (the same FaceAlign, after the same filter).")
    for i, f in enumerate(faces):
        FaceFrame.from_keypoints(f.get("keypoints"))
    return list(faces)
