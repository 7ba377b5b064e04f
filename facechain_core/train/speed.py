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

from ..errors import FaceChainError


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


def _relayout_(t: torch.Tensor, src_stride, dst_stride, scratch: torch.Tensor) -> torch.Tensor:
    """Rewrite ``t``'s memory from one layout to the other, in place, through ``scratch`` (bytes, at least
    ``t``'s size, allocated beforehand so that writing the weights back never needs new memory)."""
    with torch.inference_mode(False), torch.no_grad():
        tmp = scratch[:t.numel() * t.element_size()].view(t.dtype).as_strided(t.size(), dst_stride)
        tmp.copy_(_over(t, src_stride))
        dst = _over(t, dst_stride)
        dst.copy_(tmp)
    return dst


def _on(t: torch.Tensor, device) -> bool:
    """``t`` is on ``device`` ("cuda" without an index meaning any GPU)."""
    device = torch.device(device)
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)


def _owns_its_memory(w: torch.Tensor) -> bool:
    """Contiguous NCHW over the whole of its storage (not a view into a larger one)."""
    return (w.is_contiguous() and w.storage_offset() == 0
            and w.untyped_storage().nbytes() == w.numel() * w.element_size())


@contextmanager
def channels_last(root: torch.nn.Module, enabled: bool, device: torch.device | None = None) -> Iterator[int]:
    """Every 4-D Conv2d weight under ``root`` in NHWC layout for the run; yields how many were converted.

    A weight on ``device`` (any device when None) that owns its memory is rewritten in that memory (no second
    copy of the UNet's convolutions; the host does not use the model while it trains) and written back to NCHW
    afterwards, its original parameter object put back; a weight shared by several layers is rewritten once.
    Any other weight gets an NHWC copy for the run."""
    saved = []  # (module, original parameter)
    rewritten = []  # (original parameter, its NHWC view), to write back
    done: dict = {}  # storage address -> (original parameter, NHWC parameter)
    scratch: dict = {}  # device -> bytes for one weight
    try:
        if enabled:
            convs = [m for m in root.modules() if isinstance(m, torch.nn.Conv2d) and m.weight is not None
                     and m.weight.ndim == 4 and not m.weight.is_contiguous(memory_format=torch.channels_last)]
            holders: dict = {}  # storage address -> the distinct weight objects over it
            for m in convs:
                holders.setdefault(m.weight.untyped_storage().data_ptr(), {})[id(m.weight)] = m.weight
            # memory that two weight objects share is copied rather than rewritten under the other one
            in_place = [ws.popitem()[1] for ws in holders.values() if len(ws) == 1]
            in_place = [w for w in in_place if _owns_its_memory(w) and (device is None or _on(w, device))]
            for w in in_place:
                need = w.numel() * w.element_size()
                if need > scratch.get(w.device, torch.empty(0)).numel():
                    with torch.inference_mode(False):
                        scratch[w.device] = torch.empty(need, dtype=torch.uint8, device=w.device)
            for module in convs:
                w = module.weight
                key = w.untyped_storage().data_ptr()
                if key in done:  # the same weight object in another layer
                    nhwc = done[key][1]
                elif any(w is t for t in in_place):
                    stride = torch.empty_like(w, device="meta", memory_format=torch.channels_last).stride()
                    view = _relayout_(w, w.stride(), stride, scratch[w.device])
                    rewritten.append((w, view))
                    nhwc = torch.nn.Parameter(view, requires_grad=False)
                    done[key] = (w, nhwc)
                else:
                    with torch.inference_mode(False):  # the host may have loaded inference tensors
                        nhwc = torch.nn.Parameter(w.detach().clone(memory_format=torch.channels_last),
                                                  requires_grad=False)
                saved.append((module, w))
                module._parameters["weight"] = nhwc
        yield len(saved)
    finally:
        failed = None
        for w, view in reversed(rewritten):
            try:
                _relayout_(w, view.stride(), w.stride(), scratch[w.device])
            except Exception as e:  # noqa: BLE001 - write back every other weight before reporting it
                failed = failed or e
        for module, w in reversed(saved):
            module._parameters["weight"] = w
        if failed is not None:
            raise FaceChainError("Could not put the UNet's convolution weights back in their layout after training "
                                 f"({failed}). Reload the checkpoint before using this model again.") from failed


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
