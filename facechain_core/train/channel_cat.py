"""Concatenation of channels-last feature maps along their channels, as a UNet's up path joins its skip
connections, by a Triton copy each way.

Why: PyTorch's ``torch.cat(dim=1)`` of NHWC maps writes each input's rows into the wider rows of the output
with a kernel that is not vectorised for that layout (on an H200, SD1.5's twelve up-path joins at batch 8
took 0.7 ms a step for 0.5 GB moved, about a sixth of the memory's speed), and its backward hands out the
gradient's channel slices as strided views, which the layers that get them copy or add unvectorised. Here
each input is one tiled copy into its columns of the output (rows of channels, 16-byte vectors), and backward
copies the gradient's columns out into one contiguous map per input.

Triton, the address passing and the interpreter for the CPU tests as in ``group_norm``.
"""

from __future__ import annotations

import torch

from .fused_add import _tiles
from .group_norm import ALIGN, _DTYPES, _TL, _address, _on, available, close, probed, triton

if triton is not None:
    import triton.language as tl

    from .group_norm import _ptr

BLOCK = 4096  # elements per program


_WORKS: dict = {}  # (device, dtype) -> whether a first small run compiled, ran and matched PyTorch


def works(device: torch.device, dtype: torch.dtype) -> bool:
    """``available``, and a small concatenation in ``dtype`` on ``device`` gave PyTorch's result both ways
    (``group_norm.probed``)."""
    return probed(_WORKS, "channel concatenation", device, dtype, _try_once, available(torch.device(device)))


def _try_once(device: torch.device, dtype: torch.dtype) -> bool:
    g = torch.Generator(device="cpu").manual_seed(0)
    parts = [torch.randn(2, c, 3, 5, generator=g).to(device=device, dtype=dtype)
             .contiguous(memory_format=torch.channels_last).requires_grad_() for c in (24, 40)]
    out = _ChannelCat.apply(*parts)
    grad = torch.randn(out.shape, generator=g).to(device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    out.backward(grad)
    want = torch.cat([p.detach() for p in parts], 1)
    return (out.is_contiguous(memory_format=torch.channels_last) and close(out.detach(), want, dtype)
            and close(parts[0].grad, grad[:, :24], dtype) and close(parts[1].grad, grad[:, 24:], dtype))


def _nhwc(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and t.data_ptr() % ALIGN == 0


def usable(tensors, dim: int) -> bool:
    """Whether ``cat`` runs the kernels: two or more channels-last 4-D maps (plain tensors, 16-byte aligned, under
    2**31 values together) of one dtype, device and size but their channels, joined along the channels, outside
    torch.compile and autocast."""
    if not isinstance(tensors, (list, tuple)) or len(tensors) < 2:
        return False
    if not all(type(t) is torch.Tensor for t in tensors):  # a subclass may override torch.cat
        return False
    first = tensors[0]
    if first.ndim != 4 or dim not in (1, -3) or torch.compiler.is_compiling():
        return False
    if torch.is_autocast_enabled(first.device.type) or first.dtype not in _DTYPES:
        return False
    n, _, h, w = first.shape
    if any(t.ndim != 4 or t.dtype != first.dtype or t.device != first.device or (t.shape[0], *t.shape[2:]) != (n, h, w)
           or t.shape[1] == 0 or not _nhwc(t) for t in tensors):
        return False
    total = sum(t.shape[1] for t in tensors) * n * h * w
    if total == 0 or total >= 2 ** 31:
        return False
    return works(first.device, first.dtype)


if triton is not None:
    @triton.jit(do_not_specialize=["R"])
    def _copy_columns(SRC, DST, R, C, src_width, dst_width, src_first, dst_first, T: tl.constexpr,
                      BR: tl.constexpr, BC: tl.constexpr):
        # rows x C columns from column src_first of SRC's rows (src_width wide) to column dst_first of DST's
        # rows (dst_width wide); a tile per program
        SRC, DST = _ptr(SRC, T), _ptr(DST, T)
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        mask = (rows < R)[:, None] & (cols < C)[None, :]
        x = tl.load(SRC + rows[:, None] * src_width + (src_first + cols)[None, :], mask=mask)
        tl.store(DST + rows[:, None] * dst_width + (dst_first + cols)[None, :], x, mask=mask)


def _copy(src: torch.Tensor, dst: torch.Tensor, rows: int, columns: int, src_first: int, dst_first: int):
    br, bc = _tiles(columns, BLOCK)
    _copy_columns[(-(-rows // br), -(-columns // bc))](
        _address(src), _address(dst), rows, columns, src.shape[1], dst.shape[1], src_first, dst_first,
        T=_TL[src.dtype], BR=br, BC=bc)


class _ChannelCat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *parts):
        n, _, h, w = parts[0].shape
        widths = [p.shape[1] for p in parts]
        out = torch.empty(n, sum(widths), h, w, device=parts[0].device, dtype=parts[0].dtype,
                          memory_format=torch.channels_last)
        first = 0
        with _on(out.device):
            for p, c in zip(parts, widths):
                _copy(p, out, n * h * w, c, 0, first)
                first += c
        ctx.widths = widths
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        if not _nhwc(grad):  # a gradient in another layout: its slices, as torch.cat's backward gives them
            return tuple(s if need else None for s, need in zip(grad.split(ctx.widths, 1), ctx.needs_input_grad))
        n, _, h, w = grad.shape
        out, first = [], 0
        with _on(grad.device):
            for c, need in zip(ctx.widths, ctx.needs_input_grad):
                part = None
                if need:
                    part = torch.empty(n, c, h, w, device=grad.device, dtype=grad.dtype,
                                       memory_format=torch.channels_last)
                    _copy(grad, part, n * h * w, c, first, 0)
                out.append(part)
                first += c
        return tuple(out)


def cat(tensors, dim: int = 0, **kwargs) -> torch.Tensor:
    """``torch.cat(tensors, dim, **kwargs)``; by the kernels where ``usable`` (channels-last maps along the
    channels, no other arguments)."""
    if not kwargs and usable(tensors, dim):
        return _ChannelCat.apply(*tensors)
    return torch.cat(tensors, dim, **kwargs)
