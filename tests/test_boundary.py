"""The error boundary around every node (nodes/boundary.py), in process: what leaves a node is words."""

from __future__ import annotations

import importlib

import pytest

from conftest import load_pack


@pytest.fixture(scope="module")
def pack():
    return load_pack()


def boundary_and_paths(pack):
    return (importlib.import_module(f"{pack.__name__}.nodes.boundary"),
            importlib.import_module(f"{pack.__name__}.facechain_core.user_paths"),
            importlib.import_module(f"{pack.__name__}.facechain_core.errors"))


def test_every_registered_node_function_is_guarded(pack):
    for key, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert getattr(getattr(cls, cls.FUNCTION), "_facechain_guarded", False), key


def test_an_unexpected_error_becomes_a_clear_message_and_a_server_path_is_hidden(pack, tmp_path):
    boundary, user_paths, errors = boundary_and_paths(pack)

    class Broken:
        FUNCTION = "run"

        def run(self, value):
            if value == "bug":
                return {}["missing"]
            raise errors.FaceChainError(f"The file {tmp_path / 'facechain' / 'x.onnx'} is broken; fetch it again.")

    boundary.guard(Broken, "Broken Node")
    user_paths.set_roots({"models": tmp_path})
    with pytest.raises(errors.FaceChainError) as info:
        Broken().run("bug")
    text = str(info.value)
    assert text.startswith("Broken Node stopped on an unexpected internal error (KeyError)") and "log" in text
    assert "missing" not in text and "Traceback" not in text
    with pytest.raises(errors.FaceChainError) as info:
        Broken().run("path")
    assert str(info.value) == "The file models/facechain/x.onnx is broken; fetch it again."


def test_cancel_and_out_of_memory_pass_unchanged(pack):
    import comfy.model_management as mm

    boundary, _, _ = boundary_and_paths(pack)

    class Stops:
        FUNCTION = "run"

        def run(self, kind):
            raise mm.InterruptProcessingException() if kind == "cancel" else mm.OOM_EXCEPTION("CUDA out of memory")

    boundary.guard(Stops, "Stops")
    with pytest.raises(mm.InterruptProcessingException):
        Stops().run("cancel")
    with pytest.raises(mm.OOM_EXCEPTION):
        Stops().run("oom")
