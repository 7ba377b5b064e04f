"""The trainer's two speed paths that must not change what is trained: the LoRA product fused into the base
layers' matrix multiplies (``lora_compute: fused``) and ComfyUI's frozen layers run by training-only forwards
(``fast_frozen_layers``: GEGLU as two multiplies, SpatialTransformer's projections on the feature map's own
memory). Each is checked against the stock computation on real modules: the same outputs, the same gradients,
the modules given back as they were, and the stock path taken wherever the fast one does not apply."""

from __future__ import annotations

import contextlib
import importlib
import sys

import pytest
import torch

from conftest import load_pack, tiny_checkpoint
from facechain_core.train import TrainSettings, train_lora
from facechain_core.train import lora_layers
from facechain_core.train.lora_layers import borrowed_weights, gradient_checkpointing, lora_adapters


def _factors_random(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:  # lora_B starts at zero: make the product count
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _run(net, x, product, plain=None):
    """Output, input gradient and factor gradients of ``net`` with LoRA on its layer "0"."""
    x = x.clone().requires_grad_(True)
    with lora_adapters(net, ["0"], 4, 8, 0, product=product, plain_linear=plain) as params:
        _factors_random(params)
        out = net(x)
        out.float().square().mean().backward()
        return out.detach().float(), x.grad.float(), [p.grad.clone() for p in params]


def _count_fused(monkeypatch):
    calls = []
    apply = lora_layers._FusedLoRALinear.apply
    monkeypatch.setattr(lora_layers._FusedLoRALinear, "apply", lambda *a: (calls.append(1), apply(*a))[1])
    return calls


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_lora_gives_peft_outputs_and_gradients(monkeypatch, dtype, tol, bias):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 48, bias=bias)).to(dtype).requires_grad_(False)
    x = torch.randn(2, 5, 32, dtype=dtype)
    peft = _run(net, x, "activations")
    calls = _count_fused(monkeypatch)
    fused = _run(net, x, "fused")
    assert calls == [1]  # the fused function ran, once
    scale = peft[0].abs().max()
    assert (fused[0] - peft[0]).abs().max() <= tol * scale
    assert (fused[1] - peft[1]).abs().max() <= tol * peft[1].abs().max()
    for a, b in zip(fused[2], peft[2]):
        assert a.dtype == torch.float32 and a.abs().sum() > 0
        assert (a - b).abs().max() <= tol * b.abs().max()
    assert type(net[0]) is torch.nn.Linear and "forward" not in net[0].__dict__  # given back as it was


def test_fused_lora_leaves_what_it_cannot_fuse_to_peft(monkeypatch):
    class Doubling(torch.nn.Linear):  # a host layer whose forward is more than F.linear
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    x = torch.randn(3, 16)
    calls = _count_fused(monkeypatch)
    net = torch.nn.Sequential(Doubling(16, 16)).requires_grad_(False)
    assert torch.allclose(_run(net, x, "fused")[0], _run(net, x, "activations")[0])
    assert calls == []  # not a plain linear: peft's forward, which calls the layer's own
    # a host that says its subclass is plain gets the fused path
    net = torch.nn.Sequential(Doubling(16, 16)).requires_grad_(False)
    _run(net, x, "fused", plain=lambda m: isinstance(m, torch.nn.Linear))
    assert calls == [1]
    calls.clear()
    net = torch.nn.Sequential(torch.nn.Linear(16, 16)).requires_grad_(False)
    with lora_adapters(net, ["0"], 4, 4, 0, product="fused") as params:
        _factors_random(params)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast picks dtypes per op: peft's forward
            under_autocast = net(x)
        assert calls == [] and under_autocast.dtype == torch.bfloat16
        net(x)
        assert calls == [1]


def test_fused_lora_scales_the_up_factors_gradient_before_summing_it():
    """fp16 with a loss scaler's large gradients and a LoRA scale below 1: the sum of unscaled products would
    overflow where peft's order (scale, then sum) does not."""
    x = torch.ones(64, 4, dtype=torch.float16)
    w = torch.zeros(8, 4, dtype=torch.float16)
    a = torch.ones(2, 4, requires_grad=True)  # h = x @ a.T = 4 everywhere
    b = torch.ones(8, 2, requires_grad=True)
    y = lora_layers._FusedLoRALinear.apply(x, w, None, a, b, 0.25)
    y.backward(torch.full_like(y, 300.0))  # 64 rows x 300 x 4 = 76800 > fp16's 65504; x 0.25 = 19200
    assert torch.isfinite(b.grad).all() and torch.allclose(b.grad, torch.full_like(b.grad, 19200.0))
    assert torch.isfinite(a.grad).all()


def _count(monkeypatch, cls):
    calls = []
    apply = cls.apply
    monkeypatch.setattr(cls, "apply", lambda *a: (calls.append(1), apply(*a))[1])
    return calls


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
@pytest.mark.parametrize("bias", [True, False])
def test_merged_lora_gives_peft_outputs_and_gradients(monkeypatch, bias, dtype, tol):
    """Enough tokens for the weight's size: the adapter is merged into the weight for the step, and the output,
    the input's gradient and both factors' gradients are peft's (in float16 up to the merged weight's rounding,
    which ComfyUI's own merge of the trained LoRA has too)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 48, bias=bias)).to(dtype).requires_grad_(False)
    x = torch.randn(4, 50, 32, dtype=dtype)
    peft = _run(net, x, "activations")
    merged_calls = _count(monkeypatch, lora_layers._MergedLoRALinear)
    fused_calls = _count(monkeypatch, lora_layers._FusedLoRALinear)
    merged = _run(net, x, "merged")
    assert merged_calls == [1] and fused_calls == []
    assert (merged[0] - peft[0]).abs().max() <= tol * peft[0].abs().max()
    assert (merged[1] - peft[1]).abs().max() <= tol * peft[1].abs().max()
    for a, b in zip(merged[2], peft[2]):
        assert a.dtype == torch.float32 and a.abs().sum() > 0
        assert (a - b).abs().max() <= tol * b.abs().max()
    assert type(net[0]) is torch.nn.Linear and "forward" not in net[0].__dict__  # given back as it was


def test_merging_is_chosen_per_layer_where_it_moves_less_memory(monkeypatch):
    """Few tokens for a large weight (a cross-attention's text tokens, the lowest level), or bfloat16 weights
    (whose rounding would swallow the adapter's first small steps): the rank-r product, fused, instead."""
    big = torch.nn.Linear(256, 256).requires_grad_(False)
    assert lora_layers._merge_pays(torch.randn(8, 100, 256), big.weight)  # 800 tokens for 256 x 256
    assert not lora_layers._merge_pays(torch.randn(2, 77, 256), big.weight)  # 154 tokens
    assert not lora_layers._merge_pays(torch.randn(8, 100, 256).bfloat16(), big.weight.bfloat16())
    merged_calls = _count(monkeypatch, lora_layers._MergedLoRALinear)
    fused_calls = _count(monkeypatch, lora_layers._FusedLoRALinear)
    torch.manual_seed(0)
    few = _run(torch.nn.Sequential(big), torch.randn(2, 77, 256), "merged")
    assert merged_calls == [] and fused_calls == [1] and all(g.abs().sum() > 0 for g in few[2])


def test_merged_lora_sums_its_gradient_in_float32():
    """fp16 with a loss scaler's large gradients: the weight-shaped product summed over every token stays float32
    (cuBLAS writes it so on a GPU), where a half-precision sum would overflow."""
    x = torch.ones(64, 4, dtype=torch.float16)
    w = torch.zeros(8, 4, dtype=torch.float16)
    a = torch.ones(2, 4, requires_grad=True)
    b = torch.ones(8, 2, requires_grad=True)
    y = lora_layers._MergedLoRALinear.apply(x, w, None, a, b, 0.25)
    y.backward(torch.full_like(y, 1200.0))  # M = 64 rows x 1200 = 76800 each, past fp16's 65504
    assert torch.isfinite(b.grad).all() and torch.allclose(b.grad, torch.full_like(b.grad, 0.25 * 76800.0 * 4))
    assert torch.isfinite(a.grad).all() and torch.allclose(a.grad, torch.full_like(a.grad, 0.25 * 76800.0 * 8))


class _QKV(torch.nn.Module):
    """Three projections of one input, as a self-attention's q, k and v."""

    def __init__(self, dtype, bias=False, out_v=32):
        super().__init__()
        self.to_q, self.to_k = torch.nn.Linear(32, 32, bias=bias), torch.nn.Linear(32, 32, bias=bias)
        self.to_v = torch.nn.Linear(32, out_v, bias=bias)
        self.to(dtype).requires_grad_(False)

    def layers(self):
        return self.to_q, self.to_k, self.to_v


def _qkv_run(net, x, product="merged", stacked=True, alpha=4, scales=None):
    """q, k, v side by side, the input's gradient and the factors' (a loss that mixes q, k and v); ``scales``: a
    LoRA scale of each layer's own instead of alpha / rank."""
    x = x.clone().requires_grad_(True)
    with lora_adapters(net, ["to_q", "to_k", "to_v"], 4, alpha, 0, product=product) as params:
        _factors_random(params)
        for m, scale in zip(net.layers(), scales or ()):
            m.scaling["facechain"] = scale
        y = lora_layers.stacked_projection(x, net.layers()) if stacked else None
        if y is None:
            y = torch.cat([m(x) for m in net.layers()], dim=-1)
        q, k, v = y.split([32, 32, y.shape[-1] - 64], dim=-1)
        ((q * k).sum(-1, keepdim=True) * v).float().square().mean().backward()
        return y.detach().float(), x.grad.float(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("alpha,scales", [(4, None), (8, None), (4, (0.5, 1.0, 3.0))])  # LoRA scale 1, 2, mixed
def test_stacked_qkv_gives_each_layers_merged_outputs_and_gradients(monkeypatch, dtype, tol, bias, alpha, scales):
    """q, k and v as one multiply (``stacked_projection``) against each layer's own merged forward and peft's:
    the same outputs, input gradient and factor gradients (float32; fp16 up to the merged weight's rounding),
    also with a scale of each layer's own."""
    torch.manual_seed(0)
    net, x = _QKV(dtype, bias), torch.randn(4, 50, 32, dtype=dtype)
    stacked_calls = _count(monkeypatch, lora_layers._MergedLoRAStack)
    merged_calls = _count(monkeypatch, lora_layers._MergedLoRALinear)
    stacked = _qkv_run(net, x, alpha=alpha, scales=scales)
    assert stacked_calls == [1] and merged_calls == []
    one_by_one = _qkv_run(net, x, stacked=False, alpha=alpha, scales=scales)
    assert stacked_calls == [1] and merged_calls == [1, 1, 1]
    peft = _qkv_run(net, x, product="activations", stacked=False, alpha=alpha, scales=scales)
    for want, t in ((one_by_one, tol), (peft, tol)):
        assert (stacked[0] - want[0]).abs().max() <= t * want[0].abs().max()
        assert (stacked[1] - want[1]).abs().max() <= t * want[1].abs().max()
        for a, b in zip(stacked[2], want[2]):
            assert a.dtype == torch.float32 and a.abs().sum() > 0
            assert (a - b).abs().max() <= t * b.abs().max()
    assert all(type(m) is torch.nn.Linear and "forward" not in m.__dict__ for m in net.layers())


def test_stacked_qkv_is_refused_where_one_layer_would_compute_otherwise(monkeypatch):
    """None (the caller then runs each layer) for layers of different shapes or ranks, a hooked layer (forward or
    backward hooks), the fused product, too few tokens for merging (unless ``few_tokens``), bfloat16 weights, or a
    bias on some layers only."""
    torch.manual_seed(0)
    x = torch.randn(4, 50, 32)
    stacked_calls = _count(monkeypatch, lora_layers._MergedLoRAStack)
    for net, product, inp in ((_QKV(torch.float32, out_v=48), "merged", x), (_QKV(torch.float32), "fused", x),
                              (_QKV(torch.float32), "merged", x[:1, :10])):
        with lora_adapters(net, ["to_q", "to_k", "to_v"], 4, 4, 0, product=product):
            assert lora_layers.stacked_projection(inp, net.layers()) is None
    net = _QKV(torch.float32)
    net.to_v.bias = torch.nn.Parameter(torch.zeros(32), requires_grad=False)
    with lora_adapters(net, ["to_q", "to_k", "to_v"], 4, 4, 0, product="merged"):
        assert lora_layers.stacked_projection(x, net.layers()) is None
    net = _QKV(torch.float32)
    with lora_adapters(net, ["to_q", "to_k", "to_v"], 4, 4, 0, product="merged"):
        for register in (net.to_k.register_forward_hook, net.to_k.register_full_backward_hook):
            hook = register(lambda *args: None)
            assert lora_layers.stacked_projection(x, net.layers()) is None
            hook.remove()
        assert lora_layers.stacked_projection(x, net.layers()) is not None
        assert lora_layers.stacked_projection(x[:1, :10], net.layers(), few_tokens=True) is not None
        a = net.to_v.lora_A["facechain"]
        a.weight = torch.nn.Parameter(torch.randn(2, 32))  # another rank
        net.to_v.lora_B["facechain"].weight = torch.nn.Parameter(torch.randn(32, 2))
        assert lora_layers.stacked_projection(x, net.layers()) is None
    net = _QKV(torch.bfloat16)
    with lora_adapters(net, ["to_q", "to_k", "to_v"], 4, 4, 0, product="merged"):
        assert lora_layers.stacked_projection(x.bfloat16(), net.layers(), few_tokens=True) is None
    assert stacked_calls == [1, 1]


def test_merged_is_the_default_and_other_values_are_a_clear_error():
    from facechain_core.errors import FaceChainError

    assert TrainSettings().lora_compute == "merged" and TrainSettings().fast_frozen_layers is True
    with pytest.raises(FaceChainError, match="lora_compute must be one of merged, fused, activations, fp32"):
        TrainSettings().with_(lora_compute="fast").validate()


# ComfyUI's own modules, in process on the CPU


@pytest.fixture(scope="module")
def comfy_backbone_module():
    pack = load_pack()
    return importlib.import_module(pack.__name__ + ".nodes.comfy_backbone")


class _Calls:
    """Counts calls of the fused LoRA function and of the stock GEGLU, SpatialTransformer and
    BasicTransformerBlock forwards."""

    def __init__(self, monkeypatch):
        from comfy.ldm.modules.attention import GEGLU, BasicTransformerBlock, SpatialTransformer

        self.counts = {"fused": 0, "GEGLU": 0, "SpatialTransformer": 0, "BasicTransformerBlock": 0}
        apply = lora_layers._FusedLoRALinear.apply
        monkeypatch.setattr(lora_layers._FusedLoRALinear, "apply", lambda *a: (self._hit("fused"), apply(*a))[1])
        for cls in (GEGLU, SpatialTransformer, BasicTransformerBlock):
            stock = cls.forward
            monkeypatch.setattr(cls, "forward", lambda *a, _s=stock, _n=cls.__name__, **k: (self._hit(_n),
                                                                                          _s(*a, **k))[1])

    def _hit(self, name):
        self.counts[name] += 1

    def take(self) -> dict:
        out, self.counts = self.counts, dict.fromkeys(self.counts, 0)
        return out


def _unet_grads(unet, run, cb, fast: bool, autocast: bool = False):
    with borrowed_weights(unet), lora_adapters(unet, ["to_q", "to_k", "to_v", "to_out.0"], 4, 4, 0,
                                               product="fused", plain_linear=cb.plain_linear) as params:
        _factors_random(params)
        with cb.fast_frozen_layers(unet) if fast else contextlib.nullcontext(0) as patched, \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = run()
            out.float().square().mean().backward()
        return out.detach(), [p.grad.clone() for p in params], patched


def _lora_layers(unet) -> int:
    return sum(name.endswith(("to_q", "to_k", "to_v", "to_out.0")) for name, _ in unet.named_modules())


def _norm_forwards(unet) -> int:
    """GroupNorms the fast layers take over: each Sequential that starts with a GroupNorm and a SiLU, and
    every other GroupNorm."""
    seqs = [m for m in unet.modules() if isinstance(m, torch.nn.Sequential) and len(m) >= 2
            and isinstance(m[0], torch.nn.GroupNorm) and isinstance(m[1], torch.nn.SiLU)]
    first = {id(m[0]) for m in seqs}
    return len(seqs) + sum(isinstance(m, torch.nn.GroupNorm) and id(m) not in first for m in unet.modules())


def _same(a, b, rel=1e-5):
    return float((a - b).abs().max()) <= rel * float(b.abs().max())


def test_fast_frozen_layers_train_the_same_on_comfyui_sd15(comfy_backbone_module, monkeypatch):
    """SD1.5's 1x1-convolution projections (the tiny checkpoint's UNet, as ComfyUI loads it)."""
    import comfy.sd
    from comfy.ldm.modules.attention import BasicTransformerBlock, GEGLU, SpatialTransformer

    cb = comfy_backbone_module
    calls = _Calls(monkeypatch)
    model = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint()), output_vae=False, output_clip=False)[0]
    unet = model.model.diffusion_model
    assert any(isinstance(m, SpatialTransformer) and not m.use_linear for m in unet.modules())
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():  # the checkpoint's projection biases are zeros: make them count
        for m in unet.modules():
            for proj in ([m.proj_in, m.proj_out] if isinstance(m, SpatialTransformer) else
                         [m.proj] if isinstance(m, GEGLU) else []):
                proj.bias.copy_(torch.randn(proj.bias.shape, generator=g) * 0.1)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 700.0]), torch.randn(2, 77, 768, generator=g)

    def run(x=x):
        return unet(x, t, context=ctx, transformer_options={})

    stock = _unet_grads(unet, run, cb, fast=False)
    n_geglu = sum(isinstance(m, GEGLU) for m in unet.modules())
    n_st = sum(isinstance(m, SpatialTransformer) for m in unet.modules())
    # ComfyUI's own linear layers take the fused LoRA product, in both runs
    n_tb = sum(isinstance(m, BasicTransformerBlock) for m in unet.modules())
    assert calls.take() == {"fused": _lora_layers(unet), "GEGLU": n_geglu, "SpatialTransformer": n_st,
                            "BasicTransformerBlock": n_tb}
    fast = _unet_grads(unet, run, cb, fast=True)
    n_res = sum(type(m).__name__ == "ResBlock" for m in unet.modules())
    assert fast[2] == {"layers": n_geglu + n_st + n_tb + _norm_forwards(unet), "group_norms": _norm_forwards(unet),
                       "res_blocks": n_res, "transformer_blocks": n_tb, "channel_cat": True}
    assert n_geglu + n_st > 0 and _norm_forwards(unet) > 0 and n_res > 0 and n_tb > 0
    assert calls.take() == {"fused": _lora_layers(unet), "GEGLU": 0, "SpatialTransformer": 0,
                            "BasicTransformerBlock": 0}  # no fallback
    # (the ResBlocks' folded additions and the transformer blocks' run PyTorch's operations here, the kernels in
    # test_train_kernels)
    assert _same(fast[0], stock[0]) and all(_same(a, b) for a, b in zip(fast[1], stock[1]))
    assert not any("forward" in m.__dict__ or "_forward" in m.__dict__ for m in unet.modules())  # given back
    from comfy.ldm.modules.diffusionmodules import openaimodel
    assert openaimodel.th is torch  # the UNet module's torch given back too
    # under autocast the transformer falls back to ComfyUI's forward: its blocks get the autocast dtype
    seen, block_forward = [], BasicTransformerBlock.forward
    # (recorded in the class's forward: a hook would itself turn the fast paths off)
    monkeypatch.setattr(BasicTransformerBlock, "forward",
                        lambda self, x, *a, **k: (seen.append(x.dtype), block_forward(self, x, *a, **k))[1])
    stock_bf16 = _unet_grads(unet, run, cb, fast=False, autocast=True)
    fast_bf16 = _unet_grads(unet, run, cb, fast=True, autocast=True)
    monkeypatch.setattr(BasicTransformerBlock, "forward", block_forward)
    assert seen and set(seen) == {torch.bfloat16}
    assert calls.take()["SpatialTransformer"] == 2 * n_st
    assert _same(fast_bf16[0], stock_bf16[0], rel=2e-2)
    # channels-last feature maps come back channels-last, with the same values
    nhwc = _unet_grads(unet, lambda: run(x.contiguous(memory_format=torch.channels_last)), cb, fast=True)
    assert _same(nhwc[0], stock[0]) and all(_same(a, b) for a, b in zip(nhwc[1], stock[1]))
    # a projection that is not a plain layer (weights cast per call, or a hook) leaves its block to the stock
    # forward
    st = next(m for m in unet.modules() if isinstance(m, SpatialTransformer))
    calls.take()
    st.proj_in.comfy_cast_weights = True
    try:
        cast = _unet_grads(unet, run, cb, fast=True)
    finally:
        st.proj_in.comfy_cast_weights = False
    assert calls.take()["SpatialTransformer"] == 1 and _same(cast[0], stock[0])
    hook = st.proj_out.register_forward_hook(lambda m, args, out: out)
    try:
        hooked = _unet_grads(unet, run, cb, fast=True)
    finally:
        hook.remove()
    assert calls.take()["SpatialTransformer"] == 1 and _same(hooked[0], stock[0])


def test_the_unet_module_joins_by_the_kernels_only_inside_the_fast_layers(comfy_backbone_module):
    """``fast_frozen_layers`` points ComfyUI's UNet module's torch at one whose ``cat`` is ``channel_cat.cat`` (every
    other name torch's), and back on exit, also after an error; with ``concat_kernels`` off it is left alone."""
    import comfy.sd
    from comfy.ldm.modules.diffusionmodules import openaimodel

    unet = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint()), output_vae=False,
                                                 output_clip=False)[0].model.diffusion_model
    cb = comfy_backbone_module
    with cb.fast_frozen_layers(unet) as fast:
        assert fast["channel_cat"] and openaimodel.th is not torch
        assert openaimodel.th.cat is cb.channel_cat.cat and openaimodel.th.float16 is torch.float16
        assert openaimodel.th.nn is torch.nn
        with cb.fast_frozen_layers(unet) as inner:  # nested: the outer one's stays, and is given back by it
            assert not inner["channel_cat"]
        assert openaimodel.th.cat is cb.channel_cat.cat
    assert openaimodel.th is torch
    with pytest.raises(RuntimeError), cb.fast_frozen_layers(unet):
        raise RuntimeError("a training step failed")
    assert openaimodel.th is torch
    with cb.fast_frozen_layers(unet, concat_kernels=False) as fast:
        assert not fast["channel_cat"] and openaimodel.th is torch


def test_lora_put_in_after_the_fast_layers_still_trains_the_convolutions_inside_them(comfy_backbone_module):
    """The trainer enters the fast layers before it puts the LoRA adapters in: a LoRA on the convolutions of a
    GroupNorm + SiLU Sequential (ResBlock's in and out layers) replaces layers the patched forward calls, and
    must be the one that runs."""
    import comfy.sd

    cb = comfy_backbone_module
    model = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint()), output_vae=False, output_clip=False)[0]
    unet = model.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 700.0]), torch.randn(2, 77, 768, generator=g)
    targets = ["to_q", "in_layers.2", "out_layers.3", "out.2"]
    grads = {}
    for fast in (False, True):
        with borrowed_weights(unet), cb.fast_frozen_layers(unet) if fast else contextlib.nullcontext(0), \
                lora_adapters(unet, targets, 4, 4, 0, product="fused", plain_linear=cb.plain_linear) as params:
            _factors_random(params)
            unet(x, t, context=ctx, transformer_options={}).square().mean().backward()
            grads[fast] = [p.grad.clone() for p in params]
    conv_factors = sum(p.ndim == 4 for p in params)
    assert conv_factors > 0 and all(float(gr.abs().max()) > 0 for gr in grads[False])
    assert len(grads[True]) == len(grads[False])
    assert all(float(a.abs().max()) > 0 and _same(a, b) for a, b in zip(grads[True], grads[False]))
    assert not any("forward" in m.__dict__ for m in unet.modules())


def test_fast_frozen_layers_train_the_same_on_comfyui_sdxl(comfy_backbone_module, monkeypatch):
    """SDXL's linear projections (ComfyUI's SDXL model class, tiny)."""
    from comfy.ldm.modules.attention import SpatialTransformer

    from test_train_sdxl import tiny_sdxl

    cb = comfy_backbone_module
    calls = _Calls(monkeypatch)
    unet = tiny_sdxl().model.diffusion_model
    assert any(isinstance(m, SpatialTransformer) and m.use_linear for m in unet.modules())
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 700.0])
    ctx, y = torch.randn(2, 77, 2048, generator=g), torch.randn(2, 2816, generator=g)

    def run():
        return unet(x, t, context=ctx, y=y, transformer_options={})

    stock = _unet_grads(unet, run, cb, fast=False)
    assert calls.take()["fused"] == _lora_layers(unet)
    fast = _unet_grads(unet, run, cb, fast=True)
    assert fast[2]["layers"] > fast[2]["group_norms"] > 0
    assert calls.take() == {"fused": _lora_layers(unet), "GEGLU": 0, "SpatialTransformer": 0,
                            "BasicTransformerBlock": 0}
    assert _same(fast[0], stock[0]) and all(_same(a, b) for a, b in zip(fast[1], stock[1]))


def _res_block(channels=32, out_channels=32, dropout=0.0):
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    torch.manual_seed(0)
    block = ResBlock(channels, 64, dropout, out_channels=out_channels, operations=comfy_ops())
    with torch.no_grad():
        for name, p in block.named_parameters():  # ComfyUI's classes leave their weights uninitialised
            p.copy_(torch.randn(p.shape) * 0.1 + (1.0 if name in ("in_layers.0.weight", "out_layers.0.weight") else 0))
    return block.requires_grad_(False)


def comfy_ops():
    import comfy.ops

    return comfy.ops.disable_weight_init


@pytest.mark.parametrize("out_channels", [32, 64])  # skip connection: nothing, or a 1x1 convolution
def test_a_resblock_with_its_additions_folded_computes_comfyuis_block(comfy_backbone_module, out_channels):
    """The folded ``_forward`` (conv biases and time embedding added by the norm and the last addition) gives
    ComfyUI's output and input gradient, in the map's layout; blocks it does not handle run ComfyUI's own."""
    cb = comfy_backbone_module
    block = _res_block(out_channels=out_channels)
    x = torch.randn(2, 32, 6, 6).contiguous(memory_format=torch.channels_last)
    emb = torch.randn(2, 64)
    outs = []
    for fast in (False, True):
        xi = x.clone().requires_grad_()
        with cb.fast_frozen_layers(block) if fast else contextlib.nullcontext() as patched:
            out = block(xi, emb)
            out.square().sum().backward()
        outs.append((out.detach(), xi.grad, patched))
    (o1, g1, _), (o2, g2, patched) = outs
    assert patched["res_blocks"] == 1 and "_forward" not in block.__dict__
    assert _same(o2, o1) and _same(g2, g1) and o2.is_contiguous(memory_format=torch.channels_last)
    # what the folded forward refuses: ComfyUI's _forward runs instead
    assert cb._resblock_parts(block) is not None
    hooked = _res_block()
    hooked.skip_connection.register_forward_hook(lambda *a: None)
    assert cb._resblock_parts(hooked) is None
    hooked = _res_block()
    hooked.in_layers[2].register_forward_pre_hook(lambda *a: None)
    assert cb._resblock_parts(hooked) is None
    dropping = _res_block(dropout=0.1).train()
    assert cb._resblock_parts(dropping) is None and cb._resblock_parts(dropping.eval()) is not None
    scale_shift = _res_block()
    scale_shift.use_scale_shift_norm = True
    assert cb._resblock_parts(scale_shift) is None


def _transformer_block(disable_self_attn=False):
    from comfy.ldm.modules.attention import BasicTransformerBlock

    torch.manual_seed(0)
    block = BasicTransformerBlock(32, 2, 16, context_dim=24, disable_self_attn=disable_self_attn,
                                  operations=comfy_ops())
    with torch.no_grad():
        for name, p in block.named_parameters():  # ComfyUI's classes leave their weights uninitialised
            norm_weight = ".norm" in "." + name and name.endswith("weight")
            p.copy_(torch.randn(p.shape) * 0.2 + (1.0 if norm_weight else 0.0))
    return block.requires_grad_(False)


@pytest.mark.parametrize("disable_self_attn", [False, True])
def test_a_transformer_block_with_its_norms_folded_computes_comfyuis_block(comfy_backbone_module, monkeypatch,
                                                                           disable_self_attn):
    """The training-only block (each residual addition and the LayerNorm after it as one call of
    ``add_layer_norm``) gives ComfyUI's output and the gradients of its input and of the text context; with
    patches set in transformer_options (as an IPAdapter or attention-coupling node sets them) ComfyUI's own
    forward runs, so those patches still apply. (Here, without Triton's interpreter, ``add_layer_norm`` runs
    PyTorch's operations: the block's wiring is what is checked; the kernels inside ComfyUI's UNet are checked
    by test_train_kernels.)"""
    from comfy.ldm.modules.attention import BasicTransformerBlock

    cb = comfy_backbone_module
    block = _transformer_block(disable_self_attn)
    x, ctx = torch.randn(2, 10, 32), torch.randn(2, 7, 24)
    stock_calls = []
    stock = BasicTransformerBlock.forward
    monkeypatch.setattr(BasicTransformerBlock, "forward",
                        lambda self, *a, **k: (stock_calls.append(1), stock(self, *a, **k))[1])
    runs = []
    for fast, options in ((False, {}), (True, {}), (True, {"patches_replace": {"attn1": {("input", 1, 0): None}}})):
        xi, ci = x.clone().requires_grad_(), ctx.clone().requires_grad_()
        stock_calls.clear()
        with cb.fast_frozen_layers(block) if fast else contextlib.nullcontext() as patched:
            if options:  # a replace patch for another block: ComfyUI's forward runs and ignores it
                out = block(xi, context=ci, transformer_options=options)
            else:
                out = block(xi, context=ci, transformer_options={})
            (out.square().sum() + out.sum()).backward()
        runs.append((out.detach(), xi.grad, ci.grad, len(stock_calls), patched))
    (o1, gx1, gc1, n1, _), (o2, gx2, gc2, n2, patched), (o3, gx3, gc3, n3, _) = runs
    assert patched["transformer_blocks"] == 1 and "forward" not in block.__dict__
    assert (n1, n2, n3) == (1, 0, 1)
    for o, gx, gc in ((o2, gx2, gc2), (o3, gx3, gc3)):
        assert _same(o, o1) and _same(gx, gx1) and _same(gc, gc1)
    assert cb._plain_transformer_block(block)
    hooked = _transformer_block()
    hooked.norm2.register_forward_hook(lambda *a: None)
    assert not cb._plain_transformer_block(hooked)


def test_a_fast_transformer_block_runs_the_projections_of_one_input_as_one(comfy_backbone_module, monkeypatch):
    """LoRA merged on the attention, as the trainer's defaults train: in the training-only block the
    self-attention's q, k and v are one multiply, and so are the cross-attention's k and v over the text
    (``stacked_projection``), with ComfyUI's output and the same gradients for the input, the text and every
    factor; with ``block_merge`` off, or an attention override a custom node set in transformer_options, each
    projection runs its own forward."""
    cb = comfy_backbone_module
    block = _transformer_block()
    x, ctx = torch.randn(4, 64, 32), torch.randn(4, 7, 24)  # 256 tokens: the self-attention's adapters merge
    # (the pack's copy of lora_layers, which the backbone calls)
    stacked = _count(monkeypatch, sys.modules[cb.stacked_projection.__module__]._MergedLoRAStack)
    overridden = []

    def override(func, *args, **kwargs):
        overridden.append(args[0].is_contiguous())
        return func(*args, **kwargs)

    def run(fast, stack=True, options=None):
        xi, ci = x.clone().requires_grad_(), ctx.clone().requires_grad_()
        with cb.fast_frozen_layers(block, block_merge=stack) if fast else contextlib.nullcontext(), \
                lora_adapters(block, ["to_q", "to_k", "to_v", "to_out.0"], 4, 4, 0, product="merged",
                              plain_linear=cb.plain_linear) as params:
            _factors_random(params)
            out = block(xi, context=ci, transformer_options=options or {})
            (out.square().sum() + out.sum()).backward()
            return out.detach(), xi.grad, ci.grad, [p.grad.clone() for p in params]

    stock = run(False)
    assert stacked == []
    runs = [run(True)]
    assert stacked == [1, 1]  # q, k, v; then k, v of the text (7 tokens: alone, each would take the fused product)
    runs += [run(True, stack=False), run(True, options={"optimized_attention_override": override})]
    assert stacked == [1, 1] and overridden == [True, True]  # both attentions, given contiguous q, k, v
    for out, gx, gc, grads in runs:
        assert _same(out, stock[0]) and _same(gx, stock[1]) and _same(gc, stock[2])
        assert len(grads) == 16 and all(_same(a, b) for a, b in zip(grads, stock[3]))
    assert not any("forward" in m.__dict__ for m in block.modules())


def test_gradient_checkpointing_still_recomputes_a_transformer_block_with_its_fast_forward(comfy_backbone_module,
                                                                                          monkeypatch):
    """The trainer enters the fast layers before gradient checkpointing: a block given the training-only forward
    is still wrapped (and recomputed in backward), with the same gradients, and each context gives back what it
    found on exit."""
    cb = comfy_backbone_module
    block = _transformer_block()
    x, ctx = torch.randn(2, 10, 32), torch.randn(2, 7, 24)

    def grads():
        xi = x.clone().requires_grad_()
        block(xi, context=ctx, transformer_options={}).square().sum().backward()
        return xi.grad

    stock = grads()
    recomputed = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda *a, **k: (recomputed.append(1), checkpoint(*a, **k))[1])
    with cb.fast_frozen_layers(block) as patched:
        fast_forward = block.__dict__["forward"]
        with gradient_checkpointing(block, True) as wrapped:
            assert wrapped == 1 and block.__dict__["forward"] is not fast_forward
            checkpointed = grads()
        assert block.__dict__["forward"] is fast_forward
    assert patched["transformer_blocks"] == 1 and "forward" not in block.__dict__
    assert recomputed == [1] and _same(checkpointed, stock)


def test_the_spatial_transformer_keeps_a_channels_last_map_with_pytorchs_groupnorm(comfy_backbone_module):
    """channels_last on with the GroupNorm kernels off: the transformer's input norm gives NCHW, its output still
    goes back channels-last as the map came (and equals ComfyUI's)."""
    import comfy.sd
    from comfy.ldm.modules.attention import SpatialTransformer

    cb = comfy_backbone_module
    model = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint()), output_vae=False, output_clip=False)[0]
    st = next(m for m in model.model.diffusion_model.modules() if isinstance(m, SpatialTransformer))
    c = st.norm.num_channels
    x = torch.randn(2, c, 4, 4).contiguous(memory_format=torch.channels_last)
    ctx = torch.randn(2, 77, 768)
    with torch.no_grad():
        stock = st(x, context=ctx)
        with cb.fast_frozen_layers(st, group_norm_kernels=False):
            fast = st(x, context=ctx)
    assert fast.is_contiguous(memory_format=torch.channels_last) and _same(fast, stock, 1e-4)


@pytest.mark.host  # slow layer: two short trainings of the tiny checkpoint
def test_the_node_backbone_trains_the_same_loras_with_and_without_the_fast_paths(comfy_backbone_module):
    """Through the node's own backbone (as TrainFaceLoRA builds it): the defaults (fused product, fast frozen
    layers) and the stock computation give the same losses and the same LoRA."""
    import comfy.sd

    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint()), output_vae=True,
                                                             output_clip=True)[:3]
    backbone = comfy_backbone_module.comfy_backbone(model, clip, vae, (64, 64))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 64, 64, 3, generator=g)
    captions = ["a photo of fcsks"] * 4
    runs = {}
    for name, changes in (("defaults", {}), ("stock", dict(lora_compute="activations", fast_frozen_layers=False))):
        settings = TrainSettings().with_(samples=12, batch_size=2, save_dtype="float32", **changes)
        runs[name] = train_lora(backbone, images, captions, settings)
    a, b = runs["defaults"], runs["stock"]
    assert len(a.losses) == len(b.losses) == 6
    assert max(abs(p - q) for p, q in zip(a.losses, b.losses)) < 1e-5, (a.losses, b.losses)
    assert a.lora.keys() == b.lora.keys()
    # Adam scales each step by the gradient's own size, so the two computations' float32 rounding (other orders of
    # the same sums) moves a factor by up to ~1e-3 of its largest value after 6 steps (7.4e-4 seen on an AMD EPYC
    # host; a wrong gradient moves it by its own size)
    assert all(_same(a.lora[k], b.lora[k], rel=3e-3) for k in a.lora if a.lora[k].abs().max() > 0)
    assert not any("forward" in m.__dict__ for m in backbone.unet.modules())
