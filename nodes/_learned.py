"""What the preprocessing nodes tell ComfyUI's cache about the learned models they may load."""

from __future__ import annotations

from pathlib import Path

from ..facechain_core.model_cache import files_stamp, learned_files


def models_state(*names: str) -> str:
    """A fingerprint of the learned models' files: installing, replacing or removing one re-runs the node
    (its widgets alone would not change, so ComfyUI would otherwise reuse the old output). The same files
    and the same rule as the library's model cache."""
    parts = []
    for path, *when in files_stamp(f for name in names for f in learned_files(name)):
        parts.append(f"{Path(path).name}:" + ("-" if when[0] is None else f"{when[0]}:{when[1]}"))
    return "|".join(parts)
