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
