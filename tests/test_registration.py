"""Registration is guarded per node module: a copy of the pack with one broken node module still registers
every other node, and the log says which module failed and why. In process, no server."""

from __future__ import annotations

import logging
import shutil

from conftest import REPO, load_pack

EXPECTED = {"FaceChainLoadPhotos", "FaceChainFaceAlign", "FaceChainHumanParse", "FaceChainSkinRetouch",
            "FaceChainAutoTag", "FaceChainTemplateFace", "FaceChainTrainFaceLoRA", "FaceChainApplyStyleLoRA",
            "FaceChainFaceFusion", "FaceChainRTSRank", "FaceChainLoadTemplatePhoto"}


def copy_pack(dest):
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    dest.mkdir()
    shutil.copy2(REPO / "__init__.py", dest / "__init__.py")
    for part in ("nodes", "facechain_core"):
        shutil.copytree(REPO / part, dest / part, ignore=skip)
    return dest


def test_the_pack_registers_every_node():
    pack = load_pack()
    assert set(pack.NODE_CLASS_MAPPINGS) == EXPECTED
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == EXPECTED
    assert not pack.nodes.FAILED


def test_one_broken_node_module_leaves_the_others_working(tmp_path, caplog):
    root = copy_pack(tmp_path / "comfyui-facechain-broken")
    (root / "nodes" / "face_fusion.py").write_text("import facechain_missing_package_xyz  # noqa: F401\n")
    with caplog.at_level(logging.ERROR):
        pack = load_pack("facechain_broken_copy", root)
    assert set(pack.NODE_CLASS_MAPPINGS) == EXPECTED - {"FaceChainFaceFusion"}
    assert set(pack.nodes.FAILED) == {"face_fusion"}
    assert "facechain_missing_package_xyz" in pack.nodes.FAILED["face_fusion"]
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "face_fusion" in logged and "facechain_missing_package_xyz" in logged
    # the node modules that loaded are the copy's own, fully working
    assert pack.NODE_CLASS_MAPPINGS["FaceChainRTSRank"].__module__ == "facechain_broken_copy.nodes.rts_rank"
