"""Speed switches of a training run, each a context manager undone when the run ends.

* ``attention_backend``: which scaled-dot-product-attention kernel the UNet's attention uses.
* ``channels_last``: the UNet's convolution weights in NHWC layout for the run (a copy of the conv
  weights; the host's own tensors are put back afterwards).
* ``cudnn_benchmark``: cuDNN tries its convolution algorithms once per shape and keeps the fastest (ComfyUI
  leaves this off unless started with ``--fast autotune``); the host's setting is put back afterwards.
* ``compile_cache``: torch.compile's compiled kernels and graphs kept on disk, so the compile is paid
  once per machine rather than once per run.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import torch


def attention_backend(name: str):
    """``auto`` leaves PyTorch's own choice; otherwise only that SDPA backend is allowed (the names:
    ``settings.ATTENTION_BACKENDS``)."""
    from .settings import ATTENTION_BACKENDS

    member = ATTENTION_BACKENDS[name]
    if member is None:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, member)])


@contextmanager
def channels_last(root: torch.nn.Module, enabled: bool) -> Iterator[int]:
    """Swap every 4-D weight of a Conv2d under ``root`` for an NHWC copy; yields how many were swapped."""
    saved = []
    try:
        if enabled:
            for module in root.modules():
                if isinstance(module, torch.nn.Conv2d) and module.weight is not None and module.weight.ndim == 4:
                    w = module.weight
                    saved.append((module, w))
                    with torch.inference_mode(False):  # the host may have loaded inference tensors
                        nhwc = w.detach().clone(memory_format=torch.channels_last)
                    module._parameters["weight"] = torch.nn.Parameter(nhwc, requires_grad=False)
        yield len(saved)
    finally:
        for module, w in reversed(saved):
            module._parameters["weight"] = w


@contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = bool(enabled) or before
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "comfyui-facechain" / "torch-compile"


@contextmanager
def compile_cache(enabled: bool, folder: Path | None = None) -> Iterator[None]:
    """Point Inductor's on-disk caches (compiled kernels, FX and autograd graphs: on by default in torch) at a
    folder that outlives the process, unless the user already chose one with TORCHINDUCTOR_CACHE_DIR."""
    if not enabled or "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        yield
        return
    folder = Path(folder or default_cache_dir())
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    try:
        yield
    finally:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
