"""Where the benchmarks find this checkout and the shared photos (``FACECHAIN_SHARED``, as the tests do).
Importing it also puts the checkout and its scripts/ on ``sys.path``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_FACES = Path(os.environ.get("FACECHAIN_SHARED", REPO.parent / "shared")) / "faces"
for _folder in (REPO / "scripts", REPO):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))


def check_imports(needed: list[str]) -> None:
    """Stop, naming them, when modules a benchmark needs are missing (a GPU machine reaches no registry:
    the benchmark's docstring lists the wheels to carry)."""
    import importlib.util

    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"missing on this machine: {', '.join(missing)} (the benchmark's docstring lists the "
                         f"wheels to carry)")
