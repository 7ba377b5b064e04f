"""FaceFusion: put the template face into each generated portrait, only inside a soft face mask.

Embedded backend (offline, classical):
1. Detect the face (5 keypoints) in the template and in the target image.
2. Landmark-driven warp: from the five keypoints, derive a denser set of landmarks: the keypoints
   themselves plus a face oval and an outer ring placed by each face's own affine fit to the canonical
   112x112 face. A Delaunay mesh over the target's points maps every triangle of the template onto
   the target by its own affine transform, so eyes, nose tip and mouth corners land exactly on the
   target's while the oval follows the target's face shape and pose.
3. Soft mask: the face oval (brows to chin, cheek to cheek), shrunk a little and feathered; the mask
   is exactly zero outside the oval, so no pixel outside it changes.
4. Colour and lighting: the warped face takes the target's colour statistics (mean and spread per Lab
   channel inside the mask), then its broad shading (a heavily blurred difference of lightness).
5. Seamless blending: Poisson cloning of the corrected face into the target, then alpha blending with
   the feathered mask times ``strength``.

Learned backend (``face_fusion``): FaceChain's face-fusion model through ModelScope; its output is
blended with the same mask and strength, so the "outside the mask is unchanged" rule holds for both.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import cv2
import numpy as np

from . import model_store
from .detect import Face
from .errors import FaceChainError
from .images import as_rgb_uint8
from .progress import ProgressFn, no_progress
from .recognition import ARCFACE_TEMPLATE, detect_faces_parallel_safe, parallel_map

BACKENDS = ("embedded", "face_fusion")


def _ellipse(cx: float, cy: float, ax: float, ay: float, n: int) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False) - np.pi / 2
    return np.stack([cx + ax * np.cos(t), cy + ay * np.sin(t)], axis=1)


# Canonical landmarks in the 112x112 face template's coordinates (eyes at y~52, mouth at y~92).
# The oval runs from just above the brows to the chin and between the cheeks: the part of the face
# that carries identity, without hair or ears, whose colour varies by style.
FACE_OVAL = _ellipse(56.0, 68.0, 35.0, 45.0, 20)
# An outer ring keeps the mesh's triangles near the oval well shaped; nothing outside the oval is blended.
OUTER_RING = _ellipse(56.0, 68.0, 62.0, 74.0, 16)
CANONICAL = np.vstack([ARCFACE_TEMPLATE, FACE_OVAL, OUTER_RING]).astype(np.float64)
N_KEY, N_OVAL = 5, len(FACE_OVAL)


@dataclass
class FusionSettings:
    strength: float = 1.0
    backend: str = "embedded"
    detector: str = "embedded"
    colour_match: bool = True
    mask_shrink: float = 0.04  # of the face size: the oval's edge pulled in before feathering
    feather: float = 0.10  # of the face size: width of the soft edge
    workers: int = 0  # 0: choose from the CPU count

    def check(self) -> None:
        if not 0.0 <= self.strength <= 1.0:
            raise FaceChainError(f"Fusion strength {self.strength} is outside 0-1.")
        if self.backend not in BACKENDS:
            raise FaceChainError(f"Unknown face-fusion backend '{self.backend}'; choose one of {', '.join(BACKENDS)}.")


@dataclass
class FusedImage:
    image: np.ndarray  # HxWx3 uint8, the full image with the face fused (outside the mask: the input)
    mask: np.ndarray  # HxW float32 0..1: how much of the fused face each pixel took (strength included)
    note: str  # for the report
    fused: bool


@dataclass
class FusionResult:
    images: list[FusedImage] = field(default_factory=list)

    def report_text(self) -> str:
        n = sum(f.fused for f in self.images)
        lines = [f"FaceFusion: fused the template face into {n} of {len(self.images)} images"]
        lines += [f"- image {i + 1}: {f.note}" for i, f in enumerate(self.images)]
        return "\n".join(lines)


def dense_landmarks(face: Face) -> np.ndarray:
    """The five keypoints plus the oval and outer ring placed by the face's affine fit (N x 2)."""
    kps = face.keypoints.astype(np.float64)
    m, _ = cv2.estimateAffine2D(ARCFACE_TEMPLATE.astype(np.float64), kps, method=cv2.LMEDS)
    if m is None:
        m, _ = cv2.estimateAffinePartial2D(ARCFACE_TEMPLATE.astype(np.float64), kps, method=cv2.LMEDS)
    if m is None:
        raise FaceChainError("A face's keypoints are degenerate; it cannot be warped.")
    # A full affine fit can shear wildly when the 5 points are nearly collinear (a profile); keep it
    # close to a similarity by limiting its anisotropy.
    u, s, vt = np.linalg.svd(m[:, :2])
    s = np.clip(s, s.max() / 1.6, None)
    m[:, :2] = u @ np.diag(s) @ vt
    rest = np.hstack([CANONICAL[N_KEY:], np.ones((len(CANONICAL) - N_KEY, 1))]) @ m.T
    return np.vstack([kps, rest])


def _triangles(points: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    """Delaunay triangles of ``points`` as index triples."""
    x, y, w, h = rect
    div = cv2.Subdiv2D((x, y, w, h))
    for p in points:
        div.insert((float(p[0]), float(p[1])))
    tris = []
    for t in div.getTriangleList().reshape(-1, 3, 2):
        idx = []
        for v in t:
            d = np.linalg.norm(points - v, axis=1)
            j = int(np.argmin(d))
            if d[j] > 1e-3:
                break
            idx.append(j)
        if len(idx) == 3 and len(set(idx)) == 3:
            tris.append(idx)
    return np.array(tris, dtype=np.int32)


def warp_face(src: np.ndarray, src_pts: np.ndarray, dst_shape: tuple[int, int], dst_pts: np.ndarray,
              roi: tuple[int, int, int, int]) -> np.ndarray:
    """Piecewise-affine warp of ``src`` so that ``src_pts`` land on ``dst_pts``, computed inside ``roi``
    (x0, y0, x1, y1) of an image of ``dst_shape``; returns the ROI-sized warped patch."""
    x0, y0, x1, y1 = roi
    w, h = x1 - x0, y1 - y0
    local = dst_pts - [x0, y0]
    pad = 4 * max(w, h)
    tris = _triangles(local, (-pad, -pad, w + 2 * pad, h + 2 * pad))
    if len(tris) == 0:
        raise FaceChainError("The face mesh could not be built (degenerate landmarks).")
    label = np.full((h, w), -1, np.int32)
    maps = np.zeros((len(tris), 2, 3), np.float64)
    for k, (a, b, c) in enumerate(tris):
        cv2.fillConvexPoly(label, np.round(local[[a, b, c]]).astype(np.int32), int(k))
        maps[k] = cv2.getAffineTransform(local[[a, b, c]].astype(np.float32), src_pts[[a, b, c]].astype(np.float32))
    inside = label >= 0
    yy, xx = np.nonzero(inside)
    m = maps[label[inside]]
    map_x = np.full((h, w), -1.0, np.float32)
    map_y = np.full((h, w), -1.0, np.float32)
    map_x[inside] = m[:, 0, 0] * xx + m[:, 0, 1] * yy + m[:, 0, 2]
    map_y[inside] = m[:, 1, 0] * xx + m[:, 1, 1] * yy + m[:, 1, 2]
    return cv2.remap(src, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def face_mask(oval: np.ndarray, shape: tuple[int, int], face_size: float, shrink: float, feather: float) -> np.ndarray:
    """Feathered oval mask, float32 0..1, exactly 0 outside the oval polygon."""
    h, w = shape
    hard = np.zeros((h, w), np.uint8)
    cv2.fillPoly(hard, [np.round(oval).astype(np.int32)], 255)
    r = max(1, int(round(shrink * face_size)))
    core = cv2.erode(hard, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    f = max(1, int(round(feather * face_size)))
    # Blur the shrunk core, then clip by the hard oval: the soft edge stays inside the oval.
    soft = cv2.GaussianBlur(core.astype(np.float32) / 255.0, (0, 0), f / 2.0)
    soft[hard == 0] = 0.0
    # Below one 8-bit step a pixel would not visibly change; zero it so "mask 0" means "untouched" even
    # after the mask is saved as an 8-bit image.
    soft[soft < 1.0 / 255.0] = 0.0
    return np.clip(soft, 0.0, 1.0)


def _wide_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a float image with a wide kernel, done at reduced size (it keeps only low
    frequencies, so the result is the same to the eye at a small fraction of the cost)."""
    k = max(1, int(sigma // 3))
    if k == 1:
        return cv2.GaussianBlur(img, (0, 0), sigma)
    h, w = img.shape[:2]
    small = cv2.resize(img, (max(1, w // k), max(1, h // k)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigma / k)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def match_colour(src: np.ndarray, dst: np.ndarray, weight: np.ndarray, face_size: float) -> np.ndarray:
    """``src`` (RGB uint8) recoloured to ``dst``'s Lab statistics where ``weight`` > 0.5, then given
    ``dst``'s broad shading; returns RGB uint8."""
    sel = weight > 0.5
    if sel.sum() < 16:
        return src
    s = cv2.cvtColor(src.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    d = cv2.cvtColor(dst.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    out = s.copy()
    for ch in range(3):
        sm, ss = float(s[..., ch][sel].mean()), float(s[..., ch][sel].std())
        dm, ds = float(d[..., ch][sel].mean()), float(d[..., ch][sel].std())
        k = np.clip(ds / max(ss, 1e-3), 0.0, 2.5)
        out[..., ch] = (s[..., ch] - sm) * k + dm
    # Broad lighting (a light from one side, a shadowed cheek) comes from the target; the blur is wide
    # enough that eyes, nose and mouth keep the template's own shading.
    sigma = max(1.0, 0.12 * face_size)
    wblur = _wide_blur(weight, sigma) + 1e-4
    ld = _wide_blur(d[..., 0] * weight, sigma) / wblur
    lo = _wide_blur(out[..., 0] * weight, sigma) / wblur
    out[..., 0] += (ld - lo)
    out[..., 0] = np.clip(out[..., 0], 0, 100)
    rgb = cv2.cvtColor(out, cv2.COLOR_LAB2RGB)
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


def poisson_blend(src: np.ndarray, dst: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """OpenCV's seamless cloning of ``src`` into ``dst`` inside ``mask`` (same-size RGB patches).

    The patches are padded first: OpenCV's solver needs the mask clear of the image border."""
    pad = 8
    s = cv2.copyMakeBorder(src, pad, pad, pad, pad, cv2.BORDER_REFLECT)
    d = cv2.copyMakeBorder(dst, pad, pad, pad, pad, cv2.BORDER_REFLECT)
    m = cv2.copyMakeBorder(mask, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    ys, xs = np.nonzero(m)
    if len(xs) == 0:
        return dst
    centre = (int((xs.min() + xs.max() + 1) // 2), int((ys.min() + ys.max() + 1) // 2))
    try:
        out = cv2.seamlessClone(s, d, m, centre, cv2.NORMAL_CLONE)
    except cv2.error:
        return src  # a mask OpenCV cannot solve on: the colour-matched face alone
    return out[pad:-pad, pad:-pad]


class LearnedFusion:
    """FaceChain's face-fusion model through a ModelScope pipeline on the locally installed snapshot."""

    def __init__(self):
        local = model_store.model_path("face_fusion")
        try:
            from modelscope.pipelines import pipeline
            from modelscope.utils.constant import Tasks
        except ImportError as e:
            raise FaceChainError(
                f"The 'face_fusion' backend needs ModelScope's vision extras ({e}). Install them with "
                f"`pip install \"modelscope[cv]\"`, or choose the 'embedded' backend.") from None
        self._pipe = pipeline(Tasks.image_face_fusion, model=str(local))
        self._lock = threading.Lock()

    def fuse(self, target: np.ndarray, template: np.ndarray) -> np.ndarray:
        from PIL import Image

        with self._lock:
            out = self._pipe(dict(template=Image.fromarray(target), user=Image.fromarray(template)))
        img = out.get("output_img") if isinstance(out, dict) else None
        if img is None:
            raise FaceChainError("The face-fusion model returned no image.")
        img = np.asarray(img)
        if img.shape[:2] != target.shape[:2]:
            img = cv2.resize(img, (target.shape[1], target.shape[0]), interpolation=cv2.INTER_LINEAR)
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)  # ModelScope's vision pipelines answer in BGR


_learned: dict = {}
_learned_lock = threading.Lock()


def learned_fusion() -> LearnedFusion:
    with _learned_lock:
        if "face_fusion" not in _learned:
            _learned["face_fusion"] = LearnedFusion()
        return _learned["face_fusion"]


@dataclass
class Template:
    image: np.ndarray
    face: Face
    landmarks: np.ndarray


def prepare_template(template: np.ndarray, detector: str = "embedded") -> Template:
    rgb = as_rgb_uint8(template, "template")
    faces = detect_faces_parallel_safe(rgb, detector)
    if not faces:
        raise FaceChainError("FaceFusion found no face in the template image. Connect a clear photo of the "
                             "person's face (the template face from the training photos).")
    return Template(rgb, faces[0], dense_landmarks(faces[0]))


def fuse_one(target: np.ndarray, tpl: Template, s: FusionSettings) -> FusedImage:
    rgb = as_rgb_uint8(target, "image")
    h, w = rgb.shape[:2]
    zero = np.zeros((h, w), np.float32)
    if s.strength == 0.0:
        return FusedImage(rgb, zero, "strength 0, left unchanged", False)
    faces = detect_faces_parallel_safe(rgb, s.detector)
    if not faces:
        return FusedImage(rgb, zero, "no face found, left unchanged", False)
    face = faces[0]  # the largest: the portrait's subject
    pts = dense_landmarks(face)
    oval = pts[N_KEY:N_KEY + N_OVAL]
    # Work inside the oval's bounding box (plus the feather and a margin), not the whole image.
    size = face.size
    margin = int(0.25 * size) + 4
    x0 = int(max(0, np.floor(oval[:, 0].min()) - margin))
    y0 = int(max(0, np.floor(oval[:, 1].min()) - margin))
    x1 = int(min(w, np.ceil(oval[:, 0].max()) + margin))
    y1 = int(min(h, np.ceil(oval[:, 1].max()) + margin))
    if x1 - x0 < 8 or y1 - y0 < 8:
        return FusedImage(rgb, zero, "face too small to fuse, left unchanged", False)
    roi = (x0, y0, x1, y1)
    patch = rgb[y0:y1, x0:x1]
    local_oval = oval - [x0, y0]
    alpha = face_mask(local_oval, patch.shape[:2], size, s.mask_shrink, s.feather)
    if alpha.max() <= 0.0:
        return FusedImage(rgb, zero, "face mask empty (face at the image edge), left unchanged", False)
    if s.backend == "face_fusion":
        swapped = learned_fusion().fuse(rgb, tpl.image)[y0:y1, x0:x1]
        blended = swapped
    else:
        warped = warp_face(tpl.image, tpl.landmarks, (h, w), pts, roi)
        if s.colour_match:
            warped = match_colour(warped, patch, alpha, size)
        hard = (alpha > 0.02).astype(np.uint8) * 255
        blended = poisson_blend(warped, patch, hard)
    a = alpha * s.strength
    a[a < 1.0 / 255.0] = 0.0  # see face_mask: a zero in the saved mask means an untouched pixel
    out = rgb.copy()
    out[y0:y1, x0:x1] = np.clip(patch * (1.0 - a[..., None]) + blended * a[..., None] + 0.5, 0, 255).astype(np.uint8)
    full = zero.copy()
    full[y0:y1, x0:x1] = a
    return FusedImage(out, full, f"fused (face {size:.0f} px, {len(faces)} face{'s' if len(faces) > 1 else ''} "
                                 f"seen{', the largest used' if len(faces) > 1 else ''})", True)


def fuse_images(images: list[np.ndarray], template: np.ndarray, settings: FusionSettings | None = None,
                progress: ProgressFn | None = None) -> FusionResult:
    """Fuse the template's face into every image; images without a face come back unchanged."""
    s = settings or FusionSettings()
    s.check()
    progress = progress or no_progress
    if not images:
        raise FaceChainError("FaceFusion got no images.")
    if s.backend == "face_fusion":
        learned_fusion()  # load, or say which file is missing, before any work
    tpl = prepare_template(template, s.detector)
    result = FusionResult()
    progress(0, len(images), None)
    for i, fused in enumerate(parallel_map(lambda im: fuse_one(im, tpl, s), list(images), s.workers), start=1):
        result.images.append(fused)
        progress(i, len(images), None)
    return result
