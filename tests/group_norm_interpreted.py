"""Run by tests/test_group_norm.py in a process started with TRITON_INTERPRET=1 (Triton reads it when the kernels
are defined): the pack's GroupNorm kernels, run by Triton's interpreter on the CPU, against PyTorch.

    python tests/group_norm_interpreted.py kernels|unet

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
            ((2, 320, 16, 16), 32, "nhwc", True, torch.float16, True, 0.0),  # several chunks per sample
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
        cases.append({"shape": list(shape), "layout": layout, "silu": silu, "dtype": str(dtype).split(".")[-1],
                      "affine": affine, "offset": offset, "same_layout": yk.stride() == x.stride(),
                      "out_err": _rel(yk.detach(), yr.detach()), "grad_err": _rel(xk.grad, xr.grad)})
    return {"cases": cases}


def unet() -> dict:
    """The tiny ComfyUI SD1.5 UNet, channels-last, LoRA on its attention: stock forwards and PyTorch's
    GroupNorm, against the training-only forwards with the kernels; outputs and LoRA gradients, and how many
    GroupNorms the kernels ran."""
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
    x = torch.randn(2, 4, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    t, ctx = torch.tensor([10.0, 700.0]), torch.randn(2, 77, 768, generator=g)
    assert pack_gn.works(x.device, x.dtype)  # the first small run, before counting
    calls = {"n": 0}
    apply = pack_gn._GroupNormAct.apply

    def counted(*a):
        calls["n"] += 1
        return apply(*a)

    pack_gn._GroupNormAct.apply = counted
    runs = {}
    for name, kernels in (("stock", False), ("kernels", True)):
        # in the trainer's order: the fast layers, the NHWC weights, the borrowed weights, the adapters
        with cb.fast_frozen_layers(net, group_norm_kernels=kernels) if kernels else contextlib.nullcontext(), \
                channels_last(net, True), borrowed_weights(net), \
                lora_adapters(net, ["to_q", "to_k", "to_v", "to_out.0", "in_layers.2"], 4, 4, 0, product="fused",
                              plain_linear=cb.plain_linear) as params:
            for p in params:  # up factors start at zero: give them values so gradients reach every factor
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
            out = net(x, t, context=ctx, transformer_options={})
            out.float().square().mean().backward()
            runs[name] = (out.detach(), [p.grad.clone() for p in params],
                          out.is_contiguous(memory_format=torch.channels_last))
    pack_gn._GroupNormAct.apply = apply
    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in net.modules())
    (o1, g1, cl1), (o2, g2, cl2) = runs["stock"], runs["kernels"]
    return {"norms": norms, "kernel_calls": calls["n"], "out_err": _rel(o2, o1),
            "grad_err": max(_rel(a, b) for a, b in zip(g2, g1)), "grads": len(g1), "nhwc_out": [cl1, cl2],
            "patched_left": sum("forward" in m.__dict__ for m in net.modules())}


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    print(json.dumps({"kernels": kernels, "unet": unet}[sys.argv[1]]()))
