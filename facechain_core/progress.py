"""Progress reporting without a ComfyUI import: library loops call ``progress(done, total, info)``.

The callback may raise to cancel (ComfyUI's interrupt); library code calls it at least once per unit
of work so that Cancel takes effect promptly, and writes nothing final before its loop ends.
"""

from __future__ import annotations

from typing import Callable, Optional

ProgressFn = Callable[[int, int, Optional[str]], None]
LossesFn = Callable[[list, int], None]  # (the training losses read so far, the run's number of steps)


def no_progress(done: int, total: int, info: str | None = None) -> None:
    return None

