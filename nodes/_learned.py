"""What the preprocessing nodes tell ComfyUI's cache about the learned models they may load."""

from __future__ import annotations

from ..facechain_core import model_store


def models_state(*names: str) -> str:
    """A fingerprint of the learned models' files: installing, replacing or removing one re-runs the node
    (its widgets alone would not change, so ComfyUI would otherwise reuse the old output)."""
    parts = []
    for name in names:
        entry = model_store.catalogue()["learned"][name]
        base = model_store.models_root() / entry["path"]
        files = [base] if entry["kind"] == "file" else [base / entry.get("check", ""), base]
        files += [model_store.models_root() / rel for rel in entry.get("companions", {})]
        for f in files:
            try:
                st = f.stat()
                parts.append(f"{f.name}:{st.st_mtime_ns}:{st.st_size}")
            except OSError:
                parts.append(f"{f.name}:-")
    return "|".join(parts)
