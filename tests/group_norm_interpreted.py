"""Run by tests/test_group_norm.py and tests/test_train_kernels.py in a process started with TRITON_INTERPRET=1
(Triton reads it when the kernels are defined): the pack's training kernels (GroupNorm, GEGLU, the ResBlock's
fused addition, the transformer blocks' addition and LayerNorm, the up path's channel joins), run by Triton's
interpreter on the CPU, against PyTorch.

    python tests/group_norm_interpreted.py kernels|unet|unet_blocks|more

Prints one JSON object: what was compared and the largest differences found.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE), str(HERE.parent / "scripts")]

from facechain_core.train import group_norm as gn  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def kernels() -> dict:
    """Forward and input gradient of GroupNorm (+SiLU) for NCHW and NHWC maps, every dtype, with and without
    the affine weights, a gradient arriving in the other layout, and a map whose mean is far from zero."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for shape, groups, layout, silu, dtype, affine, offset in [
            ((2, 64, 8, 8), 32, "nhwc", True, torch.float32, True, 0.0),
            ((2, 40, 5, 7), 4, "nchw", False, torch.float32, True, 0.0),
            ((1, 96, 6, 6), 32, "nhwc", False, torch.bfloat16, True, 0.0),
            ((3, 32, 3, 4), 8, "nchw", True, torch.float16, False, 0.0),
            ((2, 320, 16, 16), 32, "nhwc", True, torch.float16, True, 0.0),  # split: several chunks per sample
            ((1, 64, 40, 40), 32, "nchw", True, torch.float32, True, 0.0),
            ((2, 16, 4, 4), 4, "nhwc", False, torch.float32, True, 300.0),  # mean >> std: the shift matters
            ((2, 12, 5), 3, "nchw", True, torch.float32, True, 0.0)]:  # 1-D maps
        x = (torch.randn(shape, generator=g) * 3 + 1 + offset).to(dtype)
        if layout == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
        c = shape[1]
        w = (torch.randn(c, generator=g) + 1).to(dtype) if affine else None
        b = torch.randn(c, generator=g).to(dtype) if affine else None
        dy = torch.randn(shape, generator=g).to(dtype)
        if layout == "nchw" and len(shape) == 4:
            dy = dy.contiguous(memory_format=torch.channels_last)  # the other layout: copied to x's
        assert gn.usable(x, w, b)
        xk = x.clone().requires_grad_()
        xr = x.detach().double().requires_grad_()
        yk = gn.group_norm(xk, groups, w, b, 1e-5, silu)
        yr = F.group_norm(xr, groups, None if w is None else w.double(), None if b is None else b.double(), 1e-5)
        yr = F.silu(yr) if silu else yr
        yk.backward(dy)
        yr.backward(dy.double())
        case = {"shape": list(shape), "layout": layout, "silu": silu, "dtype": str(dtype).split(".")[-1],
                "affine": affine, "offset": offset, "whole": getattr(yk.grad_fn, "whole", None),
                "same_layout": yk.stride() == x.stride(),
                "out_err": _rel(yk.detach(), yr.detach()), "grad_err": _rel(xk.grad, xr.grad)}
        if case["whole"]:  # the same map by the split kernels too (the larger maps' path)
            xs = x.clone().requires_grad_()
            ys = gn._GroupNormAct.apply(xs, groups, w, b, 1e-5, silu, None, False, False)
            ys.backward(dy)
            case.update(split_out_err=_rel(ys.detach(), yr.detach()), split_grad_err=_rel(xs.grad, xr.grad))
        cases.append(case)
    return {"cases": cases}


def more() -> dict:
    """GroupNorm of ``x + add`` (one value per sample and channel), GEGLU, ``a + b + bias`` and ``add_layer_norm``,
    against float64 PyTorch: outputs and input gradients, both layouts and every dtype."""
    from facechain_core.train import fused_add, geglu

    g = torch.Generator().manual_seed(1)
    cases = []
    for shape, layout, dtype, offset in [((2, 64, 6, 6), "nhwc", torch.float32, 0.0),
                                         ((2, 64, 5, 3), "nchw", torch.float32, 0.0),
                                         ((1, 96, 4, 4), "nhwc", torch.float16, 0.0),
                                         ((2, 32, 4, 4), "nhwc", torch.bfloat16, 0.0),
                                         ((2, 32, 4, 4), "nhwc", torch.float32, 200.0)]:  # add >> the map's spread
        x = (torch.randn(shape, generator=g) * 2).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x
        c = shape[1]
        add = (torch.randn(shape[:2], generator=g) * 3 + offset).to(dtype)
        w, b = (torch.randn(c, generator=g) + 1).to(dtype), torch.randn(c, generator=g).to(dtype)
        dy = torch.randn(shape, generator=g).to(dtype)
        assert gn.usable(x, w, b, add)
        xk, xr = x.clone().requires_grad_(), x.detach().double().requires_grad_()
        yk = gn.group_norm(xk, 16, w, b, 1e-5, True, add=add)
        yr = F.silu(F.group_norm(xr + add.double()[:, :, None, None], 16, w.double(), b.double(), 1e-5))
        yk.backward(dy)
        yr.backward(dy.double())
        cases.append({"kind": "group_norm_add", "shape": list(shape), "layout": layout, "offset": offset,
                      "dtype": str(dtype).split(".")[-1], "same_layout": yk.stride() == x.stride(),
                      "out_err": _rel(yk.detach(), yr.detach()), "grad_err": _rel(xk.grad, xr.grad)})
        other = torch.randn(shape, generator=g).to(dtype)
        other = other.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else other
        bias = torch.randn(c, generator=g).to(dtype)
        assert fused_add.usable(x, other, bias)
        ak, bk = x.clone().requires_grad_(), other.clone().requires_grad_()
        out = fused_add.add(ak, bk, bias)
        ref = x.double() + other.double() + bias.double()[None, :, None, None]
        out.backward(dy)
        cases.append({"kind": "add_bias", "shape": list(shape), "layout": layout, "dtype": str(dtype).split(".")[-1],
                      "same_layout": out.stride() == x.stride(), "out_err": _rel(out.detach(), ref),
                      "grad_err": max(_rel(ak.grad, dy), _rel(bk.grad, dy))})
    # an addition that needs a gradient (a LoRA before it): added first, the kernels still run on the sum
    x = torch.randn(2, 32, 4, 4, generator=g).contiguous(memory_format=torch.channels_last)
    add = torch.randn(2, 32, generator=g).requires_grad_()
    w, b, dy = torch.randn(32, generator=g) + 1, torch.randn(32, generator=g), torch.randn(2, 32, 4, 4, generator=g)
    assert not gn.usable(x, w, b, add)
    xk, xr = x.clone().requires_grad_(), x.detach().double().requires_grad_()
    yk = gn.group_norm(xk, 8, w, b, 1e-5, True, add=add)
    add_r = add.detach().double().requires_grad_()
    yr = F.silu(F.group_norm(xr + add_r[:, :, None, None], 8, w.double(), b.double(), 1e-5))
    yk.backward(dy)
    yr.backward(dy.double())
    kernel = "GroupNormAct" in type(yk.grad_fn).__name__
    cases.append({"kind": "group_norm_add_grad", "dtype": "float32", "kernel": kernel,
                  "same_layout": yk.stride() == x.stride(), "out_err": _rel(yk.detach(), yr.detach()),
                  "grad_err": max(_rel(xk.grad, xr.grad), _rel(add.grad, add_r.grad))})
    # the input passed on through the norm (a skip connection): its gradient added by the backward kernel
    for layout, dtype in (("nhwc", torch.float32), ("nchw", torch.float16)):
        x = torch.randn(2, 64, 5, 5, generator=g).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x
        w, b = (torch.randn(64, generator=g) + 1).to(dtype), torch.randn(64, generator=g).to(dtype)
        dy, ds = (torch.randn(2, 64, 5, 5, generator=g).to(dtype) for _ in range(2))
        xk, xr = x.clone().requires_grad_(), x.detach().double().requires_grad_()
        sk, yk = gn.group_norm_and_input(xk, 16, w, b, 1e-5, silu=True)
        yr = F.silu(F.group_norm(xr, 16, w.double(), b.double(), 1e-5))
        ((sk.double() * ds.double()).sum() + (yk.double() * dy.double()).sum()).backward()
        ((xr * ds.double()).sum() + (yr * dy.double()).sum()).backward()
        cases.append({"kind": "group_norm_and_input", "layout": layout, "dtype": str(dtype).split(".")[-1],
                      "kernel": "GroupNormAct" in type(yk.grad_fn).__name__ and sk.data_ptr() == xk.data_ptr(),
                      "same_layout": yk.stride() == x.stride(), "out_err": _rel(yk.detach(), yr.detach()),
                      "grad_err": _rel(xk.grad, xr.grad)})
    for tokens, width, hidden, dtype, bias in [((2, 7), 32, 64, torch.float32, True),
                                                ((3, 5), 48, 40, torch.float32, False),
                                                ((2, 9), 64, 128, torch.float16, True),
                                                ((1, 33), 32, 272, torch.bfloat16, True)]:  # hidden over a tile
        x = torch.randn(*tokens, width, generator=g).to(dtype)
        w = (torch.randn(2 * hidden, width, generator=g) * 0.2).to(dtype)
        b = (torch.randn(2 * hidden, generator=g) * 0.5).to(dtype) if bias else None
        dy = torch.randn(*tokens, hidden, generator=g).to(dtype)
        if not bias:  # a gradient arriving as a strided view: copied before the kernel reads it
            dy = torch.randn(*tokens, 2 * hidden, generator=g).to(dtype)[..., ::2]
        assert geglu.usable(x, w, b)
        xk, xr = x.clone().requires_grad_(), x.detach().double().requires_grad_()
        yk = geglu.geglu(xk, w, b)
        yr = geglu.reference(xr, w.double(), None if b is None else b.double())
        yk.backward(dy)
        yr.backward(dy.double())
        cases.append({"kind": "geglu", "shape": [*tokens, width, hidden], "dtype": str(dtype).split(".")[-1],
                      "bias": bias, "same_layout": tuple(yk.shape) == tuple(yr.shape),
                      "out_err": _rel(yk.detach(), yr.detach()), "grad_err": _rel(xk.grad, xr.grad)})
    cases += _layer_norm_cases(g)
    cases += _channel_cat_cases(g)
    cases += _lora_merge_cases(g)
    cases.append(_premerge_case(g))
    return {"cases": cases}


def _premerge_case(g: torch.Generator) -> dict:
    """``lora_layers.premerge`` on four projections of one input (q, k, v and another): the merged weights are
    taken once, by the stacked q, k, v and by the fourth layer, with the outputs of each layer merging its own;
    a factor changed in place after the merge makes its layer merge again; ``drop_premerged`` forgets what was
    not taken; too few tokens, nothing merged ahead."""
    from facechain_core.train import lora_layers

    net = torch.nn.ModuleDict({k: torch.nn.Linear(32, 32, bias=False) for k in ("q", "k", "v", "o")})
    net.half().requires_grad_(False)
    x = torch.randn(4, 50, 32, generator=g).half()
    layers = lambda: [net[k] for k in ("q", "k", "v", "o")]  # noqa: E731 - the peft wrappers, once put in
    out = {}
    with lora_layers.lora_adapters(net, ["q", "k", "v", "o"], 4, 8, 0, product="merged") as params, torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        own = [torch.cat([m(x) for m in layers()[:3]], -1), layers()[3](x)]  # each layer merging its own
        out["merged_ahead"] = lora_layers.premerge(x, layers())
        out["held"] = [m.forward.premerged is not None for m in layers()]
        ahead = [lora_layers.stacked_projection(x, layers()[:3]), layers()[3](x)]
        out["taken"] = [m.forward.premerged is None for m in layers()]
        out["err"] = max(_rel(a, b) for a, b in zip(ahead, own))
        lora_layers.premerge(x, layers())
        layers()[3].lora_B["facechain"].weight.add_(1.0)  # as an optimizer step would, in place
        changed = layers()[3](x)
        lora_layers.premerge(x, layers())
        out["stale_skipped"] = _rel(changed, layers()[3](x)) < 1e-3 and _rel(changed, ahead[1]) > 1e-2
        lora_layers.drop_premerged(layers())
        out["dropped"] = all(m.forward.premerged is None for m in layers())
        out["few_tokens"] = lora_layers.premerge(x[:1, :5], layers())
    return {"kind": "premerge", "dtype": "float16", "same_layout": True, "out_err": out.pop("err"), "grad_err": 0.0,
            **out}


def _channel_cat_cases(g: torch.Generator) -> list:
    """``channel_cat.cat``: channels-last maps joined along their channels and the gradient handed back per map,
    against ``torch.cat`` (a copy: equal to the bit), every dtype, two and three maps, widths that are not multiples
    of a vector, one map that needs no gradient; and what it refuses."""
    from facechain_core.train import channel_cat

    cases = []
    for widths, dtype, frozen in [((24, 40), torch.float32, None), ((320, 320, 640), torch.float16, 1),
                                  ((7, 9), torch.bfloat16, 0)]:
        parts = [torch.randn(2, c, 3, 5, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
                 .requires_grad_(i != frozen) for i, c in enumerate(widths)]
        assert channel_cat.usable(parts, 1)
        out = channel_cat.cat(parts, dim=1)
        grad = torch.randn(out.shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
        out.backward(grad)
        want, grads = torch.cat([p.detach() for p in parts], 1), grad.split(list(widths), 1)
        exact = torch.equal(out.detach(), want) and all(
            (p.grad is None) if i == frozen else torch.equal(p.grad, w) for i, (p, w) in enumerate(zip(parts, grads)))
        cases.append({"kind": "channel_cat", "widths": list(widths), "dtype": str(dtype).split(".")[-1],
                      "kernel": "ChannelCat" in type(out.grad_fn).__name__, "exact": exact,
                      "same_layout": out.is_contiguous(memory_format=torch.channels_last) and all(
                          p.grad.is_contiguous(memory_format=torch.channels_last) for p in parts if p.grad is not None),
                      "out_err": 0.0, "grad_err": 0.0})
    m = torch.randn(2, 8, 4, 4, generator=g).contiguous(memory_format=torch.channels_last)
    cases.append({"kind": "channel_cat_refused", "dtype": "float32", "same_layout": True, "out_err": 0.0,
                  "grad_err": 0.0, "checks": [not channel_cat.usable([m, m.contiguous()], 1),  # an NCHW map
                                               not channel_cat.usable([m, m], 0),  # along the batch
                                               not channel_cat.usable([m, m.half()], 1),
                                               not channel_cat.usable([m, m[:, :, :2].contiguous(
                                                   memory_format=torch.channels_last)], 1),  # other sizes
                                               not channel_cat.usable([m], 1),
                                               channel_cat.usable((m, m, m), -3)]})
    # a gradient arriving in another layout, or not aligned: handed back as slices, as torch.cat's backward does
    for kind, make in (("nchw", lambda t: t.contiguous()),
                       ("misaligned", lambda t: torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view(
                           t.shape[0], *t.shape[2:], t.shape[1]).permute(0, 3, 1, 2).copy_(t))):  # NHWC, 4 bytes off
        parts = [torch.randn(2, c, 3, 5, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
                 for c in (8, 16)]
        out = channel_cat.cat(parts, dim=1)
        grad = make(torch.randn(out.shape, generator=g).contiguous(memory_format=torch.channels_last))
        out.backward(grad)
        cases.append({"kind": "channel_cat_other_gradient", "gradient": kind, "dtype": "float32", "kernel": True,
                      "exact": torch.equal(parts[0].grad, grad[:, :8]) and torch.equal(parts[1].grad, grad[:, 8:]),
                      "same_layout": True, "out_err": 0.0, "grad_err": 0.0})
    return cases


def _lora_merge_cases(g: torch.Generator) -> list:
    """``lora_merge.merge``: ``W + scale * B @ A`` for several layers in one launch against float64, every dtype,
    weights narrower and wider than a tile, rank 1 to 16, scales other than 1, one layer and the most a launch
    takes; and what it refuses (too many layers, mixed shapes, half-precision factors)."""
    from facechain_core.train import lora_merge

    cases = []
    for n, out_f, in_f, r, dtype in [(3, 48, 80, 4, torch.float16), (8, 33, 70, 1, torch.float32),
                                      (2, 64, 64, 16, torch.bfloat16), (1, 320, 40, 4, torch.float32)]:
        weights = [torch.randn(out_f, in_f, generator=g).to(dtype) for _ in range(n)]
        a = [torch.randn(r, in_f, generator=g) * 0.5 for _ in range(n)]
        b = [torch.randn(out_f, r, generator=g) * 0.5 for _ in range(n)]
        scales = [1.0 + 0.5 * k for k in range(n)]
        assert lora_merge.usable(weights, a, b)
        got = lora_merge.merge(weights, a, b, scales)
        want = torch.stack([w.double() + s * (f.double() @ e.double()) for w, e, f, s in zip(weights, a, b, scales)])
        cases.append({"kind": "lora_merge", "shape": [n, out_f, in_f, r], "dtype": str(dtype).split(".")[-1],
                      "same_layout": got.dtype == dtype and tuple(got.shape) == (n, out_f, in_f),
                      "out_err": _rel(got, want), "grad_err": 0.0})
    w = [torch.randn(16, 16, generator=g) for _ in range(9)]
    a, b = [torch.randn(2, 16, generator=g) for _ in w], [torch.randn(16, 2, generator=g) for _ in w]
    cases.append({"kind": "lora_merge_refused", "dtype": "float32", "same_layout": True, "out_err": 0.0,
                  "grad_err": 0.0, "checks": [not lora_merge.usable(w, a, b),
                                               not lora_merge.usable([w[0], torch.randn(16, 8)], a[:2], b[:2]),
                                               not lora_merge.usable(w[:2], [t.half() for t in a[:2]], b[:2]),
                                               lora_merge.usable(w[:8], a[:8], b[:8])]})
    return cases


def _layer_norm_cases(g: torch.Generator) -> list:
    """``add_layer_norm``: the sum and its LayerNorm, and the gradients of both inputs, with and without the
    sum, every dtype, rows narrower and wider than a power of two, a mean far from zero, a gradient arriving as
    a strided view, and a gradient reaching the sum only."""
    from facechain_core.train import layer_norm

    cases = []
    for shape, dtype, with_h, offset, strided in [((2, 7, 32), torch.float32, False, 0.0, False),
                                                   ((3, 5, 40), torch.float32, True, 0.0, True),
                                                   ((2, 9, 320), torch.float16, True, 0.0, False),
                                                   ((4, 77), torch.bfloat16, True, 0.0, False),
                                                   ((2, 3, 48), torch.float32, True, 300.0, False)]:
        x = (torch.randn(shape, generator=g) * 2 + offset).to(dtype)
        h = torch.randn(shape, generator=g).to(dtype) if with_h else None
        n = shape[-1]
        w, b = (torch.randn(n, generator=g) * 0.3 + 1).to(dtype), torch.randn(n, generator=g).to(dtype)
        ds = torch.randn(shape, generator=g).to(dtype)
        dy = torch.randn(shape, generator=g).to(dtype)
        if strided:  # copied before the kernel reads it
            dy = torch.randn(*shape[:-1], 2 * n, generator=g).to(dtype)[..., ::2]
        assert layer_norm.usable(x, h, w, b)
        xk = x.clone().requires_grad_()
        hk = None if h is None else h.clone().requires_grad_()
        xr = x.detach().double().requires_grad_()
        hr = None if h is None else h.detach().double().requires_grad_()
        sk, yk = layer_norm.add_layer_norm(xk, hk, w, b, 1e-5)
        sr, yr = layer_norm.reference(xr, hr, w.double(), b.double(), 1e-5)
        torch.autograd.backward([sk, yk], [ds, dy])  # the gradients arrive as given (dy strided where asked)
        torch.autograd.backward([sr, yr], [ds.double(), dy.double()])
        errs = [_rel(xk.grad, xr.grad)] + ([] if h is None else [_rel(hk.grad, hr.grad)])
        cases.append({"kind": "layer_norm", "shape": list(shape), "dtype": str(dtype).split(".")[-1],
                      "sum": with_h, "offset": offset, "kernel": "AddLayerNorm" in type(yk.grad_fn).__name__,
                      "same_layout": sk.stride() == x.stride() and yk.stride() == x.stride(),
                      "alias": h is None and sk.data_ptr() == xk.data_ptr(),
                      "out_err": max(_rel(sk.detach(), sr.detach()), _rel(yk.detach(), yr.detach())),
                      "grad_err": max(errs)})
    # only the sum's gradient (a block whose norm output is not used): no kernel needed, the sum's passes through
    x, h = torch.randn(2, 5, 32, generator=g).requires_grad_(), torch.randn(2, 5, 32, generator=g).requires_grad_()
    s, _ = layer_norm.add_layer_norm(x, h, None, None, 1e-5)
    ds = torch.randn(2, 5, 32, generator=g)
    s.backward(ds)
    cases.append({"kind": "layer_norm_sum_only", "dtype": "float32", "same_layout": True, "out_err": 0.0,
                  "grad_err": max(_rel(x.grad, ds), _rel(h.grad, ds))})
    return cases


def unet(blocks: bool = False) -> dict:
    """The tiny ComfyUI SD1.5 UNet, channels-last, LoRA on its attention: stock forwards and PyTorch's
    GroupNorm, against the training-only forwards with the kernels; outputs and LoRA gradients, and how many
    GroupNorms the kernels ran. Without ``blocks`` a LoRA on each ResBlock's first convolution too (so those
    blocks run their stock ``_forward``, their norms on the kernels); with ``blocks`` the attention alone, as the
    trainer's defaults are, so every ResBlock folds its additions into the kernels (``_resblock_forward``),
    GEGLU runs its kernels, each transformer block its three additions and LayerNorms
    (``_transformer_block_forward``), and the adapters are merged into the weights (``lora_compute: merged``; merged
    ahead per block, ``premerge``; q, k, v and the text's k, v each as one multiply: ``stacked_projection``);
    the stock run is then ComfyUI's forwards with peft's product in the activations' dtype."""
    import importlib

    from conftest import load_pack, tiny_checkpoint

    from facechain_core.train.lora_layers import borrowed_weights, lora_adapters
    from facechain_core.train.speed import channels_last

    pack = load_pack()  # ComfyUI's modules first (on the CPU), then the pack
    import comfy.sd

    cb = importlib.import_module(pack.__name__ + ".nodes.comfy_backbone")
    pack_gn = importlib.import_module(pack.__name__ + ".facechain_core.train.group_norm")  # the copy cb calls
    model = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint()), output_vae=False, output_clip=False)[0]
    net = model.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():  # the checkpoint's norms are ones and zeros: make them count
        for m in net.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    # with blocks: latents big enough that the first level's adapters are merged (its tokens outweigh the weight),
    # the lower levels' not (``_merge_pays``)
    side = 16 if blocks else 8
    x = torch.randn(2, 4, side, side, generator=g).contiguous(memory_format=torch.channels_last)
    t, ctx = torch.tensor([10.0, 700.0]), torch.randn(2, 77, 768, generator=g)
    assert pack_gn.works(x.device, x.dtype)  # the first small runs, before counting
    assert pack_gn.whole_works(x.device, x.dtype)
    assert importlib.import_module(pack.__name__ + ".facechain_core.train.geglu").works(x.device, x.dtype)
    assert importlib.import_module(pack.__name__ + ".facechain_core.train.fused_add").works(x.device, x.dtype)
    assert importlib.import_module(pack.__name__ + ".facechain_core.train.channel_cat").works(x.device, x.dtype)
    pack_ln = importlib.import_module(pack.__name__ + ".facechain_core.train.layer_norm")
    assert pack_ln.works(x.device, x.dtype)
    with torch.inference_mode():  # and the LayerNorms' too
        for m in net.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    kernels_of = {"layer_norm": (pack_ln, "_AddLayerNorm"),
                  "norm": (pack_gn, "_GroupNormAct"),
                  "add": (importlib.import_module(pack.__name__ + ".facechain_core.train.fused_add"), "_AddBias"),
                  "geglu": (importlib.import_module(pack.__name__ + ".facechain_core.train.geglu"), "_GEGLU"),
                  "merged": (sys.modules[lora_adapters.__module__], "_MergedLoRALinear"),
                  # the self-attentions' q, k, v as one multiply: called by the backbone, from the pack's copy
                  "stacked": (importlib.import_module(pack.__name__ + ".facechain_core.train.lora_layers"),
                              "_MergedLoRAStack"),
                  "cat": (importlib.import_module(pack.__name__ + ".facechain_core.train.channel_cat"), "_ChannelCat")}
    pack_merge = importlib.import_module(pack.__name__ + ".facechain_core.train.lora_merge")
    assert pack_merge.works(x.device, torch.float32)  # its first small run, before counting
    launches, stock_merge = [], pack_merge.merge
    pack_merge.merge = lambda *a: (launches.append(len(a[0])), stock_merge(*a))[1]
    # per merged-layer or stacked call: whether it came with its weights merged ahead (premerge)
    premerged = {"merged": [], "stacked": []}
    calls = {name: 0 for name in kernels_of}
    stock_apply = {name: getattr(mod, cls).apply for name, (mod, cls) in kernels_of.items()}

    def counted(name):
        def apply(*a):
            calls[name] += 1
            if name in premerged:  # (x, weight, bias, a, b, scale, merged) and (x, scales, merged, ...)
                premerged[name].append((a[-1] if name == "merged" else a[2]) is not None)
            return stock_apply[name](*a)
        return apply

    for name, (mod, cls) in kernels_of.items():
        getattr(mod, cls).apply = counted(name)
    targets = ["to_q", "to_k", "to_v", "to_out.0"] + ([] if blocks else ["in_layers.2"])
    runs, folded, blocks_patched = {}, 0, 0
    for name, kernels in (("stock", False), ("kernels", True)):
        fast = cb.fast_frozen_layers(net, group_norm_kernels=kernels) if kernels else contextlib.nullcontext()
        product = ("merged" if kernels else "activations") if blocks else "fused"
        # in the trainer's order: the fast layers, the NHWC weights, the borrowed weights, the adapters
        with fast as patched, channels_last(net, True), borrowed_weights(net), \
                lora_adapters(net, targets, 4, 4, 0, product=product, plain_linear=cb.plain_linear) as params:
            folded = max(folded, (patched or {}).get("res_blocks", 0))
            blocks_patched = max(blocks_patched, (patched or {}).get("transformer_blocks", 0))
            for p in params:  # up factors start at zero: give them values so gradients reach every factor
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
            out = net(x, t, context=ctx, transformer_options={})
            out.float().square().mean().backward()
            runs[name] = (out.detach(), [p.grad.clone() for p in params],
                          out.is_contiguous(memory_format=torch.channels_last))
    for name, (mod, cls) in kernels_of.items():
        getattr(mod, cls).apply = stock_apply[name]
    pack_merge.merge = stock_merge
    from comfy.ldm.modules.attention import GEGLU, BasicTransformerBlock
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    (o1, g1, cl1), (o2, g2, cl2) = runs["stock"], runs["kernels"]
    return {"norms": sum(isinstance(m, torch.nn.GroupNorm) for m in net.modules()), "kernel_calls": calls["norm"],
            "res_blocks": sum(type(m) is ResBlock for m in net.modules()), "folded": folded, "add_calls": calls["add"],
            "gegLUs": sum(type(m) is GEGLU for m in net.modules()), "geglu_calls": calls["geglu"],
            "merged_calls": calls["merged"], "stacked_calls": calls["stacked"], "layer_norm_calls": calls["layer_norm"],
            "joins": len(net.output_blocks), "cat_calls": calls["cat"],
            "merge_launches": launches, "premerged": premerged,
            "transformer_blocks": sum(type(m) is BasicTransformerBlock for m in net.modules()),
            "transformer_blocks_patched": blocks_patched, "out_err": _rel(o2, o1),
            "grad_err": max(_rel(a, b) for a, b in zip(g2, g1)), "grads": len(g1), "nhwc_out": [cl1, cl2],
            "patched_left": sum("forward" in m.__dict__ or "_forward" in m.__dict__ for m in net.modules())}


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    print(json.dumps({"kernels": kernels, "unet": unet, "unet_blocks": lambda: unet(blocks=True),
                      "more": more}[sys.argv[1]]()))
