"""Bad input and faults, one row each, through the real host: the message the user sees is asserted, and no
raw Python exception text or absolute server path reaches the user.

The table of prompts that must fail in a node is ``NODE_ERRORS``; the rest are faults that need more than
one prompt (a killed save, a deleted LoRA) or no host at all (the API client, the error boundary).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
from PIL import Image

from conftest import FACES, REPO, TINY_CKPT, expect_node_error
from comfy_host import PromptError
from test_train_lora import train_graph

pytestmark = pytest.mark.host

RAW_TEXTS = ("Traceback", "Errno", "embedded null byte", "File name too long", "object has no attribute")


def photos_prompt(folder: str) -> dict:
    return {"1": {"class_type": "FaceChainLoadPhotos", "inputs": {"folder": folder, "max_photos": 4}},
            "2": {"class_type": "FaceChainFaceAlign", "inputs": {"photos": ["1", 0], "names": ["1", 1], "size": 128,
                                                                "face_fraction": 0.4, "face_centre": 0.42,
                                                                "detector": "embedded"}},
            "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}


def style_prompt(face_lora_path: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_CKPT.name}},
        "2": {"class_type": "FaceChainApplyStyleLoRA", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "style": "Studio Headshot", "face_lora": "none", "face_weight": -1.0,
            "style_weight": -1.0, "trigger": "fcsks", "subject": "a man", "shared_tags": "", "extra_prompt": "",
            "face_lora_path": face_lora_path}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}},
    }


LONG = "x" * 300
HUGE = "y" * 5000
# (case, prompt, words the message must hold)
NODE_ERRORS = [
    ("NUL byte in the photo folder", photos_prompt("obama\x00x"), ["control character", "folder"]),
    ("300-character photo folder", photos_prompt(LONG), ["folder", "shorter"]),
    ("5000-character photo folder", photos_prompt(HUGE), ["folder", "under 1024"]),
    ("photo folder outside input/", photos_prompt("../../"), ["outside ComfyUI's input directory"]),
    ("photo folder that does not exist", photos_prompt("no_such_person"), ["was not found", "input/no_such_person"]),
    ("NUL byte in the face LoRA path", style_prompt("facechain/a\x00.safetensors"), ["control character"]),
    ("300-character face LoRA path", style_prompt(LONG + ".safetensors"), ["face LoRA", "shorter"]),
    ("5000-character face LoRA path", style_prompt(HUGE), ["face LoRA", "under 1024"]),
    ("face LoRA path outside the loras folders", style_prompt("../../../etc/passwd"), ["outside", "models/loras"]),
    ("face LoRA that was never trained", style_prompt("facechain/never.safetensors"), ["not found", "models/loras"]),
]


def assert_user_text(message: str, comfy_base) -> None:
    for raw in RAW_TEXTS:
        assert raw not in message, f"raw exception text {raw!r} in: {message}"
    assert str(comfy_base) not in message and str(comfy_base.resolve()) not in message, message
    assert str(REPO) not in message, message


@pytest.mark.parametrize("case, prompt, words", NODE_ERRORS, ids=[row[0] for row in NODE_ERRORS])
def test_bad_input_gets_a_clear_message_without_server_paths(client, comfy_base, case, prompt, words):
    message = expect_node_error(client, prompt, *words)
    assert_user_text(message, comfy_base)


@pytest.mark.parametrize("name", ["../../obama/obama1.jpg", "/etc/passwd", str(FACES / "obama" / "obama1.jpg")])
def test_template_photo_outside_input_is_refused_before_anything_is_read(client, name):
    prompt = {"1": {"class_type": "FaceChainLoadTemplatePhoto", "inputs": {"image": name}},
              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    with pytest.raises(PromptError) as info:
        client.run(prompt)
    assert "value not in list" in str(info.value).lower() or "outside" in str(info.value).lower()


def test_template_photo_lists_and_loads_photos_in_input_subfolders(client, object_info):
    listed = object_info["FaceChainLoadTemplatePhoto"]["input"]["required"]["image"][0]
    assert "obama/obama1.jpg" in listed and not any(n.startswith(("/", "..")) for n in listed)
    entry = client.run({"1": {"class_type": "FaceChainLoadTemplatePhoto", "inputs": {"image": "obama/obama1.jpg"}},
                        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}})
    shown = client.output_images(entry, "2")
    expected = Image.open(FACES / "obama" / "obama1.jpg").size
    assert len(shown) == 1 and Image.open(__import__("io").BytesIO(shown[0])).size == expected


def test_a_link_to_a_photo_outside_input_is_not_offered(client, comfy_base, tmp_path):
    outside = tmp_path / "secret.jpg"
    Image.new("RGB", (64, 64), "red").save(outside)
    link = comfy_base / "input" / "linked_secret.jpg"
    link.symlink_to(outside)
    try:
        listed = client.get("/object_info/FaceChainLoadTemplatePhoto")
        names = listed["FaceChainLoadTemplatePhoto"]["input"]["required"]["image"][0]
        assert "linked_secret.jpg" not in names
        with pytest.raises(PromptError):
            client.run({"1": {"class_type": "FaceChainLoadTemplatePhoto", "inputs": {"image": "linked_secret.jpg"}},
                        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}})
    finally:
        link.unlink()


def lora_folder(comfy_base):
    return comfy_base / "models" / "loras" / "facechain"


def test_a_killed_save_leaves_nothing_behind_after_the_next_save(client, comfy_base):
    folder = lora_folder(comfy_base)
    folder.mkdir(parents=True, exist_ok=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = folder / f".face.facechain-partial-{int(dead.stdout)}-abcd.tmp"  # as a kill -9 during a save leaves
    stale.write_bytes(b"\0" * 1024)
    client.run(train_graph("robust_stale", samples=4))
    assert not stale.exists(), "the stale temporary file of a killed save is still there"
    saved = folder / "robust_stale.safetensors"
    assert saved.is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(saved.stat().st_mode) == 0o666 & ~umask, oct(saved.stat().st_mode)


def run_client(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "facechain_client.py"), *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("photos, words", [("no/such/folder", "no such folder"),
                                          (str(FACES / "obama" / "obama1.jpg"), "not a folder")])
def test_client_says_what_is_wrong_with_the_photos_folder(client, photos, words):
    res = run_client("--server", client.url, "--photos", photos, "--checkpoint", TINY_CKPT.name)
    assert res.returncode != 0
    assert words in res.stderr and "Traceback" not in res.stderr, res.stderr
