"""Errors meant for the person using the pack: each says what was wrong and what to do."""


class FaceChainError(ValueError):
    """Bad input or a missing prerequisite, explained in words a ComfyUI user can act on."""


class ModelMissingError(FaceChainError):
    """A learned model is not on disk and cannot be fetched here."""

