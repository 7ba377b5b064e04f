"""The one cache of loaded models, with one reload rule: an entry is loaded again when one of its files
changes (modified time or size), appears or disappears. Loading a model is the slow part; every backend,
ONNX session, tagger and the styles catalogue are held here."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable, Iterable

from . import model_store

_held: dict = {}
_lock = threading.RLock()  # re-entrant: a model's constructor may load another entry (its ONNX session)


def files_stamp(files: Iterable[str | os.PathLike]) -> tuple:
    """What identifies the files' current contents: path, modified time and size of each (None if absent)."""
    stamp = []
    for f in files:
        try:
            st = os.stat(f)
            stamp.append((str(f), st.st_mtime_ns, st.st_size))
        except OSError:
            stamp.append((str(f), None))
    return tuple(stamp)


def learned_files(name: str) -> list[Path]:
    """The files of learned model ``name`` that a reload watches: the file, or the folder and its check
    file, and its companions. Empty for a name that is no learned model (an embedded backend)."""
    entry = model_store.catalogue()["learned"].get(name)
    if entry is None:
        return []
    root = model_store.models_root()
    base = root / entry["path"]
    files = [base] if entry["kind"] == "file" else [base / entry.get("check", ""), base]
    return files + [root / rel for rel in entry.get("companions", {})]


def cached(key, make: Callable, files: Iterable[str | os.PathLike] = ()):
    """The held ``make()`` for ``key``, made again when ``files`` changed since it was made."""
    stamp = files_stamp(files)
    with _lock:
        held = _held.get(key)
        if held is None or held[0] != stamp:
            _held.pop(key, None)  # a failed reload leaves nothing stale behind
            _held[key] = (stamp, make())
        return _held[key][1]
