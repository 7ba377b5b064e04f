"""Speed switches of a training run, each a context manager undone when the run ends.

* ``attention_backend``: which scaled-dot-product-attention kernel the UNet's attention uses.
* ``channels_last``: the UNet's convolution weights in NHWC layout for the run (rewritten in their own
  memory and written back afterwards; the host's own parameter objects are put back).
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


def _over(t: torch.Tensor, stride) -> torch.Tensor:
    """A normal (non-inference) tensor over ``t``'s memory with the given strides."""
    with torch.inference_mode(False):
        view = torch.empty(0, dtype=t.dtype, device=t.device)
        return view.set_(t.untyped_storage(), t.storage_offset(), t.size(), stride)


def _relayout_(t: torch.Tensor, src_stride, dst_stride) -> torch.Tensor:
    """Rewrite ``t``'s memory from one layout to the other, in place (one weight's copy held meanwhile)."""
    with torch.inference_mode(False), torch.no_grad():
        src = _over(t, src_stride)
        dst = _over(t, dst_stride)
        dst.copy_(src.clone())
    return dst


@contextmanager
def channels_last(root: torch.nn.Module, enabled: bool) -> Iterator[int]:
    """Every 4-D Conv2d weight under ``root`` in NHWC layout for the run; yields how many were converted.

    A contiguous weight is rewritten in its own memory (no second copy of the UNet's convolutions; the host
    does not use the model while it trains) and written back to NCHW afterwards, its original parameter
    object put back; any other weight gets an NHWC copy for the run."""
    saved = []  # (module, original parameter, the NHWC tensor over its memory or None for a copy)
    try:
        if enabled:
            for module in root.modules():
                if isinstance(module, torch.nn.Conv2d) and module.weight is not None and module.weight.ndim == 4:
                    w = module.weight
                    if w.is_contiguous(memory_format=torch.channels_last):
                        continue
                    nhwc_stride = torch.empty_like(w, device="meta", memory_format=torch.channels_last).stride()
                    if w.is_contiguous():
                        nhwc = _relayout_(w, w.stride(), nhwc_stride)
                        saved.append((module, w, nhwc))
                    else:
                        with torch.inference_mode(False):  # the host may have loaded inference tensors
                            nhwc = w.detach().clone(memory_format=torch.channels_last)
                        saved.append((module, w, None))
                    module._parameters["weight"] = torch.nn.Parameter(nhwc, requires_grad=False)
        yield len(saved)
    finally:
        for module, w, nhwc in reversed(saved):
            if nhwc is not None:
                _relayout_(w, nhwc.stride(), w.stride())
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
