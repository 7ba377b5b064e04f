"""Several LoRA adapters merged into copies of their layers' weights in one Triton launch: ``W + scale * B @ A``
for up to MAX_LAYERS layers of one shape (a transformer block's attention projections), written side by side.

Why: per layer, PyTorch's way is two casts of the float32 factors and a multiply-add (a multiply more for a
scale other than 1), three or four launches of a few microseconds each for a few hundred thousand values, and
an SD1.5 step has some ninety merging layers. Here the sum is taken in float32 from the float32 factors and
rounded once to the weight's dtype (the per-layer path rounds the factors to that dtype first, then sums in
float32: for adapters small against their weights, as a face LoRA's are, the two differ by about the result's
own rounding). The trainer merges float16 and float32 weights only (``lora_layers._merge_pays``); the kernel
takes bfloat16 too.

Triton, the address passing, the first-run check and the interpreter for the CPU tests as in ``group_norm``.
"""

from __future__ import annotations

import torch

from .group_norm import ALIGN, _DTYPES, _TL, _address, _on, available, close, probed, triton

if triton is not None:
    import triton.language as tl

    from .group_norm import _ptr

MAX_LAYERS = 8  # layers per launch: their addresses are the kernel's arguments, eight of each (_pick, _merge)
TILE_ROWS, TILE_COLS = 32, 64  # a program's tile of a weight; columns are contiguous
NUM_WARPS = 4

_WORKS: dict = {}  # (device, dtype) -> whether a first small run compiled, ran and matched PyTorch


def works(device: torch.device, dtype: torch.dtype) -> bool:
    """``available``, and a small merge of three layers in ``dtype`` on ``device`` gave PyTorch's result
    (``group_norm.probed``)."""
    return probed(_WORKS, "LoRA merge", device, dtype, _try_once, available(torch.device(device)))


def _try_once(device: torch.device, dtype: torch.dtype) -> bool:
    g = torch.Generator(device="cpu").manual_seed(0)
    weights = [torch.randn(48, 80, generator=g).to(device=device, dtype=dtype) for _ in range(3)]
    a = [torch.randn(4, 80, generator=g).to(device) for _ in range(3)]
    b = [torch.randn(48, 4, generator=g).to(device) for _ in range(3)]
    scales = (1.0, 0.5, 2.0)
    got = merge(weights, a, b, scales)
    want = torch.stack([w.float() + s * (f @ e) for w, e, f, s in zip(weights, a, b, scales)])
    return got.dtype == dtype and close(got, want, dtype)


def usable(weights, factors_a, factors_b) -> bool:
    """Whether ``merge`` runs the kernel for these layers: one shape, dtype and device for the weights, float32
    factors ``[r, in]`` and ``[out, r]``, all contiguous and 16-byte aligned, at most MAX_LAYERS of them."""
    if not weights or len(weights) > MAX_LAYERS or not (len(weights) == len(factors_a) == len(factors_b)):
        return False
    w0 = weights[0]
    if w0.ndim != 2 or w0.dtype not in _DTYPES or torch.compiler.is_compiling():
        return False
    out_f, in_f = w0.shape
    r = factors_a[0].shape[0]
    if len(weights) * out_f * in_f >= 2 ** 31 or out_f * r >= 2 ** 31 or r * in_f >= 2 ** 31:
        return False
    for w, a, b in zip(weights, factors_a, factors_b):
        if (w.shape != w0.shape or w.dtype != w0.dtype or w.device != w0.device
                or a.shape != (r, in_f) or b.shape != (out_f, r) or a.device != w0.device or b.device != w0.device):
            return False
        for t in (w, a, b):
            if not t.is_contiguous() or t.data_ptr() % ALIGN:
                return False
        if a.dtype != torch.float32 or b.dtype != torch.float32:
            return False
    return works(w0.device, w0.dtype)


if triton is not None:
    @triton.jit
    def _pick(i, v0, v1, v2, v3, v4, v5, v6, v7):
        # the i-th of eight scalar arguments
        return tl.where(i == 0, v0, tl.where(i == 1, v1, tl.where(i == 2, v2, tl.where(i == 3, v3, tl.where(
            i == 4, v4, tl.where(i == 5, v5, tl.where(i == 6, v6, v7)))))))

    @triton.jit(do_not_specialize=["out_f", "in_f", "r"])
    def _merge(OUT, W0, W1, W2, W3, W4, W5, W6, W7, A0, A1, A2, A3, A4, A5, A6, A7, B0, B1, B2, B3, B4, B5, B6, B7,
               S0, S1, S2, S3, S4, S5, S6, S7, out_f, in_f, r, WT: tl.constexpr, BO: tl.constexpr,
               BI: tl.constexpr):
        # program (layer, row tile, column tile): its tile of W + scale * B @ A, summed in float32 as r rank-1
        # updates, rounded once
        layer = tl.program_id(0)
        W = _ptr(_pick(layer, W0, W1, W2, W3, W4, W5, W6, W7), WT)
        A = _ptr(_pick(layer, A0, A1, A2, A3, A4, A5, A6, A7), tl.float32)
        B = _ptr(_pick(layer, B0, B1, B2, B3, B4, B5, B6, B7), tl.float32)
        scale = _pick(layer, S0, S1, S2, S3, S4, S5, S6, S7)
        OUT = _ptr(OUT, WT)
        o = tl.program_id(1) * BO + tl.arange(0, BO)
        i = tl.program_id(2) * BI + tl.arange(0, BI)
        om, im = o < out_f, i < in_f
        acc = tl.zeros([BO, BI], tl.float32)
        for k in range(0, r):
            bk = tl.load(B + o * r + k, mask=om, other=0.0)
            ak = tl.load(A + k * in_f + i, mask=im, other=0.0)
            acc += bk[:, None] * ak[None, :]
        mask = om[:, None] & im[None, :]
        at = o[:, None] * in_f + i[None, :]
        y = tl.load(W + at, mask=mask, other=0.0).to(tl.float32) + acc * scale
        tl.store(OUT + layer * out_f * in_f + at, y.to(WT), mask=mask)


def _merge_launch(weights, factors_a, factors_b, scales) -> torch.Tensor:
    n = len(weights)
    out_f, in_f = weights[0].shape
    out = torch.empty(n, out_f, in_f, device=weights[0].device, dtype=weights[0].dtype)

    def padded(values):
        values = list(values)
        return values + [values[0]] * (MAX_LAYERS - n)

    grid = (n, triton.cdiv(out_f, TILE_ROWS), triton.cdiv(in_f, TILE_COLS))
    _merge[grid](_address(out), *padded(_address(w) for w in weights), *padded(_address(a) for a in factors_a),
                 *padded(_address(b) for b in factors_b), *padded(float(s) for s in scales), out_f, in_f,
                 int(factors_a[0].shape[0]), WT=_TL[weights[0].dtype], BO=TILE_ROWS, BI=TILE_COLS,
                 num_warps=NUM_WARPS)
    return out


def merge(weights, factors_a, factors_b, scales) -> torch.Tensor:
    """``[W_i + scale_i * B_i @ A_i for each layer]`` as one ``[n, out, in]`` tensor in the weights' dtype, by the
    kernel: for layers ``usable`` says yes to."""
    with _on(weights[0].device):
        return _merge_launch(weights, factors_a, factors_b, scales)
