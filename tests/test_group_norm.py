"""The pack's GroupNorm (+SiLU) kernels (facechain_core/train/group_norm.py): run by Triton's interpreter on the
CPU against PyTorch (float64), alone and inside the tiny ComfyUI UNet; where they cannot run, PyTorch's own
GroupNorm; and the trainer's channels_last "auto" that follows them. Their speed is measured on a GPU by
benchmarks/bench_group_norm.py and bench_train.py, not here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from facechain_core.train import group_norm as gn
from facechain_core.train.settings import TrainSettings

SCRIPT = Path(__file__).resolve().parent / "group_norm_interpreted.py"
TOLERANCE = {"float32": 1e-5, "float16": 3e-3, "bfloat16": 2e-2}


def _interpreted(part: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "FACECHAIN_EMBEDDED_DIR"}
    env["TRITON_INTERPRET"] = "1"
    run = subprocess.run([sys.executable, str(SCRIPT), part], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_the_kernels_give_pytorchs_groupnorm_and_its_gradient_in_the_maps_own_layout():
    cases = _interpreted("kernels")["cases"]
    assert len(cases) == 8
    # the small channels-last maps take the whole-group kernels (each also checked split); NCHW maps are split
    assert [c["whole"] for c in cases] == [True, False, True, False, True, False, True, False], cases
    for c in cases:
        assert c["same_layout"], c
        assert c["out_err"] < TOLERANCE[c["dtype"]], c
        assert c["grad_err"] < TOLERANCE[c["dtype"]], c
        if c["whole"]:
            assert c["split_out_err"] < TOLERANCE[c["dtype"]] and c["split_grad_err"] < TOLERANCE[c["dtype"]], c
    # the mean-far-from-zero case would lose its variance to cancellation without the shift
    assert any(c["offset"] > 0 and c["out_err"] < 1e-4 for c in cases)


@pytest.mark.host  # slow layer: ComfyUI's UNet through the interpreter
def test_the_comfyui_unet_trains_the_same_with_every_groupnorm_on_the_kernels():
    r = _interpreted("unet")
    assert r["norms"] > 0 and r["kernel_calls"] == r["norms"], r
    assert r["out_err"] < 1e-4 and r["grad_err"] < 1e-4 and r["grads"] > 0, r
    assert r["nhwc_out"] == [True, True] and r["patched_left"] == 0, r


def test_where_the_kernels_cannot_run_pytorchs_groupnorm_runs(monkeypatch, caplog):
    x = torch.randn(2, 8, 4, 4)
    w, b = torch.randn(8), torch.randn(8)
    assert not gn.available(torch.device("cpu")) and not gn.usable(x, w, b)  # a CPU without the interpreter
    assert torch.equal(gn.group_norm(x, 4, w, b, 1e-5, silu=True), F.silu(F.group_norm(x, 4, w, b, 1e-5)))
    assert torch.equal(gn.group_norm(x, 4, w, b), F.group_norm(x, 4, w, b))
    # a Triton that imports but cannot build or run them (or gives wrong results) is found out by one small
    # first run, and PyTorch's GroupNorm is used from then on
    monkeypatch.setattr(gn, "available", lambda device: True)
    monkeypatch.setattr(gn, "_WORKS", {})

    def broken(*args):
        raise RuntimeError("PTX JIT compilation failed")

    monkeypatch.setattr(gn._GroupNormAct, "apply", broken)
    assert not gn.works(x.device, x.dtype) and not gn.usable(x, w, b)
    assert torch.equal(gn.group_norm(x, 4, w, b, 1e-5, silu=True), F.silu(F.group_norm(x, 4, w, b, 1e-5)))
    monkeypatch.setattr(gn, "_WORKS", {})
    monkeypatch.setattr(gn._GroupNormAct, "apply", lambda x, *args: (x * 2).requires_grad_())
    with caplog.at_level("WARNING"):
        assert not gn.works(x.device, x.dtype)
    assert "GroupNorm kernels gave wrong results" in caplog.text
    # whole-group kernels that fail their first run alone: the split ones still run, small maps included
    monkeypatch.setattr(gn, "_WORKS", {(str(x.device), x.dtype): True})
    monkeypatch.setattr(gn, "_WHOLE_WORKS", {})
    small = x.contiguous(memory_format=torch.channels_last)

    def whole_broken(x, groups, w, b, eps, silu, add, with_input, whole):
        if whole:
            raise RuntimeError("PTX JIT compilation failed")
        return x

    monkeypatch.setattr(gn._GroupNormAct, "apply", whole_broken)
    assert gn.works(x.device, x.dtype) and not gn.whole_works(x.device, x.dtype)
    assert gn.usable(small, w, b) and not gn._whole(small, 4)
    # where they can run, each case they do not handle still goes to PyTorch
    monkeypatch.setattr(gn, "works", lambda device, dtype: True)
    assert gn.usable(x, w, b) and gn.usable(x.contiguous(memory_format=torch.channels_last), None, None)
    assert not gn.usable(x, w.clone().requires_grad_(), b)  # no gradients for the norm's own weights
    assert not gn.usable(x.transpose(2, 3), w, b)  # neither NCHW nor channels-last
    assert not gn.usable(x.long(), None, None) and not gn.usable(x[:, :, 0, 0], w, b)
    assert not gn.usable(x, w[:4], b)  # a weight per channel, or the kernels would read past it
    assert not gn.usable(x.flatten()[1:].view(1, -1)[..., :127].reshape(1, 127, 1), None, None)  # misaligned
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast computes GroupNorm in float32
        assert not gn.usable(x, w, b)


def test_channels_last_auto_follows_the_groupnorm_kernels(monkeypatch):
    """NHWC only where the GroupNorms will keep it: taken over by the fast layers, no autocast, kernels that
    work here."""
    from facechain_core.train.trainer import Backbone, LoRATrainer

    assert TrainSettings().channels_last == "auto" and TrainSettings().group_norm_kernels is True
    with pytest.raises(Exception, match="channels_last must be true, false or auto"):
        TrainSettings().with_(channels_last="yes").validate()
    unet = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3))
    fields = dict(arch="sd15", unet=unet, unet_naming="ldm", num_res_blocks=[1], predict_noise=None,
                  alphas_cumprod=torch.ones(10), device=torch.device("cpu"), encode_images=None,
                  encode_text=None, text_encoders=[], size_multiple=8)

    def nhwc(settings, group_norms=10, use_autocast=False):
        trainer = LoRATrainer(Backbone(**fields), settings)
        trainer.use_autocast = use_autocast
        return trainer.channels_last(group_norms)

    on = TrainSettings()
    assert not nhwc(on)  # the CPU: no kernels, so NCHW
    monkeypatch.setattr(gn, "works", lambda device, dtype: True)
    assert nhwc(on)
    assert not nhwc(on, group_norms=0)  # no GroupNorm taken over (other host, kernels off): PyTorch's GroupNorm
    assert not nhwc(on, use_autocast=True)  # autocast runs GroupNorm in float32, through PyTorch
    assert nhwc(on.with_(channels_last=True), group_norms=0) and not nhwc(on.with_(channels_last=False))
    monkeypatch.setattr(gn, "works", lambda device, dtype: False)  # Triton there but failing: PyTorch's
    assert not nhwc(on)
