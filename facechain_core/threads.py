"""The one home of thread pools and per-thread models.

OpenCV's detector, recogniser, warps and blending release the GIL, so the images of a batch run side by
side on a lasting pool of threads. OpenCV's nets are not thread-safe: each thread keeps its own copy
(``per_thread``), loaded when the thread starts, so the next batch finds it ready.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable

import cv2
import numpy as np

from .detect import Face

_local = threading.local()
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()

# Photos larger than this are searched for faces at this long side (FaceAlign's working size): the search
# costs grow with the pixels, and a face is hundreds of pixels wide there. Smaller is not safe: YuNet
# starts to see extra faces when one face fills half the frame (biden2.jpg at 640 px shows it).
DETECT_MAX_SIDE = 1024


def per_thread(name: str, make: Callable):
    """This thread's own instance of ``make()`` (made once per thread)."""
    held = getattr(_local, name, None)
    if held is None:
        held = make()
        setattr(_local, name, held)
    return held


def default_workers(n: int) -> int:
    """Threads for n images: half the cores leaves room for OpenCV's own threads."""
    return max(1, min(n, 8, (os.cpu_count() or 2) // 2))


def parallel_map(fn, items: list, workers: int = 0):
    """``map(fn, items)`` in order, on a lasting pool of threads: the per-thread detector and recogniser
    each thread loads stay loaded for the next batch. Yields results as they come, in order."""
    n = workers if workers > 0 else default_workers(len(items))
    n = max(1, min(n, len(items)))
    if n == 1:
        yield from map(fn, items)
        return
    with _pools_lock:
        pool = _pools.get(n)
        if pool is None:
            pool = _pools[n] = ThreadPoolExecutor(n, thread_name_prefix=f"facechain{n}",
                                                  initializer=_load_thread_models)
    with pool_share(n):
        yield from pool.map(fn, items)


_share_lock = threading.Lock()
_share = {"users": 0, "cv2_threads": 0}


@contextmanager
def pool_share(workers: int):
    """While ``workers`` of our threads run side by side (until the last such map ends), OpenCV's own pool gets
    its thread count divided among them, and is set back after. Each OpenCV call otherwise fans out over every
    core while our threads make the same calls, and OpenCV's threads spin waiting for each other: fusing 8
    portraits on 16 cores kept 4.2 cores busy for the same wall time that 2.6 now take. The host runs one node
    at a time, so nothing else of it calls OpenCV meanwhile."""
    with _share_lock:
        if _share["users"] == 0:
            _share["cv2_threads"] = cv2.getNumThreads()
            cv2.setNumThreads(max(1, _share["cv2_threads"] // workers))
        _share["users"] += 1
    try:
        yield
    finally:
        with _share_lock:
            _share["users"] -= 1
            if _share["users"] == 0:
                cv2.setNumThreads(_share["cv2_threads"])


def detect_faces_per_thread(rgb: np.ndarray, backend: str = "embedded",
                            max_side: int | None = DETECT_MAX_SIDE) -> list[Face]:
    """detect.detect_faces, with one YuNet per thread so that a thread pool does not queue on one lock;
    large images are searched at ``max_side`` and the faces scaled back."""
    from .detect import YuNetDetector, detect_faces

    rgb, k = _working(rgb, max_side)
    if backend != "embedded":
        faces = detect_faces(rgb, backend)
    else:
        faces = per_thread("yunet", YuNetDetector).detect(rgb)
    return _scaled_back(faces, k)


def detect_faces_many(rgbs: list[np.ndarray], backend: str = "embedded", max_side: int | None = DETECT_MAX_SIDE,
                      workers: int = 0, same_batch: bool = False) -> list[list[Face]]:
    """``detect_faces_per_thread`` of each image: with the embedded net on the GPU in batches (up to 8 images of
    one size in a run; ``same_batch``: see ``TorchNet.run_many``), else side by side on the thread pool."""
    from .detect import YuNetDetector
    from .onnx_torch import gpu_net

    if backend != "embedded" or gpu_net("yunet") is None:
        return list(parallel_map(lambda rgb: detect_faces_per_thread(rgb, backend, max_side), rgbs, workers))
    work = [_working(rgb, max_side) for rgb in rgbs]
    found = per_thread("yunet", YuNetDetector).detect_many([rgb for rgb, _ in work], same_batch)
    return [_scaled_back(faces, k) for faces, (_, k) in zip(found, work)]


def _working(rgb: np.ndarray, max_side: int | None) -> tuple[np.ndarray, float]:
    """The image at its working size (the long side at most ``max_side``) and the scale taken."""
    h, w = rgb.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return rgb, 1.0
    k = max_side / max(h, w)
    return cv2.resize(rgb, (max(1, round(w * k)), max(1, round(h * k))), interpolation=cv2.INTER_AREA), k


def _scaled_back(faces: list[Face], k: float) -> list[Face]:
    return faces if k == 1.0 else [Face(f.box / k, f.keypoints / k, f.score) for f in faces]


def _load_thread_models() -> None:
    """Each pool thread loads its own YuNet and SFace as it starts (together, once), not in the middle of
    some later batch."""
    from .recognition import get_recogniser

    try:
        detect_faces_per_thread(np.zeros((32, 32, 3), np.uint8))
        get_recogniser("embedded")
    except Exception:  # a missing package shows up, with its message, where the model is used
        pass
