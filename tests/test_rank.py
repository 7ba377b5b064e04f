"""RTSRank through the real host on the real photos in ../shared/faces."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import FACES, expect_node_error, png_arrays, input_folder_of
from facechain_core import model_store
from facechain_core.images import load_photo

OBAMA = ["obama/obama2.jpg", "obama/obama3.jpg", "obama/obama4_240p.jpg",
         "hard/partial_face.jpg", "hard/rgba_32bit.png", "hard/tiny_face.jpg"]
OTHERS = ["biden/biden1.jpg", "biden/biden2.jpg", "rose_leslie/rose1.jpg", "rose_leslie/rose2.jpg"]
TWO_PEOPLE = "hard/two_people.jpg"


def rank_prompt(images: str, reference: str, top_n: int = 20, backend: str = "embedded", align_reference=False,
                prefix: str = "ranked", if_none: str = "return unranked", accept: float | None = None) -> dict:
    p = {
        "1": {"class_type": "FaceChainLoadPhotos", "inputs": {"folder": images, "max_photos": 50}},
        "2": {"class_type": "FaceChainLoadPhotos", "inputs": {"folder": reference, "max_photos": 50}},
        "3": {"class_type": "FaceChainRTSRank", "inputs": {
            "images": ["1", 0], "names": ["1", 1], "reference": ["2", 0], "top_n": top_n, "backend": backend,
            "min_face_fraction": 0.12, "max_face_fraction": 0.85, "if_none_kept": if_none}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": prefix}},
    }
    if accept is not None:
        p["3"]["inputs"]["accept_likeness"] = accept
    if align_reference:
        p["5"] = {"class_type": "FaceChainFaceAlign", "inputs": {
            "photos": ["2", 0], "names": ["2", 1], "size": 256, "face_fraction": 0.40, "face_centre": 0.42,
            "detector": "embedded"}}
        p["3"]["inputs"]["reference"] = ["5", 0]
    return p


RANKED = r"^- (\S+): likeness (\d+)%, similarity (-?[0-9.]+), rank (\d+)"
REJECTED = r"^- (\S+): rejected, likeness (\d+)% below the accept threshold"


def ranked_names(report: str) -> list[str]:
    found = re.findall(RANKED, report, re.M)
    return [name for name, _, _, _ in sorted(found, key=lambda t: int(t[3]))]


def identify(saved: np.ndarray, photos: dict[str, np.ndarray]) -> str:
    """Which input photo a saved output is (RTSRank returns the input pixels unchanged)."""
    same = [n for n, a in photos.items() if a.shape == saved.shape and np.array_equal(a, saved)]
    assert len(same) == 1, f"output matches {same}"
    return same[0]


@pytest.fixture(scope="module")
def mixed(comfy_base) -> tuple[str, dict[str, np.ndarray]]:
    files = OBAMA + OTHERS + [TWO_PEOPLE]
    name = input_folder_of(comfy_base, "rank_mixed", files)
    return name, {f.split("/")[-1]: load_photo(FACES / f) for f in files}


@pytest.mark.parametrize("align_reference", [False, True], ids=["template_photo", "mean_of_training_crops"])
def test_every_obama_photo_ranks_above_every_other_person(client, comfy_base, mixed, align_reference):
    images, photos = mixed
    if align_reference:  # the mean of all the training faces (aligned crops) as the reference
        reference = input_folder_of(comfy_base, "rank_ref_all",
                                    ["obama/obama1.jpg", "obama/obama2.jpg", "obama/obama3.jpg"])
    else:
        reference = input_folder_of(comfy_base, "rank_ref_obama1", ["obama/obama1.jpg"])
    entry = client.run(rank_prompt(images, reference, align_reference=align_reference, prefix="ranked_mix"))
    report = "\n".join(entry["outputs"]["3"]["text"])
    order = ranked_names(report)
    obama = {f.split("/")[-1] for f in OBAMA}
    others = {f.split("/")[-1] for f in OTHERS}
    # every obama photo is accepted (as alike as his own photos), every other person rejected with the reason
    assert set(order) == obama, report
    assert {m[0] for m in re.findall(REJECTED, report, re.M)} == others, report
    assert "two_people.jpg: dropped, 2 faces" in report
    saved = png_arrays(client.output_images(entry, "4"))
    assert [identify(s, photos) for s in saved] == order
    likeness = [int(m[1]) for m in re.findall(RANKED, report, re.M)]
    assert min(likeness) >= 70 and max(int(m[1]) for m in re.findall(REJECTED, report, re.M)) < 40, report
    if align_reference:  # three photos: 100 % is their own leave-one-out similarity
        assert "leave-one-out over 3 reference photos" in report.splitlines()[0], report


def test_top_n_and_implausible_face_sizes(client, comfy_base):
    folder = comfy_base / "input" / "rank_sizes"
    folder.mkdir(exist_ok=True)
    photo = load_photo(FACES / "obama" / "obama2.jpg")
    canvas = np.full((1200, 1200, 3), 200, np.uint8)  # the face becomes ~4% of the side: implausibly small
    small = np.asarray(Image.fromarray(photo).resize((photo.shape[1] // 8, photo.shape[0] // 8)))
    canvas[500:500 + small.shape[0], 500:500 + small.shape[1]] = small
    Image.fromarray(canvas).save(folder / "far_away.png")
    Image.fromarray(np.full((256, 256, 3), 128, np.uint8)).save(folder / "no_face.png")
    shutil.copy(FACES / "obama" / "obama3.jpg", folder / "near.jpg")
    shutil.copy(FACES / "obama" / "obama4_240p.jpg", folder / "low_res.jpg")
    reference = input_folder_of(comfy_base, "rank_ref_obama1", ["obama/obama1.jpg"])
    entry = client.run(rank_prompt("rank_sizes", reference, top_n=1, prefix="ranked_sizes"))
    report = "\n".join(entry["outputs"]["3"]["text"])
    assert "far_away.png: dropped, face too small" in report
    assert "no_face.png: dropped, no face found" in report
    assert "returned" in report.splitlines()[0] and report.startswith("RTSRank: 1 of 4 images returned")
    assert len(client.output_images(entry, "4")) == 1
    assert re.search(r"- \S+: likeness \d+%, similarity [0-9.]+, below the top 1", report)


def test_nothing_kept_returns_unranked_or_stops_as_asked(client, comfy_base):
    folder = comfy_base / "input" / "rank_noise"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(folder / f"noise{i}.png")
    reference = input_folder_of(comfy_base, "rank_ref_obama1", ["obama/obama1.jpg"])
    entry = client.run(rank_prompt("rank_noise", reference, top_n=2, prefix="ranked_noise"))
    assert len(client.output_images(entry, "4")) == 2
    assert "returned the first ones unranked" in "\n".join(entry["outputs"]["3"]["text"])
    expect_node_error(client, rank_prompt("rank_noise", reference, top_n=2, if_none="stop with an error"),
                      "kept no image", "no face found")
    expect_node_error(client, rank_prompt(reference, "rank_noise"), "no face in the reference")


def write_tiny_arcface(path):
    """A random-weight ONNX recogniser with ArcFace's signature: [N,3,112,112] float in, [N,512] out."""
    import onnx  # a test tool (tests/requirements.txt)
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    conv_w = numpy_helper.from_array(rng.normal(0, 0.2, (16, 3, 8, 8)).astype(np.float32), "conv_w")
    fc_w = numpy_helper.from_array(rng.normal(0, 0.2, (16 * 8 * 8, 512)).astype(np.float32), "fc_w")
    shape = numpy_helper.from_array(np.array([0, -1], np.int64), "flat_shape")
    nodes = [helper.make_node("Conv", ["input.1", "conv_w"], ["c"], strides=[16, 16], pads=[4, 4, 4, 4]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Reshape", ["r", "flat_shape"], ["f"]),
             helper.make_node("MatMul", ["f", "fc_w"], ["embedding"])]
    graph = helper.make_graph(nodes, "tiny_arcface",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 512])],
                              [conv_w, fc_w, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def test_learned_recognisers_missing_then_tiny_arcface_runs(client, comfy_base, mixed):
    images, _ = mixed
    reference = input_folder_of(comfy_base, "rank_ref_obama1", ["obama/obama1.jpg"])
    target = comfy_base / "models" / "facechain" / model_store.catalogue()["learned"]["arcface"]["path"]
    assert not target.exists()
    expect_node_error(client, rank_prompt(images, reference, backend="arcface"),
                      "'arcface'", "model.onnx", "python install.py --models arcface", "immich-app/buffalo_l")
    expect_node_error(client, rank_prompt(images, reference, backend="rts"),
                      "'rts'", "python install.py --models rts", "damo/cv_ir_face-recognition-ood_rts")
    write_tiny_arcface(target)
    entry = client.run(rank_prompt(images, reference, top_n=3, backend="arcface", prefix="ranked_arcface", accept=0.0))
    report = "\n".join(entry["outputs"]["3"]["text"])
    assert report.startswith("RTSRank: 3 of 11 images returned") and "two_people.jpg: dropped, 2 faces" in report
    scores = [float(s) for s in re.findall(r"likeness \d+%, similarity (-?[0-9.]+)", report)]
    assert len(scores) == 10 and all(-1.0 <= s <= 1.0001 for s in scores)
    assert len(client.output_images(entry, "4")) == 3


def disfigured(rgb: np.ndarray) -> np.ndarray:
    """A copy whose face is torn: a swirl around the face's centre and the lower face sheared sideways, as a
    broken warp smears a face (made here, so the ranking has a known-bad image)."""
    import cv2

    from facechain_core.threads import detect_faces_per_thread

    face = detect_faces_per_thread(rgb)[0]
    cx, cy = face.centre
    radius = face.size / 2
    yy, xx = np.mgrid[0:rgb.shape[0], 0:rgb.shape[1]].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    r = np.sqrt(dx * dx + dy * dy)
    turn = 2.2 * np.exp(-(r / radius) ** 2)
    map_x = cx + dx * np.cos(turn) - dy * np.sin(turn)
    map_y = cy + dx * np.sin(turn) + dy * np.cos(turn)
    map_x += np.where(dy > 0, 0.25 * face.size * np.exp(-(r / radius) ** 2), 0)
    return cv2.remap(rgb, map_x.astype(np.float32), map_y.astype(np.float32), cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REFLECT)


def test_a_disfigured_face_ranks_below_natural_ones_and_is_rejected(client, comfy_base):
    """Likeness in percent of the person's own photo-to-photo similarity, on the likeness output and in the
    report; a face torn by a bad warp ranks below every natural photo and comes back on the rejected output."""
    folder = comfy_base / "input" / "rank_disfigured"
    folder.mkdir(exist_ok=True)
    natural = ["obama/obama2.jpg", "obama/obama3.jpg"]
    for rel in natural:
        shutil.copy(FACES / rel, folder / rel.split("/")[-1])
        Image.fromarray(disfigured(load_photo(FACES / rel))).save(folder / f"torn_{rel.split('/')[-1][:-4]}.png")
    reference = input_folder_of(comfy_base, "rank_ref_training", ["obama/obama1.jpg", "obama/obama4_240p.jpg"])
    prompt = rank_prompt("rank_disfigured", reference, top_n=4, align_reference=True, prefix="ranked_torn")
    prompt["6"] = {"class_type": "PreviewAny", "inputs": {"source": ["3", 3]}}
    prompt["7"] = {"class_type": "SaveImage", "inputs": {"images": ["3", 4], "filename_prefix": "rejected_torn"}}
    prompt["8"] = {"class_type": "PreviewAny", "inputs": {"source": ["3", 5]}}
    entry = client.run(prompt)
    report = "\n".join(entry["outputs"]["3"]["text"])
    likeness = {m[0]: int(m[1]) for m in re.findall(r"^- (\S+): (?:rejected, )?likeness (\d+)%", report, re.M)}
    assert set(likeness) == {"obama2.jpg", "obama3.jpg", "torn_obama2.png", "torn_obama3.png"}, report
    assert max(likeness["torn_obama2.png"], likeness["torn_obama3.png"]) < min(
        likeness["obama2.jpg"], likeness["obama3.jpg"]), report
    assert ranked_names(report) == sorted(["obama2.jpg", "obama3.jpg"], key=lambda n: -likeness[n]), report
    assert {m[0] for m in re.findall(REJECTED, report, re.M)} == {"torn_obama2.png", "torn_obama3.png"}, report
    # the likeness output: the returned images' percentages, in order; the rejected images and their reasons
    shown = [float(t) for t in entry["outputs"]["6"]["text"]]
    assert [round(v) for v in shown] == [likeness[n] for n in ranked_names(report)]
    assert len(client.output_images(entry, "7")) == 2
    reasons = entry["outputs"]["8"]["text"]
    assert len(reasons) == 2 and all("below the accept threshold" in r for r in reasons), reasons
