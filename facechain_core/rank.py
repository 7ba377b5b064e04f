"""RTSRank: keep the generated portraits that show one plausible face and sort them by identity.

FaceChain's rule: an image is kept only if exactly one face is detected and its size is plausible; each
kept face is embedded by a face-recognition model and the images are sorted by cosine similarity to the
template face. Here the reference may also be several photos (the aligned training crops): their
normalised embeddings are averaged, which is steadier than any single photo.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import data_files
from .detect import Face
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
    workers: int = 0  # 0: choose from the CPU count

    def check(self) -> None:
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


@dataclass
class RankResult:
    order: list[int]  # indices of the kept images, best first, at most top_n
    scores: list[float]  # their similarities
    candidates: list[Candidate]
    reference_count: int

    def report_text(self) -> str:
        lines = [f"RTSRank: {len(self.order)} of {len(self.candidates)} images returned "
                 f"(reference: {self.reference_count} face{'s' if self.reference_count != 1 else ''})"]
        rank_of = {i: r for r, i in enumerate(self.order)}
        for c in sorted(self.candidates, key=lambda c: (c.score is None, -(c.score or 0.0), c.index)):
            if c.score is None:
                lines.append(f"- {c.name}: dropped, {c.why_dropped}")
            elif c.index in rank_of:
                lines.append(f"- {c.name}: similarity {c.score:.3f}, rank {rank_of[c.index] + 1}")
            else:
                lines.append(f"- {c.name}: similarity {c.score:.3f}, below the top {len(self.order)}")
        return "\n".join(lines)


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


def rank_images(images: list[np.ndarray], references: list[np.ndarray], settings: RankSettings | None = None,
                names: list[str] | None = None, progress: ProgressFn | None = None,
                detections: list[list[dict]] | None = None) -> RankResult:
    """Filter and rank ``images`` by identity against ``references``.

    ``detections``: the faces already found in each image (FaceFusion's, whose fused face keeps the
    target's keypoints); when given, the images are not searched again."""
    s = settings or RankSettings()
    s.check()
    progress = progress or no_progress
    if not images:
        raise FaceChainError("RTSRank got no images to rank.")
    if not references:
        raise FaceChainError("RTSRank got no reference image: connect the template face or the training crops.")
    if detections is not None and len(detections) != len(images):
        raise FaceChainError(f"RTSRank got face data for {len(detections)} images but {len(images)} images; "
                             f"connect the detections of the FaceFusion that made these images.")
    names = names if names and len(names) == len(images) else [f"image {i + 1}" for i in range(len(images))]
    get_recogniser(s.backend)  # load (or fail on a missing model) before any work
    progress(0, len(images), None)

    def reference(i: int):
        rgb = as_rgb_uint8(references[i], f"reference {i + 1}")
        faces = detect_faces_per_thread(rgb, s.detector)
        return embed_face(rgb, faces[0], s.backend) if faces else None

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
    ref = np.mean(refs, axis=0)
    ref = ref / np.linalg.norm(ref)
    for c in candidates:
        if c.embedding is not None:
            c.score = float(np.dot(ref, c.embedding))
    kept = sorted((c for c in candidates if c.score is not None), key=lambda c: (-c.score, c.index))[:s.top_n]
    return RankResult([c.index for c in kept], [c.score for c in kept], candidates, len(refs))


IF_NONE_KEPT = ("return unranked", "stop with an error")


def order_or_unranked(result: RankResult, n_images: int, top_n: int, if_none_kept: str = IF_NONE_KEPT[0],
                      note: str = "") -> tuple[list[int], list[float], str]:
    """(order, scores, report, with ``note`` after the ranking). When no image showed one plausible face: the
    first ``top_n`` unranked (score 0), or an error, as ``if_none_kept`` says (RTSRank and the standalone
    pipeline both)."""
    report = result.report_text() + ("\n" + note if note else "")
    if result.order:
        return list(result.order), [float(s) for s in result.scores], report
    if if_none_kept != IF_NONE_KEPT[0]:
        raise FaceChainError("RTSRank kept no image:\n" + report + "\nGenerate more images, or widen the "
                             "face size band.")
    order = list(range(min(top_n, n_images)))
    report += "\nNo image showed exactly one plausible face: returned the first ones unranked (score 0)."
    return order, [0.0] * len(order), report
