"""The recogniser's vector of a photo's largest face, remembered by the photo's pixels.

FaceFusion and RTSRank both take the person's training crops as their likeness reference in the bundled
train+generate graph; the second one finds them here instead of detecting and embedding them again.
"""

from __future__ import annotations

import threading
import zlib
from collections import OrderedDict

import numpy as np

from .detect import Face
from .recognition import embed_face
from .threads import detect_faces_per_thread

class Recent:
    """The ``size`` values last put or found, by key (the oldest dropped first); thread-safe."""

    def __init__(self, size: int):
        self._held: OrderedDict = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, key) -> tuple | None:
        """``(value,)`` when held (the value may be None), else None."""
        with self._lock:
            if key not in self._held:
                return None
            self._held.move_to_end(key)
            return (self._held[key],)

    def put(self, key, value) -> None:
        with self._lock:
            self._held[key] = value
            self._held.move_to_end(key)
            while len(self._held) > self._size:
                self._held.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._held.clear()


_cache = Recent(256)  # photos remembered (a few hundred 128-512 floats: well under a megabyte)


def image_crc(rgb: np.ndarray) -> int:
    """CRC-32 of an image's uint8 pixels and shape: ties a stored vector to the exact image it was taken on."""
    # the array itself is the buffer: no copy of its bytes
    return zlib.crc32(np.ascontiguousarray(rgb, np.uint8), zlib.crc32(str(rgb.shape).encode()))


def photo_embedding(rgb: np.ndarray, detector: str = "embedded", backend: str = "embedded",
                    faces: list[Face] | None = None) -> np.ndarray | None:
    """The embedding of the largest face in ``rgb`` (None without a face), computed once per photo. Only the
    embedded recogniser's vectors are remembered: a learned model's file can be replaced between runs.
    ``faces``: the faces ``detector`` found in ``rgb`` (by ``detect_faces_per_thread``), when already found."""
    if backend != "embedded":
        faces = detect_faces_per_thread(rgb, detector) if faces is None else faces
        return embed_face(rgb, faces[0], backend) if faces else None
    known = remembered_embedding(rgb, detector)
    if known is not None:
        return known[0]
    faces = detect_faces_per_thread(rgb, detector) if faces is None else faces
    vec = embed_face(rgb, faces[0], backend) if faces else None
    remember_embedding(rgb, detector, vec)
    return vec


def remembered_embedding(rgb: np.ndarray, detector: str = "embedded") -> tuple[np.ndarray | None] | None:
    """``(vector,)`` when the embedded recogniser's vector of ``rgb`` is remembered (the vector None: no face),
    else None."""
    return _cache.get((image_crc(rgb), detector, "embedded"))


def remember_embedding(rgb: np.ndarray, detector: str, vec: np.ndarray | None) -> None:
    """Remember the embedded recogniser's vector of ``rgb``'s largest face (None: no face), as
    ``photo_embedding`` does, for a vector taken elsewhere (FaceFusion's batched look)."""
    _cache.put((image_crc(rgb), detector, "embedded"), vec)
