"""Human parsing for FaceChain's training crops: face, hair and head masks, and the head on white.

FaceChain keeps only the head of each aligned crop: head = hair + face from a human-parsing model,
grown a little, limited to the person, the largest connected region kept; everything else is painted
white. Two backends produce the face, hair and person masks; the head rule is shared:

* ``embedded`` (default, offline): MediaPipe's learned person mask and 468-point face mesh, the head cut
  out of the person below the chin and beside the face (``head_parse.py``). Long hair below the chin is
  kept (``long_hair="keep"``, as FaceChain's parser does) or cut at the chin (``"cut"``).
* ``classical`` (offline, no model file): the face oval and features from the 5 keypoints, a skin-colour
  model sampled on the cheeks to find the forehead, jaw and hairline, and OpenCV's GrabCut seeded from
  those to separate hair from the background.
* ``m2fp``: FaceChain's M2FP multi-human parsing through a ModelScope pipeline on the snapshot in the
  model store.

Masks are ``uint8`` 0/255 arrays of the crop's size.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import cv2
import numpy as np

from . import model_store
from .backends import backend_instance
from .errors import FaceChainError
from .face_mesh import mesh_from_list
from .face_regions import FaceFrame, draw_oval, feature_mask, soft_inside
from .head_parse import LONG_HAIR, mesh_parse
from .images import as_rgb_uint8
from .progress import ProgressFn, no_progress
from .skin_colour import require_colour, skin_likelihood

BACKENDS = ("embedded", "classical", "m2fp")
WHITE = 255


@dataclass
class Parsing:
    face: np.ndarray  # uint8 0/255
    hair: np.ndarray
    head: np.ndarray
    person: np.ndarray
    image: np.ndarray  # the crop, white outside ``head``


# --- the head rule (both backends) ---------------------------------------------------------------------

def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a 0/255 mask, holes filled."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros_like(mask)
    keep = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    region = np.where(labels == keep, 255, 0).astype(np.uint8)
    return fill_holes(region)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    contours, _ = cv2.findContours((mask > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = np.zeros_like(mask)
    cv2.drawContours(out, contours, -1, 255, -1)
    return out


def head_mask(face: np.ndarray, hair: np.ndarray, person: np.ndarray | None = None) -> np.ndarray:
    """Head = hair + face, grown by about a twentieth of the face's side, kept within the person,
    largest region, holes filled; the face itself always stays in."""
    head = np.maximum(face, hair)
    k = max(int(np.sqrt(np.count_nonzero(face)) / 20), 1)
    head = cv2.dilate(head, np.ones((k, k), np.uint8))
    if person is not None and np.any(person):
        head = np.minimum(head, person)
    return np.maximum(largest_region(head), face)


def paint_outside(rgb: np.ndarray, mask: np.ndarray, feather: int = 3) -> np.ndarray:
    """White outside the mask; a few pixels of fade inside its edge so the cut-out has no jagged rim."""
    a = soft_inside(mask, feather)
    return cv2.blendLinear(rgb, np.full_like(rgb, WHITE), a, 1.0 - a)


# --- embedded backend ------------------------------------------------------------------------------------

def embedded_parse(rgb: np.ndarray, keypoints, work_side: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Face, hair and person masks of one crop, from its keypoints, skin colour and GrabCut."""
    frame = FaceFrame.from_keypoints(keypoints)
    h, w = rgb.shape[:2]
    k = work_side / max(h, w)
    small = cv2.resize(rgb, (max(1, round(w * k)), max(1, round(h * k))), interpolation=cv2.INTER_AREA)
    sf = FaceFrame.from_keypoints(frame.keypoints * k)
    shape = small.shape[:2]

    # Face: skin-coloured pixels within a slightly grown oval, plus the features (eyes, brows, lips),
    # cut at the chin by the oval itself so the neck stays out.
    skin = (skin_likelihood(small, sf) < 10.0).astype(np.uint8) * 255
    oval_in = draw_oval(shape, sf, 0.80)
    oval_out = draw_oval(shape, sf, 1.10)
    face = np.minimum(skin, oval_out)
    face = np.maximum(face, np.minimum(feature_mask(shape, sf), oval_out))
    face = np.maximum(face, oval_in)
    face = cv2.morphologyEx(face, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    face = largest_region(face)

    # Hair and person: GrabCut seeded with the face and the crown as certain foreground, and the frame's
    # edge, everything far from the head and the body under the chin as certain background. The rest starts
    # as probable background, so the foreground colour model begins with the person's own hair and skin
    # rather than with whatever background lies near the head.
    gc = np.full(shape, cv2.GC_PR_BGD, np.uint8)
    (cx, cy), (ow, oh), ang = sf.oval()

    def zone(grow_w, grow_h, lift):
        m = np.zeros(shape, np.uint8)
        c = np.array([cx, cy]) - sf.down * lift * oh
        cv2.ellipse(m, ((float(c[0]), float(c[1])), (ow * grow_w, oh * grow_h), ang), 255, -1)
        return m

    gc[zone(2.1, 1.8, 0.15) == 0] = cv2.GC_BGD  # far from the head
    body = np.zeros(shape, np.uint8)
    neck = np.array([sf.point(-0.9, 2.1), sf.point(0.9, 2.1), sf.point(0.9, 9.0), sf.point(-0.9, 9.0)], np.int32)
    cv2.fillConvexPoly(body, neck, 255)
    gc[body > 0] = cv2.GC_BGD
    b = max(2, shape[0] // 64)
    gc[:b, :], gc[-b:, :], gc[:, :b], gc[:, -b:] = cv2.GC_BGD, cv2.GC_BGD, cv2.GC_BGD, cv2.GC_BGD
    # the crown: a thin band over the forehead that is hair unless it is skin (a bald head)
    crown = zone(1.05, 1.12, 0.04)
    crown[oval_out > 0] = 0
    crown[skin > 0] = 0
    crown[np.dot(np.indices(shape)[::-1].transpose(1, 2, 0) - sf.eye_centre, sf.down) > -0.3 * sf.eye_to_mouth] = 0
    gc[crown > 0] = cv2.GC_FGD
    gc[face > 0] = cv2.GC_FGD
    # GrabCut only where the answer is open, plus a margin of certain background for its colour model.
    ys, xs = np.nonzero(gc != cv2.GC_BGD)
    m = 3 * b
    box = (slice(max(0, ys.min() - m), ys.max() + 1 + m), slice(max(0, xs.min() - m), xs.max() + 1 + m))
    sub = np.ascontiguousarray(gc[box])
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.grabCut(cv2.cvtColor(np.ascontiguousarray(small[box]), cv2.COLOR_RGB2BGR), sub, None, bgd, fgd, 4,
                cv2.GC_INIT_WITH_MASK)
    gc[box] = sub
    person = np.where((gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD), 255, 0).astype(np.uint8)
    person = largest_region(person)
    hair = person.copy()
    hair[face > 0] = 0
    hair = cv2.morphologyEx(hair, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))

    def up_size(m):
        return (cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR) > 127).astype(np.uint8) * 255

    return up_size(face), up_size(hair), up_size(cv2.dilate(person, np.ones((5, 5), np.uint8)))


# --- M2FP backend ----------------------------------------------------------------------------------------

class M2FPParser:
    """FaceChain's M2FP human parsing through a ModelScope pipeline on the local snapshot."""

    score_threshold = 0.8  # FaceChain keeps parts above this score

    def __init__(self):
        self._pipe = model_store.modelscope_pipeline("m2fp", "image_segmentation")
        self._lock = threading.Lock()

    def parse(self, rgb: np.ndarray, keypoints=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with self._lock:
            out = self._pipe(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        return masks_from_parts(out.get("masks", []), out.get("labels", []), out.get("scores", []),
                                rgb.shape[:2], self.score_threshold)


def masks_from_parts(masks, labels, scores, shape, threshold: float = 0.8):
    """Face, hair and person masks from a parser's labelled parts: the largest confident part of each."""
    best = {"Face": None, "Hair": None, "Human": None}
    for m, label, score in zip(masks, labels, scores):
        if label not in best or float(score) <= threshold:
            continue
        m = (np.asarray(m) > 0.5).astype(np.uint8) * 255
        if m.shape != tuple(shape):
            m = cv2.resize(m, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
        if best[label] is None or np.count_nonzero(m) > np.count_nonzero(best[label]):
            best[label] = m
    empty = np.zeros(shape, np.uint8)
    return tuple(best[k] if best[k] is not None else empty for k in ("Face", "Hair", "Human"))


def get_parser(backend: str):
    return backend_instance("parsing", backend, {"embedded": None, "classical": None, "m2fp": M2FPParser})


def parse_crop(image: np.ndarray, keypoints, backend: str = "embedded", name: str = "crop", mesh=None,
               long_hair: str = "keep") -> Parsing:
    """Masks and head-on-white of one crop. ``mesh``: the face's 468 points in the crop (FaceAlign's faces
    carry them), found here when absent; ``long_hair``: keep or cut hair below the chin (embedded backend)."""
    rgb = as_rgb_uint8(image, name)
    parser = get_parser(backend)
    if backend == "embedded":
        face, hair, person = mesh_parse(rgb, keypoints, mesh_from_list(mesh), long_hair)
    elif parser is None:
        require_colour(rgb, keypoints, name, "HumanParse")
        face, hair, person = embedded_parse(rgb, keypoints)
    else:
        face, hair, person = parser.parse(rgb, keypoints)
        if not np.any(face):
            raise FaceChainError(f"{backend} found no face in {name}; check that FaceAlign kept the right photo, "
                                 f"or use the 'embedded' backend.")
    head = head_mask(face, hair, person)
    return Parsing(face, np.minimum(hair, head), head, person, paint_outside(rgb, head))


def parse_crops(images: list[np.ndarray], keypoints: list, backend: str = "embedded", names: list[str] | None = None,
                progress: ProgressFn | None = None, meshes: list | None = None,
                long_hair: str = "keep") -> list[Parsing]:
    if not images:
        raise FaceChainError("HumanParse got no images. Connect the aligned crops of FaceAlign.")
    if long_hair not in LONG_HAIR:
        raise FaceChainError(f"Unknown long_hair '{long_hair}'; choose one of {', '.join(LONG_HAIR)}.")
    meshes = meshes or [None] * len(images)
    progress = progress or no_progress
    names = names or [f"crop {i + 1}" for i in range(len(images))]
    out = []
    for i, (img, kps) in enumerate(zip(images, keypoints)):
        progress(i, len(images), names[i])
        out.append(parse_crop(img, kps, backend, names[i], meshes[i], long_hair))
    progress(len(images), len(images), None)
    return out
