"""FaceFusion: put the template face into each generated portrait, inside the inner face only.

Embedded backend (offline, classical):
1. Dense landmarks: MediaPipe's 468-point face mesh (``face_mesh``) on the template and on each target.
2. Guards (``fusion_geometry``): head pose, mouth and eyes of the two faces, and the warp's triangles
   (flipped, degenerate, scaled far from the face's mean). A failed check fuses less (a lower strength, or
   the eyes and brows only) or leaves the image unfused; the report says which and why.
3. Warp: the template is warped triangle by triangle onto the target's mesh, so the target keeps its
   outline, jaw and pose; only the inner face (brows, eyes, nose, mouth, cheeks) is blended.
4. Blend (``fusion_blend``): colour and light matched region by region, the eyes kept as sharp as the
   target's, the mask's edge feathered inside the inner face.
5. After-check: the mesh is found again on the fused image; if a landmark outside the inner face moved
   more than a small tolerance, the image is fused less, or left unfused.

Learned backend (``face_fusion``): FaceChain's face-fusion model through ModelScope; its output goes
through the same region mask, strength and after-check, so "outside the mask is unchanged" holds for both.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import cv2
import numpy as np

from . import fusion_blend as fb
from . import fusion_geometry as fg
from . import model_store, processes
from .detect import Face
from .errors import FaceChainError
from .face_mesh import face_mesh, face_meshes, fill_contours, topology
from .images import as_rgb_uint8
from .model_cache import cached, learned_files
from .photo_embeddings import Recent, image_crc, remember_embedding, remembered_embedding
from .progress import ProgressFn, no_progress
from .recognition import cosine, embed_face, embed_faces
from .threads import detect_faces_many, parallel_map

BACKENDS = ("embedded", "face_fusion")
LEVEL_WORDS = {"full": "fused (inner face)", "reduced": "fused at reduced strength (inner face)",
               "eyes_brows": "fused less (eyes and brows only)", "brows": "fused less (brows only)",
               "skip": "left unfused"}


@dataclass
class FusionSettings:
    strength: float = 1.0
    backend: str = "embedded"
    detector: str = "embedded"
    colour_match: bool = True
    workers: int = 0  # 0: choose from the CPU count
    processes: int = -1  # helper processes for the warp, colour work and blends; -1: by the CPU count

    def check(self) -> None:
        if not 0.0 <= self.strength <= 1.0:
            raise FaceChainError(f"Fusion strength {self.strength} is outside 0-1.")
        if self.backend not in BACKENDS:
            raise FaceChainError(f"Unknown face-fusion backend '{self.backend}'; choose one of {', '.join(BACKENDS)}.")
        if self.processes < -1:
            raise FaceChainError(f"Fusion helper processes {self.processes}: give 0 or more (-1: by the CPU count).")


@dataclass
class FusedImage:
    image: np.ndarray  # HxWx3 uint8, the full image with the face fused (outside the mask: the input)
    mask: np.ndarray  # HxW float32 0..1: how much of the fused face each pixel took (strength included)
    note: str  # for the report
    fused: bool
    roi: tuple[int, int, int, int] | None = None  # x0, y0, x1, y1: the only part that can differ
    faces: list[Face] = field(default_factory=list)  # the faces found in the input image, largest first
    level: str = "none"  # full, reduced, eyes_brows, skip; none: nothing to fuse (no face, strength 0)
    reasons: list[str] = field(default_factory=list)  # why the fusion was reduced or skipped
    embedding: np.ndarray | None = None  # the embedded recogniser's (SFace) vector of the returned face, if taken


@dataclass
class FusionResult:
    images: list[FusedImage] = field(default_factory=list)

    def detections(self) -> list[list[dict]]:
        """The faces found in each input image (for RTSRank). The fused face keeps the target's keypoints
        (the warp puts the template's features on the target's); the face that was fused also says how
        (``fusion``: level, ``fusion_note``: why it was reduced or skipped), so RTSRank can name it."""
        out = []
        for img in self.images:
            faces = [f.to_dict() for f in img.faces]
            if faces and img.level not in ("none", "full"):
                faces[0]["fusion"] = img.level
                faces[0]["fusion_note"] = "; ".join(img.reasons)
            if faces and img.embedding is not None:
                # the embedded recogniser's vector of the returned face, and which pixels it belongs to:
                # RTSRank takes it instead of embedding the same face again when the image is unchanged
                faces[0]["embedding"] = np.round(img.embedding.astype(np.float64), 6).tolist()
                faces[0]["image_crc"] = image_crc(img.image)
            out.append(faces)
        return out

    def report_text(self) -> str:
        n = sum(f.fused for f in self.images)
        lines = [f"FaceFusion: fused the template face into {n} of {len(self.images)} images"]
        lines += [f"- image {i + 1}: {f.note}" for i, f in enumerate(self.images)]
        return "\n".join(lines)


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
    shape: fg.FaceShape
    triangles: np.ndarray  # Delaunay over the template's mesh points
    embedding: np.ndarray  # the recogniser's (SFace) view of the person: fusion must get closer to it
    face_embedding: np.ndarray  # the recogniser's vector of the template face itself
    likeness_to: str = "template"  # what ``embedding`` is, for the report
    photos: list[np.ndarray] = field(default_factory=list)  # the person's photos' vectors, when given

    def likeness(self, vec: np.ndarray) -> float:
        """The recogniser's similarity of ``vec`` to the person: the mean over the person's photos (each photo
        counts, as a person comparing would), else to the template face."""
        return float(np.mean([cosine(vec, e) for e in self.photos])) if self.photos else cosine(vec, self.embedding)

    @classmethod
    def of(cls, rgb: np.ndarray, face: Face, embedding: np.ndarray | None = None, mesh=None) -> "Template":
        """``embedding``, ``mesh``: the recogniser's vector and the face mesh of ``face``, when already taken."""
        mesh = mesh if mesh is not None else face_mesh(rgb, face.keypoints)
        shape = fg.FaceShape.of(mesh.points, mesh.presence)
        if shape.presence < fg.settings_data()["guards"]["min_presence"]:
            raise FaceChainError(f"The face mesh is unsure of the template's face (presence {shape.presence:.2f}). "
                                 f"Connect a clear, frontal photo of the person's face as the template.")
        vec = embed_face(rgb, face) if embedding is None else embedding
        return cls(rgb, face, shape, fg.triangulate(shape.points), vec, vec)


def target_shape(rgb: np.ndarray, face: Face) -> fg.FaceShape:
    """The mesh measures of an image's face (taken side by side with the template's)."""
    mesh = face_mesh(rgb, face.keypoints)
    return fg.FaceShape.of(mesh.points, mesh.presence)


def _roi(points: np.ndarray, iod: float, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    h, w = shape
    margin = int(0.3 * iod) + 4
    lo, hi = points.min(axis=0), points.max(axis=0)
    return (int(max(0, np.floor(lo[0]) - margin)), int(max(0, np.floor(lo[1]) - margin)),
            int(min(w, np.ceil(hi[0]) + margin)), int(min(h, np.ceil(hi[1]) + margin)))


def judge(tpl: Template, tgt: fg.FaceShape) -> fg.Verdict:
    """Every guard before blending: pose and expression, then the warp's triangles in the region to blend."""
    verdict = fg.compare_faces(tpl.shape, tgt)
    scale = fg.settings_data()["inner_face"]["inner_scale"]
    outside = np.zeros(len(tgt.points), bool)
    outside[tgt.outside_inner(scale)] = True
    fg.check_warp(tpl.shape, tgt, tpl.triangles, ~outside, verdict, "eyes_brows")
    for level, names, level_if_bad in (("eyes_brows", ("right_eye", "left_eye", "right_brow", "left_brow"), "brows"),
                                       ("brows", ("right_brow", "left_brow"), "skip")):
        if verdict.level == level:
            region = np.zeros(len(tgt.points), bool)
            for name in names:
                region[topology()["contours"][name]] = True
            fg.check_warp(tpl.shape, tgt, tpl.triangles, region, verdict, level_if_bad)
    return verdict


def prepared_face(rgb: np.ndarray, warped: np.ndarray, tgt: fg.FaceShape, roi, s: FusionSettings) -> np.ndarray:
    """The warped template given the target's colour, light and eye detail (the same for every region and
    strength tried, so it is made once per image)."""
    d = fg.settings_data()
    x0, y0, x1, y1 = roi
    patch = rgb[y0:y1, x0:x1]
    local = tgt.points - [x0, y0]
    face = warped
    if s.colour_match:
        inner_poly = tgt.inner_polygon(d["inner_face"]["inner_scale"]) - [x0, y0]
        support = np.zeros(patch.shape[:2], np.uint8)
        cv2.fillPoly(support, [np.round(inner_poly).astype(np.int32)], 255)
        # skin against skin: the template's brows and eyes would carry their darkness into the skin around them
        # (the lids are skin: left in, they take the target's colour, not a guess from the cheeks and forehead)
        grow = max(1, int(round(d["blend"]["feature_grow"] * tgt.iod)))
        features = fill_contours(patch.shape[:2], local, ["right_brow", "left_brow"], grow=grow) | \
            fill_contours(patch.shape[:2], local, ["right_eye", "left_eye"], grow=max(1, grow // 4))
        face = fb.match_colour(face, patch, (support > 0) & (features == 0), d["blend"]["colour_sigma"] * tgt.iod)
        face = fb.match_lids(face, patch, local, tgt.iod, d["blend"]["lid_grow"])
        face = fb.match_brows(face, patch, local, tgt.iod, d["blend"]["feature_grow"])
        face = fb.match_lips(face, patch, local, tgt.iod)
    return fb.match_detail(face, patch, fb.eye_boxes(local), d["blend"]["detail_min_ratio"],
                           d["blend"]["detail_max_ratio"], d["blend"]["detail_max_gain"])


@dataclass
class _Shared:
    """What every try of one image blends with, made once: the two bands the prepared face is mixed in, and
    each region's mask (the ladder tries a region at more than one strength)."""

    bands: tuple
    masks: dict = field(default_factory=dict)


def shared_parts(rgb: np.ndarray, warped: np.ndarray, tgt: fg.FaceShape, roi, s: FusionSettings) -> _Shared:
    """The prepared face's bands against the target's pixels (the masks are made as tries ask)."""
    x0, y0, x1, y1 = roi
    face = prepared_face(rgb, warped, tgt, roi, s)
    sigma = max(1.0, fg.settings_data()["blend"]["detail_sigma"] * tgt.iod)
    return _Shared(fb.two_bands(rgb[y0:y1, x0:x1], face, sigma))


def _in_image(rgb: np.ndarray, roi, blended: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A blended patch put back into the image, and its mask in the image's frame."""
    x0, y0, x1, y1 = roi
    out = rgb.copy()
    out[y0:y1, x0:x1] = blended
    full = np.zeros(rgb.shape[:2], np.float32)
    full[y0:y1, x0:x1] = a
    return out, full


def _blend_patch(rgb: np.ndarray, tgt: fg.FaceShape, roi, region: str, strength: float,
                 shared: _Shared) -> tuple[np.ndarray, np.ndarray]:
    """One region blended at ``strength``: the ``roi`` patch (uint8) and its mask (float32)."""
    d = fg.settings_data()
    x0, y0, x1, y1 = roi
    patch = rgb[y0:y1, x0:x1]
    local = tgt.points - [x0, y0]
    alpha = shared.masks.get(region)
    if alpha is None:
        inner_poly = tgt.inner_polygon(d["inner_face"]["inner_scale"]) - [x0, y0]
        alpha = shared.masks[region] = fb.region_mask(patch.shape[:2], local, inner_poly, region, tgt.iod,
                                                      d["inner_face"])
    a = alpha * strength
    a[a < 1.0 / 255.0] = 0.0  # a zero in the saved mask means an untouched pixel
    blended = fb.two_band_blend(shared.bands, a, strength)
    # The mix can still be softer than the image around the eyes (two eyes never align to the pixel): lift
    # the fused pixels' detail to the target's there, fading out over the mask's edge.
    sharp = fb.match_detail(blended, patch, fb.eye_boxes(local), d["blend"]["detail_min_ratio"], np.inf,
                            d["blend"]["detail_max_gain"])
    lift = np.clip(a / 0.25, 0.0, 1.0)[..., None]
    blended = np.clip(blended + (sharp.astype(np.float32) - blended) * lift + 0.5, 0, 255).astype(np.uint8)
    return blended, a


def rungs(verdict: fg.Verdict) -> list[tuple[str, float]]:
    """The (region, strength) tries left for ``verdict``, most fused first: the guards pick the first rung
    (its region, and a strength below 1 when reduced); each failed after-check moves one rung down."""
    ladder = [(region, float(k)) for region, k in fg.settings_data()["ladder"]]
    if verdict.region == "none":
        return []
    floor = fg.REGIONS.index(verdict.region)

    def allowed(region: str, k: float) -> bool:
        here = fg.REGIONS.index(region)
        return here > floor or (here == floor and (k < 1.0 or not verdict.reduced))

    return [(region, k) for region, k in ladder if allowed(region, k)][:fg.settings_data()["max_tries"]]


def _level_of(region: str, strength: float) -> tuple[str, str]:
    """The level a rung reports, and its words."""
    level = {"inner": "full" if strength >= 1.0 else "reduced"}.get(region, region)
    words = LEVEL_WORDS[level] + (f" at strength {strength:g}" if strength < 1.0 and level != "reduced" else "")
    return level, words


def _nearest(found: list[Face], face: Face) -> Face:
    """Of the faces found afresh on a fused image, the one nearest where ``face`` was (its keypoints follow the
    fused eyes); ``face`` itself when none was found."""
    return min(found, key=lambda f: float(np.linalg.norm(f.centre - face.centre))) if found else face


@dataclass
class _Check:
    """One fused image for the after-check: the image before and after, the face fused, its mesh measures, the
    likeness before, and whether the eyes were fused (then the face is found again: the recogniser aligns on
    the eyes)."""

    original: np.ndarray
    out: np.ndarray
    face: Face
    tgt: fg.FaceShape
    before: float
    eyes_moved: bool = True


def _after_checks(checks: list[_Check], tpl: Template, detector: str = "embedded",
                  workers: int = 0) -> list[tuple[str, float, np.ndarray | None]]:
    """For each fused image: '' when it keeps its eyes' sharpness, is more like the person than before and
    keeps its outline, else why not; and the fused face's likeness and vector. Cheapest check first; each
    net runs once for all the images still in (batched on a GPU). The face is searched for on the whole fused
    image, as RTSRank will search it (at its working size), so the likeness weighed here is the one RTSRank
    then reports."""
    d = fg.settings_data()
    out: list = [None] * len(checks)

    def eyes(c: _Check) -> float:
        boxes = fb.eye_boxes(c.tgt.points)
        return fb.sharpness(c.out, boxes) / max(1e-6, fb.sharpness(c.original, boxes))

    live = []
    for n, (c, sharp) in enumerate(zip(checks, parallel_map(eyes, checks, workers))):
        if sharp < d["guards"]["min_eye_sharpness"]:
            out[n] = (f"the eyes came out softer ({sharp:.2f} of their sharpness)", c.before, None)
        else:
            live.append(n)
    again = [n for n in live if checks[n].eyes_moved]
    faces = {n: checks[n].face for n in live}
    # same_batch: a check's answer must not depend on which other tries' blends had arrived with it
    for n, found in zip(again, detect_faces_many([checks[n].out for n in again], detector, workers=workers,
                                                 same_batch=True)):
        faces[n] = _nearest(found, checks[n].face)
    vecs = dict(zip(live, embed_faces([(checks[n].out, faces[n]) for n in live], workers=workers, same_batch=True)))
    gain = d["guards"]["min_likeness_gain" if tpl.likeness_to == "template" else "min_likeness_gain_photos"]
    kept, afters = [], {n: tpl.likeness(vecs[n]) for n in live}
    for n in live:
        c, after = checks[n], afters[n]
        if after < c.before + gain:
            verb = "raise" if gain > 0 else "keep"
            out[n] = (f"fusing did not {verb} the likeness to the {tpl.likeness_to} ({c.before:.2f} -> {after:.2f})",
                      after, vecs[n])
        else:
            kept.append(n)
    meshes = face_meshes([(checks[n].out, checks[n].face.keypoints) for n in kept], workers, same_batch=True)
    for n, mesh in zip(kept, meshes):
        c = checks[n]
        shift = fg.outline_shift(c.tgt, mesh.points, d["inner_face"]["inner_scale"])
        if shift > d["guards"]["outline_tolerance"]:
            out[n] = (f"the outline moved {shift:.2f} IOD when fused", c.before, None)
        else:
            out[n] = ("", afters[n], vecs[n])
    return out


@dataclass(eq=False)  # one image's job is itself only (its arrays are not compared)
class _Fusing:
    """One image on its way through the ladder: what every try shares (made once), and the tries' verdicts."""

    rgb: np.ndarray
    faces: list
    tgt: fg.FaceShape
    verdict: fg.Verdict
    roi: tuple
    extra: str
    ladder: list
    original_vec: np.ndarray | None = None
    before: float = 0.0
    shared: _Shared | None = None
    parts: processes.Parts | None = None  # each try's (patch, mask) in ladder order, when a helper makes them
    local: Callable[[], None] | None = None  # makes ``shared`` here (a helper that broke leaves it to us)
    tries: dict = field(default_factory=dict)  # ladder index -> (why_not, out, mask, after, vec)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def patch(self, i: int, strength: float) -> tuple[np.ndarray, np.ndarray]:
        """The ``i``-th try's blended patch and mask: the helper's, else made here."""
        parts = self.parts
        if parts is not None:
            try:
                return parts.get(i)
            except processes.HelperBroke:
                pass  # the helper stopped before this part: made here (another try of this image may be too)
        with self._lock:
            self.parts = None
            if self.shared is None:
                self.local()
        return _blend_patch(self.rgb, self.tgt, self.roi, self.ladder[i][0], strength, self.shared)


def _unfused(rgb: np.ndarray, faces: list, note: str, vec: np.ndarray | None = None,
             reasons: list | None = None) -> FusedImage:
    zero = np.zeros(rgb.shape[:2], np.float32)
    if reasons is None:
        return FusedImage(rgb, zero, note, False, faces=faces)
    return FusedImage(rgb, zero, note, False, None, faces, "skip", reasons, vec)


def start_fusing(rgb: np.ndarray, faces: list[Face], tpl: Template, s: FusionSettings,
                 tgt: fg.FaceShape | None = None, original_vec: np.ndarray | None = None) -> "_Fusing | FusedImage":
    """The guards' verdict and what every try of the ladder blends with (the warped template's colour work, or,
    from a helper process, every try's blended patch); or the image as it is, when there is nothing to try."""
    h, w = rgb.shape[:2]
    if s.strength == 0.0:
        return _unfused(rgb, faces, "strength 0, left unchanged")
    if not faces:
        return _unfused(rgb, faces, "no face found, left unchanged")
    face = faces[0]  # the largest: the portrait's subject
    tgt = tgt or target_shape(rgb, face)
    verdict = judge(tpl, tgt)
    roi = _roi(tgt.points, tgt.iod, (h, w))
    if roi[2] - roi[0] < 16 or roi[3] - roi[1] < 16 or tgt.iod < 6:
        verdict.lower("skip", f"face too small to fuse ({tgt.iod:.0f} px between the eyes)")
    extra = f" ({len(faces)} faces seen, the largest used)" if len(faces) > 1 else ""
    job = _Fusing(rgb, faces, tgt, verdict, roi, extra, rungs(verdict) if verdict.level != "skip" else [])
    if job.ladder:
        job.original_vec = original_vec if original_vec is not None else embed_face(rgb, face)
        job.before = tpl.likeness(job.original_vec)
        same = cosine(job.original_vec, tpl.face_embedding)
        if same >= fg.settings_data()["guards"]["same_face_likeness"]:
            verdict.lower("skip", f"already the template's face (likeness to it {same:.2f})")
            job.ladder = []
    if not job.ladder:
        return _unfused(rgb, faces, f"left unfused: {'; '.join(verdict.reasons)}" + extra, job.original_vec,
                        list(verdict.reasons))
    if s.backend == "face_fusion":
        warped = learned_fusion().fuse(rgb, tpl.image)[roi[1]:roi[3], roi[0]:roi[2]]
        job.shared = shared_parts(rgb, warped, tgt, roi, s)
        return job
    def in_this_thread():  # the warp and colour work here; the tries blend as they come (most pass the first)
        warped = fg.warp_patch(tpl.image, tpl.shape.points, tgt.points, tpl.triangles, roi)
        job.shared = shared_parts(rgb, warped, tgt, roi, s)

    job.local = in_this_thread
    helpers = helper_pool(s)
    if helpers is not None:
        helpers.start()
    if helpers is None or helpers.ready == 0:  # no helper yet: not even worth packing the job for one
        in_this_thread()
        return job
    # a helper process blends every try, the first first, and sends each as it is made: its cores are spare,
    # and this thread goes on once the job is sent (the tries wait for their blends). With more images than
    # helpers a job waits for the first helper to come free; while the pool starts, or with its helpers
    # broken, this thread works as above
    tries = [(region, s.strength * k) for region, k in job.ladder]
    patch = np.ascontiguousarray(rgb[roi[1]:roi[3], roi[0]:roi[2]])
    job.parts = helpers.run_parts("fusion:warped_blends", patch, rgb.shape, tpl.image, tpl.shape.points,
                                  tpl.triangles, tgt.points, tgt.presence, roi, asdict(s), tries,
                                  fallback=in_this_thread)
    return job


def warped_blends(patch: np.ndarray, shape: tuple, tpl_image: np.ndarray, tpl_points: np.ndarray,
                  tpl_triangles: np.ndarray, points: np.ndarray, presence: float, roi: tuple, settings: dict,
                  tries: list[tuple[str, float]]):
    """The template warped onto the image's mesh (``points``), given the image's colour and detail, and
    blended at each (region, strength) of ``tries``: yields each try's patch and mask as it is made. Of the
    image (its ``shape``) only the ``roi`` patch is read, so only that is sent. Plain data in and out (the
    ``FusionSettings`` as a dict): a helper process's job (``helper_pool``)."""
    x0, y0, x1, y1 = roi
    rgb = np.zeros(shape, np.uint8)
    rgb[y0:y1, x0:x1] = patch
    tgt = fg.FaceShape.of(points, presence)
    warped = fg.warp_patch(tpl_image, tpl_points, tgt.points, tpl_triangles, roi)
    shared = shared_parts(rgb, warped, tgt, roi, FusionSettings(**settings))
    for region, strength in tries:
        yield _blend_patch(rgb, tgt, roi, region, strength, shared)


def warm_up_helper() -> None:
    """What a helper process does once before its first job: the data files read, and OpenCV's Lab tables
    built (its first float Lab conversion takes ~0.1 s)."""
    fg.settings_data()
    topology()
    lab = cv2.cvtColor(np.zeros((8, 8, 3), np.float32), cv2.COLOR_RGB2LAB)
    cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def helper_processes(s: FusionSettings) -> int:
    """How many helper processes do the warp, colour work and blends: none in a bundled executable; else
    ``s.processes``, else the environment's FACECHAIN_FUSION_PROCESSES, else by the CPU count
    (``helper_processes`` in data/fusion.json: none on a host with few cores, where threads do as well)."""
    if getattr(sys, "frozen", False):  # a bundled executable: sys.executable is no Python to start helpers with
        return 0
    if s.processes >= 0:
        return s.processes
    env = os.environ.get("FACECHAIN_FUSION_PROCESSES", "").strip()
    if env:
        try:
            return max(0, int(env))
        except ValueError:
            raise FaceChainError(f"FACECHAIN_FUSION_PROCESSES is {env!r}; give a whole number (0: none).") from None
    d = fg.settings_data()["helper_processes"]
    cores = os.cpu_count() or 2
    return 0 if cores < d["min_cores"] else max(1, min(d["max"], cores // d["cores_each"]))


def helper_pool(s: FusionSettings) -> "processes.ProcessPool | None":
    """The lasting pool of helper processes for ``warped_blends`` (None: the threads do it)."""
    n = helper_processes(s)
    if n == 0:
        return None
    return processes.pool(n, fg.settings_data()["helper_processes"]["opencv_threads"], ("fusion",))


def try_rung(job: _Fusing, i: int, tpl: Template, s: FusionSettings) -> None:
    """Blend at the ladder's ``i``-th (region, strength) and check the result; kept in ``job.tries``."""
    try_rungs([(job, i)], tpl, s)


def try_rungs(tries: list[tuple[_Fusing, int]], tpl: Template, s: FusionSettings) -> None:
    """``try_rung`` of each (job, ladder index), side by side: the blends on the thread pool (or ready, from a
    helper), then the after-check of them all (``_after_checks``). Tries do not depend on each other, even two
    of one image."""
    def blended(t: tuple[_Fusing, int]):
        job, i = t
        return _in_image(job.rgb, job.roi, *job.patch(i, s.strength * job.ladder[i][1]))

    made = list(parallel_map(blended, tries, s.workers))
    checks = [_Check(job.rgb, out, job.faces[0], job.tgt, job.before, job.ladder[i][0] != "brows")
              for (job, i), (out, _) in zip(tries, made)]
    for (job, i), (out, mask), (why_not, after, vec) in zip(tries, made, _after_checks(checks, tpl, s.detector,
                                                                                         s.workers)):
        job.tries[i] = (why_not, out, mask, after, vec)


def finish_fusing(job: _Fusing, tpl: Template) -> FusedImage:
    """The first try of the ladder that passed its after-check (the tries before it give their reasons)."""
    for i, (region, k) in enumerate(job.ladder):
        if i not in job.tries:
            break
        why_not, out, mask, after, vec = job.tries[i]
        if not why_not:
            level, note = _level_of(region, k)
            note += f", likeness to the {tpl.likeness_to} {job.before:.2f} -> {after:.2f}"
            note += f": {'; '.join(job.verdict.reasons)}" if job.verdict.reasons else ""
            return FusedImage(out, mask, note + job.extra, True, job.roi, job.faces, level,
                              list(job.verdict.reasons), vec)
        job.verdict.reasons.append(f"{why_not} ({region.replace('_', ' and ')} region at strength {k:g})")
    note = f"left unfused: {'; '.join(job.verdict.reasons)}"
    return _unfused(job.rgb, job.faces, note + job.extra, job.original_vec, list(job.verdict.reasons))


def fuse_one(rgb: np.ndarray, faces: list[Face], tpl: Template, s: FusionSettings,
             tgt: fg.FaceShape | None = None) -> FusedImage:
    """Fuse the template into ``rgb`` (RGB uint8), whose faces were already found (and ``tgt``, the
    largest face's mesh measures, when already taken): the ladder's tries one after the other."""
    job = start_fusing(rgb, faces, tpl, s, tgt)
    if isinstance(job, FusedImage):
        return job
    for i in range(len(job.ladder)):
        try_rung(job, i, tpl, s)
        if not job.tries[i][0]:
            break
    return finish_fusing(job, tpl)


def mean_embedding(embs: list[np.ndarray | None]) -> np.ndarray | None:
    """The normalised mean of the recogniser embeddings of the person's photos (None when none shows a face)."""
    embs = [e for e in embs if e is not None]
    if not embs:
        return None
    mean = np.mean([e / np.linalg.norm(e) for e in embs], axis=0)
    return mean / np.linalg.norm(mean)


_templates = Recent(4)  # the few templates last looked at: a graph fuses every batch with the same one


def _looks(kinds: list[str], rgbs: list[np.ndarray], s: FusionSettings) -> list:
    """What is looked at before fusing, for each (kind, image); each net runs once for all of them (batched on
    a GPU, side by side on the thread pool otherwise):
    - "tpl": the template's face, mesh and vector (its vector remembered for RTSRank; falsy without a face);
    - "ref": a reference photo's vector (remembered for RTSRank; None without a face);
    - "img": an image's faces, and its largest face's mesh measures and vector (every image with a face needs
      the vector: the fusion's before-and-after, or RTSRank when left unfused)."""
    out: list = [None] * len(rgbs)
    look = []  # the images whose faces are searched for
    for n, (kind, rgb) in enumerate(zip(kinds, rgbs)):
        known = remembered_embedding(rgb, s.detector) if kind == "ref" else None
        if kind == "tpl":
            held = _templates.get((image_crc(rgb), s.detector))
            if held is not None:  # a copy: fuse_images sets the person's reference on it
                held = held[0]
                known = (replace(held, photos=list(held.photos)),)
                remember_embedding(rgb, s.detector, held.face_embedding)  # for RTSRank, as a first look does
        if known is not None:
            out[n] = known[0]
        else:
            look.append(n)
    faces = dict(zip(look, detect_faces_many([rgbs[n] for n in look], s.detector, workers=s.workers)))
    fused = s.strength != 0.0
    meshed = [n for n in look if faces[n] and (kinds[n] == "tpl" or (kinds[n] == "img" and fused))]
    meshes = dict(zip(meshed, face_meshes([(rgbs[n], faces[n][0].keypoints) for n in meshed], s.workers)))
    embedded = [n for n in look if faces[n] and (kinds[n] != "img" or fused)]
    vecs = dict(zip(embedded, embed_faces([(rgbs[n], faces[n][0]) for n in embedded], workers=s.workers)))
    for n in look:
        kind, rgb = kinds[n], rgbs[n]
        if kind != "img":
            remember_embedding(rgb, s.detector, vecs.get(n))
        if kind == "ref":
            out[n] = vecs.get(n)
        elif kind == "tpl":
            out[n] = faces[n] and Template.of(rgb, faces[n][0], vecs[n], meshes[n])
            if out[n]:
                _templates.put((image_crc(rgb), s.detector), replace(out[n], image=rgb.copy(), photos=[]))
        elif not faces[n] or not fused:
            out[n] = (faces[n], None, None)
        else:
            out[n] = (faces[n], fg.FaceShape.of(meshes[n].points, meshes[n].presence), vecs[n])
    return out


def fuse_images(images: list[np.ndarray], template: np.ndarray, settings: FusionSettings | None = None,
                progress: ProgressFn | None = None, references: list[np.ndarray] | None = None) -> FusionResult:
    """Fuse the template's face into every image; images without a face come back unchanged.

    ``references``: the person's photos (the aligned training crops); fusion is kept only where it brings
    the face closer to their mean embedding. Without them, closer to the template's."""
    s = settings or FusionSettings()
    s.check()
    s = replace(s, processes=helper_processes(s))  # the environment read (and checked) once, before any work
    progress = progress or no_progress
    if not images:
        raise FaceChainError("FaceFusion got no images.")
    if s.backend == "face_fusion":
        learned_fusion()  # load, or say which file is missing, before any work
    rgbs = [as_rgb_uint8(im, f"image {i + 1}") for i, im in enumerate(images)]
    template_rgb = as_rgb_uint8(template, "template")
    refs = [as_rgb_uint8(im, f"reference {i + 1}") for i, im in enumerate(references or [])]
    progress(0, len(rgbs), None)
    # 1. the template, the reference photos and the images looked at, together; 2. every image's warp, colour
    # work and blends handed to a helper (or done side by side here); 3. each try checked as its blend comes
    looked = _looks(["tpl"] + ["ref"] * len(refs) + ["img"] * len(rgbs), [template_rgb] + refs + rgbs, s)
    tpl, ref_embs, found = looked[0], looked[1:1 + len(refs)], looked[1 + len(refs):]
    if not tpl:
        raise FaceChainError("FaceFusion found no face in the template image. Connect a clear photo of the "
                             "person's face (the template face from the training photos).")
    embs = [e for e in ref_embs if e is not None]
    if refs and not embs and any(look[0] for look in found):  # an error only when there is a face to fuse
        raise FaceChainError("FaceFusion found no face in the reference photos. Connect the aligned training "
                             "crops (FaceAlign's images), or leave the reference input empty.")
    if embs:
        # the template's own photo among them is left out: fusing it in always looks more like itself
        same = fg.settings_data()["guards"]["same_face_likeness"]
        others = [e for e in embs if cosine(e, tpl.face_embedding) < same]
        if others:
            word = "other " if len(others) < len(embs) else ""
            tpl.embedding, tpl.photos = mean_embedding(others), others
            tpl.likeness_to = f"person's {len(others)} {word}photo{'s' if len(others) > 1 else ''}"
    jobs = start_all(rgbs, found, tpl, s)
    run_tries(jobs, tpl, s)
    result = FusionResult()
    for n, job in enumerate(jobs, start=1):
        result.images.append(job if isinstance(job, FusedImage) else finish_fusing(job, tpl))
        progress(n, len(rgbs), None)
    return result


def start_all(rgbs: list, found: list, tpl: Template, s: FusionSettings) -> list:
    """``start_fusing`` of every image (as ``_looks`` found it), side by side: each thread sends its image's warp,
    colour work and blends to a helper process (and goes on), or does the warp and colour work itself. (Sent
    from one thread, one after the other, the last job left later: on an H200 host 25 ms after the first
    against 19 ms.)"""
    return list(parallel_map(lambda n: start_fusing(rgbs[n], found[n][0], tpl, s, found[n][1], found[n][2]),
                             list(range(len(rgbs))), s.workers))


def run_tries(jobs: list, tpl: Template, s: FusionSettings) -> None:
    """The ladder's tries of every image, each checked as soon as its blend is there (a helper sends each
    image's blends as it makes them): whatever has come is checked together (``try_rungs``), while the
    helpers still work on the rest. After a failed first try: every remaining rung at once where there are
    cores to spare (the slowest image then costs one more round, not one per try), else the next rung, each
    image stopping at the first that passes; either schedule picks the same try. (With the nets on a GPU a
    check runs in a batch of 8 whether its blend came alone or with others, ``same_batch``: TF32 rounds a
    batch and a single run apart, and an image at a guard's very edge would otherwise go either way.)"""
    speculate = (os.cpu_count() or 2) >= fg.settings_data()["all_tries_at_once"]["min_cores"]
    todo = [(j, 0) for j in jobs if isinstance(j, _Fusing)]
    while todo:
        ready = [(j, i) for j, i in todo if j.parts is None or j.parts.has(i)]
        if not ready:
            processes.wait_any([(j.parts, i) for j, i in todo], 1.0)
            continue
        try_rungs(ready, tpl, s)
        todo = [t for t in todo if t not in ready]
        for j, i in ready:
            if j.tries[i][0] and (i == 0 or not speculate) and i + 1 < len(j.ladder):
                todo += [(j, r) for r in range(i + 1, len(j.ladder) if speculate else i + 2)]
