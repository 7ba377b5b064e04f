"""The library's shared homes, in process: the one model cache and its reload rule, the one loader of the
JSON data files, the one empty-input check of training."""

from __future__ import annotations

import json
import os

import pytest

from facechain_core import data_files, model_cache
from facechain_core.errors import FaceChainError
from facechain_core.train import require_images, resolve_captions


def test_model_cache_reloads_only_when_a_file_changes(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"one")
    made = []

    def make():
        made.append(f.read_bytes())
        return object()

    first = model_cache.cached(("test", "m"), make, [f])
    assert model_cache.cached(("test", "m"), make, [f]) is first and made == [b"one"]
    f.write_bytes(b"second")  # another size
    second = model_cache.cached(("test", "m"), make, [f])
    assert second is not first and made == [b"one", b"second"]
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same size, newer
    assert model_cache.cached(("test", "m"), make, [f]) is not second
    f.unlink()  # removed: made again (the maker decides what a missing file means)
    with pytest.raises(FileNotFoundError):
        model_cache.cached(("test", "m"), make, [f])
    f.write_bytes(b"back")
    assert model_cache.cached(("test", "m"), make, [f]) is not second and made[-1] == b"back"


def test_data_files_load_once_and_name_a_broken_file(tmp_path, monkeypatch):
    assert data_files.load("models.json") is data_files.load("models.json")
    assert all(not k.startswith("_") for k in data_files.settings("train_defaults.json"))
    (tmp_path / "broken.json").write_text('{"a": 1,,}')
    (tmp_path / "list.json").write_text(json.dumps([1, 2]))
    monkeypatch.setattr(data_files, "DATA", tmp_path)
    with pytest.raises(FaceChainError, match="broken.json' is broken"):
        data_files.load("broken.json")
    with pytest.raises(FaceChainError, match="one JSON object"):
        data_files.load("list.json")
    with pytest.raises(FaceChainError, match="could not be read"):
        data_files.load("absent.json")


def test_one_empty_input_check_for_training_images():
    import torch

    assert require_images(torch.zeros(3, 64, 64, 3)) == 3
    for bad in (None, torch.zeros(0, 64, 64, 3), torch.zeros(64, 64, 3), "images"):
        with pytest.raises(FaceChainError, match="No training images"):
            require_images(bad)
    with pytest.raises(FaceChainError, match="No training images"):
        resolve_captions(0, trigger="zk")
