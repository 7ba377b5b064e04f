"""One loaded instance per step and backend, shared by every caller (loading a model is the slow part)."""

from __future__ import annotations

from typing import Callable, Optional

from .errors import FaceChainError
from .model_cache import cached, learned_files


def backend_instance(step: str, backend: str, factories: dict[str, Optional[Callable]]):
    """The shared instance of ``factories[backend]()`` (made again when a learned backend's model files
    change); None where a factory is None (the step's embedded code needs no loaded object); a clear error
    for a name not in ``factories``."""
    if backend not in factories:
        raise FaceChainError(f"Unknown {step} backend '{backend}'; choose one of {', '.join(factories)}.")
    factory = factories[backend]
    if factory is None:
        return None
    return cached(("backend", step, backend), factory, learned_files(backend))
