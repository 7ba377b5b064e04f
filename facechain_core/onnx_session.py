"""One way to open an ONNX model: onnxruntime on the GPU when one is usable, else on the CPU."""

from __future__ import annotations

from pathlib import Path

from .errors import FaceChainError
from .model_cache import cached


def _providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    # onnxruntime-gpu lists CUDA even on a machine without a usable GPU; ask torch (the host's) first.
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
            if p in available and (cuda or p != "CUDAExecutionProvider")]


def onnx_session(path: str | Path):
    """A cached ``onnxruntime.InferenceSession`` for ``path`` (reopened when the file changes)."""
    path = Path(path)
    try:
        import onnxruntime as ort
    except ImportError:
        raise FaceChainError("onnxruntime is not installed; run `pip install -r requirements.txt` in the "
                             "comfyui-facechain folder.") from None
    path.stat()  # a missing file is the caller's FileNotFoundError, as before

    def open_session():
        try:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            return ort.InferenceSession(str(path), options, providers=_providers())
        except Exception as e:  # onnxruntime raises its own exception types for broken files
            raise FaceChainError(f"Could not open the ONNX model '{path}' ({type(e).__name__}: {e}). "
                                 f"Fetch it again (`python install.py --models ...`).") from None

    return cached(("onnx", str(path.resolve())), open_session, [path])
