"""Face quality of every training crop, the photos too poor to keep, and the template face.

FaceChain drops photos whose landmarks are poor and later fuses and ranks against the training photo
with the best face-quality score (the "template face"). Two scorers:

* ``embedded`` (default, offline): the geometric mean of four measures, each 0-1,
  - sharpness: fine detail relative to coarser detail inside the face (an upscaled or blurred photo
    lacks the finest band whatever its contrast),
  - resolution: how many of the source photo's pixels back each pixel of the face in the crop (a face
    upscaled from a 240p frame cannot be sharp); the photo's short side when that is unknown,
  - pose: how frontal the face is, from where the nose tip sits between the eyes and mouth corners,
  - visible: the share of the face oval that is photo, not the white fill of a face cut by the frame,
  - confidence: the face detector's score for the crop.
* ``fqa``: FaceChain's face-quality-assessment network (ONNX in its ModelScope snapshot), run through
  onnxruntime on the face aligned to the 112-pixel template, as its pipeline does.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from . import model_store
from .errors import FaceChainError
from .face_regions import FaceFrame, align_112, draw_oval
from .images import as_rgb_uint8
from .onnx_session import onnx_session
from .progress import ProgressFn, no_progress

SCORERS = ("embedded", "fqa")
# Weights of the embedded measures in the geometric mean; sharpness matters most for a template.
WEIGHTS = {"sharpness": 0.3, "resolution": 0.2, "pose": 0.2, "visible": 0.2, "confidence": 0.1}
SHARP_BAND = (0.15, 0.45)  # fine/coarse detail ratio: upscaled 240p ~0.2, sharp photos ~0.4
FULL_RESOLUTION = 512  # short side (px) from which a photo counts as full resolution for a 512 crop
CONFIDENCE_BAND = (0.5, 1.0)  # detector score mapped to 0-1
FRONTAL_SPREAD = 0.35  # nose offset (eye distances) at which the pose measure falls to 1/e


@dataclass
class FaceQuality:
    name: str
    score: float
    measures: dict  # measure -> 0..1 (embedded) plus 'fqa' when that scorer ran

    def weakest(self) -> str:
        m = {k: v for k, v in self.measures.items() if k in WEIGHTS}
        k = min(m, key=m.get)
        return f"{k} {m[k]:.2f}"


def sharpness(rgb: np.ndarray, frame: FaceFrame) -> float:
    g = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    inside = draw_oval(g.shape, frame, 0.85) > 0
    g1 = cv2.GaussianBlur(g, (0, 0), 1.0)
    g4 = cv2.GaussianBlur(g, (0, 0), 4.0)
    fine, coarse = float((g - g1)[inside].std()), float((g1 - g4)[inside].std())
    ratio = fine / max(coarse, 1e-3)
    lo, hi = SHARP_BAND
    return float(np.clip((ratio - lo) / (hi - lo), 0.0, 1.0))


def pose(frame: FaceFrame) -> float:
    k = frame.keypoints
    nose = k[2] - frame.eye_centre
    yaw = float(np.dot(nose, frame.right)) / frame.eye_distance
    mouth = float(np.dot(frame.mouth_centre - frame.eye_centre, frame.right)) / frame.eye_distance
    turn = max(abs(yaw), abs(mouth))
    return float(np.exp(-(turn / FRONTAL_SPREAD) ** 2))


def visible(rgb: np.ndarray, frame: FaceFrame) -> float:
    inside = draw_oval(rgb.shape[:2], frame, 0.9) > 0
    fill = np.all(rgb[inside] >= 254, axis=-1)
    return float(1.0 - fill.mean()) if fill.size else 0.0


def resolution(face: dict) -> float:
    source_face, box = face.get("source_face_px"), face.get("box")
    if source_face and box:
        return float(np.clip(source_face / max(box[2], box[3], 1.0), 0.0, 1.0))
    source_size = face.get("source_size")
    if not source_size:
        return 1.0
    return float(np.clip(min(source_size) / FULL_RESOLUTION, 0.0, 1.0))


def confidence(score) -> float:
    if score is None:
        return 1.0
    lo, hi = CONFIDENCE_BAND
    return float(np.clip((float(score) - lo) / (hi - lo), 0.0, 1.0))


def embedded_measures(rgb: np.ndarray, face: dict) -> dict:
    frame = FaceFrame.from_keypoints(face["keypoints"])
    return {"sharpness": sharpness(rgb, frame), "resolution": resolution(face),
            "pose": pose(frame), "visible": visible(rgb, frame), "confidence": confidence(face.get("score"))}


def combine(measures: dict) -> float:
    logs = sum(w * np.log(max(measures[k], 1e-3)) for k, w in WEIGHTS.items())
    return float(np.exp(logs / sum(WEIGHTS.values())))


class FQAScorer:
    """FaceChain's FQA network: ``model.onnx`` taking [1, 3, 112, 112] RGB scaled to -1..1, whose mean
    output is the quality score (higher is better)."""

    file = "model.onnx"

    def __init__(self):
        path = model_store.model_path("fqa") / self.file
        self.session = onnx_session(path)
        self.input_name = self.session.get_inputs()[0].name

    def score(self, rgb: np.ndarray, keypoints) -> float:
        face = align_112(rgb, keypoints).astype(np.float32)
        x = ((face / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None]
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x)})[0]
        return float(np.mean(out))


@dataclass
class QualityResult:
    scores: list[FaceQuality]
    kept: list[int]
    dropped: list[tuple[int, str]]
    template: int

    def report_text(self, scorer: str) -> str:
        lines = [f"Face quality ({scorer}): kept {len(self.kept)} of {len(self.scores)}; template face: "
                 f"{self.scores[self.template].name} ({self.scores[self.template].score:.3f})"]
        dropped = dict(self.dropped)
        for i, q in enumerate(self.scores):
            parts = ", ".join(f"{k} {v:.2f}" for k, v in q.measures.items())
            state = f"dropped, {dropped[i]}" if i in dropped else ("template" if i == self.template else "kept")
            lines.append(f"- {q.name}: {q.score:.3f} ({parts}) {state}")
        return "\n".join(lines)


def assess_faces(images: list[np.ndarray], faces: list[dict], scorer: str = "embedded", min_quality: float = 0.3,
                 progress: ProgressFn | None = None) -> QualityResult:
    """Score every crop, drop those under ``min_quality`` and choose the best as the template face."""
    if scorer not in SCORERS:
        raise FaceChainError(f"Unknown quality scorer '{scorer}'; choose one of {', '.join(SCORERS)}.")
    if not images:
        raise FaceChainError("The template-face step got no images. Connect the crops of FaceAlign or SkinRetouch.")
    if len(faces) != len(images):
        raise FaceChainError(f"Got {len(images)} images but face data for {len(faces)}; connect the faces output "
                             f"that belongs to these images.")
    progress = progress or no_progress
    fqa = FQAScorer() if scorer == "fqa" else None
    scores = []
    for i, (img, face) in enumerate(zip(images, faces)):
        name = face.get("name") or f"photo {i + 1}"
        progress(i, len(images), name)
        rgb = as_rgb_uint8(img, name)
        measures = embedded_measures(rgb, face)
        value = combine(measures)
        if fqa is not None:
            value = fqa.score(rgb, face["keypoints"])
            measures["fqa"] = value
        scores.append(FaceQuality(name, value, measures))
    progress(len(images), len(images), None)
    kept = [i for i, q in enumerate(scores) if q.score >= min_quality]
    dropped = [(i, f"quality {q.score:.2f} below {min_quality:.2f} (weakest: {q.weakest()})")
               for i, q in enumerate(scores) if q.score < min_quality]
    if not kept:
        best = max(scores, key=lambda q: q.score)
        raise FaceChainError(
            f"Every photo scored below the minimum quality {min_quality:.2f} (best: {best.name}, {best.score:.2f}; "
            f"weakest measure {best.weakest()}). Lower min_quality or add sharper, more frontal photos.")
    template = max(kept, key=lambda i: scores[i].score)
    return QualityResult(scores, kept, dropped, template)
