"""The pipeline without ComfyUI (`python -m facechain_core portraits`) and the batch over people on Dask
(`python -m facechain_core batch`), on the tiny SD1.5-shaped checkpoint at CPU sizes.

Sizes are parameters: a few training samples at 64 px, two 64 px portraits at 3 steps. The tiny model's portraits
are noise, so no face is found in them: RTSRank's fallback returns them unranked, which the manifest says."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import ARTIFACTS, COMFY_DIR, FACES, REPO, tiny_checkpoint

pytestmark = pytest.mark.host  # slow layer: Dask clusters and whole pipelines, though no server

SMALL = ["--size", "64", "--samples", "8", "--batch-size", "4", "--images", "2", "--image-size", "64",
         "--steps", "3", "--top", "2"]
TOKENIZER = str(COMFY_DIR / "comfy" / "sd1_tokenizer")  # CLIP's tokenizer files, from the test ComfyUI


def run_cli(*args, timeout=900):
    env = dict(os.environ, PYTHONUNBUFFERED="1", FACECHAIN_CLIP_TOKENIZER=TOKENIZER)
    return subprocess.run([sys.executable, "-m", "facechain_core", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def contact_sheet(rows: list[list[np.ndarray]], path, cell: int = 128) -> None:
    """Each row of images scaled to one height, rows stacked, on white."""
    width = max(len(r) for r in rows) * cell
    sheet = Image.new("RGB", (width, len(rows) * cell), "white")
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            sheet.paste(Image.fromarray(im).resize((cell, cell), Image.NEAREST), (x * cell, y * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def read(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def check_done(folder, top: int = 2, loras=("face LoRA: 32 of 32 layers at 0.95",)) -> dict:
    m = json.loads((folder / "manifest.json").read_text())
    assert m["status"] == "done", m.get("error")
    assert m["error"] is None and m["photos_kept"] >= 2
    for stage in ("preprocess", "load_model", "train", "generate", "fuse", "rank", "total"):
        assert m["timings"][stage] > 0, stage
    assert [p["file"] for p in m["portraits"]] == [f"portrait_{i:02d}.png" for i in range(1, top + 1)]
    for p in m["portraits"]:
        assert read(folder / p["file"]).shape == (64, 64, 3)
    # every layer of the trained face LoRA found its place in the diffusers UNet
    assert m["generate"]["loras"] == list(loras)
    assert m["generate"]["positive"].startswith("fcsks, ")  # then the subject phrase (AutoTag's source)
    assert m["generate"]["sampler"] == "dpmpp_2m/karras" and m["generate"]["steps"] == 3
    # noise from the tiny model shows no face: the fallback returns the images unranked, and says so
    assert m["likeness"] == {"best": None, "mean": None, "ranked": False}
    assert "returned the first ones unranked" in m["reports"]["rank"]
    with safe_open(str(folder / "face.safetensors"), "pt") as f:
        assert len(list(f.keys())) == 32 * 3 and f.metadata()["facechain_trigger"] == "fcsks"
    assert read(folder / "template.png").shape == (64, 64, 3)
    return m


def fake_style_lora(path, seed: int = 0) -> None:
    """A kohya LoRA for every attention projection of the tiny UNet (what a style LoRA holds), random weights:
    it stands in for a style's downloaded file (no model hub here)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    blocks = ["down_blocks_0_attentions_0", "mid_block_attentions_0", "up_blocks_0_attentions_0",
              "up_blocks_0_attentions_1"]
    state = {}
    for block in blocks:
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v", "to_out_0"):
                key = f"lora_unet_{block}_transformer_blocks_0_{attn}_{proj}"
                fan_in = 768 if attn == "attn2" and proj in ("to_k", "to_v") else 320
                state[f"{key}.lora_down.weight"] = torch.randn(4, fan_in, generator=g).half() * 0.01
                state[f"{key}.lora_up.weight"] = torch.randn(320, 4, generator=g).half() * 0.01
                state[f"{key}.alpha"] = torch.tensor(4.0).half()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))


def test_portraits_on_tiny_model(tmp_path):
    """A style with a style LoRA: both LoRAs go into the model at the style's weights, the prompt is the style's."""
    out = tmp_path / "portraits"
    fake_style_lora(tmp_path / "loras" / "facechain_styles" / "west.safetensors")
    r = run_cli("portraits", "--photos", str(FACES / "obama"), "--checkpoint", str(tiny_checkpoint()),
                "--style", "Wild West", "--loras", str(tmp_path / "loras"), "--out", str(out), *SMALL)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = check_done(out, loras=["face LoRA: 32 of 32 layers at 0.95", "style LoRA: 32 of 32 layers at 0.35"])
    assert m["style"] == "Wild West" and "cowboy hat and leather vest" in m["generate"]["positive"]
    assert m["generate"]["negative"].startswith("city, modern car")
    assert m["train"]["samples"] == 8 and m["generate"]["size"] == [64, 64]
    assert "1. portrait_01.png" in r.stdout
    portraits = [read(out / p["file"]) for p in m["portraits"]]
    assert all(p.std() > 5 for p in portraits)  # pictures, not blank or NaN-black frames
    contact_sheet([[read(out / "template.png"), *portraits]], ARTIFACTS / "portraits_tiny.png")


def test_portraits_reports_bad_input_in_manifest(tmp_path, capsys):
    from facechain_core.__main__ import main

    common = ["--photos", str(FACES / "obama"), "--checkpoint", str(tiny_checkpoint()), *SMALL]
    assert main(["portraits", *common, "--style", "No Such Style", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "Unknown style 'No Such Style'" in err and "Traceback" not in err
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["status"] == "failed" and "Known styles" in m["error"] and "traceback" not in m
    assert main(["portraits", *common, "--out", str(tmp_path / "o2"), "--set", "KSampler.colour=1"]) == 2
    assert "Unknown pipeline setting 'KSampler.colour'" in capsys.readouterr().err
    # a style whose LoRA file is missing fails before any work, saying how to get it
    assert main(["portraits", *common, "--style", "Wild West", "--out", str(tmp_path / "o3"),
                 "--loras", str(tmp_path / "no_loras")]) == 2
    m = json.loads((tmp_path / "o3" / "manifest.json").read_text())
    assert "install.py --styles wild_west" in m["error"] and "preprocess" not in m["timings"]


def people_folder(root):
    """obama (real photos), no_face (two pictures without a face), not_photos (text named .jpg)."""
    shutil.copytree(FACES / "obama", root / "obama")
    (root / "no_face").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(root / "no_face" / "noise.png")
    ramp = np.linspace(0, 255, 400, dtype=np.uint8)[None, :, None].repeat(300, 0).repeat(3, 2)
    Image.fromarray(ramp).save(root / "no_face" / "wall.jpg")
    (root / "not_photos").mkdir()
    (root / "not_photos" / "IMG_0001.jpg").write_text("this is a text file, not a JPEG")
    return root


def test_batch_two_workers_failures_recorded_rerun_skips(tmp_path):
    people = people_folder(tmp_path / "people")
    out = tmp_path / "out"
    args = ["batch", "--people", str(people), "--scheduler", "local", "--workers", "2",
            "--checkpoint", str(tiny_checkpoint()), "--out", str(out), *SMALL]
    r = run_cli(*args)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]  # 1: some people failed
    assert "2 workers (local); 3 people to run" in r.stdout
    summary = json.loads((out / "batch.json").read_text())
    assert summary["people"] == {"no_face": "failed", "not_photos": "failed", "obama": "done"}
    assert summary["done"] == 1 and summary["failed"] == ["no_face", "not_photos"] and summary["people_per_min"] > 0
    done = check_done(out / "obama")
    assert done["style"] == "Studio Headshot" and "professional headshot" in done["generate"]["positive"]
    no_face = json.loads((out / "no_face" / "manifest.json").read_text())
    assert no_face["status"] == "failed" and no_face["stage"] == "preprocess"
    assert "found no usable face in any photo" in no_face["error"] and "noise.png" in no_face["error"]
    assert "traceback" not in no_face  # an expected failure: the message says it all
    not_photos = json.loads((out / "not_photos" / "manifest.json").read_text())
    assert "IMG_0001.jpg' could not be read" in not_photos["error"]
    assert not (out / "no_face" / "face.safetensors").exists()
    contact_sheet([[read(out / "obama" / "template.png")] + [read(out / "obama" / p["file"])
                                                             for p in done["portraits"]]],
                  ARTIFACTS / "batch_obama.png")

    # a re-run skips the finished person and tries the failed ones again
    r = run_cli(*args)
    assert r.returncode == 1 and "skipping 1 already done: obama" in r.stdout, r.stdout[-3000:]
    assert "2 people to run" in r.stdout
    again = json.loads((out / "batch.json").read_text())
    assert again["skipped"] == ["obama"] and again["ran"] == 2 and again["people"]["obama"] == "done"
    assert json.loads((out / "obama" / "manifest.json").read_text())["started"] == done["started"]


def test_batch_without_dask_says_what_to_install(tmp_path, monkeypatch):
    from facechain_core import batch
    from facechain_core.errors import FaceChainError

    monkeypatch.setitem(sys.modules, "distributed", None)  # as if it were not installed
    with pytest.raises(FaceChainError, match=r'pip install "dask\[distributed\]"'):
        batch.run_batch(FACES, tmp_path, "local", str(tiny_checkpoint()))


def test_lora_is_added_for_one_call_and_taken_out(monkeypatch):
    """applied_loras: each layer changes by exactly weight * up @ down * alpha / rank, and every weight is
    bit-identical afterwards; a LoRA with no layer of this model is refused; a LoRA changes the picture."""
    from facechain_core import standalone
    from facechain_core.errors import FaceChainError

    monkeypatch.setenv("FACECHAIN_CLIP_TOKENIZER", TOKENIZER)
    models = standalone.load_models(tiny_checkpoint(), torch.device("cpu"), torch.float32)
    targets = standalone.lora_targets(models.unet, models.text_encoder)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    te_key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert key in targets and te_key in targets
    g = torch.Generator().manual_seed(0)
    state = {}
    for k in (key, te_key):
        w = targets[k].weight
        state[f"{k}.lora_down.weight"] = torch.randn(4, w.shape[1], generator=g) * 0.05
        state[f"{k}.lora_up.weight"] = torch.randn(w.shape[0], 4, generator=g) * 0.05
        state[f"{k}.alpha"] = torch.tensor(2.0)
    before = {k: m.weight.detach().clone() for k, m in targets.items()}
    base = standalone.generate(models, "a photo", "", 64, 64, 1, 2, 7.0, 1, "euler", "normal")[0]
    with standalone.applied_loras(models, [("test LoRA", state, 0.5)]) as lines:
        assert lines == ["test LoRA: 2 of 2 layers at 0.5"]
        for k in (key, te_key):
            want = before[k] + 0.5 * state[f"{k}.lora_up.weight"] @ state[f"{k}.lora_down.weight"] * (2.0 / 4)
            torch.testing.assert_close(targets[k].weight, want)
        with_lora = standalone.generate(models, "a photo", "", 64, 64, 1, 2, 7.0, 1, "euler", "normal")[0]
    assert all(torch.equal(m.weight, before[k]) for k, m in targets.items())
    assert np.abs(with_lora.astype(int) - base.astype(int)).max() > 0
    foreign = {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(8, 4)}
    with pytest.raises(FaceChainError, match="another base model"):
        with standalone.applied_loras(models, [("style LoRA", foreign, 1.0)]):
            pass
    again = standalone.generate(models, "a photo", "", 64, 64, 1, 2, 7.0, 1, "euler", "normal")[0]
    assert np.array_equal(again, base)  # same seed, weights back: the same picture


def test_batch_comfy_pool_runs_the_bundled_workflow(comfy_server, tmp_path):
    """--comfy: each person is uploaded to a running ComfyUI (the pack's client) and the bundled API workflow
    runs there; a person whose photos the server's LoadFacePhotos cannot read is recorded as failed."""
    people = tmp_path / "people"
    shutil.copytree(FACES / "obama", people / "obama")
    (people / "not_photos").mkdir()
    (people / "not_photos" / "IMG_0001.jpg").write_text("this is a text file, not a JPEG")
    out = tmp_path / "out"
    r = run_cli("batch", "--people", str(people), "--scheduler", "local", "--comfy", comfy_server.url,
                "--checkpoint", str(tiny_checkpoint()), "--out", str(out), *SMALL,
                "--size", "128")  # the host's FaceFusion finds no face in a 64 px template crop
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "1 workers (local); 2 people to run" in r.stdout
    m = json.loads((out / "obama" / "manifest.json").read_text())
    assert m["status"] == "done" and m["mode"] == "comfy" and m["server"] == comfy_server.url, m.get("error")
    assert [p["file"] for p in m["portraits"]] == ["rank_01.png", "rank_02.png"]
    assert all(read(out / "obama" / p["file"]).shape == (64, 64, 3) for p in m["portraits"])
    assert "RTSRank" in m["reports"]["rank"]
    bad = json.loads((out / "not_photos" / "manifest.json").read_text())
    assert bad["status"] == "failed" and "could not be read" in bad["error"], bad
