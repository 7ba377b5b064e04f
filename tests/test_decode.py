"""Photos that decoded wrong: 16-bit grayscale (PIL modes I;16, I;16B, I) and animated GIFs, through the
real host's Load Face Photos, whose report names every file it skipped and why."""

import numpy as np
from conftest import FACES, png_arrays
from PIL import Image

from facechain_core.images import read_photo, wide_gray_to_uint8


def gray8(rel: str) -> np.ndarray:
    return np.asarray(Image.open(FACES / rel).convert("L"))


def make_decode_folder(folder) -> dict:
    """16-bit and animated copies of shared photos, plus files that must be skipped; the expected pixels."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    expected = {}
    # 16-bit: the 8-bit gray times 257 plus noise in the low byte, which the 8-bit result must drop
    g = gray8("obama/obama1.jpg")
    wide = np.minimum(g.astype(np.int64) * 257 + rng.integers(0, 200, g.shape), 65535).astype(np.uint16)
    Image.fromarray(wide).save(folder / "a_gray16.png")  # mode I;16
    expected["a_gray16.png"] = g
    g = gray8("rose_leslie/rose1.jpg")
    wide = (g.astype(np.uint16) * 257).astype(">u2")
    Image.frombytes("I;16B", (g.shape[1], g.shape[0]), wide.tobytes()).save(folder / "b_gray16b.tif")
    expected["b_gray16b.tif"] = g
    g = gray8("katy_perry/img42.jpg")
    Image.fromarray(g.astype(np.int32) * 257).save(folder / "c_gray32.tif")  # mode I
    expected["c_gray32.tif"] = g
    first = Image.open(FACES / "obama" / "obama2.jpg").convert("RGB")
    later = [Image.new("RGB", first.size, c) for c in ((30, 200, 40), (200, 30, 40))]
    first.save(folder / "d_animated.gif", save_all=True, append_images=later, duration=200, loop=0)
    expected["d_animated.gif"] = np.asarray(Image.open(folder / "d_animated.gif").convert("RGB"))
    (folder / "e_notes.txt").write_text("not a photo")
    (folder / "f_broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    return expected


def test_16_bit_and_animated_photos_load_right_and_skips_are_reported(client, comfy_base):
    expected = make_decode_folder(comfy_base / "input" / "decode")
    for name in ("a_gray16.png", "b_gray16b.tif", "c_gray32.tif"):
        assert Image.open(comfy_base / "input" / "decode" / name).mode in ("I;16", "I;16B", "I")
    prompt = {
        "1": {"class_type": "FaceChainLoadPhotos", "inputs": {"folder": "decode", "max_photos": 20}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "decoded"}},
        "3": {"class_type": "FaceChainFaceAlign", "inputs": {
            "photos": ["1", 0], "names": ["1", 1], "size": 256, "face_fraction": 0.40, "face_centre": 0.42,
            "detector": "embedded"}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["1", 2]}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["3", 2]}},
    }
    entry = client.run(prompt)
    report = "\n".join(entry["outputs"]["4"]["text"])
    decoded = png_arrays(client.output_images(entry, "2"))
    names = sorted(expected)
    assert len(decoded) == len(names)
    for name, img in zip(names, decoded):
        want = expected[name]
        if want.ndim == 2:
            assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()
            diff = np.abs(img[..., 0].astype(int) - want)
            assert diff.max() <= 1, f"{name}: off by up to {diff.max()}"
            assert (img == 255).mean() < 0.2, f"{name}: mostly white"
        else:
            assert np.abs(img.astype(int) - want).mean() < 1.0, f"{name}: not the first frame"
    assert "a_gray16.png: loaded, I;16 grayscale scaled to 8 bits" in report
    assert "b_gray16b.tif: loaded, I;16B grayscale scaled to 8 bits" in report
    assert "c_gray32.tif: loaded, I grayscale scaled to 8 bits" in report
    assert "d_animated.gif: loaded, first frame of 3 (animated GIF)" in report, report
    assert "e_notes.txt: skipped, not a photo type" in report
    assert "f_broken.jpg: skipped, Photo 'f_broken.jpg' could not be read" in report
    assert "4 photos from 'decode', 2 files skipped" in report
    # every decoded photo has its face found
    align = "\n".join(entry["outputs"]["5"]["text"])
    assert "kept 4 of 4" in align, align


def test_wide_gray_scaling_rules():
    ramp = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)
    assert (wide_gray_to_uint8(Image.fromarray(ramp)) == np.arange(256).reshape(16, 16)).all()
    eight = Image.fromarray(np.arange(256, dtype=np.int32).reshape(16, 16))  # mode I holding 8-bit values
    assert (wide_gray_to_uint8(eight) == np.arange(256).reshape(16, 16)).all()
    floats = Image.fromarray(np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16))
    assert wide_gray_to_uint8(floats).max() == 255 and wide_gray_to_uint8(floats).min() == 0


def test_read_photo_notes(tmp_path):
    g = gray8("obama/obama1.jpg")
    Image.fromarray(g.astype(np.uint16) * 257).save(tmp_path / "g.png")
    photo = read_photo(tmp_path / "g.png")
    assert photo.note == "I;16 grayscale scaled to 8 bits" and photo.image.shape == (*g.shape, 3)
    assert read_photo(FACES / "obama" / "obama1.jpg").note == ""
