"""Skin retouching: smooth blemishes on the skin of the face and neck, leave everything else alone.

* ``embedded`` (default, offline): a skin mask (the cheek-sampled skin colour within the face and neck,
  less the eyes, brows and lips: their real contours from the 468-point face mesh when the faces carry it,
  else shapes placed from the 5 keypoints), and an edge-preserving bilateral filter whose result is
  blended in with the ``strength`` inside that mask only.
* ``abpn``: FaceChain's ABPN skin-retouching network through a ModelScope pipeline on the snapshot in
  the model store; its output is blended in through the same skin mask, so eyes, brows, lips, hair and
  the background stay exactly as they were with either backend.

The blend weight is zero outside the returned mask: a pixel outside it is never changed.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np

from . import model_store
from .backends import backend_instance
from .errors import FaceChainError
from .face_mesh import fill_contours, mesh_from_list
from .face_regions import FaceFrame, draw_oval, feature_mask, soft_inside
from .images import as_rgb_uint8
from .progress import ProgressFn, no_progress
from .skin_colour import require_colour, skin_likelihood

BACKENDS = ("embedded", "abpn")


def features(shape: tuple[int, int], frame: FaceFrame, mesh: np.ndarray | None) -> np.ndarray:
    """Eyes, brows and lips that the retouch leaves sharp: the mesh's contours grown over lids, lashes and
    the lip line (in eye distances), else generous shapes from the keypoints."""
    if mesh is None:
        return cv2.dilate(feature_mask(shape, frame), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    d = frame.eye_distance
    eyes = fill_contours(shape, mesh, ["right_eye", "left_eye"], grow=max(2, round(0.12 * d)))
    brows = fill_contours(shape, mesh, ["right_brow", "left_brow"], grow=max(2, round(0.06 * d)))
    lips = fill_contours(shape, mesh, ["lips_outer"], grow=max(2, round(0.05 * d)))
    out = np.maximum(np.maximum(eyes, brows), lips)
    # the detector's eyes and mouth corners stay sharp too: the two models disagree by up to ~0.15 d there
    for x, y in frame.keypoints[[0, 1, 3, 4]]:
        cv2.circle(out, (round(float(x)), round(float(y))), max(3, round(0.15 * d)), 255, -1)
    return out


def skin_mask(rgb: np.ndarray, keypoints, limit: np.ndarray | None = None, mesh=None) -> np.ndarray:
    """0/255 mask of the skin a retouch may touch: skin colour within the face oval and the neck under it,
    without the eyes, brows and lips (grown a little so their edges stay crisp); within ``limit`` if given.
    ``mesh``: the face's 468 points in ``rgb``'s pixels (FaceAlign's faces carry them), or None."""
    frame = FaceFrame.from_keypoints(keypoints)
    shape = rgb.shape[:2]
    mesh = mesh_from_list(mesh)
    if mesh is None:
        zone = draw_oval(shape, frame, 1.12)
    else:
        zone = fill_contours(shape, mesh, ["face_oval"], grow=max(2, round(0.05 * frame.eye_distance)))
    neck = np.array([frame.point(-0.95, 1.6), frame.point(0.95, 1.6), frame.point(0.85, 3.0),
                     frame.point(-0.85, 3.0)], np.int32)
    cv2.fillConvexPoly(zone, neck, 255)
    skin = np.zeros(shape, np.uint8)
    box = region_box(zone, 0)
    if box is None:
        return skin
    skin[box] = ((skin_likelihood(rgb[box], frame, rgb) < 8.0) & (zone[box] > 0)).astype(np.uint8) * 255
    skin = cv2.morphologyEx(skin, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
    skin[features(shape, frame, mesh) > 0] = 0
    if limit is not None:
        skin[limit == 0] = 0
    return skin


def region_box(mask: np.ndarray, pad: int) -> tuple[slice, slice] | None:
    """The bounding box of a mask's pixels grown by ``pad``, as slices; None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    h, w = mask.shape[:2]
    return (slice(max(0, ys.min() - pad), min(h, ys.max() + 1 + pad)),
            slice(max(0, xs.min() - pad), min(w, xs.max() + 1 + pad)))


def blend_weight(mask: np.ndarray, strength: float, feather: int) -> np.ndarray:
    """Soft weight that fades in from the mask's edge and is exactly zero outside the mask."""
    return np.clip(soft_inside(mask, feather) * float(strength), 0.0, 1.0)[..., None]


def smooth_skin(rgb: np.ndarray, face_size: float) -> np.ndarray:
    """Edge-preserving smoothing scaled to the face: two bilateral passes flatten spots and pores while
    the edges of the nose, jaw and wrinkles that carry identity survive."""
    space = max(2.0, face_size / 70.0)
    out = cv2.bilateralFilter(rgb, d=0, sigmaColor=18, sigmaSpace=space)
    return cv2.bilateralFilter(out, d=0, sigmaColor=12, sigmaSpace=space * 1.5)


class ABPNRetoucher:
    """FaceChain's ABPN skin retouching through a ModelScope pipeline on the local snapshot."""

    def __init__(self):
        self._pipe = model_store.modelscope_pipeline("abpn", "skin_retouching")
        self._lock = threading.Lock()

    def retouch(self, rgb: np.ndarray) -> np.ndarray:
        from modelscope.outputs import OutputKeys

        with self._lock:
            out = self._pipe(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        bgr = np.asarray(out[OutputKeys.OUTPUT_IMG])
        return cv2.cvtColor(np.clip(bgr, 0, 255).astype(np.uint8), cv2.COLOR_BGR2RGB)


def _retoucher(backend: str):
    return backend_instance("retouch", backend, {"embedded": None, "abpn": ABPNRetoucher})


def retouch_crop(image: np.ndarray, keypoints, strength: float = 0.6, backend: str = "embedded",
                 limit: np.ndarray | None = None, name: str = "crop", mesh=None) -> tuple[np.ndarray, np.ndarray]:
    """(retouched image, 0/255 mask of where it may differ from the input)."""
    if not 0.0 <= strength <= 1.0:
        raise FaceChainError(f"Retouch strength {strength} is outside 0-1.")
    rgb = as_rgb_uint8(image, name)
    if limit is not None and limit.shape[:2] != rgb.shape[:2]:
        raise FaceChainError(f"The mask for {name} is {limit.shape[1]}x{limit.shape[0]} but the image is "
                             f"{rgb.shape[1]}x{rgb.shape[0]}; connect a mask made from these images "
                             f"(HumanParse's face or head mask).")
    require_colour(rgb, keypoints, name, "SkinRetouch")
    frame = FaceFrame.from_keypoints(keypoints)
    mask = skin_mask(rgb, keypoints, limit, mesh)
    if strength == 0.0 or not np.any(mask):
        return rgb.copy(), mask
    engine = _retoucher(backend)
    # Only the skin's bounding box (plus the filter's reach) is filtered and blended: the rest is copied.
    box = region_box(mask, int(4 * frame.size / 70.0) + 4)
    roi = rgb[box]
    smooth = smooth_skin(roi, frame.size) if engine is None else engine.retouch(rgb)[box]
    w = blend_weight(mask[box], strength, feather=max(3, int(frame.size / 60)) | 1)
    out = rgb.copy()
    blend = roi.astype(np.float32) * (1.0 - w) + smooth.astype(np.float32) * w
    out[box] = np.clip(blend + 0.5, 0, 255).astype(np.uint8)
    return out, mask


def retouch_crops(images: list[np.ndarray], keypoints: list, strength: float = 0.6, backend: str = "embedded",
                  limits: list[np.ndarray] | None = None, names: list[str] | None = None,
                  progress: ProgressFn | None = None,
                  meshes: list | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    if not images:
        raise FaceChainError("SkinRetouch got no images. Connect the aligned crops of FaceAlign or HumanParse.")
    progress = progress or no_progress
    names = names or [f"crop {i + 1}" for i in range(len(images))]
    out = []
    for i, (img, kps) in enumerate(zip(images, keypoints)):
        progress(i, len(images), names[i])
        out.append(retouch_crop(img, kps, strength, backend, None if limits is None else limits[i], names[i],
                                None if meshes is None else meshes[i]))
    progress(len(images), len(images), None)
    return out
