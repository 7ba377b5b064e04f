"""Fixtures: a real ComfyUI 0.3.75 server on the CPU with this pack in custom_nodes, and its client."""

from __future__ import annotations

import io
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from comfy_host import CACHE, COMFY_DIR, ComfyClient, ComfyServer, PromptError, import_comfy, install_comfyui

REPO = Path(__file__).resolve().parent.parent

SHARED = Path(os.environ.get("FACECHAIN_SHARED", REPO.parent / "shared"))
FACES = SHARED / "faces"
TINY_CKPT = CACHE / "tiny_sd15.safetensors"
ARTIFACTS = REPO / "artifacts"


def pytest_collection_modifyitems(items):
    """Every test that needs the ComfyUI server (directly or through ``client``/``object_info``) is marked
    ``host``: ``pytest -m "not host"`` runs the fast in-process layer alone."""
    for item in items:
        if "comfy_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.host)


def import_comfy_in_process():
    """ComfyUI's modules in this test process, on the CPU (its arguments must be parsed before comfy.*)."""
    import_comfy(COMFY_DIR, cpu=True)
    import comfy.utils

    return comfy


def load_pack(name: str = "comfyui_facechain", root: Path = REPO):
    """This pack imported in the test process as ComfyUI would import it from custom_nodes (a package named
    after its folder; ComfyUI's own top-level ``nodes`` module stays untouched), ComfyUI on the CPU. The nodes'
    thumbnails go to a temp folder of this process, not into the shared ComfyUI's ``temp/``."""
    import atexit
    import importlib.util
    import tempfile

    import_comfy_in_process()
    import folder_paths

    if Path(folder_paths.get_temp_directory()).resolve().is_relative_to(COMFY_DIR.resolve()):
        temp = tempfile.mkdtemp(prefix="facechain-node-temp-")
        atexit.register(shutil.rmtree, temp, True)
        folder_paths.set_temp_directory(temp)
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def tiny_checkpoint() -> Path:
    import tiny_checkpoint as builder

    builder.ensure(TINY_CKPT)
    return TINY_CKPT


def link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def input_folder_of(comfy_base: Path, name: str, files: list[str]) -> str:
    """input/<name> holding copies of the shared photos ``files`` (``person/file.jpg``); returns ``name``."""
    folder = comfy_base / "input" / name
    folder.mkdir(exist_ok=True)
    for rel in files:
        shutil.copy(FACES / rel, folder / rel.split("/")[-1])
    return name


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("comfy")
    for sub in ("models/checkpoints", "input", "output"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link_or_copy(tiny_checkpoint(), base / "models" / "checkpoints" / TINY_CKPT.name)
    for person in ("obama", "biden", "rose_leslie", "hard", "jennifer_aniston", "katy_perry"):
        shutil.copytree(FACES / person, base / "input" / person)
    return base


@pytest.fixture(scope="session")
def comfy_server(comfy_base):
    install_comfyui(COMFY_DIR)
    server = ComfyServer(comfy_base)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client(comfy_server) -> ComfyClient:
    return ComfyClient(comfy_server.url)


@pytest.fixture(scope="session")
def object_info(client) -> dict:
    return client.object_info()


def png_arrays(blobs: list[bytes]) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs]


def expect_node_error(client: ComfyClient, prompt: dict, *words: str) -> str:
    """Run a prompt that must fail in a node; return the message the UI shows and check its words."""
    with pytest.raises(PromptError) as info:
        client.run(prompt)
    message = str(info.value)
    for w in words:
        assert w.lower() in message.lower(), f"{w!r} not in error message: {message}"
    assert "Traceback" not in message
    return message
