"""MediaPipe's 468-point face mesh on a face the pack has already found (5 keypoints).

MediaPipe's own pipeline crops a square around the detected face, turned so the eyes are level, runs
``face_landmark.tflite`` on that 192x192 crop and maps the points back. Here the crop comes from the 5
keypoints of FaceAlign's detector: centre at the middle of the face, side a fixed multiple of the face's
height, turned by the eye angle. A second pass re-centres the crop on the first pass's points, as
MediaPipe does when it tracks a face from frame to frame. OpenCV's TFLite reader runs the net (the
mediapipe package is never imported); on a GPU host torch runs the same file (``tflite_graph``,
``onnx_torch``). The index groups (face oval, eyes, brows, lips, nose, jaw) are data:
``data/face_mesh.json``.

Points are ``float32`` (468, 2) arrays in the pixel frame of the image they were found on.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from . import model_store
from .data_files import load
from .errors import FaceChainError, ModelMissingError
from .face_regions import FaceFrame
from .model_cache import files_stamp
from .onnx_torch import gpu_net

N_POINTS = 468


def topology() -> dict:
    """The named index groups of the mesh (``data/face_mesh.json``)."""
    return load("face_mesh.json")


def contour(points: np.ndarray, name: str) -> np.ndarray:
    """The points of one named contour (``face_oval``, ``right_eye``, ``lips_outer``...) in order."""
    idx = _contour_index(name)
    return np.asarray(points, np.float32)[idx]


@lru_cache(maxsize=None)
def _contour_index(name: str) -> np.ndarray:
    groups = topology()["contours"]
    if name not in groups:
        raise FaceChainError(f"Unknown face mesh contour '{name}'; known: {', '.join(groups)}.")
    return np.asarray(groups[name], np.intp)


def point(points: np.ndarray, name: str) -> np.ndarray:
    return np.asarray(points, np.float32)[topology()["points"][name]]


def jaw(points: np.ndarray) -> np.ndarray:
    """The lower face outline, cheek to chin to cheek (image-left first for an upright face)."""
    return np.asarray(points, np.float32)[topology()["jaw"]]


def fill_contours(shape: tuple[int, int], points: np.ndarray, names: list[str], grow: int = 0) -> np.ndarray:
    """0/255 mask of the named contours filled, grown by ``grow`` pixels."""
    mask = np.zeros(shape[:2], np.uint8)
    for name in names:
        cv2.fillPoly(mask, [np.round(contour(points, name)).astype(np.int32)], 255, cv2.LINE_AA)
    mask = np.where(mask > 127, 255, 0).astype(np.uint8)
    if grow > 0:
        mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1)))
    return mask


@dataclass
class Mesh:
    points: np.ndarray  # (468, 2) float32, image pixels
    depth: np.ndarray  # (468,) float32, same pixel scale, smaller = nearer the camera
    presence: float  # the net's face-presence score, 0-1

    def to_list(self) -> list[list[float]]:
        return [[round(float(x), 1), round(float(y), 1)] for x, y in self.points]


def read_tflite(path: Path):
    """A TFLite net in OpenCV. OpenCV 5's new engine returns only the graph's declared outputs (the mesh's
    face-presence score is an inner layer), so its classic engine is asked for where there is a choice."""
    engine = getattr(cv2.dnn, "ENGINE_CLASSIC", None)
    if engine is None:
        return cv2.dnn.readNetFromTFLite(str(path))
    return cv2.dnn.readNetFromTFLite(str(path), engine=engine)


class FaceMeshNet:
    """face_landmark.tflite through OpenCV, one forward at a time (an OpenCV net is not re-entrant); each
    thread holds its own (``mesh_net``)."""

    def __init__(self, path: Path):
        self._net = read_tflite(path)
        self._outs = self._output_names()
        self._lock = threading.Lock()

    def _output_names(self) -> list[str]:
        """The landmark tensor and the face-presence score: the last conv layers that output 1404 and 1 values."""
        self._net.setInput(_blob(np.zeros((192, 192, 3), np.uint8)))
        names = [n for n in self._net.getLayerNames() if n.startswith("conv2d_")]
        return list(_marks_and_score({o.size: n for n, o in zip(names, self._net.forward(names))}))

    def run(self, crop: np.ndarray) -> tuple[np.ndarray, float]:
        """(468, 3) points in the crop's pixels and the presence score of one 192x192 RGB uint8 crop."""
        blob = _blob(crop)
        with self._lock:
            self._net.setInput(blob)
            marks, score = self._net.forward(self._outs)
        return _answer(marks, score)


def _blob(crop: np.ndarray) -> np.ndarray:
    """The net's input: the RGB crop as NCHW float scaled to 0..1."""
    return cv2.dnn.blobFromImage(crop, 1 / 255.0, (crop.shape[1], crop.shape[0]))


def _marks_and_score(by_size: dict) -> tuple:
    """Of the net's outputs keyed by their number of values: the landmarks (1404) and the face score (1)."""
    if N_POINTS * 3 not in by_size or 1 not in by_size:
        raise FaceChainError("face_landmark.tflite has no 1404-value landmark output and 1-value face score; "
                             "the file is not MediaPipe's 468-point face mesh. Run `python install.py` again.")
    return by_size[N_POINTS * 3], by_size[1]


def _answer(marks: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, float]:
    """(468, 3) points in the crop's pixels and the presence probability (the score is a logit)."""
    return marks.reshape(N_POINTS, 3), float(1.0 / (1.0 + np.exp(-float(score.ravel()[0]))))


_local = threading.local()


def mesh_net() -> FaceMeshNet:
    """This thread's own net, loaded again when its file changes. One net per thread: a shared one would
    queue every thread of a pool on its lock (the mesh runs two to four times per fused image)."""
    path = model_store.embedded_path("face_mesh")
    stamp = files_stamp([path])
    held = getattr(_local, "mesh", None)
    if held is None or held[0] != stamp:
        held = _local.mesh = (stamp, FaceMeshNet(path))
    return held[1]


def _run_torch(net, crop: np.ndarray) -> tuple[np.ndarray, float]:
    """FaceMeshNet.run's answer from the net run by torch (``onnx_torch``): the outputs told apart by size."""
    return _answer(*_marks_and_score({o.size: o for o in net(_blob(crop))}))


def _crop_transform(centre: np.ndarray, side: float, angle: float, size: int) -> np.ndarray:
    """2x3 affine from the image to a ``size`` square crop of ``side`` pixels around ``centre``, turned by
    ``angle`` degrees (the eye line's angle) so the face stands upright in the crop."""
    m = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), angle, size / side)
    m[:, 2] += np.array([size / 2.0, size / 2.0]) - np.asarray(centre, np.float64)
    return m


def _crop(rgb: np.ndarray, centre: np.ndarray, side: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """The net's square input around ``centre`` and the affine that made it."""
    size = int(topology()["input_size"])
    m = _crop_transform(centre, side, angle, size)
    return cv2.warpAffine(rgb, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE), m


def _in_image(marks: np.ndarray, presence: float, m: np.ndarray, side: float) -> tuple[np.ndarray, np.ndarray, float]:
    """The crop's points back in the image's pixels (x, y), their depth at the image's scale, the presence."""
    size = int(topology()["input_size"])
    inv = cv2.invertAffineTransform(m)
    xy = marks[:, :2] @ inv[:, :2].T + inv[:, 2]
    return xy.astype(np.float32), (marks[:, 2] * side / size).astype(np.float32), presence


def _run_on(rgb: np.ndarray, centre: np.ndarray, side: float, angle: float) -> tuple[np.ndarray, np.ndarray, float]:
    crop, m = _crop(rgb, centre, side, angle)
    gpu = gpu_net("face_mesh")
    marks, presence = _run_torch(gpu, crop) if gpu is not None else mesh_net().run(crop)
    return _in_image(marks, presence, m, side)


def _first_crop(keypoints) -> tuple[np.ndarray, float, float]:
    """Where the first pass looks: the centre, side and angle from the face's 5 keypoints."""
    frame = FaceFrame.from_keypoints(keypoints)
    return frame.point(0.0, 0.45), topology()["roi"]["scale"] * frame.size, frame.angle  # size: forehead to chin


def _refined_crop(xy: np.ndarray) -> tuple[np.ndarray, float, float] | None:
    """As MediaPipe tracks: the next crop is the square around the points found, turned by their eye line
    (None when the first pass found nothing usable)."""
    eyes = xy[topology()["points"]["left_eye_outer"]] - xy[topology()["points"]["right_eye_outer"]]
    angle = float(np.degrees(np.arctan2(eyes[1], eyes[0])))
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    if not (np.all(np.isfinite(xy)) and np.all(hi - lo > 4)):
        return None
    return (lo + hi) / 2, topology()["roi"]["scale"] * float(np.max(hi - lo)), angle


def face_mesh(rgb: np.ndarray, keypoints) -> Mesh:
    """The 468 points of the face whose 5 keypoints are given, in ``rgb``'s pixels."""
    xy, z, presence = _run_on(rgb, *_first_crop(keypoints))
    if topology()["roi"].get("refine"):
        again = _refined_crop(xy)
        if again is not None:
            xy, z, presence = _run_on(rgb, *again)
    return Mesh(xy, z, presence)


def face_meshes(pairs: list[tuple[np.ndarray, object]], workers: int = 0, same_batch: bool = False) -> list[Mesh]:
    """``face_mesh`` of each (image, keypoints): with the net on the GPU, each pass of all the faces as one
    batch (``same_batch``: see ``TorchNet.run_many``); else side by side on the thread pool."""
    from .threads import parallel_map

    gpu = gpu_net("face_mesh")
    if gpu is None:
        return list(parallel_map(lambda p: face_mesh(p[0], p[1]), pairs, workers))
    rgbs = [rgb for rgb, _ in pairs]

    def run(where: list) -> list:
        crops = [_crop(rgb, *w) for rgb, w in zip(rgbs, where)]
        outs = gpu.run_many([_blob(crop) for crop, _ in crops], same_batch)
        return [_in_image(*_answer(*_marks_and_score({o.size: o for o in out})), m, w[1])
                for out, (_, m), w in zip(outs, crops, where)]

    found = run([_first_crop(k) for _, k in pairs])
    if topology()["roi"].get("refine"):
        again = [_refined_crop(xy) for xy, _, _ in found]
        redo = [i for i, w in enumerate(again) if w is not None]
        for i, answer in zip(redo, run([again[i] for i in redo]) if redo else []):
            found[i] = answer
    return [Mesh(*f) for f in found]


def mesh_from_list(value, shape: tuple[int, int] | None = None) -> np.ndarray | None:
    """The ``mesh`` entry of a FACECHAIN_FACES dict as a (468, 2) array; None when absent or malformed."""
    if value is None:
        return None
    try:
        pts = np.asarray(value, np.float32)
    except (TypeError, ValueError):
        return None
    if pts.shape != (N_POINTS, 2) or not np.all(np.isfinite(pts)):
        return None
    return pts


def add_meshes(images: list[np.ndarray], faces: list[dict]) -> list[dict]:
    """The FACECHAIN_FACES dicts with each face's 468 points (``mesh``: [x, y] pairs in the crop's pixels)
    added, for the steps that need real contours (HumanParse, SkinRetouch, FaceFusion). Without the mesh's
    model file the dicts go on unchanged: those steps then say what is missing when they need it."""
    out = []
    for img, face in zip(images, faces):
        face = dict(face)
        try:
            face["mesh"] = face_mesh(img, face["keypoints"]).to_list()
        except ModelMissingError:
            return [dict(f) for f in faces]
        out.append(face)
    return out
