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
from pathlib import Path

import pytest
from PIL import Image

import run_report
from conftest import ARTIFACTS, FACES, REPO, TINY_CKPT, expect_node_error
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


def lora_report(entry) -> str:
    return "\n".join(t for out in entry["outputs"].values() for t in out.get("text", []) if "LoRA saved" in t)


def test_a_deleted_lora_is_trained_again_and_an_identical_rerun_reuses_the_file(client, comfy_base):
    graph = train_graph("robust_again", samples=4)
    path = lora_folder(comfy_base) / "robust_again.safetensors"
    first = client.run(graph)
    assert path.is_file()
    again = client.run(graph)  # the file appeared since the first run: the node runs, finds its own inputs
    assert "reused the saved file" in lora_report(again) and path.is_file()
    # the run report's loss box says the LoRA was reused, not that no loss was recorded
    trained, reused = (run_report.collect(graph, e, lambda img: b"", []) for e in (first, again))
    assert trained.losses and trained.loss_note == run_report.NO_LOSS
    assert not reused.losses and reused.loss_note == run_report.LORA_REUSED
    ARTIFACTS.mkdir(exist_ok=True)
    run_report.loss_plot(reused.losses, note=reused.loss_note).save(ARTIFACTS / "run_report_loss_reused.png")
    path.unlink()
    entry = client.run(graph)  # identical prompt, file gone: the host's cache must not answer
    assert path.is_file(), "the LoRA was deleted and the identical prompt did not train it again"
    assert "reused" not in lora_report(entry)
    other = train_graph("robust_again", samples=4, seed=7)  # other inputs, same name, overwrite off
    message = expect_node_error(client, other, "already exists", "overwrite")
    assert_user_text(message, comfy_base)


def test_shipped_train_graphs_name_the_lora_after_the_person_and_never_overwrite():
    import json

    for name in ("facechain_train_api.json", "facechain_train_generate_api.json"):
        prompt = json.loads((REPO / "workflows" / "api" / name).read_text())
        train = next(n for n in prompt.values() if n["class_type"] == "FaceChainTrainFaceLoRA")
        loader = train["inputs"]["name"]
        assert isinstance(loader, list) and prompt[loader[0]]["class_type"] == "FaceChainLoadPhotos", name
        assert loader[1] == 3 and train["inputs"]["overwrite"] is False, name


def test_each_person_gets_a_lora_of_their_own(client, comfy_base):
    for person in ("obama", "biden"):
        graph = train_graph("unused", samples=4)
        graph["2"]["inputs"]["folder"] = person
        graph["4"]["inputs"]["name"] = ["2", 3]
        client.run(graph)
    for person in ("obama", "biden"):
        assert (lora_folder(comfy_base) / f"{person}.safetensors").is_file(), person


def test_install_offline_says_one_line_per_failed_model_goes_on_and_leaves_nothing(tmp_path):
    env = dict(os.environ, FACECHAIN_MODELS=str(tmp_path / "models"), HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, str(REPO / "install.py"), "--models", "wd14_tagger", "arcface",
                          "--styles", "autumn_poplars", "--loras-dir", str(tmp_path / "loras")],
                         capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    failed = [line for line in res.stderr.splitlines() if line.strip().startswith("failed:")]
    assert len(failed) == 3, res.stderr  # each item tried, each failure one line
    assert "3 could not be fetched" in res.stderr and "Traceback" not in res.stderr
    left = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert left == [], left
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").rglob("*"))


def test_a_link_in_a_photo_folder_to_a_photo_outside_input_is_skipped_and_named(client, comfy_base, tmp_path):
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes((FACES / "biden" / "biden1.jpg").read_bytes())
    folder = comfy_base / "input" / "robust_links"
    folder.mkdir()
    for name in ("obama1.jpg", "obama2.jpg"):
        (folder / name).write_bytes((FACES / "obama" / name).read_bytes())
    (folder / "linked.jpg").symlink_to(outside)
    entry = client.run({"1": {"class_type": "FaceChainLoadPhotos", "inputs": {"folder": "robust_links",
                                                                            "max_photos": 20}},
                        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 2]}}})
    report = "\n".join(entry["outputs"]["1"]["text"])
    assert "- linked.jpg: skipped, a link to a file outside ComfyUI's input directory" in report, report
    assert "2 photos" in report and str(tmp_path) not in report


def test_the_client_uploads_plain_file_names_only():
    from facechain_client import upload_name

    assert upload_name(1, Path("/photos/obama1.jpg")) == "obama1.jpg"
    for odd in ("..", ".hidden.jpg", "x" * 200 + ".jpg", "pic;rm -rf.jpg", "caf\u00e9\u202e.jpg"):
        assert upload_name(3, Path("/photos") / odd) == f"photo_03{Path(odd).suffix.lower()}", odd
