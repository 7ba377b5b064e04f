"""The subject of a photo set by identity: which face in a group photo is the person the set is of.

FaceChain keeps a photo with several faces only when the largest is at least 4x the next. The other
photos of the set say plainly who the subject is: the identity their single faces share (the SFace
medoid of the single-face photos). A group photo is kept when exactly one of its faces matches that
identity and no other face does. Thresholds: ``data/subject_rules.json``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import data_files
from .detect import Face, choose_subject
from .recognition import embed_face


def rules() -> dict:
    return data_files.load("subject_rules.json")


@dataclass
class Identity:
    embedding: np.ndarray  # L2-normalised
    source: str  # the photo whose face is the medoid
    photos: int  # single-face photos it was chosen among

    def describe(self) -> str:
        return f"the face of {self.source}, the medoid of the {self.photos} single-face photos"


def medoid(embeddings: list[np.ndarray]) -> int:
    """Index of the embedding with the highest summed cosine similarity to all the others."""
    e = np.stack(embeddings)
    return int(np.argmax((e @ e.T).sum(axis=1)))


def set_identity(single_faces: list[tuple[str, np.ndarray, Face]]) -> Identity | None:
    """The identity shared by the single-face photos: (name, image, its one face) each; None without any."""
    if not single_faces:
        return None
    backend = rules()["identity"]["recogniser"]
    embeddings = [embed_face(img, face, backend) for _, img, face in single_faces]
    i = medoid(embeddings)
    return Identity(embeddings[i], single_faces[i][0], len(single_faces))


def face_label(face: Face, faces: list[Face], shape: tuple) -> str:
    """'face 2 of 4 (2nd largest, centre 31% across, 40% down)': how the report names a face of a photo."""
    i = next(j for j, f in enumerate(faces) if f is face)
    size = "the largest" if i == 0 else f"{i + 1}{'nd' if i == 1 else 'rd' if i == 2 else 'th'} largest"
    x, y = 100 * face.centre[0] / shape[1], 100 * face.centre[1] / shape[0]
    return f"face {i + 1} of {len(faces)} ({size}, centre {x:.0f}% across, {y:.0f}% down)"


def choose_by_identity(image: np.ndarray, faces: list[Face], identity: Identity | None,
                       dominance: float = 4.0) -> tuple[Face | None, str]:
    """The subject among ``faces`` and a sentence on why (or None and why the photo is skipped).

    One face: it. Several: the one matching ``identity``; without an identity, FaceChain's 4x rule."""
    if len(faces) <= 1 or identity is None:
        face, why = choose_subject(faces, dominance)
        if face is not None and len(faces) > 1:
            why = (f"{face_label(face, faces, image.shape)} chosen by FaceChain's rule (no single-face photo in the "
                   f"set to tell the subject by identity): {faces[0].area / faces[1].area:.1f}x the area of the next")
        return face, why
    r = rules()["identity"]
    sims = [float(np.dot(embed_face(image, f, r["recogniser"]), identity.embedding)) for f in faces]
    matching = [i for i, s in enumerate(sims) if s >= r["match"]]
    others = ", ".join(f"{s:.2f}" for j, s in enumerate(sims) if j not in matching[:1])
    if len(matching) == 1:
        i = matching[0]
        return faces[i], (f"{face_label(faces[i], faces, image.shape)} chosen by identity: SFace similarity "
                          f"{sims[i]:.2f} to {identity.describe()} (match at {r['match']:.2f}); other faces {others}")
    if not matching:
        return None, (f"{len(faces)} faces, none matches the set's identity ({identity.describe()}): SFace "
                      f"similarities {others}, {r['match']:.2f} needed; use photos of the one person")
    listed = ", ".join(f"face {i + 1} {sims[i]:.2f}" for i in matching)
    return None, (f"{len(faces)} faces, {len(matching)} of them match the set's identity ({listed}, "
                  f"{r['match']:.2f} needed): cannot tell which is the subject")
