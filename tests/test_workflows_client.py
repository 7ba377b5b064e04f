"""scripts/facechain_client.py against the real test host: uploads photos, follows the websocket, saves the
ranked portraits. Sizes are tiny (the tiny checkpoint), set through the client's own options."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import FACES, REPO, TINY_CKPT

CLIENT = REPO / "scripts" / "facechain_client.py"


def run_client(client, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLIENT), "--server", client.url, *args],
                          capture_output=True, text=True, timeout=900)


def test_client_trains_generates_and_saves_ranked_portraits(client, tmp_path):
    out = tmp_path / "portraits"
    res = run_client(client, "--photos", str(FACES / "obama"), "--checkpoint", TINY_CKPT.name,
                     "--style", "Film Noir", "--size", "64", "--count", "2", "--top", "2", "--steps", "3",
                     "--samples", "8", "--lora-name", "client_run", "--set", "3.size=128",
                     "--set", "8.batch_size=4", "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    log = res.stdout
    assert "uploaded 4 photos into input/facechain_" in log
    assert "Train Face LoRA (FaceChain) ..." in log and "KSampler: 3/3" in log  # progress from the websocket
    assert "RTS Rank (FaceChain) ..." in log and "saved 2 portraits in" in log
    files = sorted(out.glob("rank_*.png"))
    assert [f.name for f in files] == ["rank_01.png", "rank_02.png"]
    assert all(np.asarray(Image.open(f)).shape == (64, 64, 3) for f in files)
    assert (out / "ranking.txt").read_text().startswith("RTSRank:")


def test_client_generates_from_an_existing_face_lora(client, comfy_base, tmp_path):
    from test_generate import TEST_FACE_LORA, make_lora

    make_lora(comfy_base / "models" / "loras" / TEST_FACE_LORA, seed=11)
    res = run_client(client, "--face-lora", TEST_FACE_LORA, "--template", str(FACES / "obama" / "obama1.jpg"),
                     "--checkpoint", TINY_CKPT.name, "--style", "Summer Beach", "--size", "64", "--count", "2",
                     "--top", "1", "--steps", "2", "--out", str(tmp_path / "gen"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "uploaded the template face obama1.jpg" in res.stdout
    assert len(list((tmp_path / "gen").glob("rank_*.png"))) == 1


def test_client_explains_bad_requests(client, tmp_path):
    res = run_client(client, "--photos", str(FACES / "obama"), "--checkpoint", TINY_CKPT.name, "--style", "Nope")
    assert res.returncode != 0 and "unknown style 'Nope'" in res.stderr and "Studio Headshot" in res.stderr
    res = run_client(client, "--photos", str(FACES / "obama"), "--checkpoint", "missing.safetensors")
    assert res.returncode != 0 and "ckpt_name" in res.stderr and "missing.safetensors" in res.stderr
    res = run_client(client, "--list-styles")
    assert res.returncode == 0 and "Film Noir" in res.stdout.splitlines()
