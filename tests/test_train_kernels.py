"""Rounds seven to ten's training kernels: GEGLU in one projection and one pass each way
(facechain_core/train/geglu.py), GroupNorm of ``x + add`` (the ResBlock's time embedding and convolution bias
folded into the norm), the ResBlock's ``skip + h + bias`` in one pass (fused_add.py), the transformer
blocks' residual addition with the LayerNorm after it (layer_norm.py), several LoRA adapters merged into
their weights in one launch (lora_merge.py), and the up path's joins of channels-last maps (channel_cat.py).
Run by Triton's interpreter on the CPU against float64 PyTorch, alone and inside the tiny ComfyUI UNet in the
trainer's order; where they cannot run, PyTorch's own computation. Their speed is measured on a GPU by
benchmarks/bench_train.py and profile_train.py, not here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from facechain_core.train import channel_cat, fused_add, geglu, layer_norm
from facechain_core.train import group_norm as gn
from facechain_core.train.settings import TrainSettings
from test_group_norm import TOLERANCE, _interpreted


def test_the_kernels_give_pytorchs_results_and_gradients():
    cases = _interpreted("more")["cases"]
    kinds = [c["kind"] for c in cases]
    assert kinds.count("group_norm_add") == 5 and kinds.count("add_bias") == 5 and kinds.count("geglu") == 4
    assert kinds.count("layer_norm") == 5 and kinds.count("layer_norm_sum_only") == 1
    assert [c["kernel"] for c in cases if c["kind"] == "group_norm_and_input"] == [True, True]
    assert all(c["kernel"] for c in cases if c["kind"] == "layer_norm")
    assert [c["alias"] for c in cases if c["kind"] == "layer_norm"] == [True, False, False, False, False]
    assert [c["kernel"] for c in cases if c["kind"] == "group_norm_add_grad"] == [True]
    assert kinds.count("lora_merge") == 4
    (pre,) = [c for c in cases if c["kind"] == "premerge"]
    assert pre["merged_ahead"] == 4 and pre["held"] == [True] * 4 and pre["taken"] == [True] * 4, pre
    assert pre["stale_skipped"] and pre["dropped"] and pre["few_tokens"] == 0, pre
    assert [c["checks"] for c in cases if c["kind"] == "lora_merge_refused"] == [[True, True, True, True]]
    joins = [c for c in cases if c["kind"] == "channel_cat"]
    assert len(joins) == 3 and all(c["kernel"] and c["exact"] for c in joins), joins
    assert [c["checks"] for c in cases if c["kind"] == "channel_cat_refused"] == [[True] * 6]
    assert [(c["gradient"], c["exact"]) for c in cases if c["kind"] == "channel_cat_other_gradient"] == [
        ("nchw", True), ("misaligned", True)]
    for c in cases:
        assert c["same_layout"], c
        assert c["out_err"] < TOLERANCE[c["dtype"]], c
        assert c["grad_err"] < TOLERANCE[c["dtype"]], c
    # the added values far larger than the map's spread: the norm's shift includes them, or the variance is lost
    assert any(c["kind"] == "group_norm_add" and c["offset"] > 0 and c["out_err"] < 1e-4 for c in cases)
    assert any(c["kind"] == "layer_norm" and c["offset"] > 0 and c["out_err"] < 1e-4 for c in cases)


@pytest.mark.host  # slow layer: ComfyUI's UNet through the interpreter
def test_the_comfyui_unet_trains_the_same_with_its_resblocks_and_geglus_on_the_kernels():
    """The trainer's defaults on ComfyUI's tiny SD1.5 UNet (LoRA on the attention, merged where it pays, fast
    layers, channels-last): every ResBlock folds its additions into the kernels, every GEGLU runs its kernels,
    every transformer block its additions and LayerNorms (its attention's adapters merged ahead, the self-attention's
    q, k and v and the cross-attention's k and v each as one multiply), and the output and the LoRA gradients are
    ComfyUI's stock forwards' with peft's product."""
    r = _interpreted("unet_blocks")
    assert r["transformer_blocks"] > 0 and r["transformer_blocks_patched"] == r["transformer_blocks"], r
    assert r["layer_norm_calls"] == 3 * r["transformer_blocks"], r
    assert r["res_blocks"] > 0 and r["folded"] == r["res_blocks"] and r["add_calls"] == r["res_blocks"], r
    assert r["norms"] > 0 and r["kernel_calls"] == r["norms"], r
    assert r["gegLUs"] > 0 and r["geglu_calls"] == r["gegLUs"], r
    assert r["merged_calls"] > 0, r  # the first level's adapters are merged, the lower levels' are not
    # each block's merging adapters merged ahead, the stock run (peft's product) none: 6 for the hidden states,
    # 2 (the cross-attention's k and v) for the text, and every merged layer's call given its weight merged ahead
    assert r["merge_launches"] == [6, 2] * r["transformer_blocks"], r
    assert r["stacked_calls"] == 2 * r["transformer_blocks"], r
    assert r["premerged"] == {"merged": [True] * r["merged_calls"], "stacked": [True] * r["stacked_calls"]}, r
    assert r["cat_calls"] == r["joins"] > 0, r  # every skip connection joined by the kernels
    assert r["out_err"] < 1e-4 and r["grad_err"] < 1e-4 and r["grads"] > 0, r
    assert r["nhwc_out"] == [True, True] and r["patched_left"] == 0, r


def test_where_the_kernels_cannot_run_pytorch_computes_the_same():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 5, 16), torch.randn(64, 16) * 0.2, torch.randn(64) * 0.1
    assert not geglu.usable(x, w, b)  # a CPU without the interpreter
    value, gate = F.linear(x, w, b).chunk(2, dim=-1)
    assert torch.equal(geglu.geglu(x, w, b), value * F.gelu(gate))
    m = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    other, bias = torch.randn_like(m), torch.randn(8)
    assert not fused_add.usable(m, other, bias)
    assert torch.equal(fused_add.add(m, other, bias), m + other + bias[None, :, None, None])
    add = torch.randn(2, 8)
    assert torch.equal(gn.group_norm(m, 4, None, None, 1e-5, silu=True, add=add),
                       F.silu(F.group_norm(m + add[:, :, None, None], 4, None, None, 1e-5)))
    same, y = gn.group_norm_and_input(m, 4, None, None, 1e-5, silu=True)
    assert same is m and torch.equal(y, F.silu(F.group_norm(m, 4, None, None, 1e-5)))
    t, h, lw, lb = torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.randn(16), torch.randn(16)
    assert not layer_norm.usable(t, h, lw, lb)
    s, y = layer_norm.add_layer_norm(t, h, lw, lb, 1e-5)
    assert torch.equal(s, t + h) and torch.equal(y, F.layer_norm(t + h, (16,), lw, lb, 1e-5))
    s, y = layer_norm.add_layer_norm(t, None, lw, lb, 1e-5)
    assert s is t and torch.equal(y, F.layer_norm(t, (16,), lw, lb, 1e-5))
    assert not channel_cat.usable([m, m], 1)
    assert torch.equal(channel_cat.cat([m, other], dim=1), torch.cat([m, other], 1))
    out = torch.empty(2, 16, 4, 4)
    assert channel_cat.cat((m, other), 1, out=out) is out and torch.equal(out, torch.cat([m, other], 1))


def test_each_case_the_kernels_do_not_handle_goes_to_pytorch(monkeypatch):
    monkeypatch.setattr(gn, "works", lambda device, dtype: True)
    monkeypatch.setattr(geglu, "works", lambda device, dtype: True)
    monkeypatch.setattr(fused_add, "works", lambda device, dtype: True)
    monkeypatch.setattr(layer_norm, "works", lambda device, dtype: True)
    x, w, b = torch.randn(2, 5, 16), torch.randn(64, 16), torch.randn(64)
    assert geglu.usable(x, w, b) and geglu.usable(x, w, None)
    assert not geglu.usable(x, w.clone().requires_grad_(), b)  # the projection must be frozen
    assert not geglu.usable(x, torch.randn(36, 16), None)  # halves of 18: not 16-byte aligned rows
    assert not geglu.usable(x, torch.randn(63, 16), None) and not geglu.usable(x, w.half(), b.half())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast picks each op's precision: leave it to PyTorch
        assert not geglu.usable(x, w, b)
    m = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    assert fused_add.usable(m, torch.randn_like(m), torch.randn(8)) and fused_add.usable(m, m.clone(), None)
    assert not fused_add.usable(m, m.contiguous(), None)  # the two maps in different layouts
    assert not fused_add.usable(m[:0], m[:0].clone(), None)  # an empty batch
    assert not fused_add.usable(m, torch.randn_like(m), torch.randn(8, requires_grad=True))
    assert not fused_add.usable(m, torch.randn_like(m), torch.randn(4))
    assert not fused_add.usable(m[:, :, :2], m[:, :, :2].clone(), None)  # neither NCHW nor channels-last
    ok = torch.randn(2, 8)
    assert gn.usable(m, None, None, ok)
    assert not gn.usable(m, None, None, ok.t().contiguous().t())  # not contiguous
    assert not gn.usable(m, None, None, torch.randn(2, 4)) and not gn.usable(m, None, None, ok.requires_grad_())
    t, lw = torch.randn(2, 5, 16), torch.randn(16)
    assert layer_norm.usable(t, t.clone(), lw, lw) and layer_norm.usable(t, None, None, None)
    assert not layer_norm.usable(t.transpose(0, 1), None, lw, lw)  # rows not contiguous
    assert not layer_norm.usable(t, t.half(), lw, lw)  # the two inputs in different dtypes
    assert not layer_norm.usable(t, None, lw.clone().requires_grad_(), None)  # the norm's weight must be frozen
    assert not layer_norm.usable(t, None, torch.randn(8), None)  # a weight per value of the row
    assert not layer_norm.usable(torch.randn(2, 9000), None, None, None)  # rows wider than a program reads
    assert not layer_norm.usable(t[:0], None, None, None)  # nothing to normalise
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast runs LayerNorm in float32: leave it to PyTorch
        assert not layer_norm.usable(t, None, lw, lw)


def _refused_first_runs(monkeypatch, module, function, wrong, device, dtype):
    """A Triton that imports but cannot build or run ``module``'s kernels, then one whose kernels give wrong
    results: each is found out by the first small run (``works`` False), from a fresh per-process record."""
    monkeypatch.setattr(module, "available", lambda device: True)

    def broken(*args):
        raise RuntimeError("PTX JIT compilation failed")

    for apply in (broken, wrong):
        monkeypatch.setattr(module, "_WORKS", {})
        monkeypatch.setattr(function, "apply", apply)
        assert not module.works(device, dtype)


def test_a_geglu_kernel_that_fails_its_first_run_is_not_used(monkeypatch):
    x, w = torch.randn(2, 5, 16), torch.randn(64, 16)
    _refused_first_runs(monkeypatch, geglu, geglu._GEGLU,
                        lambda x, w, b: geglu.reference(x, w, b) * 1.5, x.device, x.dtype)  # wrong results
    assert not geglu.usable(x, w, None)
    value, gate = F.linear(x, w).chunk(2, dim=-1)
    assert torch.equal(geglu.geglu(x, w), value * F.gelu(gate))


def test_an_addition_kernel_that_fails_its_first_run_is_not_used(monkeypatch):
    m = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    other, bias = torch.randn_like(m), torch.randn(8)
    _refused_first_runs(monkeypatch, fused_add, fused_add._AddBias, lambda a, b, bias: a + b,  # the bias forgotten
                        m.device, m.dtype)
    assert not fused_add.usable(m, other, bias)
    assert torch.equal(fused_add.add(m, other, bias), m + other + bias[None, :, None, None])


def test_a_layer_norm_kernel_that_fails_its_first_run_is_not_used(monkeypatch):
    t, h, w = torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.randn(16)
    _refused_first_runs(monkeypatch, layer_norm, layer_norm._AddLayerNorm,  # the residual forgotten
                        lambda x, h, w, b, eps: layer_norm.reference(x, None, w, b, eps), t.device, t.dtype)
    assert not layer_norm.usable(t, h, w, None)
    s, y = layer_norm.add_layer_norm(t, h, w, None, 1e-5)
    assert torch.equal(s, t + h) and torch.equal(y, F.layer_norm(t + h, (16,), w, None, 1e-5))


def test_a_channel_join_kernel_that_fails_its_first_run_is_not_used(monkeypatch):
    m = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    other = torch.randn(2, 4, 4, 4).contiguous(memory_format=torch.channels_last)
    _refused_first_runs(monkeypatch, channel_cat, channel_cat._ChannelCat,
                        lambda *parts: torch.cat(parts[::-1], 1), m.device, m.dtype)  # the maps in the wrong order
    assert not channel_cat.usable([m, other], 1)
    assert torch.equal(channel_cat.cat([m, other], 1), torch.cat([m, other], 1))


def test_an_addition_that_needs_a_gradient_is_added_before_the_norm():
    """A LoRA on a ResBlock's time-embedding layer: the addition needs a gradient, which the kernels do not
    give; it is added to the map first, and its gradient is PyTorch's."""
    torch.manual_seed(0)
    m = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    add = torch.randn(2, 8, requires_grad=True)
    y = gn.group_norm(m, 4, None, None, 1e-5, silu=True, add=add)
    y.square().sum().backward()
    add_ref = add.detach().clone().requires_grad_()
    F.silu(F.group_norm(m + add_ref[:, :, None, None], 4)).square().sum().backward()
    assert torch.allclose(add.grad, add_ref.grad, atol=1e-6) and add.grad.abs().sum() > 0
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_geglu_kernels_are_a_default_setting():
    assert TrainSettings().geglu_kernels is True and TrainSettings().with_(geglu_kernels=False).geglu_kernels is False


def test_layer_norm_kernels_are_a_default_setting():
    assert TrainSettings().layer_norm_kernels is True
    assert TrainSettings().with_(layer_norm_kernels=False).layer_norm_kernels is False


def test_merging_a_blocks_adapters_ahead_is_a_default_setting():
    assert TrainSettings().block_merge is True
    assert TrainSettings().with_(block_merge=False).block_merge is False


def test_joining_the_skip_connections_by_the_kernels_is_a_default_setting():
    assert TrainSettings().concat_kernels is True
    assert TrainSettings().with_(concat_kernels=False).concat_kernels is False
