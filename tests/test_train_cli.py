"""The standalone trainer: `python -m facechain_core train` on the tiny checkpoint writes a kohya LoRA that the
real host's stock LoraLoader applies in full (every key mapped) and that changes what the model samples."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open

from conftest import COMFY_DIR, FACES, REPO, TINY_CKPT
from test_train_lora import fetch_latent, sample_nodes, tiny_unet_fingerprint


def run_cli(*args):
    # CLIP's tokenizer files: outside ComfyUI the command takes them from this variable (ComfyUI's copy here)
    env = dict(os.environ, PYTHONUNBUFFERED="1", FACECHAIN_CLIP_TOKENIZER=str(COMFY_DIR / "comfy" / "sd1_tokenizer"))
    return subprocess.run([sys.executable, "-m", "facechain_core", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_trains_on_tiny_checkpoint_and_host_loads_the_file(client, comfy_server, comfy_base, tmp_path):
    folder = comfy_base / "models" / "loras" / "cli"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "obama_cli.safetensors"
    captions = tmp_path / "captions.txt"
    captions.write_text("a portrait photo of a man\n")
    r = run_cli("train", "--images", str(FACES / "obama"), "--checkpoint", str(TINY_CKPT), "--out", str(out),
                "--size", "64", "--samples", "16", "--batch-size", "4", "--lr", "1e-3", "--captions", str(captions))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "LoRA saved" in r.stdout
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert all(k.startswith("lora_unet_") for k in keys) and len(keys) == 32 * 3
    assert "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in keys
    assert meta["facechain_trigger"] == "fcsks"
    assert meta["facechain_captions"].count("fcsks, a portrait photo of a man") == 4
    # the same base-model hash as the node computes from ComfyUI's loaded UNet
    assert meta["facechain_base_model_hash"] == tiny_unet_fingerprint()

    log_before = comfy_server.log_path.read_text(errors="replace")
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_CKPT.name}},
              "10": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                            "lora_name": "cli/obama_cli.safetensors",
                                                            "strength_model": 1.0, "strength_clip": 1.0}}}
    prompt.update(sample_nodes("q", ["10", 0], ["10", 1], "q9", seed=21))
    prompt.update(sample_nodes("p", ["1", 0], ["1", 1], "p9", seed=21))
    entry = client.run(prompt)
    new_log = comfy_server.log_path.read_text(errors="replace")[len(log_before):]
    assert "lora key not loaded" not in new_log and "NOT LOADED" not in new_log, new_log[-2000:]
    with_lora, base = fetch_latent(client, entry, "q9"), fetch_latent(client, entry, "p9")
    assert np.abs(with_lora - base).max() > 1e-3


@pytest.mark.host  # slow layer: heavy, though no server
def test_cli_refuses_to_overwrite_and_bad_checkpoint(tmp_path):
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"keep")
    r = run_cli("train", "--images", str(FACES / "obama"), "--checkpoint", str(TINY_CKPT), "--out", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr
    assert out.read_bytes() == b"keep"
    bogus = tmp_path / "not_sd.safetensors"
    from safetensors.torch import save_file
    import torch

    save_file({"w": torch.zeros(2)}, str(bogus))
    r = run_cli("train", "--images", str(FACES / "obama"), "--checkpoint", str(bogus), "--out",
                str(tmp_path / "y.safetensors"), "--size", "64")
    assert r.returncode == 2 and "SD1.5" in r.stderr, r.stderr
    assert not (tmp_path / "y.safetensors").exists()
