"""Where errors leave the pack for ComfyUI's error dialog: clear words, no server paths, no raw exceptions.

Every node's FUNCTION is wrapped once at registration. A ``FaceChainError`` passes with the server's
folders written as ``input/...``, ``models/...`` (see ``facechain_core.user_paths``). Cancel and
out-of-memory pass unchanged, because ComfyUI acts on them (it stops the queue item, or unloads models
and prints its memory tips). Anything else is a bug of the pack: the full traceback goes to the server
log, and the user reads which node failed, the kind of error and what to do.
"""

from __future__ import annotations

import functools
import inspect
import logging

import comfy.model_management

from ..facechain_core import user_paths
from ..facechain_core.errors import FaceChainError

_log = logging.getLogger("comfyui-facechain")
_PASS_THROUGH = (comfy.model_management.InterruptProcessingException, comfy.model_management.OOM_EXCEPTION)


def user_message(error: BaseException, node_name: str) -> FaceChainError:
    """The error the user is shown for ``error`` raised inside ``node_name``."""
    if isinstance(error, FaceChainError):
        return type(error)(user_paths.scrub(str(error)))
    return FaceChainError(
        f"{node_name} stopped on an unexpected internal error ({type(error).__name__}). The details are in the "
        f"ComfyUI server log; please report them to comfyui-facechain. Check that the node's inputs are connected "
        f"as its tooltips say, then run the prompt again.")


def guard(cls: type, node_name: str) -> type:
    """Wrap ``cls``'s FUNCTION (an ordinary method) so every error leaves through ``user_message``."""
    name = getattr(cls, "FUNCTION", None)
    original = cls.__dict__.get(name) if name else None
    if not inspect.isfunction(original) or getattr(original, "_facechain_guarded", False):
        return cls

    @functools.wraps(original)
    def run(self, *args, **kwargs):
        try:
            return original(self, *args, **kwargs)
        except _PASS_THROUGH:
            raise
        except Exception as e:  # noqa: BLE001 - this is the one place that turns every error into words
            if not isinstance(e, FaceChainError):
                _log.exception("FaceChain: %s failed", node_name)
            raise user_message(e, node_name) from None

    run._facechain_guarded = True
    setattr(cls, name, run)
    return cls
