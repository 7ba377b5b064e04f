"""The model store: where learned models live, the offline error, and the atomic fetch.

The hub itself cannot be reached here, so ModelScope's download function is replaced by one that writes
files the way it does; everything around it (paths, temp folder, rename, presence check) is the real code.
"""

import subprocess
import sys

import pytest

from conftest import REPO
from facechain_core import model_store
from facechain_core.errors import ModelMissingError


@pytest.fixture
def root(tmp_path):
    model_store.set_models_root(tmp_path / "facechain")
    yield tmp_path / "facechain"
    model_store.set_models_root(None)


def test_missing_model_error_names_file_folder_and_command(root):
    with pytest.raises(ModelMissingError) as e:
        model_store.model_path("m2fp")
    msg = str(e.value)
    assert "'m2fp'" in msg and str(root) in msg and "python install.py --models m2fp" in msg
    assert "damo/cv_resnet101_image-multiple-human-parsing" in msg


def test_embedded_models_are_found_inside_their_package():
    for name in ("yunet", "sface"):
        path = model_store.embedded_path(name)
        assert path.is_file() and path.stat().st_size > 50_000


def test_fetch_is_atomic_and_makes_the_model_present(root, monkeypatch):
    import importlib

    sd = importlib.import_module("modelscope.hub.snapshot_download")

    calls = []

    def fake_snapshot_download(model_id, local_dir=None, **kw):
        calls.append(model_id)
        from pathlib import Path

        Path(local_dir, "configuration.json").write_text("{}")
        Path(local_dir, "weights.bin").write_bytes(b"x" * 10)
        return local_dir

    monkeypatch.setattr(sd, "snapshot_download", fake_snapshot_download)
    assert not model_store.is_present("abpn")
    path = model_store.fetch("abpn")
    assert calls == ["damo/cv_unet_skin-retouching"]
    assert path == root / "abpn" and (path / "weights.bin").is_file()
    assert model_store.model_path("abpn") == path
    assert [p.name for p in root.iterdir()] == ["abpn"], "a temporary folder was left behind"

    def broken(model_id, local_dir=None, **kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(sd, "snapshot_download", broken)
    with pytest.raises(ConnectionError):
        model_store.fetch("fqa")
    assert not model_store.is_present("fqa") and [p.name for p in root.iterdir()] == ["abpn"]


def test_install_py_lists_models_into_comfyui_models_folder(tmp_path):
    comfy = tmp_path / "ComfyUI"
    (comfy / "models").mkdir(parents=True)
    (comfy / "custom_nodes").mkdir()
    (comfy / "custom_nodes" / "comfyui-facechain").symlink_to(REPO)
    # Run the copy inside custom_nodes, as ComfyUI-Manager does (the symlink keeps its own path).
    out = subprocess.run([sys.executable, str(comfy / "custom_nodes" / "comfyui-facechain" / "install.py"), "--list"],
                         capture_output=True, text=True, check=True).stdout
    assert "damofd" in out and "missing" in out
    assert str(comfy / "models" / "facechain" / "damofd") in out


def test_learned_pipeline_with_missing_packages_says_what_to_install(root):
    # A real M2FP snapshot layout; ModelScope's M2FP code imports packages this environment lacks (mmcv and
    # friends), which must surface as a clear FaceChainError naming what to install, not a traceback.
    import json

    from facechain_core.errors import FaceChainError

    folder = root / "m2fp"
    folder.mkdir(parents=True)
    (folder / "configuration.json").write_text(json.dumps({
        "framework": "pytorch", "task": "image-segmentation",
        "pipeline": {"type": "m2fp-image-human-parsing"}, "model": {"type": "m2fp"}}))
    with pytest.raises(FaceChainError) as e:
        model_store.modelscope_pipeline("m2fp", "image_segmentation")
    msg = str(e.value)
    assert "'m2fp'" in msg and "mim install mmcv" in msg and "embedded" in msg
