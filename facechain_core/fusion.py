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
from .face_regions import MEAN_FACE_5
from .images import as_rgb_uint8
from .progress import ProgressFn, no_progress
from .model_cache import cached, learned_files
from .threads import detect_faces_per_thread, parallel_map

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
CANONICAL = np.vstack([MEAN_FACE_5, FACE_OVAL, OUTER_RING]).astype(np.float64)
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
    roi: tuple[int, int, int, int] | None = None  # x0, y0, x1, y1: the only part that can differ
    faces: list[Face] = field(default_factory=list)  # the faces found in the input image, largest first


@dataclass
class FusionResult:
    images: list[FusedImage] = field(default_factory=list)

    def detections(self) -> list[list[dict]]:
        """The faces found in each input image (for RTSRank). The fused face keeps the target's
        keypoints, since the warp puts the template's keypoints exactly there."""
        return [[f.to_dict() for f in img.faces] for img in self.images]

    def report_text(self) -> str:
        n = sum(f.fused for f in self.images)
        lines = [f"FaceFusion: fused the template face into {n} of {len(self.images)} images"]
        lines += [f"- image {i + 1}: {f.note}" for i, f in enumerate(self.images)]
        return "\n".join(lines)


def dense_landmarks(face: Face) -> np.ndarray:
    """The five keypoints plus the oval and outer ring placed by the face's affine fit (N x 2)."""
    kps = face.keypoints.astype(np.float64)
    m, _ = cv2.estimateAffine2D(MEAN_FACE_5.astype(np.float64), kps, method=cv2.LMEDS)
    if m is None:
        m, _ = cv2.estimateAffinePartial2D(MEAN_FACE_5.astype(np.float64), kps, method=cv2.LMEDS)
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


def _signed_areas(points: np.ndarray, tris: np.ndarray) -> np.ndarray:
    a, b, c = points[tris[:, 0]], points[tris[:, 1]], points[tris[:, 2]]
    return (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])


# Every face's landmarks come from the same canonical layout, so one mesh serves them all; a face whose
# keypoints fold a triangle over (an extreme pose) gets its own Delaunay mesh instead.
CANONICAL_TRIANGLES = _triangles(CANONICAL, (-100, -100, 320, 320))
_CANONICAL_SIGNS = np.sign(_signed_areas(CANONICAL, CANONICAL_TRIANGLES))


def mesh_for(points: np.ndarray, pad: float) -> np.ndarray:
    if np.all(np.sign(_signed_areas(points, CANONICAL_TRIANGLES)) == _CANONICAL_SIGNS):
        return CANONICAL_TRIANGLES
    lo = points.min(axis=0) - pad
    hi = points.max(axis=0) + pad
    return _triangles(points, (int(lo[0]), int(lo[1]), int(hi[0] - lo[0]) + 1, int(hi[1] - lo[1]) + 1))


def warp_face(src: np.ndarray, src_pts: np.ndarray, dst_shape: tuple[int, int], dst_pts: np.ndarray,
              roi: tuple[int, int, int, int]) -> np.ndarray:
    """Piecewise-affine warp of ``src`` so that ``src_pts`` land on ``dst_pts``, computed inside ``roi``
    (x0, y0, x1, y1) of an image of ``dst_shape``; returns the ROI-sized warped patch."""
    x0, y0, x1, y1 = roi
    w, h = x1 - x0, y1 - y0
    local = dst_pts - [x0, y0]
    tris = mesh_for(local, 4 * max(w, h))
    if len(tris) == 0:
        raise FaceChainError("The face mesh could not be built (degenerate landmarks).")
    label = np.full((h, w), -1, np.int32)
    corners = np.round(local[tris]).astype(np.int32)
    for k in range(len(tris)):
        cv2.fillConvexPoly(label, corners[k], k)
    # Every triangle's affine map from the target to the template, solved at once: [x y 1] M^T = src.
    dst_h = np.concatenate([local[tris], np.ones((len(tris), 3, 1))], axis=2)  # (T, 3, 3)
    with np.errstate(all="ignore"):
        maps = np.linalg.solve(dst_h + np.eye(3) * 1e-9, src_pts[tris]).transpose(0, 2, 1)  # (T, 2, 3)
    maps = np.nan_to_num(maps)
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
    ``dst``'s broad shading; returns RGB uint8. (8-bit Lab: L 0-255, a and b offset by 128.)"""
    sel = weight > 0.5
    if sel.sum() < 16:
        return src
    s = cv2.cvtColor(src, cv2.COLOR_RGB2LAB).astype(np.float32)
    d = cv2.cvtColor(dst, cv2.COLOR_RGB2LAB).astype(np.float32)
    s_sel, d_sel = s[sel], d[sel]
    sm, ss = s_sel.mean(axis=0), s_sel.std(axis=0)
    dm, ds = d_sel.mean(axis=0), d_sel.std(axis=0)
    k = np.clip(ds / np.maximum(ss, 0.25), 0.0, 2.5)
    out = (s - sm) * k + dm
    # Broad lighting (a light from one side, a shadowed cheek) comes from the target; the blur is wide
    # enough that eyes, nose and mouth keep the template's own shading.
    sigma = max(1.0, 0.12 * face_size)
    wblur = _wide_blur(weight, sigma) + 1e-4
    ld = _wide_blur(d[..., 0] * weight, sigma) / wblur
    lo = _wide_blur(out[..., 0] * weight, sigma) / wblur
    out[..., 0] += ld - lo
    lab = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def poisson_blend(src: np.ndarray, dst: np.ndarray, mask: np.ndarray, reduce: int = 2) -> np.ndarray:
    """Seamless (Poisson) cloning of ``src`` into ``dst`` inside ``mask`` (same-size RGB patches).

    Poisson cloning equals the source plus a smooth membrane that carries the target's colours in from
    the mask's edge. OpenCV solves it at 1/``reduce`` of the size (a quarter of the pixels for 2) and
    the membrane, being smooth, is enlarged back and added to the full-size source."""
    h, w = mask.shape[:2]
    k = reduce if min(h, w) >= 48 * reduce else 1
    if k > 1:
        size = (max(1, w // k), max(1, h // k))
        s_small = cv2.resize(src, size, interpolation=cv2.INTER_AREA)
        d_small = cv2.resize(dst, size, interpolation=cv2.INTER_AREA)
        m_small = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    else:
        s_small, d_small, m_small = src, dst, mask
    pad = 8
    s = cv2.copyMakeBorder(s_small, pad, pad, pad, pad, cv2.BORDER_REFLECT)
    d = cv2.copyMakeBorder(d_small, pad, pad, pad, pad, cv2.BORDER_REFLECT)
    m = cv2.copyMakeBorder(m_small, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    ys, xs = np.nonzero(m)
    if len(xs) == 0:
        return dst
    centre = (int((xs.min() + xs.max() + 1) // 2), int((ys.min() + ys.max() + 1) // 2))
    try:  # OpenCV's solver needs the mask clear of the border: hence the padding
        cloned = cv2.seamlessClone(s, d, m, centre, cv2.NORMAL_CLONE)[pad:-pad, pad:-pad]
    except cv2.error:
        return src  # a mask OpenCV cannot solve on: the colour-matched face alone
    if k == 1:
        return cloned
    membrane = cloned.astype(np.float32) - s_small.astype(np.float32)
    membrane = cv2.resize(membrane, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip(src.astype(np.float32) + membrane + 0.5, 0, 255).astype(np.uint8)


class LearnedFusion:
    """FaceChain's face-fusion model through a ModelScope pipeline on the locally installed snapshot."""

    def __init__(self):
        self._pipe = model_store.modelscope_pipeline("face_fusion", "image_face_fusion")
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


def learned_fusion() -> LearnedFusion:
    return cached(("fusion", "face_fusion"), LearnedFusion, learned_files("face_fusion"))


@dataclass
class Template:
    image: np.ndarray
    face: Face
    landmarks: np.ndarray


def fuse_one(rgb: np.ndarray, faces: list[Face], tpl: Template, s: FusionSettings) -> FusedImage:
    """Fuse the template into ``rgb`` (RGB uint8), whose faces were already found."""
    h, w = rgb.shape[:2]
    zero = np.zeros((h, w), np.float32)
    if s.strength == 0.0:
        return FusedImage(rgb, zero, "strength 0, left unchanged", False, faces=faces)
    if not faces:
        return FusedImage(rgb, zero, "no face found, left unchanged", False, faces=faces)
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
        return FusedImage(rgb, zero, "face too small to fuse, left unchanged", False, faces=faces)
    roi = (x0, y0, x1, y1)
    patch = rgb[y0:y1, x0:x1]
    local_oval = oval - [x0, y0]
    alpha = face_mask(local_oval, patch.shape[:2], size, s.mask_shrink, s.feather)
    if alpha.max() <= 0.0:
        return FusedImage(rgb, zero, "face mask empty (face at the image edge), left unchanged", False, faces=faces)
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
    note = (f"fused (face {size:.0f} px, {len(faces)} face{'s' if len(faces) > 1 else ''} "
            f"seen{', the largest used' if len(faces) > 1 else ''})")
    return FusedImage(out, full, note, True, roi, faces)


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
    rgbs = [as_rgb_uint8(im, f"image {i + 1}") for i, im in enumerate(images)]
    template_rgb = as_rgb_uint8(template, "template")
    progress(0, len(rgbs), None)
    # 1. find the faces of the template and of every image side by side, 2. fuse side by side
    found = list(parallel_map(lambda im: detect_faces_per_thread(im, s.detector), [template_rgb] + rgbs,
                              s.workers))
    if not found[0]:
        raise FaceChainError("FaceFusion found no face in the template image. Connect a clear photo of the "
                             "person's face (the template face from the training photos).")
    tpl = Template(template_rgb, found[0][0], dense_landmarks(found[0][0]))
    result = FusionResult()
    jobs = list(zip(rgbs, found[1:]))
    for i, fused in enumerate(parallel_map(lambda job: fuse_one(job[0], job[1], tpl, s), jobs, s.workers), start=1):
        result.images.append(fused)
        progress(i, len(rgbs), None)
    return result
