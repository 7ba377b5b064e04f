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
from .detect import detect_faces
from .errors import FaceChainError
from .face_mesh import face_mesh, fill_contours, jaw, point, read_tflite, topology
from .model_cache import cached

LONG_HAIR = ("keep", "cut")
SEG_SIDE = 256  # the person net's input side
WORK_SIDE = 128  # the colour test's side: it decides hair or not in blocks, the person mask draws the edge


class PersonMaskNet:
    """selfie_segmentation.tflite through OpenCV: RGB in [0, 1], 256x256, person probability out."""

    def __init__(self, path):
        self._net = read_tflite(path)
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
    """The shared net, loaded again when its file changes."""
    path = model_store.embedded_path("selfie_segmentation")
    return cached(("embedded", "selfie_segmentation"), lambda: PersonMaskNet(path), [path])


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


class SmallView:
    """The crop and its masks at the colour test's size (the test decides in blocks; the full-size person mask
    draws the edges afterwards)."""

    def __init__(self, rgb, person, face, neck, axes: FaceAxes):
        h, w = person.shape
        self.full = (w, h)
        self.k = WORK_SIDE / max(h, w)
        self.side = (max(1, round(w * self.k)), max(1, round(h * self.k)))
        self.rgb = _small(rgb, self.side)
        self.person, self.face, self.neck = (_small(m, self.side, cv2.INTER_NEAREST) > 0 for m in (person, face, neck))
        # face coordinates stay in full-size pixels
        self.below = _small(axes.below_chin, self.side, cv2.INTER_LINEAR)
        self.across = _small(axes.across, self.side, cv2.INTER_LINEAR)
        outside = (~self.face).astype(np.uint8)
        self.from_face = cv2.distanceTransform(outside, cv2.DIST_L2, 3) / max(axes.width * self.k, 1.0)

    def up(self, mask: np.ndarray, person: np.ndarray) -> np.ndarray:
        """A small 0/1 decision at full size, smoothed, within the full-size person mask; 0/255."""
        soft = cv2.GaussianBlur(mask.astype(np.float32), (3, 3), 0)
        soft = cv2.resize(soft, self.full, interpolation=cv2.INTER_LINEAR)
        return np.where((soft > 0.5) & (person > 0), 255, 0).astype(np.uint8)


def hair_mask(rgb: np.ndarray, person: np.ndarray, face: np.ndarray, neck: np.ndarray, axes: FaceAxes,
              points: np.ndarray) -> np.ndarray:
    """0/255 at ``rgb``'s size: the hair of this head.

    Near the face (``near`` face widths from its oval) and above the mouth, the person is hair. Further out,
    and below the mouth, only what has the hair's colour: colour histograms of the person above the eyes near
    the face (certain hair) against the face and the column under the jaw below the chin (neck, chest and
    the clothes on them). Below the chin, hair must also hang: under hair at the chin's level, unbroken."""
    zone = topology()["head"]
    v = SmallView(rgb, person, face, neck, axes)
    near = v.from_face < zone["near"]
    upper = v.below < -axes.mouth_depth(points)
    seeds_hair = v.person & near & (v.below < -axes.eye_depth(points)) & ~v.face
    # not hair: the face, the neck column under the chin and the background around the head (the person
    # mask can take in a patch of background between the hair and the shoulders)
    seeds_other = (v.person & v.neck & (v.below > 0)) | v.face | (~v.person & (v.from_face < 1.0))
    # below the mouth, the hair's colour is that of the hair beside the face, which is what hangs down
    seeds_beside = v.person & near & ~v.face & ~v.neck & (v.below > -axes.eye_depth(points)) & upper
    coloured = np.zeros(v.person.shape, bool)
    if seeds_hair.sum() >= 20 and seeds_other.sum() >= 20:
        coloured = colour_probability(v.rgb, seeds_hair, seeds_other) > 0.5
        if seeds_beside.sum() >= 20:
            hangs = colour_probability(v.rgb, seeds_beside, seeds_other) > zone["hang_colour"]
            coloured = np.where(upper, coloured, coloured & hangs)
    hair = v.person & ~v.face & ~v.neck & (np.abs(v.across) <= zone["half_width"] * axes.width)
    hair &= (upper & near) | coloured
    hair &= (v.below <= 0) | hangs_from_chin(hair, v.across, v.below, axes.height, axes.width)
    hair &= (v.below <= 0) | unbroken_down(hair | (v.below <= 0))
    out = v.up(hair, person)
    # above the mouth and near the face the full-size person mask decides on its own (sharp edges)
    exact = (person > 0) & (face == 0) & (neck == 0) & (axes.below_chin < -axes.mouth_depth(points))
    exact &= cv2.resize(near.astype(np.uint8), v.full, interpolation=cv2.INTER_NEAREST) > 0
    out[exact] = 255
    return out


def other_faces(rgb: np.ndarray, points: np.ndarray, side: int = 320) -> list[tuple[np.ndarray, float]]:
    """(centre, size) in ``rgb``'s pixels of every face in the crop other than this one (people behind or
    beside the head). Detected on a smaller copy: a face of 30 pixels in a 512 crop is still found."""
    h, w = rgb.shape[:2]
    k = min(1.0, side / max(h, w))
    small = cv2.resize(rgb, (max(1, round(w * k)), max(1, round(h * k))), interpolation=cv2.INTER_AREA)
    oval = np.asarray(points, np.float32)[topology()["contours"]["face_oval"]]
    centre, size = oval.mean(axis=0), float(np.ptp(oval, axis=0).max())
    out = []
    for f in detect_faces(small, "embedded"):
        c, s = f.centre / k, f.size / k
        if np.linalg.norm(c - centre) > 0.5 * size:
            out.append((c, s))
    return out


def belongs_to_others(shape: tuple[int, int], points: np.ndarray, others) -> np.ndarray:
    """True where a pixel lies nearer another face than this one, distances in each face's own size: the
    person mask joins people who touch, this splits them between their faces."""
    oval = np.asarray(points, np.float32)[topology()["contours"]["face_oval"]]
    centre, size = oval.mean(axis=0), float(np.ptp(oval, axis=0).max())
    xs = np.arange(shape[1], dtype=np.float32)[None, :]
    ys = np.arange(shape[0], dtype=np.float32)[:, None]
    own = np.hypot(xs - centre[0], ys - centre[1]) / size
    theirs = np.zeros(shape[:2], bool)
    for c, s in others:
        theirs |= np.hypot(xs - c[0], ys - c[1]) / s < own
    return theirs


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
    hair = hair_mask(rgb, person, face, neck, axes, points)
    others = other_faces(rgb, points)
    if others:
        hair[belongs_to_others(shape, points, others)] = 0
    if long_hair == "cut":
        hair[axes.below_chin > 0] = 0
    hair = cv2.morphologyEx(hair, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    return face, hair, person
