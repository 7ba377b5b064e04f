"""GroupNorm, optionally followed by SiLU, as Triton kernels that read and write the feature map in its own
memory layout (NCHW or channels-last NHWC), for training a frozen UNet.

Why: PyTorch's GroupNorm gives NCHW back whatever it is given, so a channels-last UNet pays cuDNN's
NHWC conversions around every convolution; and GroupNorm followed by SiLU is three passes over the map
forward and three backward, with both the norm's input and its output kept for backward. Here forward
reads the map twice (statistics, then the normalised and activated map) and backward twice (the two group
sums the gradient needs, then the input's gradient); only the input and two numbers per group are kept.
The norm's weight and bias must be frozen (no gradients for them are computed): the trainer's UNet is.

Each program reads a tile of positions x channels, long along the layout's contiguous axis (channels in
NHWC, positions in NCHW), and keeps per-channel partial sums; a small kernel per group adds them up in a
fixed order, so results do not depend on scheduling. A program's loop over its tiles is software-pipelined
(``tl.range(..., num_stages=3)``: the next tiles' loads are issued before this one's arithmetic): on an
H200 all of one SD1.5 step's GroupNorms, forward and backward, took 3.15 ms as one CUDA graph with plain
loops and 2.86 ms so (the 64x64 maps' 1.50 -> 1.29 ms; 2 stages gained nothing, 4 a little less than 3).
Statistics are taken in float32 about a shift (the group's first element) so the variance does not cancel
away. Small channels-last maps (``_whole``) take one program per group instead, statistics and output (or the
two sums and the input's gradient) in one launch each way, the group's second read served from the cache.

Triton ships with PyTorch on Linux; where it is missing, or for a tensor it does not handle, ``usable``
says no and the caller keeps PyTorch's own GroupNorm. ``TRITON_INTERPRET=1`` runs the kernels on the CPU
(slowly), which is how the CPU tests check them.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (e.g. Windows without triton-windows): PyTorch's GroupNorm is used
    triton = None

TILE_POSITIONS, TILE_CHANNELS = 32, 64  # a program's tile; the layout's contiguous axis is read whole
ALIGN = 16  # bytes: the kernels' tensors start at multiples of this (a fresh allocation always does)
TARGET_PROGRAMS = 1024  # programs to aim for over the map (a few per multiprocessor)
NUM_WARPS = 4  # per program
# channels-last maps of at most WHOLE_POSITIONS positions whose groups have at most WHOLE_CHANNELS channels (SD1.5's
# 8x8 and 16x16 maps up to 1920 channels at 32 groups) take one program per group and one launch each way
# (``_fwd_whole``, ``_bwd_whole``): there three launches, and the partial sums between them, cost more than the
# data. On an H200 at batch 8, forward + backward from CUDA graphs (bench_group_norm.py --split-or-whole): 8x8
# maps 10-12 us against 18-20 split, 16x16 ones of 640 and 1920 channels 19 and 32 us against 26 and 41; the
# 32x32 maps (41-73 against 30-59 us) and 16x16 ones of 80 channels a group (92 against 50) are faster split
WHOLE_POSITIONS, WHOLE_CHANNELS = 256, 64
WHOLE_TILE = 2048  # elements of a whole-group program's tile
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TL = {} if triton is None else {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether the kernels can run on ``device`` at all (Triton present; a GPU, or the interpreter on a CPU)."""
    return triton is not None and (device.type == "cuda" or (_interpreting() and device.type == "cpu"))


def probed(cache: dict, what: str, device: torch.device, dtype: torch.dtype, trial, ready: bool) -> bool:
    """Whether a kernel family (``what``, for the log) runs right on ``device`` in ``dtype``: ``ready`` (Triton
    and a device it runs on: ``available``), and ``trial(device, dtype)`` (a small first run compared with
    PyTorch) returned True, tried once per process and kept in ``cache`` (Triton can import yet fail to build or
    launch: an old GPU, no C compiler for its launcher). Never tried while a CUDA graph is being captured: False
    then, until tried. Any failure is logged once, and PyTorch's computation is used from then on."""
    device = torch.device(device)
    key = (str(device), dtype)
    if key not in cache:
        if not ready or dtype not in _DTYPES:
            return False
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False
        try:
            with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
                ok = bool(trial(device, dtype))
            if not ok:
                logging.warning("comfyui-facechain: the %s kernels gave wrong results on %s (%s); using PyTorch's "
                                "computation", what, device, dtype)
        except Exception as e:  # noqa: BLE001 - any failure to build or run them means: use PyTorch's
            logging.warning("comfyui-facechain: the %s kernels cannot run on %s (%s): %s; using PyTorch's "
                            "computation", what, device, dtype, str(e).splitlines()[0] if str(e) else type(e).__name__)
            ok = False
        cache[key] = ok
    return cache[key]


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    """A first run's result against PyTorch's: within 1e-4 (float32) or 5e-2 (half) of its largest value."""
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    return bool((got.float() - want.float()).abs().max() <= tol * want.float().abs().max())


_WORKS: dict = {}  # (device, dtype) -> whether a first small run compiled, ran and matched PyTorch
_WHOLE_WORKS: dict = {}  # the same for the whole-group kernels (``_whole``)


def works(device: torch.device, dtype: torch.dtype) -> bool:
    """``available``, and a tiny forward and backward in ``dtype`` on ``device`` by the split kernels gave
    PyTorch's result (``probed``)."""
    return probed(_WORKS, "GroupNorm", device, dtype, lambda d, t: _try_once(d, t, False),
                  available(torch.device(device)))


def whole_works(device: torch.device, dtype: torch.dtype) -> bool:
    """``works``, for the whole-group kernels: where only they fail, the split kernels still run."""
    return probed(_WHOLE_WORKS, "GroupNorm (whole groups)", device, dtype, lambda d, t: _try_once(d, t, True),
                  available(torch.device(device)))


def _try_once(device: torch.device, dtype: torch.dtype, whole: bool) -> bool:
    g = torch.Generator(device="cpu").manual_seed(0)
    # a UNet's first level in miniature (320 channels, 32 groups), so its compiled kernels serve there too
    x0 = torch.randn(2, 320, 8, 8, generator=g).to(device=device, dtype=dtype)
    w = (torch.rand(320, generator=g) + 0.5).to(device=device, dtype=dtype)
    b = torch.randn(320, generator=g).to(device=device, dtype=dtype)
    for with_input in (False, True):  # the norm alone, and with the input passed on (its gradient added)
        out = []
        for run in (_GroupNormAct.apply, None):
            x = x0.clone(memory_format=torch.channels_last).requires_grad_()
            if run:
                got = run(x, 32, w, b, 1e-5, True, None, with_input, whole)
                s, y = got if with_input else (x, got)
            else:
                s, y = x, F.silu(F.group_norm(x.float(), 32, w.float(), b.float()))
            (y.float().square().sum() + (s.float().sum() if with_input else 0)).backward()
            out.append((y.detach(), x.grad))
        (y1, g1), (y2, g2) = out
        if not (close(y1, y2, dtype) and close(g1, g2, dtype)):
            return False
    return True


def usable(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
           add: torch.Tensor | None = None) -> bool:
    """Whether the kernels handle this call; otherwise use ``F.group_norm``."""
    if x.ndim < 3 or x.dtype not in _DTYPES or x.numel() >= 2 ** 31 or x.numel() == 0:
        return False
    if x.shape[0] * x.shape[1] * 2 * 64 >= 2 ** 31:  # the partial sums' indices (64 chunks at most) stay int32
        return False
    if torch.compiler.is_compiling():  # under torch.compile: leave GroupNorm to it
        return False
    if torch.is_autocast_enabled(x.device.type):  # autocast runs GroupNorm in float32: leave it to PyTorch
        return False
    if not works(x.device, x.dtype):
        return False
    if any(p is not None and (p.requires_grad or p.device != x.device or p.dtype not in _DTYPES
                              or tuple(p.shape) != (x.shape[1],) or not p.is_contiguous() or p.data_ptr() % ALIGN)
           for p in (weight, bias)):
        return False
    if add is not None and (add.requires_grad or add.device != x.device or add.dtype not in _DTYPES
                            or tuple(add.shape) != tuple(x.shape[:2]) or not add.is_contiguous()
                            or add.data_ptr() % ALIGN):
        return False
    return x.data_ptr() % ALIGN == 0 and _layout(x) is not None


def _layout(x: torch.Tensor):
    """(stride of a sample, stride of a channel, stride of a position) if the positions of each channel lie at
    one stride (contiguous NCHW, or channels-last), else None."""
    n, c = x.shape[:2]
    hw = x[0, 0].numel()
    if x.is_contiguous():
        return c * hw, hw, 1
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return c * hw, 1, c
    if x.ndim == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return c * hw, 1, c
    return None


if triton is not None:
    # integers that only count things: not specialised on, so one compiled kernel serves every shape (Triton
    # would otherwise compile again for each value that is 1 or a multiple of 16, on a machine's first run)
    _SHAPE_ONLY = ["G", "cpg", "count", "splits"]

    @triton.jit
    def _ptr(address, dtype: tl.constexpr):
        # tensors come in as addresses (see _address), 16-byte aligned (see usable): saying so lets Triton
        # use vector loads and stores, which it cannot infer through the cast
        return tl.multiple_of(address.to(tl.pointer_type(dtype)), 16)

    @triton.jit
    def _tile(C, chunk, splits, BP: tl.constexpr, BC: tl.constexpr):
        # this program's row of partial sums (n * splits + split), its sample, its channels and their mask,
        # and its first positions (chunks are whole tiles)
        row = tl.program_id(0)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        return row, row // splits, c, c < C, (row % splits) * chunk + tl.arange(0, BP)

    @triton.jit
    def _group_sums(PART, C, cpg, splits, G, SP: tl.constexpr, CP: tl.constexpr):
        # this program's group (n * G + g) and the two sums over its channels' partial sums, in a fixed order
        row = tl.program_id(0)
        n = row // G
        g = row % G
        s = tl.arange(0, SP)
        j = tl.arange(0, CP)
        mask = (s < splits)[:, None] & (j < cpg)[None, :]
        at = ((n * splits + s)[:, None] * C + g * cpg + j[None, :]) * 2
        total = tl.sum(tl.sum(tl.load(PART + at, mask=mask, other=0.0), axis=1), axis=0)
        total2 = tl.sum(tl.sum(tl.load(PART + at + 1, mask=mask, other=0.0), axis=1), axis=0)
        return row, n, g, total, total2

    @triton.jit
    def _added(ADD, n, C, c, cmask, HAS_ADD: tl.constexpr):
        # the per-sample, per-channel value added to the map before the norm (a ResBlock's time embedding and
        # its convolution's bias), float32; zeros without one
        if HAS_ADD:
            return tl.load(ADD + n * C + c, mask=cmask, other=0.0).to(tl.float32)
        return tl.zeros(c.shape, tl.float32)

    @triton.jit
    def _column_stats(STATS, n, c, cmask, cpg, G):
        g = c // cpg
        mean = tl.load(STATS + (n * G + g) * 2, mask=cmask, other=0.0)
        rstd = tl.load(STATS + (n * G + g) * 2 + 1, mask=cmask, other=0.0)
        return mean, rstd

    @triton.jit
    def _norm_stats(STATS, ADD, n, C, c, cmask, cpg, G, HAS_ADD: tl.constexpr):
        # each channel's group mean less the channel's addition (x - it = (x + added) - mean), and 1/std
        mean, rstd = _column_stats(STATS, n, c, cmask, cpg, G)
        return mean - _added(ADD, n, C, c, cmask, HAS_ADD), rstd

    @triton.jit(do_not_specialize=_SHAPE_ONLY)
    def _fwd_sums(X, ADD, PART, HW, C, cpg, chunk, splits, sn, sc, shw, XT: tl.constexpr, AT: tl.constexpr,
                  HAS_ADD: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr):
        X, ADD, PART = _ptr(X, XT), _ptr(ADD, AT), _ptr(PART, tl.float32)
        # per channel, over this program's positions: the sum and the sum of squares of x - shift (shift: the
        # first element of the channel's group), float32
        row, n, c, cmask, p0 = _tile(C, chunk, splits, BP, BC)
        added = _added(ADD, n, C, c, cmask, HAS_ADD)
        first = (c // cpg) * cpg
        shift = (tl.load(X + n * sn + first * sc, mask=cmask, other=0.0).to(tl.float32)
                 + _added(ADD, n, C, first, cmask, HAS_ADD))
        acc = tl.zeros([BP, BC], tl.float32)
        acc2 = tl.zeros([BP, BC], tl.float32)
        for off in tl.range(0, chunk, BP, num_stages=3):  # loads run ahead: see the module's note
            p = p0 + off
            mask = (p < HW)[:, None] & cmask[None, :]
            x = tl.load(X + n * sn + p[:, None] * shw + c[None, :] * sc, mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, x + added[None, :] - shift[None, :], 0.0)
            acc += d
            acc2 += d * d
        out = row * C + c
        tl.store(PART + out * 2, tl.sum(acc, axis=0), mask=cmask)
        tl.store(PART + out * 2 + 1, tl.sum(acc2, axis=0), mask=cmask)

    @triton.jit
    def _group_shift(X, ADD, n, C, g, cpg, sn, sc, HAS_ADD: tl.constexpr):
        # a group's first element (of x + add), about which its statistics are taken
        shift = tl.load(X + n * sn + g * cpg * sc).to(tl.float32)
        if HAS_ADD:
            shift += tl.load(ADD + n * C + g * cpg).to(tl.float32)
        return shift

    @triton.jit
    def _write_normed(X, Y, ptr, mask, scale, shift, XT: tl.constexpr, SILU: tl.constexpr):
        # a tile of the normalised (and activated) map: x * scale + shift per channel
        y = tl.load(X + ptr, mask=mask, other=0.0).to(tl.float32) * scale[None, :] + shift[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(Y + ptr, y.to(XT), mask=mask)

    @triton.jit(do_not_specialize=_SHAPE_ONLY)
    def _fwd_finish(X, ADD, PART, STATS, G, C, cpg, count, splits, sn, sc, eps, XT: tl.constexpr,
                    AT: tl.constexpr, HAS_ADD: tl.constexpr, SP: tl.constexpr, CP: tl.constexpr):
        X, ADD, PART, STATS = _ptr(X, XT), _ptr(ADD, AT), _ptr(PART, tl.float32), _ptr(STATS, tl.float32)
        # per group: mean and 1/std from the partial sums of its channels
        row, n, g, total, total2 = _group_sums(PART, C, cpg, splits, G, SP, CP)
        shift = _group_shift(X, ADD, n, C, g, cpg, sn, sc, HAS_ADD)
        d_mean = total / count
        var = tl.maximum(total2 / count - d_mean * d_mean, 0.0)
        tl.store(STATS + row * 2, shift + d_mean)
        tl.store(STATS + row * 2 + 1, 1.0 / tl.sqrt(var + eps))

    @triton.jit
    def _affine(W, B, c, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
        if HAS_W:
            w = tl.load(W + c, mask=cmask, other=1.0).to(tl.float32)
        else:
            w = tl.full(c.shape, 1.0, tl.float32)
        if HAS_B:
            b = tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)
        else:
            b = tl.zeros(c.shape, tl.float32)
        return w, b

    @triton.jit(do_not_specialize=_SHAPE_ONLY)
    def _fwd_apply(X, ADD, Y, W, B, STATS, HW, C, G, cpg, chunk, splits, sn, sc, shw, XT: tl.constexpr,
                   AT: tl.constexpr, WT: tl.constexpr, BT: tl.constexpr, HAS_ADD: tl.constexpr,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, BP: tl.constexpr,
                   BC: tl.constexpr):
        X, ADD, Y, W, B = _ptr(X, XT), _ptr(ADD, AT), _ptr(Y, XT), _ptr(W, WT), _ptr(B, BT)
        STATS = _ptr(STATS, tl.float32)
        row, n, c, cmask, p0 = _tile(C, chunk, splits, BP, BC)
        mean, rstd = _norm_stats(STATS, ADD, n, C, c, cmask, cpg, G, HAS_ADD)
        w, b = _affine(W, B, c, cmask, HAS_W, HAS_B)
        scale = rstd * w
        shift = b - mean * scale
        for off in tl.range(0, chunk, BP, num_stages=3):  # loads run ahead: see the module's note
            p = p0 + off
            _write_normed(X, Y, n * sn + p[:, None] * shw + c[None, :] * sc, (p < HW)[:, None] & cmask[None, :],
                          scale, shift, XT, SILU)

    @triton.jit
    def _grad_z(x, dy, mean, rstd, w, b, SILU: tl.constexpr):
        # the normalised input, and the gradient reaching it (through SiLU when fused)
        xhat = (x - mean[None, :]) * rstd[None, :]
        if SILU:
            z = xhat * w[None, :] + b[None, :]
            sig = tl.sigmoid(z)
            dy = dy * sig * (1.0 + z * (1.0 - sig))
        return xhat, dy * w[None, :]

    @triton.jit
    def _grad_at(X, DY, ptr, mask, mean, rstd, w, b, SILU: tl.constexpr):
        # a tile's normalised input and the gradient reaching it, read from the map and its gradient
        x = tl.load(X + ptr, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + ptr, mask=mask, other=0.0).to(tl.float32)
        return _grad_z(x, dy, mean, rstd, w, b, SILU)

    @triton.jit
    def _write_dx(X, DY, DS, DX, ptr, mask, mean, rstd, w, b, c1, c2, XT: tl.constexpr, SILU: tl.constexpr,
                  HAS_DS: tl.constexpr):
        # a tile of the input's gradient from the group means c1 (of dxhat) and c2 (of dxhat * xhat), per channel
        xhat, dxhat = _grad_at(X, DY, ptr, mask, mean, rstd, w, b, SILU)
        dx = rstd[None, :] * (dxhat - c1[None, :] - xhat * c2[None, :])
        if HAS_DS:  # the gradient reaching the input by another way (a skip connection), added as dx is written
            dx += tl.load(DS + ptr, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + ptr, dx.to(XT), mask=mask)

    @triton.jit(do_not_specialize=_SHAPE_ONLY)
    def _bwd_sums(X, ADD, DY, W, B, STATS, PART, HW, C, G, cpg, chunk, splits, sn, sc, shw, XT: tl.constexpr,
                  AT: tl.constexpr, WT: tl.constexpr, BT: tl.constexpr, HAS_ADD: tl.constexpr,
                  HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, BP: tl.constexpr,
                  BC: tl.constexpr):
        X, ADD, DY, W, B = _ptr(X, XT), _ptr(ADD, AT), _ptr(DY, XT), _ptr(W, WT), _ptr(B, BT)
        STATS, PART = _ptr(STATS, tl.float32), _ptr(PART, tl.float32)
        # per channel, over this program's positions: the sums of dxhat and of dxhat * xhat
        row, n, c, cmask, p0 = _tile(C, chunk, splits, BP, BC)
        mean, rstd = _norm_stats(STATS, ADD, n, C, c, cmask, cpg, G, HAS_ADD)
        w, b = _affine(W, B, c, cmask, HAS_W, HAS_B)
        acc = tl.zeros([BP, BC], tl.float32)
        acc2 = tl.zeros([BP, BC], tl.float32)
        for off in tl.range(0, chunk, BP, num_stages=3):  # loads run ahead: see the module's note
            p = p0 + off
            mask = (p < HW)[:, None] & cmask[None, :]
            ptr = n * sn + p[:, None] * shw + c[None, :] * sc
            xhat, dxhat = _grad_at(X, DY, ptr, mask, mean, rstd, w, b, SILU)
            acc += tl.where(mask, dxhat, 0.0)
            acc2 += tl.where(mask, dxhat * xhat, 0.0)
        out = row * C + c
        tl.store(PART + out * 2, tl.sum(acc, axis=0), mask=cmask)
        tl.store(PART + out * 2 + 1, tl.sum(acc2, axis=0), mask=cmask)

    @triton.jit(do_not_specialize=_SHAPE_ONLY)
    def _bwd_finish(PART, COEF, G, C, cpg, count, splits, SP: tl.constexpr, CP: tl.constexpr):
        PART, COEF = _ptr(PART, tl.float32), _ptr(COEF, tl.float32)
        # per group: the means of dxhat and of dxhat * xhat
        row, n, g, total, total2 = _group_sums(PART, C, cpg, splits, G, SP, CP)
        tl.store(COEF + row * 2, total / count)
        tl.store(COEF + row * 2 + 1, total2 / count)

    @triton.jit(do_not_specialize=_SHAPE_ONLY)
    def _bwd_apply(X, ADD, DY, DS, DX, W, B, STATS, COEF, HW, C, G, cpg, chunk, splits, sn, sc, shw,
                   XT: tl.constexpr, AT: tl.constexpr, WT: tl.constexpr, BT: tl.constexpr, HAS_ADD: tl.constexpr,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, HAS_DS: tl.constexpr,
                   BP: tl.constexpr, BC: tl.constexpr):
        X, ADD, DY, DX, W, B = _ptr(X, XT), _ptr(ADD, AT), _ptr(DY, XT), _ptr(DX, XT), _ptr(W, WT), _ptr(B, BT)
        DS = _ptr(DS, XT)
        STATS, COEF = _ptr(STATS, tl.float32), _ptr(COEF, tl.float32)
        row, n, c, cmask, p0 = _tile(C, chunk, splits, BP, BC)
        mean, rstd = _norm_stats(STATS, ADD, n, C, c, cmask, cpg, G, HAS_ADD)
        c1, c2 = _column_stats(COEF, n, c, cmask, cpg, G)
        w, b = _affine(W, B, c, cmask, HAS_W, HAS_B)
        for off in tl.range(0, chunk, BP, num_stages=3):  # loads run ahead: see the module's note
            p = p0 + off
            _write_dx(X, DY, DS, DX, n * sn + p[:, None] * shw + c[None, :] * sc, (p < HW)[:, None] & cmask[None, :],
                      mean, rstd, w, b, c1, c2, XT, SILU, HAS_DS)

    @triton.jit
    def _whole_group(cpg, G, CP: tl.constexpr):
        # a whole-group program's sample, group, channels and their mask
        row = tl.program_id(0)
        j = tl.arange(0, CP)
        return row, row // G, row % G, (row % G) * cpg + j, j < cpg

    @triton.jit(do_not_specialize=_SHAPE_ONLY)
    def _fwd_whole(X, ADD, Y, W, B, STATS, HW, C, G, cpg, count, sn, shw, eps, XT: tl.constexpr, AT: tl.constexpr,
                   WT: tl.constexpr, BT: tl.constexpr, HAS_ADD: tl.constexpr, HAS_W: tl.constexpr,
                   HAS_B: tl.constexpr, SILU: tl.constexpr, BP: tl.constexpr, CP: tl.constexpr):
        X, ADD, Y, W, B = _ptr(X, XT), _ptr(ADD, AT), _ptr(Y, XT), _ptr(W, WT), _ptr(B, BT)
        STATS = _ptr(STATS, tl.float32)
        # one group of a channels-last map: its statistics (about its first element, as _fwd_sums), then the
        # normalised (and activated) map, the second read of the group served from the cache
        row, n, g, c, cmask = _whole_group(cpg, G, CP)
        added = _added(ADD, n, C, c, cmask, HAS_ADD)
        shift = _group_shift(X, ADD, n, C, g, cpg, sn, 1, HAS_ADD)
        acc = tl.zeros([BP, CP], tl.float32)
        acc2 = tl.zeros([BP, CP], tl.float32)
        for off in tl.range(0, HW, BP, num_stages=3):
            p = off + tl.arange(0, BP)
            mask = (p < HW)[:, None] & cmask[None, :]
            x = tl.load(X + n * sn + p[:, None] * shw + c[None, :], mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, x + added[None, :] - shift, 0.0)
            acc += d
            acc2 += d * d
        d_mean = tl.sum(tl.sum(acc, axis=1), axis=0) / count
        var = tl.maximum(tl.sum(tl.sum(acc2, axis=1), axis=0) / count - d_mean * d_mean, 0.0)
        mean = shift + d_mean
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(STATS + row * 2, mean)
        tl.store(STATS + row * 2 + 1, rstd)
        w, b = _affine(W, B, c, cmask, HAS_W, HAS_B)
        scale = rstd * w
        offset = b - (mean - added) * scale
        for off in tl.range(0, HW, BP, num_stages=3):
            p = off + tl.arange(0, BP)
            _write_normed(X, Y, n * sn + p[:, None] * shw + c[None, :], (p < HW)[:, None] & cmask[None, :], scale,
                          offset, XT, SILU)

    @triton.jit(do_not_specialize=_SHAPE_ONLY)
    def _bwd_whole(X, ADD, DY, DS, DX, W, B, STATS, HW, C, G, cpg, count, sn, shw, XT: tl.constexpr,
                   AT: tl.constexpr, WT: tl.constexpr, BT: tl.constexpr, HAS_ADD: tl.constexpr, HAS_W: tl.constexpr,
                   HAS_B: tl.constexpr, SILU: tl.constexpr, HAS_DS: tl.constexpr, BP: tl.constexpr,
                   CP: tl.constexpr):
        X, ADD, DY, DX, W, B = _ptr(X, XT), _ptr(ADD, AT), _ptr(DY, XT), _ptr(DX, XT), _ptr(W, WT), _ptr(B, BT)
        DS, STATS = _ptr(DS, XT), _ptr(STATS, tl.float32)
        # one group: the two sums the gradient needs (as _bwd_sums), then the input's gradient (as _bwd_apply)
        row, n, g, c, cmask = _whole_group(cpg, G, CP)
        mean, rstd = _norm_stats(STATS, ADD, n, C, c, cmask, cpg, G, HAS_ADD)
        w, b = _affine(W, B, c, cmask, HAS_W, HAS_B)
        acc = tl.zeros([BP, CP], tl.float32)
        acc2 = tl.zeros([BP, CP], tl.float32)
        for off in tl.range(0, HW, BP, num_stages=3):
            p = off + tl.arange(0, BP)
            mask = (p < HW)[:, None] & cmask[None, :]
            xhat, dxhat = _grad_at(X, DY, n * sn + p[:, None] * shw + c[None, :], mask, mean, rstd, w, b, SILU)
            acc += tl.where(mask, dxhat, 0.0)
            acc2 += tl.where(mask, dxhat * xhat, 0.0)
        c1 = tl.zeros([CP], tl.float32) + tl.sum(tl.sum(acc, axis=1), axis=0) / count  # per channel, as _write_dx
        c2 = tl.zeros([CP], tl.float32) + tl.sum(tl.sum(acc2, axis=1), axis=0) / count
        for off in tl.range(0, HW, BP, num_stages=3):
            p = off + tl.arange(0, BP)
            _write_dx(X, DY, DS, DX, n * sn + p[:, None] * shw + c[None, :], (p < HW)[:, None] & cmask[None, :],
                      mean, rstd, w, b, c1, c2, XT, SILU, HAS_DS)


def _whole(x: torch.Tensor, groups: int) -> bool:
    """Whether the map takes the whole-group kernels: channels-last, small (WHOLE_POSITIONS, WHOLE_CHANNELS), and
    they work here (``whole_works``)."""
    return (_layout(x)[1] == 1 and x[0, 0].numel() <= WHOLE_POSITIONS and x.shape[1] // groups <= WHOLE_CHANNELS
            and whole_works(x.device, x.dtype))


def _whole_plan(x: torch.Tensor, groups: int) -> dict:
    n, c = x.shape[:2]
    hw = x[0, 0].numel()
    cp = max(2, triton.next_power_of_2(c // groups))
    return dict(hw=hw, c=c, cpg=c // groups, count=(c // groups) * hw, sn=c * hw, shw=c, CP=cp,
                BP=max(2, min(WHOLE_TILE // cp, triton.next_power_of_2(hw))), grid=(n * groups,))


def _plan(x: torch.Tensor, groups: int) -> dict:
    """Grid and block sizes: tiles of positions x channels, long along the layout's contiguous axis, and
    each sample's positions split into chunks so there are about TARGET_PROGRAMS programs."""
    n, c = x.shape[:2]
    hw = x[0, 0].numel()
    sn, sc, shw = _layout(x)
    bp, bc = (TILE_POSITIONS, TILE_CHANNELS) if sc == 1 else (TILE_CHANNELS, TILE_POSITIONS)
    bc = min(bc, triton.next_power_of_2(c))
    cblocks = -(-c // bc)
    splits = max(1, min(-(-TARGET_PROGRAMS // (n * cblocks)), -(-hw // bp), 64))
    chunk = -(-(-(-hw // splits)) // bp) * bp  # whole tiles per program
    splits = -(-hw // chunk)
    cpg = c // groups
    return dict(n=n, c=c, hw=hw, cpg=cpg, count=cpg * hw, sn=sn, sc=sc, shw=shw, BP=bp, BC=bc,
                cblocks=cblocks, splits=splits, chunk=chunk, SP=max(2, triton.next_power_of_2(splits)),
                CP=max(2, triton.next_power_of_2(cpg)))


def _address(t: torch.Tensor) -> int:
    """Tensors go to the kernels as plain addresses. Triton checks each tensor argument's pointer with the
    driver, and that check fails for memory allocated while a CUDA graph is captured under the
    cudaMallocAsync allocator, which ComfyUI turns on by default: the trainer's graph would break."""
    return t.data_ptr()


def _addresses(x, weight, bias) -> tuple:
    """x's, the weight's and the bias's addresses; an absent weight or bias is never read: x's stands in."""
    return tuple(_address(t if t is not None else x) for t in (x, weight, bias))


def _dtypes(x, weight, bias) -> dict:
    return dict(XT=_TL[x.dtype], WT=_TL[(weight if weight is not None else x).dtype],
                BT=_TL[(bias if bias is not None else x).dtype])


def _as_laid_out(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` (a gradient arriving for ``x``) with ``x``'s strides and 16-byte aligned, copied only if it is not."""
    return t if t.stride() == x.stride() and t.data_ptr() % ALIGN == 0 else torch.empty_like(x).copy_(t)


def _on(device: torch.device):
    """Kernels launch on the current device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


class _GroupNormAct(torch.autograd.Function):
    """The norm (then SiLU) of ``x``; with ``with_input`` ``(x, norm)``, ``x`` returned as an alias whose gradient
    (a skip connection's, say) backward adds to the norm's as it writes the input's gradient, instead of autograd
    adding the two in a pass of their own."""

    @staticmethod
    def forward(ctx, x, groups, weight, bias, eps, silu, add=None, with_input=False, whole=None):
        whole = _whole(x, groups) if whole is None else whole
        with _on(x.device):
            y, stats = (_forward_whole if whole else _forward)(x, groups, weight, bias, eps, silu, add)
        ctx.save_for_backward(x, weight, bias, stats, add)
        ctx.groups, ctx.silu, ctx.with_input, ctx.whole = groups, silu, with_input, whole
        if with_input:
            ctx.set_materialize_grads(False)
            return x, y
        return y

    @staticmethod
    def backward(ctx, *grads):
        ds, dy = grads if ctx.with_input else (None, grads[0])
        x, weight, bias, stats, add = ctx.saved_tensors
        if dy is None:
            dx = ds
        else:
            with _on(x.device):
                dx = (_backward_whole if ctx.whole else _backward)(x, dy, ctx.groups, weight, bias, stats, ctx.silu,
                                                                    add, ds)
        return dx, None, None, None, None, None, None, None, None


def _add_arg(x, add) -> tuple:
    """The addition's address and Triton dtype (x's where there is none: then it is never read)."""
    t = add if add is not None else x
    return _address(t), _TL[t.dtype]


def _flags(x, weight, bias, add, silu) -> dict:
    """The dtypes and switches every apply and backward launch takes."""
    return dict(**_dtypes(x, weight, bias), AT=_add_arg(x, add)[1], HAS_ADD=add is not None,
                HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu)


def _forward(x, groups, weight, bias, eps, silu, add=None):
    k = _plan(x, groups)
    grid = (k["n"] * k["splits"], k["cblocks"])
    part = torch.empty(k["n"] * k["splits"] * k["c"] * 2, device=x.device, dtype=torch.float32)
    stats = torch.empty(k["n"] * groups * 2, device=x.device, dtype=torch.float32)
    y = torch.empty_like(x)
    xa, wa, ba = _addresses(x, weight, bias)
    aa, at = _add_arg(x, add)
    xt = _TL[x.dtype]
    layout = (k["sn"], k["sc"], k["shw"])
    _fwd_sums[grid](xa, aa, _address(part), k["hw"], k["c"], k["cpg"], k["chunk"], k["splits"], *layout,
                    XT=xt, AT=at, HAS_ADD=add is not None, BP=k["BP"], BC=k["BC"], num_warps=NUM_WARPS)
    _fwd_finish[(k["n"] * groups,)](xa, aa, _address(part), _address(stats), groups, k["c"], k["cpg"],
                                    k["count"], k["splits"], k["sn"], k["sc"], float(eps), XT=xt, AT=at,
                                    HAS_ADD=add is not None, SP=k["SP"], CP=k["CP"])
    _fwd_apply[grid](xa, aa, _address(y), wa, ba, _address(stats), k["hw"], k["c"], groups, k["cpg"],
                     k["chunk"], k["splits"], *layout, **_flags(x, weight, bias, add, silu), BP=k["BP"], BC=k["BC"],
                     num_warps=NUM_WARPS)
    return y, stats


def _backward(x, dy, groups, weight, bias, stats, silu, add=None, ds=None):
    k = _plan(x, groups)
    dy = _as_laid_out(dy, x)  # gradients are read through x's strides
    ds = None if ds is None else _as_laid_out(ds, x)
    grid = (k["n"] * k["splits"], k["cblocks"])
    part = torch.empty(k["n"] * k["splits"] * k["c"] * 2, device=x.device, dtype=torch.float32)
    coef = torch.empty(k["n"] * groups * 2, device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x)
    xa, wa, ba = _addresses(x, weight, bias)
    aa = _add_arg(x, add)[0]
    flags = dict(**_flags(x, weight, bias, add, silu), BP=k["BP"], BC=k["BC"])
    tail = (k["hw"], k["c"], groups, k["cpg"], k["chunk"], k["splits"], k["sn"], k["sc"], k["shw"])
    _bwd_sums[grid](xa, aa, _address(dy), wa, ba, _address(stats), _address(part), *tail, **flags,
                    num_warps=NUM_WARPS)
    _bwd_finish[(k["n"] * groups,)](_address(part), _address(coef), groups, k["c"], k["cpg"], k["count"],
                                    k["splits"], SP=k["SP"], CP=k["CP"])
    _bwd_apply[grid](xa, aa, _address(dy), _address(ds if ds is not None else dy), _address(dx), wa, ba,
                     _address(stats), _address(coef), *tail, **flags, HAS_DS=ds is not None, num_warps=NUM_WARPS)
    return dx


def _forward_whole(x, groups, weight, bias, eps, silu, add=None):
    k = _whole_plan(x, groups)
    stats = torch.empty(x.shape[0] * groups * 2, device=x.device, dtype=torch.float32)
    y = torch.empty_like(x)
    xa, wa, ba = _addresses(x, weight, bias)
    _fwd_whole[k["grid"]](xa, _add_arg(x, add)[0], _address(y), wa, ba, _address(stats), k["hw"], k["c"], groups,
                          k["cpg"], k["count"], k["sn"], k["shw"], float(eps), **_flags(x, weight, bias, add, silu),
                          BP=k["BP"], CP=k["CP"], num_warps=NUM_WARPS)
    return y, stats


def _backward_whole(x, dy, groups, weight, bias, stats, silu, add=None, ds=None):
    k = _whole_plan(x, groups)
    dy = _as_laid_out(dy, x)
    ds = None if ds is None else _as_laid_out(ds, x)
    dx = torch.empty_like(x)
    xa, wa, ba = _addresses(x, weight, bias)
    _bwd_whole[k["grid"]](xa, _add_arg(x, add)[0], _address(dy), _address(ds if ds is not None else dy),
                          _address(dx), wa, ba, _address(stats), k["hw"], k["c"], groups, k["cpg"], k["count"],
                          k["sn"], k["shw"], **_flags(x, weight, bias, add, silu), HAS_DS=ds is not None,
                          BP=k["BP"], CP=k["CP"], num_warps=NUM_WARPS)
    return dx


def group_norm(x: torch.Tensor, groups: int, weight=None, bias=None, eps: float = 1e-5,
               silu: bool = False, add: torch.Tensor | None = None) -> torch.Tensor:
    """``F.group_norm`` (then ``F.silu`` when ``silu``) of ``x``, or of ``x + add`` with ``add`` one value per
    sample and channel (``[N, C]``, added before the norm without writing the sum), in ``x``'s own layout;
    PyTorch's when not ``usable``."""
    if add is not None and not (x.shape[1] % groups == 0 and usable(x, weight, bias, add)):
        # an addition the kernels cannot take (one needing a gradient, say): added first, in x's layout
        x, add = x + add.reshape(*add.shape, *[1] * (x.ndim - 2)).to(x.dtype), None
    if x.shape[1] % groups == 0 and usable(x, weight, bias, add):
        return _GroupNormAct.apply(x, groups, weight, bias, eps, silu, add)
    y = F.group_norm(x, groups, weight, bias, eps)
    return F.silu(y) if silu else y


def group_norm_and_input(x: torch.Tensor, groups: int, weight=None, bias=None, eps: float = 1e-5,
                         silu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, group_norm(x, ...))`` for a map that is also used by another way (a skip connection): use the first
    instead of ``x`` there, and the kernels' backward adds that way's gradient to the norm's as it writes the
    input's (one pass less over the map). PyTorch's norm and ``x`` itself when not ``usable``."""
    if x.shape[1] % groups == 0 and usable(x, weight, bias):
        return _GroupNormAct.apply(x, groups, weight, bias, eps, silu, None, True)
    return x, group_norm(x, groups, weight, bias, eps, silu)
