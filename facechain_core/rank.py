"""RTSRank: keep the generated portraits that show one plausible face and sort them by identity.

FaceChain's rule: an image is kept only if exactly one face is detected and its size is plausible; each
kept face is embedded by a face-recognition model and the images are sorted by cosine similarity to the
template face. Here the reference may also be several photos (the aligned training crops): their
normalised embeddings are averaged, which is steadier than any single photo.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from .detect import Face
from .errors import FaceChainError
from .images import as_rgb_uint8
from .progress import ProgressFn, no_progress
from .recognition import detect_faces_parallel_safe, embed_face, get_recogniser, parallel_map

FILTER_FILE = Path(__file__).with_name("data") / "rank_filter.json"


@lru_cache(maxsize=1)
def filter_defaults() -> dict:
    with open(FILTER_FILE, encoding="utf-8") as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


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


def reference_embedding(references: list[np.ndarray], s: RankSettings) -> tuple[np.ndarray, int]:
    """Mean of the normalised embeddings of the largest face in each reference image."""
    embs = []
    for i, ref in enumerate(references):
        rgb = as_rgb_uint8(ref, f"reference {i + 1}")
        faces = detect_faces_parallel_safe(rgb, s.detector)
        if faces:
            embs.append(embed_face(rgb, faces[0], s.backend))
    if not embs:
        raise FaceChainError("RTSRank found no face in the reference image(s). Connect the template face photo "
                             "(or the aligned training crops) showing the person's face clearly.")
    mean = np.mean(embs, axis=0)
    return mean / np.linalg.norm(mean), len(embs)


def rank_images(images: list[np.ndarray], references: list[np.ndarray], settings: RankSettings | None = None,
                names: list[str] | None = None, progress: ProgressFn | None = None) -> RankResult:
    s = settings or RankSettings()
    s.check()
    progress = progress or no_progress
    if not images:
        raise FaceChainError("RTSRank got no images to rank.")
    if not references:
        raise FaceChainError("RTSRank got no reference image: connect the template face or the training crops.")
    names = names if names and len(names) == len(images) else [f"image {i + 1}" for i in range(len(images))]
    get_recogniser(s.backend)  # load (or fail on a missing model) before any work
    ref, ref_count = reference_embedding(references, s)
    progress(0, len(images), None)

    def one(i: int) -> Candidate:
        c = Candidate(i, names[i])
        rgb = as_rgb_uint8(images[i], names[i])
        faces = detect_faces_parallel_safe(rgb, s.detector)
        if len(faces) != 1:
            c.why_dropped = "no face found" if not faces else f"{len(faces)} faces (exactly one is needed)"
            return c
        why = plausible_face(faces[0], rgb.shape, s)
        if why:
            c.why_dropped = why
            return c
        c.face = faces[0]
        c.score = float(np.dot(ref, embed_face(rgb, faces[0], s.backend)))
        return c

    candidates: list[Candidate] = []
    for done, c in enumerate(parallel_map(one, list(range(len(images))), s.workers), start=1):
        candidates.append(c)
        progress(done, len(images), c.name)
    kept = sorted((c for c in candidates if c.score is not None), key=lambda c: (-c.score, c.index))[:s.top_n]
    return RankResult([c.index for c in kept], [c.score for c in kept], candidates, ref_count)
