"""One caption per training image, from AutoTag's captions, typed lines, or the trigger token alone."""

from __future__ import annotations

from typing import Mapping

from ..errors import FaceChainError

NO_IMAGES = "No training images: connect the aligned face crops (an IMAGE batch of 3-20 photos)."


def require_images(images) -> int:
    """The one check that there is something to train on: an IMAGE batch [N,H,W,C] with N > 0. Returns N."""
    if getattr(images, "ndim", 0) != 4 or images.shape[0] == 0:
        raise FaceChainError(NO_IMAGES)
    return int(images.shape[0])


def clean_token(trigger: str | None) -> str:
    t = " ".join((trigger or "").split()).strip(" ,")
    if "," in t:
        raise FaceChainError(f"The trigger token {t!r} contains a comma; use one made-up word such as 'fcsks'.")
    return t


def resolve_captions(n_images: int, captions: Mapping | None = None, caption_text: str | None = None,
                     trigger: str | None = None) -> tuple[list[str], str]:
    """Return (one caption per image, trigger).

    Priority: AutoTag's FACECHAIN_CAPTIONS dict; else the typed lines (one for all images, or one per image;
    the trigger is put in front of a line that lacks it); else the trigger token alone.
    """
    if n_images <= 0:
        raise FaceChainError(NO_IMAGES)
    if captions is not None:
        if not isinstance(captions, Mapping) or not isinstance(captions.get("captions"), (list, tuple)):
            raise FaceChainError("The captions input is not a FACECHAIN_CAPTIONS value: connect AutoTag's captions "
                                 "output, or type captions in the caption text box instead.")
        lines = [" ".join(str(c).split()) for c in captions["captions"]]
        token = clean_token(captions.get("trigger") or trigger)
        source = "AutoTag"
    else:
        lines = [" ".join(ln.split()) for ln in (caption_text or "").splitlines() if ln.strip()]
        token = clean_token(trigger)
        source = "caption text"
        if token:
            lines = [ln if token in ln.replace(",", " ").split() else f"{token}, {ln}" for ln in lines]
    if not lines:
        if captions is not None:
            raise FaceChainError("AutoTag's captions are empty: run AutoTag on the same images.")
        if not token:
            raise FaceChainError("No captions and no trigger token: type a trigger token (a made-up word such as "
                                 "'fcsks'), type captions, or connect AutoTag's captions.")
        return [token] * n_images, token
    if len(lines) == 1:
        return lines * n_images, token
    if len(lines) != n_images:
        raise FaceChainError(f"{len(lines)} captions ({source}) for {n_images} images: give one caption per image "
                             f"(in the images' order) or a single caption for all. With AutoTag, connect it to the "
                             f"same images that go into TrainFaceLoRA.")
    return lines, token
