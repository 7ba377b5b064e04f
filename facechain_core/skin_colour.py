"""The skin-colour model the embedded parsing and retouching share: skin is found by its colour, sampled
on the cheeks of each face (so a black-and-white photo, which has none, is refused with a clear message)."""

from __future__ import annotations

import cv2
import numpy as np

from .errors import FaceChainError
from .face_regions import FaceFrame, cheek_samples, draw_oval


def require_colour(rgb: np.ndarray, keypoints, name: str, step: str) -> None:
    """The embedded backends find skin by its colour: a black-and-white photo has none to find."""
    frame = FaceFrame.from_keypoints(keypoints)
    face = rgb[draw_oval(rgb.shape[:2], frame, 0.8) > 0].astype(np.int16)
    if face.size == 0:
        raise FaceChainError(f"The face of {name} lies outside the crop; run FaceAlign on the photo again.")
    spread = np.abs(face[:, 0] - face[:, 1]) + np.abs(face[:, 1] - face[:, 2])
    if float(np.mean(spread)) < 4.0:
        raise FaceChainError(
            f"{name} is a grayscale (black-and-white) photo: {step}'s embedded backend finds skin by its "
            f"colour and cannot work on it. Remove the photo from the folder or use a colour photo of the person.")


def skin_likelihood(rgb: np.ndarray, frame: FaceFrame, whole: np.ndarray | None = None) -> np.ndarray:
    """Mahalanobis distance (squared) of every pixel's chroma to the skin colour sampled on the cheeks.

    Chroma (Cr, Cb) carries the skin colour across light and shade; luminance only enters weakly, so that
    dark hair and white walls of a similar hue still fall outside. ``rgb`` may be a part of ``whole``, the
    image the frame's keypoints refer to (the cheeks are sampled there)."""
    ycc = cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb).astype(np.float32)
    sampled = cheek_samples(rgb if whole is None else whole, frame)
    samples = cv2.cvtColor(sampled[None], cv2.COLOR_RGB2YCrCb)[0].astype(np.float32)
    if len(samples) < 20:
        raise FaceChainError("The cheeks of the face are outside the crop; run FaceAlign on the photo again.")
    mean = samples.mean(axis=0)
    cov = np.cov(samples.T) + np.diag([25.0, 4.0, 4.0])  # floor: a flat-lit cheek has almost no spread
    cov[0, :] *= 4.0  # luminance counts a quarter as much: light and shade vary across a face
    cov[:, 0] *= 4.0
    inv = np.linalg.inv(cov).astype(np.float32)
    diff = ycc - mean
    return np.einsum("...i,ij,...j->...", diff, inv, diff)
