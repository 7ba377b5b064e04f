"""FaceAlign through the real host, measured on its output with the detector itself."""

import numpy as np
import pytest
from PIL import Image

from conftest import FACES, expect_node_error, png_arrays
from facechain_core.align import mirrored_tilt
from facechain_core.detect import detect_faces


def align_prompt(folder: str, size: int = 512, prefix: str = "aligned") -> dict:
    return {
        "1": {"class_type": "FaceChainLoadPhotos", "inputs": {"folder": folder, "max_photos": 20}},
        "2": {"class_type": "FaceChainFaceAlign", "inputs": {
            "photos": ["1", 0], "names": ["1", 1], "size": size, "face_fraction": 0.40,
            "face_centre": 0.42, "detector": "embedded"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def report_of(entry: dict, node_id: str = "2") -> str:
    return "\n".join(entry["outputs"][node_id]["text"])


def measure(crop: np.ndarray) -> tuple[float, float, float]:
    """(eye tilt in degrees, face side / crop side, face centre height / crop side) of the subject."""
    faces = detect_faces(crop)
    assert faces, "no face in the crop"
    f = faces[0]  # the largest; a crop may show a bystander at its edge
    side = crop.shape[0]
    assert abs(f.centre[0] / side - 0.5) < 0.05, "the largest face is not the centred subject"
    return mirrored_tilt(crop, f), f.size / side, f.centre[1] / side


@pytest.mark.parametrize("person", ["obama", "biden", "rose_leslie"])
def test_every_photo_gives_one_level_crop_in_facechain_band(client, person):
    photos = sorted(p for p in (FACES / person).iterdir() if p.suffix.lower() in (".jpg", ".png"))
    entry = client.run(align_prompt(person, prefix=f"aligned_{person}"))
    crops = png_arrays(client.output_images(entry, "3"))
    assert len(crops) == len(photos)
    for crop in crops:
        assert crop.shape == (512, 512, 3)
        tilt, fraction, centre = measure(crop)
        assert abs(tilt) <= 2.0, f"eyes tilted {tilt:.2f} deg"
        assert 0.35 <= fraction <= 0.45, f"face fraction {fraction:.3f}"
        assert 0.35 <= centre <= 0.50, f"face centre at {centre:.3f} of the side"
    assert f"kept {len(photos)} of {len(photos)}" in report_of(entry)


def test_hard_cases_two_people_by_identity_rgba_and_tiny_face_work(client):
    # hard/'s single-face photos are all obama's: two_people.jpg keeps his face, the one that matches them
    entry = client.run(align_prompt("hard", size=256, prefix="aligned_hard"))
    report = report_of(entry)
    crops = png_arrays(client.output_images(entry, "3"))
    assert "two_people.jpg: kept" in report and "chosen by identity" in report
    for kept in ("rgba_32bit.png: kept", "tiny_face.jpg: kept", "partial_face.jpg: kept"):
        assert kept in report
    assert len(crops) == 4
    for crop in crops:
        assert crop.shape == (256, 256, 3)
        tilt, fraction, _ = measure(crop)
        assert abs(tilt) <= 2.0 and 0.35 <= fraction <= 0.45


def test_white_fill_outside_the_photo(client, comfy_base):
    # A narrow photo: the square crop reaches past its left and right edges, which must be pure white.
    src = np.asarray(Image.open(FACES / "obama" / "obama1.jpg").convert("RGB"))
    h, w = src.shape[:2]
    narrow = src[:, w // 2 - w // 6: w // 2 + w // 6]
    folder = comfy_base / "input" / "narrow"
    folder.mkdir(exist_ok=True)
    Image.fromarray(narrow).save(folder / "narrow.png")
    entry = client.run(align_prompt("narrow", size=256, prefix="aligned_narrow"))
    (crop,) = png_arrays(client.output_images(entry, "3"))
    assert (crop[:, :8] >= 250).all() and (crop[:, -8:] >= 250).all()


def make_folder(comfy_base, name: str, files: dict) -> str:
    folder = comfy_base / "input" / name
    folder.mkdir(exist_ok=True)
    for fname, writer in files.items():
        writer(folder / fname)
    return name


def test_bad_inputs_give_clear_errors_and_server_keeps_serving(client, comfy_base):
    corrupt = make_folder(comfy_base, "bad_corrupt",
                          {"broken.jpg": lambda p: p.write_bytes(b"\xff\xd8\xff not a jpeg")})
    expect_node_error(client, align_prompt(corrupt), "broken.jpg", "could not be read")

    empty = make_folder(comfy_base, "bad_empty", {"notes.txt": lambda p: p.write_text("no photos here")})
    expect_node_error(client, align_prompt(empty), "holds no photos")

    rng = np.random.default_rng(0)
    noface = make_folder(comfy_base, "bad_noface", {
        "texture.png": lambda p: Image.fromarray(rng.integers(0, 255, (400, 600, 3), dtype=np.uint8)).save(p)})
    expect_node_error(client, align_prompt(noface), "no usable face", "texture.png", "no face found")

    tiny = make_folder(comfy_base, "bad_1x1", {"dot.png": lambda p: Image.new("RGB", (1, 1), (200, 150, 120)).save(p)})
    expect_node_error(client, align_prompt(tiny), "dot.png", "too small")

    huge = make_folder(comfy_base, "bad_huge",
                       {"huge.png": lambda p: Image.new("RGB", (12000, 12000), (90, 90, 90)).save(p)})
    expect_node_error(client, align_prompt(huge), "huge.png", "12000x12000", "downscale")

    expect_node_error(client, align_prompt("../../"), "outside ComfyUI's input directory")
    expect_node_error(client, align_prompt("no_such_folder"), "was not found")

    learned = align_prompt("obama")
    learned["2"]["inputs"]["detector"] = "damofd"
    expect_node_error(client, learned, "damofd", "not installed", "python install.py --models damofd",
                      "models/facechain")

    # the server still answers, and a good prompt still runs
    entry = client.run(align_prompt("rose_leslie", size=128, prefix="after_errors"))
    assert len(client.output_images(entry, "3")) == 2
