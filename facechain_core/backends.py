"""One loaded instance per step and backend, shared by every caller (loading a model is the slow part)."""

from __future__ import annotations

import threading
from typing import Callable, Optional

from .errors import FaceChainError

_instances: dict = {}
_lock = threading.Lock()


def backend_instance(step: str, backend: str, factories: dict[str, Optional[Callable]]):
    """The shared instance of ``factories[backend]()``; None where a factory is None (the step's embedded code
    needs no loaded object); a clear error for a name not in ``factories``."""
    if backend not in factories:
        raise FaceChainError(f"Unknown {step} backend '{backend}'; choose one of {', '.join(factories)}.")
    factory = factories[backend]
    if factory is None:
        return None
    with _lock:
        key = (step, backend)
        if key not in _instances:
            _instances[key] = factory()
        return _instances[key]
