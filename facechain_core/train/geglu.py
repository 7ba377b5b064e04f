"""GEGLU (``value * gelu(gate)``, the UNet transformer's feed-forward input) as one matrix multiply and a Triton
kernel each way, for training a frozen UNet.

Why: PyTorch's GEGLU writes the projection, then the GELU of its gate half, then the product (three passes over
the 4x-wide hidden map) and keeps value, gate and the GELU for backward; backward runs three more element-wise
passes and, for the two halves' gradients, two matrix multiplies whose results are added. Here forward is the
projection (one multiply, ``[tokens, 2 * hidden]``) and one kernel that reads both halves of each row and
writes the product; backward one kernel that writes both halves' gradients into one ``[tokens, 2 * hidden]``
map, and one multiply by the whole projection weight. Only the projection is kept for backward. The GELU is
the exact (erf) one, computed in float32 and rounded once. The projection's weight and bias must be frozen.

Triton, the address passing and the interpreter for the CPU tests as in ``group_norm``; ``usable`` says when
the caller should keep PyTorch's own computation instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .group_norm import ALIGN, _DTYPES, _TL, _address, _on, available, close, probed, triton

if triton is not None:
    import triton.language as tl

    from .group_norm import _ptr

BLOCK_ROWS, BLOCK_COLS = 8, 256  # a program's tile of the hidden map (rows are tokens)

_WORKS: dict = {}  # (device, dtype) -> whether a first small run compiled, ran and matched PyTorch


def works(device: torch.device, dtype: torch.dtype) -> bool:
    """``available``, and a small forward and backward in ``dtype`` on ``device`` gave PyTorch's result
    (``group_norm.probed``)."""
    return probed(_WORKS, "GEGLU", device, dtype, _try_once, available(torch.device(device)))


def reference(x, weight, bias):
    """PyTorch's GEGLU, as ComfyUI computes it (the projection split in two halves)."""
    value, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return value * F.gelu(gate)


def _try_once(device: torch.device, dtype: torch.dtype) -> bool:
    g = torch.Generator(device="cpu").manual_seed(0)
    # a first transformer level in miniature (320 wide, 1280 hidden), so its kernels serve there too
    x0 = torch.randn(2, 24, 320, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(2560, 320, generator=g) * 0.05).to(device=device, dtype=dtype)
    b = (torch.randn(2560, generator=g) * 0.1).to(device=device, dtype=dtype)
    out = []
    for run in (_GEGLU.apply, None):
        x = x0.clone().requires_grad_()
        y = run(x, w, b) if run else reference(x.float(), w.float(), b.float())
        y.float().square().sum().backward()
        out.append((y.detach(), x.grad))
    (y1, g1), (y2, g2) = out
    return close(y1, y2, dtype) and close(g1, g2, dtype)


def usable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether ``geglu`` runs the kernels for this call (else it is PyTorch's computation)."""
    if x.dtype not in _DTYPES or x.numel() == 0 or weight.ndim != 2 or weight.shape[1] != x.shape[-1]:
        return False
    hidden = weight.shape[0] // 2
    tokens = x.numel() // x.shape[-1]
    if weight.shape[0] % 2 or hidden % 8 or tokens * weight.shape[0] >= 2 ** 31:
        return False  # each half's rows start 16-byte aligned; int32 indices
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type):
        return False  # leave it to torch.compile, or to autocast's per-op precision
    if any(t is not None and (t.requires_grad or t.device != x.device or t.dtype != x.dtype)
           for t in (weight, bias)):
        return False
    return works(x.device, x.dtype)


if triton is not None:
    @triton.jit
    def _tile(P, H, BM: tl.constexpr, BN: tl.constexpr):
        # this program's rows and columns of the hidden map, their mask, and where each row's value half starts
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        mask = (rows < P)[:, None] & (cols < H)[None, :]
        return rows, cols, mask, rows[:, None] * (2 * H) + cols[None, :]

    @triton.jit
    def _gelu_parts(gate):
        # the normal CDF and density at the gate: gelu = gate * cdf, gelu' = cdf + gate * pdf
        cdf = 0.5 * (1.0 + tl.math.erf(gate * 0.7071067811865476))
        pdf = tl.exp(-0.5 * gate * gate) * 0.3989422804014327
        return cdf, pdf

    @triton.jit(do_not_specialize=["P"])
    def _fwd(PROJ, OUT, P, H, T: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        PROJ, OUT = _ptr(PROJ, T), _ptr(OUT, T)
        rows, cols, mask, at = _tile(P, H, BM, BN)
        value = tl.load(PROJ + at, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(PROJ + at + H, mask=mask, other=0.0).to(tl.float32)
        cdf, pdf = _gelu_parts(gate)
        tl.store(OUT + rows[:, None] * H + cols[None, :], (value * gate * cdf).to(T), mask=mask)

    @triton.jit(do_not_specialize=["P"])
    def _bwd(PROJ, DOUT, DPROJ, P, H, T: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        PROJ, DOUT, DPROJ = _ptr(PROJ, T), _ptr(DOUT, T), _ptr(DPROJ, T)
        rows, cols, mask, at = _tile(P, H, BM, BN)
        value = tl.load(PROJ + at, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(PROJ + at + H, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(DOUT + rows[:, None] * H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        cdf, pdf = _gelu_parts(gate)
        tl.store(DPROJ + at, (dout * gate * cdf).to(T), mask=mask)
        tl.store(DPROJ + at + H, (dout * value * (cdf + gate * pdf)).to(T), mask=mask)


def _grid(tokens: int, hidden: int) -> tuple:
    return -(-tokens // BLOCK_ROWS), -(-hidden // BLOCK_COLS)


class _GEGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])
        proj = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        tokens, hidden = proj.shape[0], proj.shape[1] // 2
        out = torch.empty(tokens, hidden, device=x.device, dtype=x.dtype)
        with _on(x.device):
            _fwd[_grid(tokens, hidden)](_address(proj), _address(out), tokens, hidden, T=_TL[x.dtype],
                                        BM=BLOCK_ROWS, BN=BLOCK_COLS)
        ctx.save_for_backward(proj, weight)
        ctx.shape = x.shape
        return out.view(*x.shape[:-1], hidden)

    @staticmethod
    def backward(ctx, dout):
        proj, weight = ctx.saved_tensors
        tokens, hidden = proj.shape[0], proj.shape[1] // 2
        dout = dout.reshape(tokens, hidden)
        if not dout.is_contiguous() or dout.data_ptr() % ALIGN or dout.dtype != proj.dtype:
            dout = torch.empty_like(proj[:, :hidden], memory_format=torch.contiguous_format).copy_(dout)
        dproj = torch.empty_like(proj)
        with _on(proj.device):
            _bwd[_grid(tokens, hidden)](_address(proj), _address(dout), _address(dproj), tokens, hidden,
                                        T=_TL[proj.dtype], BM=BLOCK_ROWS, BN=BLOCK_COLS)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (dproj @ weight).view(ctx.shape)
        return grad_x, None, None


def geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``value * gelu(gate)`` of ``F.linear(x, weight, bias)`` split in halves; by the kernels when ``usable``."""
    if usable(x, weight, bias):
        return _GEGLU.apply(x, weight, bias)
    return reference(x, weight, bias)
