"""ApplyStyleLoRA and the style catalogue, through the real host on the tiny checkpoint.

The face LoRAs here are made by the tests: kohya-named low-rank deltas for the tiny UNet's attention
and the text encoder, with shapes read from the checkpoint itself, the format TrainFaceLoRA writes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import TINY_CKPT, expect_node_error, png_arrays
from facechain_core import styles
from facechain_core.errors import FaceChainError

TEST_FACE_LORA = "facechain_test/face_a.safetensors"
_UNET_ATTN = re.compile(r"^model\.diffusion_model\.(.+\.attn[12]\.(?:to_q|to_k|to_v|to_out\.0))\.weight$")
_CLIP_ATTN = re.compile(r"^cond_stage_model\.transformer\."
                        r"(text_model\.encoder\.layers\.\d+\.self_attn\.[qkv]_proj)\.weight$")


def make_lora(path: Path, seed: int, scale: float = 0.6, rank: int = 4) -> Path:
    """A kohya-format LoRA for the tiny checkpoint's attention layers and text encoder."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    with safe_open(str(TINY_CKPT), "pt") as f:
        for key in f.keys():
            for pattern, prefix in ((_UNET_ATTN, "lora_unet_"), (_CLIP_ATTN, "lora_te_")):
                m = pattern.match(key)
                if not m:
                    continue
                out_dim, in_dim = f.get_slice(key).get_shape()[:2]
                name = prefix + m.group(1).replace(".", "_")
                sd[f"{name}.lora_down.weight"] = torch.randn(rank, in_dim, generator=gen) * scale / in_dim ** 0.5
                sd[f"{name}.lora_up.weight"] = torch.randn(out_dim, rank, generator=gen) * scale
                sd[f"{name}.alpha"] = torch.tensor(float(rank))
    assert sd, "no attention weights found in the tiny checkpoint"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.fixture(scope="session")
def face_lora(comfy_base) -> str:
    make_lora(comfy_base / "models" / "loras" / TEST_FACE_LORA, seed=11)
    return TEST_FACE_LORA


def style_prompt(style: str, face_lora: str = "none", face_weight: float = -1.0, style_weight: float = -1.0,
                 face_path: str | None = None, seed: int = 7, size: int = 64, steps: int = 3,
                 prefix: str = "style") -> dict:
    p = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_CKPT.name}},
        "2": {"class_type": "FaceChainApplyStyleLoRA", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "style": style, "face_lora": face_lora,
            "face_weight": face_weight, "style_weight": style_weight, "trigger": "fcsks",
            "subject": "a handsome man", "shared_tags": "short hair, smile", "extra_prompt": ""}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": ["2", 2], "clip": ["2", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": ["2", 3], "clip": ["2", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
            "seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
    }
    if face_path is not None:
        p["9"] = {"class_type": "PrimitiveString", "inputs": {"value": face_path}}
        p["2"]["inputs"]["face_lora_path"] = ["9", 0]
    return p


def run_style(client, **kw) -> tuple[np.ndarray, str]:
    entry = client.run(style_prompt(**kw))
    (img,) = png_arrays(client.output_images(entry, "8"))
    return img, "\n".join(entry["outputs"]["2"]["text"])


def test_catalogue_has_twelve_styles_with_previews_and_sources(object_info):
    cat = styles.load_catalogue([styles.BUILTIN_DIR])
    assert not cat.problems, cat.problems
    assert len(cat.styles) >= 12
    prompt_only = [s for s in cat.styles.values() if s.prompt_only]
    with_lora = [s for s in cat.styles.values() if not s.prompt_only]
    assert len(prompt_only) >= 4 and len(with_lora) >= 4
    for s in cat.styles.values():
        assert s.preview is not None and s.preview.is_file(), s.name
        with Image.open(s.preview) as im:
            assert im.size == (styles.PREVIEW_SIZE, styles.PREVIEW_SIZE)
        assert 0.0 < s.face_lora_weight <= 1.0 and s.positive
    for s in with_lora:
        assert s.style_lora.file.startswith(styles.LORA_SUBFOLDER + "/")
        assert s.style_lora.source.get("modelscope") and s.style_lora.source.get("file"), s.name
        assert 0.1 <= s.style_lora.weight <= 0.6
    listed = object_info["FaceChainApplyStyleLoRA"]["input"]["required"]["style"][0]
    assert set(cat.styles) <= set(listed)


def test_prompt_only_style_samples_with_face_lora_and_writes_facechain_prompt(client, face_lora):
    img, report = run_style(client, style="Film Noir", face_lora=face_lora, prefix="style_noir")
    assert img.shape == (64, 64, 3) and img.std() > 1.0
    positive = re.search(r"^Positive: (.*)$", report, re.M).group(1)
    negative = re.search(r"^Negative: (.*)$", report, re.M).group(1)
    # FaceChain's order: trigger, subject phrase, shared tags, then the style's text.
    assert positive.startswith("fcsks, a handsome man, short hair, smile, black and white photograph")
    assert "colour" in negative and "lowres" in negative
    assert "Face LoRA: face_a.safetensors at 0.95" in report and "prompt only" in report


def test_face_lora_changes_the_image_and_weight_zero_does_not(client, face_lora, comfy_server):
    base, _ = run_style(client, style="Studio Headshot", prefix="style_base")
    with_face, _ = run_style(client, style="Studio Headshot", face_lora=face_lora, face_weight=1.0, prefix="style_face")
    zero, report = run_style(client, style="Studio Headshot", face_lora=face_lora, face_weight=0.0, prefix="style_zero")
    assert np.abs(with_face.astype(int) - base.astype(int)).mean() > 2.0, "the face LoRA changed nothing"
    assert np.array_equal(zero, base) and "weight 0" in report
    assert "lora key not loaded" not in comfy_server.log_path.read_text(errors="replace")


def test_face_lora_from_the_socket_equals_the_list_choice(client, face_lora):
    listed, _ = run_style(client, style="Summer Beach", face_lora=face_lora, prefix="style_list")
    socket, _ = run_style(client, style="Summer Beach", face_path=face_lora, prefix="style_socket")
    assert np.array_equal(listed, socket)
    expect_node_error(client, style_prompt("Summer Beach", face_path="../../models/checkpoints/" + TINY_CKPT.name),
                      "outside ComfyUI's loras folders")
    expect_node_error(client, style_prompt("Summer Beach", face_path="facechain/never_trained.safetensors"),
                      "never_trained.safetensors", "not found")


def test_missing_style_lora_names_the_file_and_how_to_get_it(client):
    msg = expect_node_error(client, style_prompt("Autumn Poplars"), "facechain_styles/autumn_populus.safetensors",
                            "python install.py --styles autumn_poplars", "PeiPeiY/style_lora", "prompt-only")
    assert "FaceChainApplyStyleLoRA" in msg


def test_user_style_file_appears_without_restart_and_applies_its_lora(client, comfy_base):
    lora_rel = "facechain_styles/test_user_style.safetensors"
    make_lora(comfy_base / "models" / "loras" / lora_rel, seed=23, scale=0.8)
    folder = comfy_base / "models" / "facechain" / "styles"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "my_test_style.json").write_text(json.dumps({
        "name": "My Test Style", "positive": "pencil drawing, cross hatching", "negative": "colour",
        "face_lora_weight": 0.9, "palette": ["#ffffff", "#000000"],
        "style_lora": {"file": lora_rel, "weight": 0.5, "source": {"url": "https://example.invalid/style.safetensors"}}}))
    try:
        listed = client.object_info()["FaceChainApplyStyleLoRA"]["input"]["required"]["style"][0]
        assert "My Test Style" in listed
        with_style, report = run_style(client, style="My Test Style", prefix="style_user")
        without, _ = run_style(client, style="My Test Style", style_weight=0.0, prefix="style_user0")
        assert "Style LoRA: facechain_styles/test_user_style.safetensors at 0.5" in report
        assert np.abs(with_style.astype(int) - without.astype(int)).mean() > 2.0
    finally:
        (folder / "my_test_style.json").unlink()


def test_broken_style_file_is_reported_not_fatal(client, comfy_base):
    folder = comfy_base / "models" / "facechain" / "styles"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "broken.json").write_text('{"name": "Broken", "positive": "x",,}')
    (folder / "bad_weight.json").write_text(json.dumps({"name": "Bad", "positive": "x", "face_lora_weight": 7}))
    try:
        spec = client.object_info()["FaceChainApplyStyleLoRA"]["input"]["required"]["style"]
        assert "Studio Headshot" in spec[0] and "Broken" not in spec[0] and "Bad" not in spec[0]
        assert "broken.json" in spec[1]["tooltip"] and "not valid JSON" in spec[1]["tooltip"]
        assert "bad_weight.json" in spec[1]["tooltip"] and "face_lora_weight" in spec[1]["tooltip"]
        img, _ = run_style(client, style="Studio Headshot", prefix="style_after_broken")
        assert img.shape == (64, 64, 3)
    finally:
        (folder / "broken.json").unlink()
        (folder / "bad_weight.json").unlink()


def test_catalogue_rules_without_the_host(tmp_path):
    assert styles.join_prompt(["fcsks, a man", "Smile, smile", "", "a man, hat"]) == "fcsks, a man, Smile, hat"
    (tmp_path / "escape.json").write_text(json.dumps({
        "name": "Escape", "positive": "x", "style_lora": {"file": "../../evil.safetensors", "weight": 0.3}}))
    (tmp_path / "ok_style.json").write_text(json.dumps({"name": "Fine Style", "positive": "x"}))
    cat = styles.load_catalogue([tmp_path])
    assert list(cat.styles) == ["Fine Style"]
    assert any("escape.json" in p and ".." in p for p in cat.problems)
    assert cat.get("ok_style").name == "Fine Style" and cat.get("fine   STYLE").name == "Fine Style"
    with pytest.raises(FaceChainError, match="Unknown style 'Nope'.*Skipped style files: escape.json"):
        cat.get("Nope")
    style = cat.get("Fine Style")
    assert style.prompt_only and styles.preview_image(style).shape == (styles.PREVIEW_SIZE, styles.PREVIEW_SIZE, 3)


def test_install_py_fetches_a_style_lora_atomically(tmp_path, monkeypatch):
    import importlib

    import install

    hub = importlib.import_module("modelscope.hub.file_download")
    calls = []

    def fake_download(model_id, file_path, revision=None, local_dir=None, **kw):
        calls.append((model_id, file_path, revision))
        got = Path(local_dir) / file_path
        got.write_bytes(b"lora")
        return str(got)

    monkeypatch.setattr(hub, "model_file_download", fake_download)
    loras = tmp_path / "loras"
    args = ["--no-requirements", "--styles", "Autumn Poplars", "film_noir", "--loras-dir", str(loras)]
    assert install.main(args) == 0
    assert calls == [("PeiPeiY/style_lora", "autumn_populus.safetensors", "v1")]
    assert (loras / "facechain_styles" / "autumn_populus.safetensors").read_bytes() == b"lora"
    assert sorted(p.name for p in (loras / "facechain_styles").iterdir()) == ["autumn_populus.safetensors"]

    def broken(*a, **kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(hub, "model_file_download", broken)
    with pytest.raises(ConnectionError):
        install.main(["--no-requirements", "--styles", "wild_west", "--loras-dir", str(loras)])
    assert sorted(p.name for p in (loras / "facechain_styles").iterdir()) == ["autumn_populus.safetensors"]
