"""RTSRank: keep the generated portraits that show one plausible face and sort them by identity.

FaceChain's rule: an image is kept only if exactly one face is detected and its size is plausible; each
kept face is embedded by a face-recognition model and the images are sorted by cosine similarity to the
template face. Here the reference may also be several photos (the aligned training crops): their
normalised embeddings are averaged, which is steadier than any single photo.

Likeness: the similarity as a share of the person's own photo-to-photo similarity (leave-one-out over the
references: each one against the mean of the others), so 100 % means "as alike as two of the person's own
photos", whatever the recogniser's scale. Images below the accept threshold are rejected, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import data_files
from .detect import Face
from .photo_embeddings import image_crc, photo_embedding
from .errors import FaceChainError
from .images import as_rgb_uint8
from .progress import ProgressFn, no_progress
from .recognition import embed_face, get_recogniser
from .threads import detect_faces_per_thread, parallel_map



def filter_defaults() -> dict:
    return data_files.settings("rank_filter.json")


@dataclass
class RankSettings:
    top_n: int = 4
    backend: str = "embedded"
    detector: str = "embedded"
    min_face_fraction: float = field(default_factory=lambda: filter_defaults()["min_face_fraction"])
    max_face_fraction: float = field(default_factory=lambda: filter_defaults()["max_face_fraction"])
    min_face_px: float = field(default_factory=lambda: filter_defaults()["min_face_px"])
    accept_likeness: float = field(default_factory=lambda: filter_defaults()["accept_likeness"])  # percent
    workers: int = 0  # 0: choose from the CPU count

    def check(self) -> None:
        if not 0.0 <= self.accept_likeness <= 200.0:
            raise FaceChainError(f"Accept threshold {self.accept_likeness}% is outside 0-200%.")
        if self.top_n < 1:
            raise FaceChainError(f"top_n is {self.top_n}; keep at least 1 image.")
        if not 0.0 < self.min_face_fraction < self.max_face_fraction <= 1.5:
            raise FaceChainError(f"Face size band {self.min_face_fraction}-{self.max_face_fraction} is empty or "
                                 f"out of range; use fractions of the image's short side such as 0.12-0.85.")


@dataclass
class Candidate:
    index: int
    name: str
    score: float | None = None
    face: Face | None = None
    embedding: np.ndarray | None = None
    why_dropped: str = ""
    likeness: float | None = None  # percent of the person's own photo-to-photo similarity
    fusion_note: str = ""  # how FaceFusion reduced or skipped its fusion of this image, when it did

    @property
    def accepted(self) -> bool:
        return self.score is not None and not self.why_dropped


@dataclass
class RankResult:
    order: list[int]  # indices of the kept images, best first, at most top_n
    scores: list[float]  # their similarities
    candidates: list[Candidate]
    reference_count: int
    self_similarity: float = 0.0  # the person's own photo-to-photo similarity (100 % likeness)
    self_similarity_source: str = ""
    accept_likeness: float = 0.0

    @property
    def likeness(self) -> list[float]:
        """The likeness (percent) of each returned image, in ``order``."""
        return [self.candidates[i].likeness for i in self.order]

    @property
    def rejected(self) -> list[int]:
        """Indices of the images not accepted (no plausible face, or below the likeness threshold), best first."""
        out = [c for c in self.candidates if not c.accepted]
        return [c.index for c in sorted(out, key=lambda c: (c.score is None, -(c.score or 0.0), c.index))]

    def report_text(self) -> str:
        n_acc = sum(c.accepted for c in self.candidates)
        lines = [f"RTSRank: {len(self.order)} of {len(self.candidates)} images returned "
                 f"(reference: {self.reference_count} face{'s' if self.reference_count != 1 else ''}); "
                 f"{n_acc} accepted at likeness >= {self.accept_likeness:.0f}%, "
                 f"100% = similarity {self.self_similarity:.3f} ({self.self_similarity_source})"]
        rank_of = {i: r for r, i in enumerate(self.order)}
        for c in sorted(self.candidates, key=lambda c: (c.score is None, -(c.score or 0.0), c.index)):
            if c.score is None:
                line = f"- {c.name}: dropped, {c.why_dropped}"
            elif c.why_dropped:
                line = f"- {c.name}: rejected, {c.why_dropped}"
            elif c.index in rank_of:
                line = f"- {c.name}: likeness {c.likeness:.0f}%, similarity {c.score:.3f}, rank {rank_of[c.index] + 1}"
            else:
                line = (f"- {c.name}: likeness {c.likeness:.0f}%, similarity {c.score:.3f}, "
                        f"below the top {len(self.order)}")
            lines.append(line + (f" [fusion {c.fusion_note}]" if c.fusion_note else ""))
        return "\n".join(lines)


def self_similarity(refs: list[np.ndarray], backend: str) -> tuple[float, str]:
    """The person's own photo-to-photo similarity: leave-one-out over the reference embeddings (each one
    against the normalised mean of the others), or the recogniser's typical value for a single photo."""
    d = filter_defaults()
    if len(refs) < 2:
        return float(d["typical_self_similarity"][backend]), "one reference photo: the recogniser's typical value"
    unit = [r / np.linalg.norm(r) for r in refs]
    total = np.sum(unit, axis=0)
    loo = []
    for u in unit:
        rest = total - u
        loo.append(float(np.dot(u, rest / np.linalg.norm(rest))))
    value = max(float(np.mean(loo)), float(d["min_self_similarity"]))
    return value, f"leave-one-out over {len(refs)} reference photos"


def plausible_face(face: Face, image_shape: tuple[int, ...], s: RankSettings) -> str:
    """'' if the face's size fits the band, else why not."""
    short = min(image_shape[:2])
    frac = face.size / short
    if face.size < s.min_face_px:
        return f"face too small ({face.size:.0f} px, at least {s.min_face_px:.0f} px needed)"
    if frac < s.min_face_fraction:
        return f"face too small ({frac:.2f} of the image side, at least {s.min_face_fraction:.2f})"
    if frac > s.max_face_fraction:
        return f"face too large ({frac:.2f} of the image side, at most {s.max_face_fraction:.2f})"
    return ""


def faces_from_dicts(items, name: str) -> list[Face]:
    """Faces given as FACECHAIN face dicts (box, keypoints, score), largest first."""
    try:
        faces = [Face(np.asarray(d["box"], np.float64), np.asarray(d["keypoints"], np.float64).reshape(5, 2),
                      float(d.get("score", 1.0))) for d in items]
    except (KeyError, TypeError, ValueError):
        raise FaceChainError(f"The face data for {name} is not a list of faces with 'box' and 'keypoints'; "
                             f"connect FaceFusion's detections output.") from None
    return sorted(faces, key=lambda f: f.area, reverse=True)


def _check_inputs(images: list, references: list, detections: list | None) -> None:
    if not images:
        raise FaceChainError("RTSRank got no images to rank.")
    if not references:
        raise FaceChainError("RTSRank got no reference image: connect the template face or the training crops.")
    if detections is not None and len(detections) != len(images):
        raise FaceChainError(f"RTSRank got face data for {len(detections)} images but {len(images)} images; "
                             f"connect the detections of the FaceFusion that made these images.")


def first_detection(detections: list[list[dict]] | None, i: int) -> dict:
    """The first face record FaceFusion passed along for image ``i`` ({} when none)."""
    items = detections[i] if detections is not None else []
    return items[0] if items and isinstance(items[0], dict) else {}


def given_embedding(face: dict, rgb: np.ndarray) -> np.ndarray | None:
    """FaceFusion's SFace vector of this face, when it was taken on exactly these pixels."""
    if "embedding" not in face or face.get("image_crc") != image_crc(rgb):
        return None
    vec = np.asarray(face["embedding"], np.float32)
    return vec if vec.ndim == 1 and np.all(np.isfinite(vec)) and np.linalg.norm(vec) > 0 else None


def fusion_note(face: dict) -> str:
    """FaceFusion's word on an image, when it fused less than the whole inner face or not at all."""
    if "fusion" not in face:
        return ""
    return f"{face['fusion'].replace('_', ' and ')}: {face.get('fusion_note', '')}".rstrip(": ")


def rank_images(images: list[np.ndarray], references: list[np.ndarray], settings: RankSettings | None = None,
                names: list[str] | None = None, progress: ProgressFn | None = None,
                detections: list[list[dict]] | None = None) -> RankResult:
    """Filter and rank ``images`` by identity against ``references``.

    ``detections``: the faces already found in each image (FaceFusion's, whose fused face keeps the
    target's keypoints); when given, the images are not searched again."""
    s = settings or RankSettings()
    s.check()
    progress = progress or no_progress
    _check_inputs(images, references, detections)
    names = names if names and len(names) == len(images) else [f"image {i + 1}" for i in range(len(images))]
    get_recogniser(s.backend)  # load (or fail on a missing model) before any work
    progress(0, len(images), None)

    def reference(i: int):
        return photo_embedding(as_rgb_uint8(references[i], f"reference {i + 1}"), s.detector, s.backend)

    def candidate(i: int) -> Candidate:
        c = Candidate(i, names[i])
        rgb = as_rgb_uint8(images[i], names[i])
        if detections is not None:
            faces = faces_from_dicts(detections[i], names[i])
        else:
            faces = detect_faces_per_thread(rgb, s.detector)
        if len(faces) != 1:
            c.why_dropped = "no face found" if not faces else f"{len(faces)} faces (exactly one is needed)"
            return c
        why = plausible_face(faces[0], rgb.shape, s)
        if why:
            c.why_dropped = why
            return c
        c.face = faces[0]
        c.embedding = given_embedding(first_detection(detections, i), rgb) if s.backend == "embedded" else None
        if c.embedding is None:
            c.embedding = embed_face(rgb, faces[0], s.backend)
        return c

    # The references and the images are embedded side by side on the same threads.
    jobs = [("ref", i) for i in range(len(references))] + [("img", i) for i in range(len(images))]
    refs, candidates = [], []
    for kind, out in parallel_map(lambda job: (job[0], (reference if job[0] == "ref" else candidate)(job[1])),
                                  jobs, s.workers):
        if kind == "ref":
            refs.append(out)
        else:
            candidates.append(out)
            progress(len(candidates), len(images), out.name)
    refs = [e for e in refs if e is not None]
    if not refs:
        raise FaceChainError("RTSRank found no face in the reference image(s). Connect the template face photo "
                             "(or the aligned training crops) showing the person's face clearly.")
    ref = np.mean([r / np.linalg.norm(r) for r in refs], axis=0)
    ref = ref / np.linalg.norm(ref)
    full, source = self_similarity(refs, s.backend)
    for c in candidates:
        c.fusion_note = fusion_note(first_detection(detections, c.index))
        if c.embedding is not None:
            c.score = float(np.dot(ref, c.embedding / np.linalg.norm(c.embedding)))
            c.likeness = max(0.0, 100.0 * c.score / full)
            if c.likeness < s.accept_likeness:
                c.why_dropped = (f"likeness {c.likeness:.0f}% below the accept threshold {s.accept_likeness:.0f}% "
                                 f"(similarity {c.score:.3f})")
    kept = sorted((c for c in candidates if c.accepted), key=lambda c: (-c.score, c.index))[:s.top_n]
    return RankResult([c.index for c in kept], [c.score for c in kept], candidates, len(refs), full, source,
                      s.accept_likeness)


IF_NONE_KEPT = ("return unranked", "stop with an error")


def order_or_unranked(result: RankResult, n_images: int, top_n: int, if_none_kept: str = IF_NONE_KEPT[0],
                      note: str = "") -> tuple[list[int], list[float], list[float], str]:
    """(order, scores, likeness, report with ``note`` after the ranking), for RTSRank and the standalone
    pipeline. When no image was accepted: an error, or (``if_none_kept`` "return unranked") the most alike
    images below the accept threshold, else the first ``top_n`` unranked (score 0)."""
    report = result.report_text() + ("\n" + note if note else "")
    order, scores, likeness = list(result.order), list(result.scores), list(result.likeness)
    if not order:
        if if_none_kept != IF_NONE_KEPT[0]:
            raise FaceChainError("RTSRank kept no image:\n" + report + "\nGenerate more images, widen the "
                                 "face size band or lower the accept threshold.")
        scored = sorted((c for c in result.candidates if c.score is not None), key=lambda c: -c.score)
        if scored:
            order = [c.index for c in scored[:top_n]]
            scores, likeness = [c.score for c in scored[:top_n]], [c.likeness for c in scored]
            report += "\nNo image reached the accept threshold: returned the most alike ones anyway."
        else:
            order = list(range(min(top_n, n_images)))
            scores, likeness = [0.0] * len(order), [0.0] * len(order)
            report += "\nNo image showed exactly one plausible face: returned the first ones unranked (score 0)."
    return order, [float(s) for s in scores], [float(v) for v in likeness[:len(order)]], report
