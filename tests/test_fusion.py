"""FaceFusion through the real host on the real photos in ../shared/faces.

The real case is one photo of a person fused into other photos of the same person: the likeness to the
person's other photos (the template excluded) must be kept or raised and the face must stay natural (one
face, the outline where it was, eyes as sharp). Fused into other people, every output is natural by the
same measures or left unfused with a reason. Contact sheets of every image go to artifacts/.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from conftest import ARTIFACTS, FACES, expect_node_error, png_arrays, input_folder_of
from facechain_core.images import load_photo
from facechain_core.recognition import cosine
from fusion_measures import embedding, likeness, naturalness, sheet_row, write_sheet

# template, targets: each target is fused with the person's other photos (the template included, the
# target excluded) as the likeness reference, as the training crops are in the bundled workflow.
SAME_PERSON = {
    "obama": ("obama/obama1.jpg", ["obama/obama2.jpg", "obama/obama3.jpg"]),
    "rose": ("rose_leslie/rose1.jpg", ["rose_leslie/rose2.jpg"]),
    # the template is the person's most typical photo (highest mean likeness to the others), as Template Face picks
    "katy": ("katy_perry/img44.jpg", ["katy_perry/img26.jpg", "katy_perry/img27.jpg", "katy_perry/img28.jpg",
                                      "katy_perry/img42.jpg", "katy_perry/img43.jpg", "katy_perry/img45.jpg",
                                      "katy_perry/img46.jpg"]),
}
EXTRA_PHOTOS = {"obama": ["obama/obama4_240p.jpg"]}
CROSS = ["biden/biden1.jpg", "biden/biden2.jpg", "rose_leslie/rose1.jpg", "rose_leslie/rose2.jpg"]
LIKENESS_NOISE = 0.01  # SFace moves this much between two saves of the same image: "kept" within it


def fusion_prompt(targets: str, template: str, strength: float = 1.0, backend: str = "embedded",
                  prefix: str = "fused", reference: str | None = None) -> dict:
    p = {
        "1": {"class_type": "FaceChainLoadPhotos", "inputs": {"folder": targets, "max_photos": 20}},
        "2": {"class_type": "FaceChainLoadPhotos", "inputs": {"folder": template, "max_photos": 1}},
        "3": {"class_type": "FaceChainFaceFusion", "inputs": {
            "images": ["1", 0], "template": ["2", 0], "strength": strength, "backend": backend}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": prefix}},
        "5": {"class_type": "MaskToImage", "inputs": {"mask": ["3", 1]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": prefix + "_mask"}},
    }
    if reference:
        p["7"] = {"class_type": "FaceChainLoadPhotos", "inputs": {"folder": reference, "max_photos": 20}}
        p["3"]["inputs"]["reference"] = ["7", 0]
    return p


def report_lines(entry: dict) -> list[str]:
    return "\n".join(entry["outputs"]["3"]["text"]).splitlines()


@pytest.fixture(scope="module")
def folders(comfy_base) -> dict[str, str]:
    made = {"fuse_template": input_folder_of(comfy_base, "fuse_template", ["obama/obama1.jpg"]),
            "fuse_cross": input_folder_of(comfy_base, "fuse_cross", CROSS)}
    folder = comfy_base / "input" / "fuse_noface"  # images without a face: a flat card and a gradient
    folder.mkdir(exist_ok=True)
    Image.fromarray(np.full((96, 128, 3), 90, np.uint8)).save(folder / "card.png")
    ramp = np.linspace(0, 255, 160, dtype=np.float32)
    Image.fromarray(np.stack([np.tile(ramp, (120, 1))] * 3, -1).astype(np.uint8)).save(folder / "ramp.png")
    made["fuse_noface"] = "fuse_noface"
    return made


def check_unchanged_outside_mask(rel: str, original: np.ndarray, out: np.ndarray, mask: np.ndarray) -> None:
    assert out.shape == original.shape and mask.shape == original.shape[:2]
    assert np.array_equal(out[mask == 0], original[mask == 0]), f"{rel}: pixels outside the mask changed"


def test_same_person_fusion_keeps_likeness_and_looks_natural(client, comfy_base):
    rows, fused_count, lines = [], 0, []
    for person, (template, targets) in SAME_PERSON.items():
        tpl_folder = input_folder_of(comfy_base, f"same_{person}_tpl", [template])
        photos = [template] + targets + EXTRA_PHOTOS.get(person, [])
        for rel in targets:
            stem = rel.split("/")[-1].split(".")[0]
            target = input_folder_of(comfy_base, f"same_{person}_{stem}", [rel])
            reference = input_folder_of(comfy_base, f"same_{person}_{stem}_ref", [p for p in photos if p != rel])
            entry = client.run(fusion_prompt(target, tpl_folder, prefix=f"same_{stem}", reference=reference))
            (out,) = png_arrays(client.output_images(entry, "4"))
            (mask,) = [m[..., 0] for m in png_arrays(client.output_images(entry, "6"))]
            note = report_lines(entry)[1]
            original = load_photo(FACES / rel)
            check_unchanged_outside_mask(rel, original, out, mask)
            # rose_leslie has two photos: the template is then the only other one
            others = [embedding(load_photo(FACES / p)) for p in photos if p not in (rel, template)] or \
                [embedding(load_photo(FACES / template))]
            before, after = likeness(original, others), likeness(out, others)
            nat = naturalness(original, out)
            lines.append(f"{rel}: likeness to the other photos {before:.3f} -> {after:.3f}, eyes x"
                         f"{nat.eye_sharpness:.2f}, outline {nat.outline_shift:.3f} IOD, brow fringe "
                         f"{nat.brow_fringe:+.1f}, brows darker {nat.brow_darkening:+.1f} | {note}")
            rows.append(sheet_row(rel, load_photo(FACES / template), original, out,
                                  f"likeness {before:.3f}->{after:.3f} | {note}"))
            if "left unfused" in note:
                assert np.array_equal(out, original) and not mask.any(), note
                assert re.search(r"left unfused: \S", note), note  # with a reason
                continue
            fused_count += 1
            assert after >= before - LIKENESS_NOISE, f"{rel}: likeness {before:.3f} -> {after:.3f}\n{note}"
            assert not nat.problems(), f"{rel}: {nat.problems()}\n{note}"
    write_sheet(rows, ARTIFACTS / "fusion_same_person.png")
    print("\n".join(lines))
    # the real case is not a no-op: where the whole inner face cannot be fused safely, less of it is (a lower
    # strength, the eyes and brows, the brows): most same-person photos take the template
    assert fused_count >= 7, "\n".join(lines)


def test_cross_person_outputs_are_natural_or_left_unfused_with_a_reason(client, folders):
    entry = client.run(fusion_prompt(folders["fuse_cross"], folders["fuse_template"], prefix="fused_cross"))
    fused = png_arrays(client.output_images(entry, "4"))
    masks = [m[..., 0] for m in png_arrays(client.output_images(entry, "6"))]
    notes = report_lines(entry)[1:]
    template = load_photo(FACES / "obama" / "obama1.jpg")
    rows = []
    # LoadFacePhotos lists the folder in name order
    for rel, out, mask, note in zip(sorted(CROSS, key=lambda r: r.split("/")[-1]), fused, masks, notes):
        original = load_photo(FACES / rel)
        check_unchanged_outside_mask(rel, original, out, mask)
        rows.append(sheet_row(rel, template, original, out, note))
        if "left unfused" in note:
            assert np.array_equal(out, original) and re.search(r"left unfused: \S", note), note
            continue
        nat = naturalness(original, out)
        print(f"{rel}: eyes x{nat.eye_sharpness:.2f}, outline {nat.outline_shift:.3f} IOD, brow fringe "
              f"{nat.brow_fringe:+.1f}, brows darker {nat.brow_darkening:+.1f} | {note}")
        assert not nat.problems(), f"{rel}: {nat.problems()}\n{note}"
        # the face is the template's more than before: fusion did something
        t = embedding(template)
        assert cosine(embedding(out), t) > cosine(embedding(original), t), note
    write_sheet(rows, ARTIFACTS / "fusion_cross_person.png")
    # the guards speak: a closed mouth against the template's open smile fuses the eyes and brows only
    assert any("eyes and brows only" in n and "mouth closed in the image" in n for n in notes), notes


def test_strength_scales_the_change_and_zero_changes_nothing(client, folders):
    def run(strength: float, prefix: str):
        entry = client.run(fusion_prompt(folders["fuse_cross"], folders["fuse_template"], strength, prefix=prefix))
        return png_arrays(client.output_images(entry, "4")), report_lines(entry)

    full, full_notes = run(0.9, "fs09")
    half, half_notes = run(0.45, "fs045")
    zero, zero_notes = run(0.0, "fs0")
    originals = [load_photo(FACES / r) for r in sorted(CROSS, key=lambda r: r.split("/")[-1])]
    compared = 0
    for o, f, h, z, note, half_note in zip(originals, full, half, zero, full_notes[1:], half_notes[1:]):
        assert np.array_equal(z, o)
        if "left unfused" in half_note:  # half the change can fail the after-check (too small a likeness gain)
            assert np.array_equal(h, o), half_note
        if "left unfused" in note or "left unfused" in half_note:
            continue
        d_full = np.abs(f.astype(int) - o).sum()
        d_half = np.abs(h.astype(int) - o).sum()
        assert 0.1 * d_full < d_half < 0.9 * d_full, note
        compared += 1
    assert compared >= 1, full_notes + half_notes
    assert "strength 0, left unchanged" in "\n".join(zero_notes)


def test_images_without_a_face_pass_through_and_the_report_says_so(client, folders):
    entry = client.run(fusion_prompt(folders["fuse_noface"], folders["fuse_template"], prefix="fused_noface"))
    out = png_arrays(client.output_images(entry, "4"))
    masks = png_arrays(client.output_images(entry, "6"))
    report = "\n".join(report_lines(entry))
    assert report.splitlines()[0] == "FaceFusion: fused the template face into 0 of 2 images"
    assert report.count("no face found, left unchanged") == 2
    for name, img, mask in zip(["card.png", "ramp.png"], out, masks):
        original = np.asarray(Image.open(client_input(client, folders["fuse_noface"], name)).convert("RGB"))
        assert np.array_equal(img, original) and not mask.any()


def client_input(client, folder: str, name: str):
    import io

    return io.BytesIO(client.view(name, folder, "input"))


def test_template_without_a_face_and_missing_learned_model_are_clear_errors(client, folders):
    expect_node_error(client, fusion_prompt(folders["fuse_cross"], folders["fuse_noface"]), "no face in the template")
    expect_node_error(client, fusion_prompt(folders["fuse_cross"], folders["fuse_template"],
                                            reference=folders["fuse_noface"]), "no face in the reference photos")
    expect_node_error(client, fusion_prompt(folders["fuse_cross"], folders["fuse_template"], backend="face_fusion"),
                      "'face_fusion'", "python install.py --models face_fusion", "damo/cv_unet-image-face-fusion_damo")


def test_rank_with_fusion_detections_matches_searching_again_and_names_reduced_fusions(client, folders):
    """FaceFusion hands its detections to RTSRank; the ranking is the one a fresh search gives, and the
    images whose fusion was reduced or skipped are named in RTSRank's report."""
    def rank_node(detections: bool) -> dict:
        inputs = {"images": ["3", 0], "reference": ["2", 0], "top_n": 4, "backend": "embedded",
                  "min_face_fraction": 0.12, "max_face_fraction": 0.85, "if_none_kept": "return unranked",
                  "names": ["1", 1], "accept_likeness": 0.0}
        if detections:
            inputs["detections"] = ["3", 3]
        return {"class_type": "FaceChainRTSRank", "inputs": inputs}

    prompt = fusion_prompt(folders["fuse_cross"], folders["fuse_template"], strength=0.8, prefix="fused_rank")
    prompt["7"], prompt["8"] = rank_node(True), rank_node(False)
    prompt["9"] = {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "fr_a"}}
    prompt["10"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "fr_b"}}
    entry = client.run(prompt)
    with_det, searched = ("\n".join(entry["outputs"][n]["text"]) for n in ("7", "8"))
    pattern = r"^- (\S+): likeness (\d+)%, similarity (-?[0-9.]+), rank (\d+)"
    a = {m[0]: (float(m[2]), m[3]) for m in re.findall(pattern, with_det, re.M)}
    b = {m[0]: (float(m[2]), m[3]) for m in re.findall(pattern, searched, re.M)}
    assert set(a) == set(b) == {"biden1.jpg", "biden2.jpg", "rose1.jpg", "rose2.jpg"}
    for name in a:
        # same rank; the fused face found afresh has slightly different keypoints (its features are the template's)
        assert a[name][1] == b[name][1] and abs(a[name][0] - b[name][0]) < 0.05, (name, a[name], b[name])
    fusion_notes = report_lines(entry)[1:]
    reduced = [n for n in fusion_notes if "fused less" in n or "reduced strength" in n or "left unfused" in n]
    assert reduced, fusion_notes
    assert with_det.count("[fusion ") == len(reduced), with_det
    assert "[fusion " not in searched
