"""The offline default of HumanParse: a learned person mask and the 468-point face mesh.

MediaPipe's selfie segmentation (``selfie_segmentation.tflite``, 256x256, person probability) separates the
person from the background far better than colour can, and the face mesh gives the real face outline. The
head is then cut out of the person:

* face = the mesh's face oval;
* hair = the person above the chin, less the neck under the jaw, within a head zone beside the face (other
  people behind the head, who the person mask may join to it, stand further out);
* below the mouth, clothes, collars and skin are told from hair by OpenCV's GrabCut inside the person mask,
  seeded with the hair above the eyes (certain hair) and the face and the column under the jaw (certainly
  not hair). What it calls hair below the chin is kept with ``long_hair="keep"`` (FaceChain's parser keeps
  all of the hair, long hair on the shoulders included) and dropped with ``long_hair="cut"``.

The zone sizes are in units of the face (its width cheek to cheek, its height forehead to chin), data in
``data/face_mesh.json`` under ``head``.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np

from . import model_store
from .backends import backend_instance
from .errors import FaceChainError
from .face_mesh import face_mesh, fill_contours, jaw, point, read_tflite, topology

LONG_HAIR = ("keep", "cut")
SEG_SIDE = 256  # the person net's input side
WORK_SIDE = 128  # the colour test's side: it decides hair or not in blocks, the person mask draws the edge


class PersonMaskNet:
    """selfie_segmentation.tflite through OpenCV: RGB in [0, 1], 256x256, person probability out."""

    def __init__(self):
        self._net = read_tflite(model_store.embedded_path("selfie_segmentation"))
        self._lock = threading.Lock()

    def probability(self, rgb: np.ndarray) -> np.ndarray:
        """Person probability at ``rgb``'s size, float32 0-1."""
        blob = cv2.dnn.blobFromImage(rgb, 1 / 255.0, (SEG_SIDE, SEG_SIDE))
        with self._lock:
            self._net.setInput(blob)
            out = self._net.forward()
        prob = out.reshape(SEG_SIDE, SEG_SIDE)
        return cv2.resize(prob, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)


def person_net() -> PersonMaskNet:
    return backend_instance("person_mask", "embedded", {"embedded": PersonMaskNet})


class FaceAxes:
    """Per-pixel coordinates in the face's own frame: ``across`` (to the image-right along the eye line) from
    the face's middle, ``down`` from the chin; both in pixels."""

    def __init__(self, points: np.ndarray, shape: tuple[int, int]):
        eyes = point(points, "left_eye_outer") - point(points, "right_eye_outer")
        self.right = eyes / max(float(np.linalg.norm(eyes)), 1e-6)
        self.down = np.array([-self.right[1], self.right[0]], np.float32)
        self.chin = point(points, "chin")
        cheeks = point(points, "left_cheek") - point(points, "right_cheek")
        self.width = float(abs(np.dot(cheeks, self.right)))
        self.height = float(np.dot(self.chin - point(points, "forehead_top"), self.down))
        if self.width < 4 or self.height < 4:
            raise FaceChainError("The face mesh is degenerate (face narrower than 4 pixels); run FaceAlign again.")
        middle = (point(points, "left_cheek") + point(points, "right_cheek")) / 2
        xs = np.arange(shape[1], dtype=np.float32)[None, :]
        ys = np.arange(shape[0], dtype=np.float32)[:, None]
        self.across = (xs - middle[0]) * self.right[0] + (ys - middle[1]) * self.right[1]
        self.below_chin = (xs - self.chin[0]) * self.down[0] + (ys - self.chin[1]) * self.down[1]

    def mouth_depth(self, points: np.ndarray) -> float:
        """How far above the chin the mouth lies (pixels, positive)."""
        mouth = (point(points, "mouth_left") + point(points, "mouth_right")) / 2
        return float(np.dot(self.chin - mouth, self.down))

    def eye_depth(self, points: np.ndarray) -> float:
        eyes = (point(points, "left_eye_outer") + point(points, "right_eye_outer")) / 2
        return float(np.dot(self.chin - eyes, self.down))


def under_jaw(shape: tuple[int, int], points: np.ndarray, axes: FaceAxes) -> np.ndarray:
    """0/255: the column under the jaw line (neck and chest), cheek to cheek, down to the frame's edge."""
    line = jaw(points)
    far = 4.0 * max(shape)
    poly = np.vstack([line, line[-1] + far * axes.down, line[0] + far * axes.down])
    mask = np.zeros(shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 255)
    return mask


def _small(mask: np.ndarray, side: tuple[int, int], interp=cv2.INTER_AREA) -> np.ndarray:
    return cv2.resize(mask, side, interpolation=interp)


def colour_probability(small: np.ndarray, hair: np.ndarray, other: np.ndarray) -> np.ndarray:
    """P(hair | colour) per pixel from two colour histograms (hair seeds vs everything known not to be hair),
    smoothed over a few pixels; 0.5 where neither seed set has the colour."""
    bins, ranges = [16, 16, 16], [0, 256, 0, 256, 0, 256]
    h_hair = cv2.calcHist([small], [0, 1, 2], hair.astype(np.uint8), bins, ranges)
    h_other = cv2.calcHist([small], [0, 1, 2], other.astype(np.uint8), bins, ranges)
    h_hair = cv2.GaussianBlur(h_hair.reshape(16, -1), (3, 3), 0).reshape(bins) / max(float(h_hair.sum()), 1.0)
    h_other = cv2.GaussianBlur(h_other.reshape(16, -1), (3, 3), 0).reshape(bins) / max(float(h_other.sum()), 1.0)
    eps = 1e-4
    ratio = ((h_hair + eps) / (h_hair + h_other + 2 * eps)).astype(np.float32)
    idx = (small // 16).astype(np.intp)
    prob = ratio[idx[..., 0], idx[..., 1], idx[..., 2]]
    return cv2.GaussianBlur(prob, (5, 5), 0)


def hangs_from_chin(hair: np.ndarray, across: np.ndarray, below: np.ndarray, face_height: float,
                    face_width: float) -> np.ndarray:
    """Where hair below the chin may lie: under the places where there is hair at the chin's level (hair
    hangs down), a little wider. Keeps shoulders, straps and collars beside or under the hair out."""
    band = hair & (below > -0.15 * face_height) & (below <= 0)
    lo = int(np.floor(across.min()))
    occupied = np.zeros(int(np.ceil(across.max())) - lo + 2, np.uint8)
    occupied[np.round(across[band]).astype(np.intp) - lo] = 1
    grow = max(1, round(topology()["head"]["hang_spread"] * face_width))
    occupied = cv2.dilate(occupied[None], np.ones((1, 2 * grow + 1), np.uint8))[0]
    return occupied[np.round(across).astype(np.intp) - lo] > 0


def unbroken_down(hair: np.ndarray, gap: int = 3) -> np.ndarray:
    """Pixels of ``hair`` joined to the top of their column by hair all the way up (gaps of up to ``gap``
    pixels bridged): hair hangs down from the head, a patch of hair-coloured clothes under a gap does not."""
    closed = cv2.morphologyEx(hair.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((gap + 1, 1), np.uint8))
    return np.cumprod(closed, axis=0).astype(bool) & hair


def hair_below_mouth(rgb: np.ndarray, person: np.ndarray, face: np.ndarray, neck: np.ndarray,
                     axes: FaceAxes, points: np.ndarray) -> np.ndarray:
    """0/255 at ``rgb``'s size: the person's pixels below the mouth whose colour is the hair's.

    The hair's colour comes from the person above the eyes outside the face (certain hair); what is not
    hair from the face and the column under the jaw below the chin (neck, chest, the clothes on them)."""
    h, w = person.shape
    k = WORK_SIDE / max(h, w)
    side = (max(1, round(w * k)), max(1, round(h * k)))
    small = _small(rgb, side)
    p, f, n = (_small(m, side, cv2.INTER_NEAREST) > 0 for m in (person, face, neck))
    below = _small(axes.below_chin, side, cv2.INTER_LINEAR)
    seeds_hair = p & (below < -axes.eye_depth(points)) & ~f
    seeds_other = (p & n & (below > 0)) | f
    if seeds_hair.sum() < 20 or seeds_other.sum() < 20:
        return np.zeros((h, w), np.uint8)
    prob = colour_probability(small, seeds_hair, seeds_other)
    hair = (prob > 0.5) & p & ~n
    across = _small(axes.across, side, cv2.INTER_LINEAR)
    hair &= (below <= 0) | hangs_from_chin(hair & ~f, across, below, axes.height * k, axes.width * k)
    hair &= (below <= 0) | unbroken_down(hair | (below <= 0))
    # the decision is blocky at this size: smooth it, and let the full-size person mask draw the edge
    soft = cv2.GaussianBlur(hair.astype(np.float32), (3, 3), 0)
    soft = cv2.resize(soft, (w, h), interpolation=cv2.INTER_LINEAR)
    hair = np.where((soft > 0.5) & (person > 0), 255, 0).astype(np.uint8)
    hair[axes.below_chin < -axes.mouth_depth(points)] = 0
    return hair


def head_zone(axes: FaceAxes) -> np.ndarray:
    """0/255: where hair of this head may lie: a band a few face widths wide around the face's axis."""
    zone = topology()["head"]
    inside = np.abs(axes.across) <= zone["half_width"] * axes.width
    return inside.astype(np.uint8) * 255


def mesh_parse(rgb: np.ndarray, keypoints, points: np.ndarray | None = None,
               long_hair: str = "keep") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Face, hair and person masks of one crop from the person mask and the face mesh."""
    if long_hair not in LONG_HAIR:
        raise FaceChainError(f"Unknown long_hair '{long_hair}'; choose one of {', '.join(LONG_HAIR)}.")
    if points is None:
        points = face_mesh(rgb, keypoints).points
    shape, zone = rgb.shape[:2], topology()["head"]
    person = (person_net().probability(rgb) > 0.5).astype(np.uint8) * 255
    axes = FaceAxes(points, shape)
    face = fill_contours(shape, points, ["face_oval"])
    neck = under_jaw(shape, points, axes)
    neck[(face > 0) | ((axes.below_chin > 0) & (np.abs(axes.across) > zone["neck_half_width"] * axes.width))] = 0
    hair = person.copy()
    hair[(face > 0) | (neck > 0) | (head_zone(axes) == 0)] = 0
    lower = hair_below_mouth(rgb, person, face, neck, axes, points)
    hair[axes.below_chin > -axes.mouth_depth(points)] = 0  # below the mouth only what GrabCut calls hair
    hair = np.maximum(hair, np.minimum(lower, head_zone(axes)))
    if long_hair == "cut":
        hair[axes.below_chin > 0] = 0
    hair = cv2.morphologyEx(hair, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    return face, hair, person
