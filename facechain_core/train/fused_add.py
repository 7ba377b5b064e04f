"""``a + b + bias`` (two feature maps in the same layout and a per-channel bias) as one Triton pass, for the end
of a UNet ResBlock: its skip connection plus its last convolution, whose bias PyTorch would otherwise add in a
pass of its own (cuDNN's convolution leaves the bias to a broadcast addition, which is not vectorised on a
channels-last map). Backward is free: both maps get the output's gradient.

Triton, the address passing and the interpreter for the CPU tests as in ``group_norm``.
"""

from __future__ import annotations

import torch

from .group_norm import ALIGN, _DTYPES, _TL, _address, _layout, _on, available, close, probed, triton

if triton is not None:
    import triton.language as tl

    from .group_norm import _ptr

BLOCK = 2048  # elements per program


_WORKS: dict = {}  # (device, dtype) -> whether a first small run compiled, ran and matched PyTorch


def works(device: torch.device, dtype: torch.dtype) -> bool:
    """``available``, and a small sum in ``dtype`` on ``device`` gave PyTorch's result in both layouts
    (``group_norm.probed``)."""
    return probed(_WORKS, "ResBlock addition", device, dtype, _try_once, available(torch.device(device)))


def _try_once(device: torch.device, dtype: torch.dtype) -> bool:
    g = torch.Generator(device="cpu").manual_seed(0)
    ok = True
    for layout in (torch.channels_last, torch.contiguous_format):
        a, b = (torch.randn(2, 320, 4, 4, generator=g).to(device=device, dtype=dtype).contiguous(memory_format=layout)
                for _ in range(2))
        bias = torch.randn(320, generator=g).to(device=device, dtype=dtype)
        out = _AddBias.apply(a, b, bias)
        ok = ok and out.stride() == a.stride() and close(out, a.float() + b.float() + bias.float()[None, :, None, None],
                                                         dtype)
    return ok


def usable(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether ``add`` runs the kernel for these tensors (same shape, dtype, device and layout, a 4-D map)."""
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(a.device.type):
        return False  # leave it to torch.compile, or to autocast's per-op precision
    if a.ndim != 4 or a.shape != b.shape or a.dtype != b.dtype or a.device != b.device or a.dtype not in _DTYPES:
        return False
    if a.numel() == 0 or a.numel() >= 2 ** 31 or a.stride() != b.stride() or _layout(a) is None:
        return False
    if a.data_ptr() % ALIGN or b.data_ptr() % ALIGN:
        return False
    if bias is not None and (bias.requires_grad or bias.device != a.device or bias.dtype not in _DTYPES
                             or tuple(bias.shape) != (a.shape[1],) or not bias.is_contiguous()):
        return False
    return works(a.device, a.dtype)


if triton is not None:
    @triton.jit(do_not_specialize=["R"])
    def _add_bias(A, B, BIAS, OUT, R, L, C, T: tl.constexpr, BT: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                  HAS_BIAS: tl.constexpr, BR: tl.constexpr, BL: tl.constexpr):
        # the maps as an R x L row-major matrix: positions x channels (channels-last) or (sample, channel) x
        # positions (NCHW); a tile of it per program, the bias read once per column or row of the tile
        A, B, OUT = _ptr(A, T), _ptr(B, T), _ptr(OUT, T)
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        cols = tl.program_id(1) * BL + tl.arange(0, BL)
        mask = (rows < R)[:, None] & (cols < L)[None, :]
        at = rows[:, None] * L + cols[None, :]
        y = tl.load(A + at, mask=mask, other=0.0).to(tl.float32) + tl.load(B + at, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            BIAS = BIAS.to(tl.pointer_type(BT))
            if CHANNELS_LAST:
                y += tl.load(BIAS + cols, mask=cols < L, other=0.0).to(tl.float32)[None, :]
            else:
                y += tl.load(BIAS + rows % C, mask=rows < R, other=0.0).to(tl.float32)[:, None]
        tl.store(OUT + at, y.to(T), mask=mask)


def _tiles(cols: int, block: int = BLOCK) -> tuple[int, int]:
    """A tile of about ``block`` elements, as wide as the rows allow (up to 256)."""
    bl = min(256, triton.next_power_of_2(cols))
    return max(1, block // bl), bl


class _AddBias(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, bias):
        out = torch.empty_like(a)
        n, c = a.shape[:2]
        hw = a.numel() // (n * c)
        channels_last = _layout(a)[1] == 1
        rows, cols = (n * hw, c) if channels_last else (n * c, hw)
        br, bl = _tiles(cols)
        with _on(a.device):
            _add_bias[(-(-rows // br), -(-cols // bl))](
                _address(a), _address(b), _address(bias if bias is not None else a), _address(out), rows, cols, c,
                T=_TL[a.dtype], BT=_TL[(bias if bias is not None else a).dtype], CHANNELS_LAST=channels_last,
                HAS_BIAS=bias is not None, BR=br, BL=bl)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, grad, None


def add(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a + b + bias[None, :, None, None]`` in ``a``'s layout; PyTorch's operations when not ``usable``."""
    if usable(a, b, bias):
        return _AddBias.apply(a, b, bias)
    out = a + b
    return out if bias is None else out + bias.reshape(1, -1, *[1] * (a.ndim - 2)).to(out.dtype)
