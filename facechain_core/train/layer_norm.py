"""LayerNorm over the last axis, optionally of a sum ``x + h`` that is also returned, as Triton kernels, for the
transformer blocks of a frozen UNet in training.

Why: a transformer block is ``x + attn1(norm1(x))``, then ``+ attn2(norm2(.))``, then ``+ ff(norm3(.))``.
Stock, each residual addition is a pass of its own (read two maps, write one), each norm another, and in
backward autograd adds the residual's gradient to the norm's input gradient in a third. Here one kernel adds
and normalises (reads two maps, writes the sum and the normalised map), and the backward kernel adds the
sum's own gradient as it writes the input's. PyTorch's LayerNorm kernel also reads the short rows of a UNet
(320-1280 values) one row per thread block, at a fraction of the memory's speed; these read a tile of rows.

Rows are normalised in float32 (mean, then the variance about it). With ``h`` the sum is rounded to the
activations' dtype before it is normalised, as PyTorch's addition then LayerNorm would. Only the norm's input
(the sum) and two float32 numbers per row are kept for backward. The norm's weight and bias must be frozen (no
gradients are computed for them); ``usable`` says when the caller should keep PyTorch's computation.

Triton, the address passing and the interpreter for the CPU tests as in ``group_norm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .group_norm import ALIGN, _DTYPES, _TL, _address, _as_laid_out, _on, available, close, probed, triton

if triton is not None:
    import triton.language as tl

    from .group_norm import _affine, _ptr

ELEMENTS = 4096  # values per program (whole rows: a tile of rows x the row width rounded up to a power of two)
NUM_WARPS = 4

_WORKS: dict = {}  # (device, dtype) -> whether a first small run compiled, ran and matched PyTorch


def works(device: torch.device, dtype: torch.dtype) -> bool:
    """``available``, and a small sum-and-norm forward and backward in ``dtype`` on ``device`` gave PyTorch's
    result (``group_norm.probed``)."""
    return probed(_WORKS, "LayerNorm", device, dtype, _try_once, available(torch.device(device)))


def reference(x, h, weight, bias, eps):
    """PyTorch's computation: the sum (rounded to its dtype), and its LayerNorm."""
    s = x if h is None else x + h
    return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)


def _try_once(device: torch.device, dtype: torch.dtype) -> bool:
    g = torch.Generator(device="cpu").manual_seed(0)
    # a first transformer level in miniature (320 wide), so its compiled kernels serve there too
    x0, h0 = (torch.randn(2, 24, 320, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    w = (torch.rand(320, generator=g) + 0.5).to(device=device, dtype=dtype)
    b = torch.randn(320, generator=g).to(device=device, dtype=dtype)
    ok = True
    # each kernel variant the blocks use: the sum and its norm, both reaching the loss (norm2, norm3); the norm of
    # x alone, with x's own gradient added (norm1), and without it
    for with_h, sum_in_loss in ((True, True), (False, True), (False, False)):
        out = []
        for run in (_AddLayerNorm.apply, None):
            x = x0.clone().requires_grad_()
            h = h0.clone().requires_grad_() if with_h else None
            if run:
                s, y = run(x, h, w, b, 1e-5)
            else:
                s, y = reference(x.float(), None if h is None else h.float(), w.float(), b.float(), 1e-5)
            (y.float().square().sum() + (s.float().square().sum() * 0.5 if sum_in_loss else 0)).backward()
            out.append((s.detach(), y.detach(), x.grad) + ((h.grad,) if with_h else ()))
        ok = ok and all(close(a, b, dtype) for a, b in zip(*out))
    return ok


def usable(x: torch.Tensor, h: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    """Whether ``add_layer_norm`` runs the kernels for these tensors: contiguous, aligned, rows of at most 8192
    values, the weight and bias frozen vectors of the row's width; otherwise PyTorch's operations."""
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type):
        return False  # leave it to torch.compile, or to autocast (which runs LayerNorm in float32)
    if x.ndim < 2 or x.dtype not in _DTYPES or not 0 < x.numel() < 2 ** 31 or not 0 < x.shape[-1] <= 8192:
        return False
    if not x.is_contiguous() or x.data_ptr() % ALIGN:
        return False
    if h is not None and (h.shape != x.shape or h.dtype != x.dtype or h.device != x.device or not h.is_contiguous()
                          or h.data_ptr() % ALIGN):
        return False
    if any(p is not None and (p.requires_grad or p.device != x.device or p.dtype not in _DTYPES
                              or tuple(p.shape) != (x.shape[-1],) or not p.is_contiguous())
           for p in (weight, bias)):
        return False
    return works(x.device, x.dtype)


if triton is not None:
    @triton.jit
    def _rows(R, N, BR: tl.constexpr, BN: tl.constexpr):
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        cols = tl.arange(0, BN)
        mask = (rows < R)[:, None] & (cols < N)[None, :]
        return rows, cols, mask, rows[:, None] * N + cols[None, :]

    @triton.jit(do_not_specialize=["R"])
    def _ln_fwd(X, H, W, B, S, Y, STATS, R, N, eps, T: tl.constexpr, WT: tl.constexpr, BT: tl.constexpr,
             HAS_H: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr):
        X, H, S, Y = _ptr(X, T), _ptr(H, T), _ptr(S, T), _ptr(Y, T)
        W, B, STATS = W.to(tl.pointer_type(WT)), B.to(tl.pointer_type(BT)), _ptr(STATS, tl.float32)
        rows, cols, mask, at = _rows(R, N, BR, BN)
        x = tl.load(X + at, mask=mask, other=0.0)
        if HAS_H:  # the sum, rounded as PyTorch's addition would round it, is what gets normalised
            x = (x.to(tl.float32) + tl.load(H + at, mask=mask, other=0.0).to(tl.float32)).to(T)
            tl.store(S + at, x, mask=mask)
        x = x.to(tl.float32)
        mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
        w, b = _affine(W, B, cols, cols < N, HAS_W, HAS_B)
        tl.store(Y + at, (xc * rstd[:, None] * w[None, :] + b[None, :]).to(T), mask=mask)
        tl.store(STATS + rows * 2, mean, mask=rows < R)
        tl.store(STATS + rows * 2 + 1, rstd, mask=rows < R)

    @triton.jit(do_not_specialize=["R"])
    def _ln_bwd(S, DY, DS, W, STATS, DX, R, N, T: tl.constexpr, WT: tl.constexpr, HAS_DS: tl.constexpr,
             HAS_W: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr):
        S, DY, DS, DX = _ptr(S, T), _ptr(DY, T), _ptr(DS, T), _ptr(DX, T)
        W, STATS = W.to(tl.pointer_type(WT)), _ptr(STATS, tl.float32)
        rows, cols, mask, at = _rows(R, N, BR, BN)
        mean = tl.load(STATS + rows * 2, mask=rows < R, other=0.0)
        rstd = tl.load(STATS + rows * 2 + 1, mask=rows < R, other=0.0)
        xhat = tl.where(mask, (tl.load(S + at, mask=mask, other=0.0).to(tl.float32) - mean[:, None]) * rstd[:, None],
                        0.0)
        w, _ = _affine(W, W, cols, cols < N, HAS_W, False)
        wdy = tl.load(DY + at, mask=mask, other=0.0).to(tl.float32) * w[None, :]
        c1 = tl.sum(wdy * xhat, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        dx = (wdy - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_DS:  # the gradient reaching the sum directly (the residual stream's), added as it is written
            dx += tl.load(DS + at, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + at, dx.to(T), mask=mask)


def _tile(n: int) -> tuple[int, int]:
    bn = triton.next_power_of_2(n)
    return max(1, ELEMENTS // bn), bn


class _AddLayerNorm(torch.autograd.Function):
    """(s, LayerNorm(s)) with s = x + h, or s = x itself (an alias) without h; backward gives x (and h) the sum
    of s's own gradient and the norm's."""

    @staticmethod
    def forward(ctx, x, h, weight, bias, eps):
        n = x.shape[-1]
        rows = x.numel() // n
        s = x if h is None else torch.empty_like(x)
        y = torch.empty_like(x)
        stats = torch.empty(rows * 2, device=x.device, dtype=torch.float32)
        br, bn = _tile(n)
        w = weight if weight is not None else x
        b = bias if bias is not None else x
        with _on(x.device):
            _ln_fwd[(-(-rows // br),)](_address(x), _address(h if h is not None else x), _address(w), _address(b),
                                    _address(s), _address(y), _address(stats), rows, n, float(eps), T=_TL[x.dtype],
                                    WT=_TL[w.dtype], BT=_TL[b.dtype], HAS_H=h is not None,
                                    HAS_W=weight is not None, HAS_B=bias is not None, BR=br, BN=bn,
                                    num_warps=NUM_WARPS)
        ctx.save_for_backward(s, weight, stats)
        ctx.has_h = h is not None
        ctx.set_materialize_grads(False)
        return s, y

    @staticmethod
    def backward(ctx, ds, dy):
        s, weight, stats = ctx.saved_tensors
        if dy is None:
            dx = ds
        else:
            n = s.shape[-1]
            rows = s.numel() // n
            dy = _as_laid_out(dy, s)
            ds = None if ds is None else _as_laid_out(ds, s)
            dx = torch.empty_like(s)
            br, bn = _tile(n)
            w = weight if weight is not None else s
            with _on(s.device):
                _ln_bwd[(-(-rows // br),)](_address(s), _address(dy), _address(ds if ds is not None else s),
                                        _address(w), _address(stats), _address(dx), rows, n, T=_TL[s.dtype],
                                        WT=_TL[w.dtype], HAS_DS=ds is not None, HAS_W=weight is not None, BR=br,
                                        BN=bn, num_warps=NUM_WARPS)
        return dx, (dx if ctx.has_h else None), None, None, None


def add_layer_norm(x: torch.Tensor, h: torch.Tensor | None, weight=None, bias=None, eps: float = 1e-5):
    """``(s, F.layer_norm(s, ...))`` over the last axis, with ``s = x + h`` (or ``x`` itself when ``h`` is None):
    one pass each way by the kernels where ``usable``, PyTorch's operations otherwise."""
    if usable(x, h, weight, bias):
        return _AddLayerNorm.apply(x, h, weight, bias, eps)
    return reference(x, h, weight, bias, eps)
