"""FaceFusion through the real host on the real photos in ../shared/faces, judged by the face recogniser."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import FACES, expect_node_error, png_arrays
from facechain_core.images import load_photo
from facechain_core.recognition import cosine, embed_face
from facechain_core.threads import detect_faces_per_thread

TARGETS = ["biden/biden2.jpg", "rose_leslie/rose1.jpg", "biden/biden1.jpg"]


def fusion_prompt(targets: str, template: str, strength: float = 1.0, backend: str = "embedded",
                  prefix: str = "fused") -> dict:
    return {
        "1": {"class_type": "FaceChainLoadPhotos", "inputs": {"folder": targets, "max_photos": 20}},
        "2": {"class_type": "FaceChainLoadPhotos", "inputs": {"folder": template, "max_photos": 1}},
        "3": {"class_type": "FaceChainFaceFusion", "inputs": {
            "images": ["1", 0], "template": ["2", 0], "strength": strength, "backend": backend}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": prefix}},
        "5": {"class_type": "MaskToImage", "inputs": {"mask": ["3", 1]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": prefix + "_mask"}},
    }


def embedding(rgb: np.ndarray) -> np.ndarray:
    faces = detect_faces_per_thread(rgb)
    assert faces, "no face found"
    return embed_face(rgb, faces[0])


@pytest.fixture(scope="module")
def folders(comfy_base) -> dict[str, str]:
    made = {}
    for name, files in {"fuse_targets": TARGETS, "fuse_template": ["obama/obama1.jpg"]}.items():
        folder = comfy_base / "input" / name
        folder.mkdir(exist_ok=True)
        for rel in files:
            shutil.copy(FACES / rel, folder / rel.split("/")[-1])
        made[name] = name
    # images without a face: a flat card and a landscape-like gradient
    folder = comfy_base / "input" / "fuse_noface"
    folder.mkdir(exist_ok=True)
    Image.fromarray(np.full((96, 128, 3), 90, np.uint8)).save(folder / "card.png")
    ramp = np.linspace(0, 255, 160, dtype=np.float32)
    Image.fromarray(np.stack([np.tile(ramp, (120, 1))] * 3, -1).astype(np.uint8)).save(folder / "ramp.png")
    made["fuse_noface"] = "fuse_noface"
    return made


def test_fused_face_is_closer_to_the_template_and_nothing_outside_the_mask_changes(client, folders):
    entry = client.run(fusion_prompt("fuse_targets", "fuse_template", prefix="fused_real"))
    fused = png_arrays(client.output_images(entry, "4"))
    masks = [m[..., 0] for m in png_arrays(client.output_images(entry, "6"))]
    report = "\n".join(entry["outputs"]["3"]["text"])
    assert report.startswith("FaceFusion: fused the template face into 3 of 3 images"), report
    template = embedding(load_photo(FACES / "obama" / "obama1.jpg"))
    # LoadFacePhotos lists the folder in name order
    for rel, out, mask in zip(sorted(TARGETS, key=lambda r: r.split("/")[-1]), fused, masks):
        original = load_photo(FACES / rel)
        assert out.shape == original.shape and mask.shape == original.shape[:2]
        outside = mask == 0
        assert np.array_equal(out[outside], original[outside]), f"{rel}: pixels outside the mask changed"
        inside = mask > 0
        face = detect_faces_per_thread(original)[0]
        x, y, w, h = face.box
        ys, xs = np.nonzero(inside)
        # the mask is the face: inside the face box grown by a quarter, and covering most of the box's middle
        assert xs.min() >= x - 0.25 * w and xs.max() <= x + 1.25 * w
        assert ys.min() >= y - 0.25 * h and ys.max() <= y + 1.25 * h
        assert inside.sum() > 0.4 * w * h
        assert (out[inside] != original[inside]).any()
        before, after = cosine(embedding(original), template), cosine(embedding(out), template)
        assert after > before + 0.15, f"{rel}: similarity to the template {before:.3f} -> {after:.3f}"


def test_strength_scales_the_change_and_zero_changes_nothing(client, folders):
    full = png_arrays(client.output_images(
        client.run(fusion_prompt("fuse_targets", "fuse_template", 1.0, prefix="fs1")), "4"))
    half = png_arrays(client.output_images(
        client.run(fusion_prompt("fuse_targets", "fuse_template", 0.5, prefix="fs05")), "4"))
    entry = client.run(fusion_prompt("fuse_targets", "fuse_template", 0.0, prefix="fs0"))
    zero = png_arrays(client.output_images(entry, "4"))
    originals = [load_photo(FACES / r) for r in sorted(TARGETS, key=lambda r: r.split("/")[-1])]
    for o, f, h, z in zip(originals, full, half, zero):
        assert np.array_equal(z, o)
        d_full = np.abs(f.astype(int) - o).sum()
        d_half = np.abs(h.astype(int) - o).sum()
        assert 0.3 * d_full < d_half < 0.7 * d_full
    assert "strength 0, left unchanged" in "\n".join(entry["outputs"]["3"]["text"])


def test_images_without_a_face_pass_through_and_the_report_says_so(client, folders):
    entry = client.run(fusion_prompt("fuse_noface", "fuse_template", prefix="fused_noface"))
    out = png_arrays(client.output_images(entry, "4"))
    masks = png_arrays(client.output_images(entry, "6"))
    report = "\n".join(entry["outputs"]["3"]["text"])
    assert report.splitlines()[0] == "FaceFusion: fused the template face into 0 of 2 images"
    assert report.count("no face found, left unchanged") == 2
    folder = folders["fuse_noface"]
    for name, img, mask in zip(["card.png", "ramp.png"], out, masks):
        original = np.asarray(Image.open(client_input(client, folder, name)).convert("RGB"))
        assert np.array_equal(img, original) and not mask.any()


def client_input(client, folder: str, name: str):
    import io

    return io.BytesIO(client.view(name, folder, "input"))


def test_template_without_a_face_and_missing_learned_model_are_clear_errors(client, folders):
    expect_node_error(client, fusion_prompt("fuse_targets", "fuse_noface"), "no face in the template")
    expect_node_error(client, fusion_prompt("fuse_targets", "fuse_template", backend="face_fusion"),
                      "'face_fusion'", "python install.py --models face_fusion", "damo/cv_unet-image-face-fusion_damo")


def test_rank_with_fusion_detections_matches_searching_again(client, folders):
    """FaceFusion hands its detections to RTSRank; the ranking is the one a fresh search gives."""
    def rank_node(detections: bool) -> dict:
        inputs = {"images": ["3", 0], "reference": ["2", 0], "top_n": 3, "backend": "embedded",
                  "min_face_fraction": 0.12, "max_face_fraction": 0.85, "if_none_kept": "return unranked",
                  "names": ["1", 1]}
        if detections:
            inputs["detections"] = ["3", 3]
        return {"class_type": "FaceChainRTSRank", "inputs": inputs}

    prompt = fusion_prompt("fuse_targets", "fuse_template", strength=0.8, prefix="fused_rank")
    prompt["7"], prompt["8"] = rank_node(True), rank_node(False)
    prompt["9"] = {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "fr_a"}}
    prompt["10"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "fr_b"}}
    entry = client.run(prompt)
    with_det, searched = ("\n".join(entry["outputs"][n]["text"]) for n in ("7", "8"))
    pattern = r"^- (\S+): similarity (-?[0-9.]+), rank (\d+)$"
    a = {m[0]: (float(m[1]), m[2]) for m in re.findall(pattern, with_det, re.M)}
    b = {m[0]: (float(m[1]), m[2]) for m in re.findall(pattern, searched, re.M)}
    assert set(a) == set(b) == {"biden1.jpg", "biden2.jpg", "rose1.jpg"}
    for name in a:
        assert a[name][1] == b[name][1] and abs(a[name][0] - b[name][0]) < 0.03, (name, a[name], b[name])
