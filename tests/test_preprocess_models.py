"""The learned backends of the preprocessing nodes through the real host.

Each tiny model has the real file layout and input/output signature (random or chosen weights) and sits
where the model store looks (<base>/models/facechain/...), so the nodes run their real loading code:
WD14 tagger (ONNX + selected_tags.csv), FairFace (torchvision ResNet-34 state dict), FQA (ONNX).
M2FP and ABPN run as ModelScope pipelines (ABPN also needs TensorFlow and a hub detector) that cannot be
built small; for those, and for every learned backend chosen while absent, the missing-model error is tested.
"""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import expect_node_error

TRIGGER = "fcsks"
# (name, category, bias): category 0 general, 4 character, 9 rating. A large bias keeps a tag on (or off)
# whatever the image, so the expected captions are known; the image still flows through the weights.
WD14_TAGS = [
    ("general", 9, 6.0), ("sensitive", 9, -6.0), ("short_hair", 0, 6.0), ("black_hair", 0, 6.0),
    ("smile", 0, 6.0), ("open_mouth", 0, -6.0), ("brown_eyes", 0, 6.0), ("1boy", 0, 6.0), ("solo", 0, 6.0),
    ("upper_body", 0, 6.0), ("white_background", 0, 6.0), ("necktie", 0, 6.0), ("nose", 0, 6.0),
    ("long_hair", 0, -6.0), ("^_^", 0, -6.0), ("barack_obama", 4, 6.0),
]
EXPECTED_TAGS = {"short hair", "black hair", "smile", "white background", "necktie"}


def build_wd14(folder: Path, side: int = 448) -> None:
    """model.onnx: [N, side, side, 3] BGR 0-255 -> mean colour -> linear -> sigmoid [N, tags]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    n = len(WD14_TAGS)
    w = (rng.standard_normal((3, n)) / 255.0).astype(np.float32)
    b = np.array([t[2] for t in WD14_TAGS], np.float32)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input_1:0", "axes"], ["pooled"], keepdims=0),
         helper.make_node("MatMul", ["pooled", "w"], ["logits0"]),
         helper.make_node("Add", ["logits0", "b"], ["logits"]),
         helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"])],
        "tiny_wd14",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, ["N", side, side, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["N", n])],
        [numpy_helper.from_array(np.array([1, 2], np.int64), "axes"), numpy_helper.from_array(w, "w"),
         numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    with open(folder / "selected_tags.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["tag_id", "name", "category", "count"])
        for i, (name, cat, _) in enumerate(WD14_TAGS):
            out.writerow([1000 + i, name, cat, 10000 - i])


def build_fqa(folder: Path) -> None:
    """model.onnx: [1, 3, 112, 112] RGB in -1..1 -> [1, 1] score (sigmoid of a weighted mean)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input", "axes"], ["pooled"], keepdims=0),
         helper.make_node("MatMul", ["pooled", "w"], ["logit"]),
         helper.make_node("Sigmoid", ["logit"], ["score"])],
        "tiny_fqa",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1, 1])],
        [numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
         numpy_helper.from_array(np.array([[2.0], [-1.0], [0.5]], np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    (folder / "configuration.json").write_text(json.dumps({"task": "face-quality-assessment"}))


def build_fairface(folder: Path) -> None:
    """pytorch_model.pt: torchvision ResNet-34 with an 18-way head (7 race, 2 gender, 9 age bins), random
    weights except the head, which says 'female, 60-69' whatever the face (FaceChain: 'a mature woman')."""
    import torch
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet34(weights=None)
    net.fc = torch.nn.Linear(net.fc.in_features, 18)
    with torch.no_grad():
        net.fc.weight.mul_(0.01)
        net.fc.bias.zero_()
        net.fc.bias[8] = 8.0  # female
        net.fc.bias[9 + 6] = 8.0  # age bin 60-69
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), folder / "pytorch_model.pt")
    (folder / "configuration.json").write_text(json.dumps({"task": "face-attribute-recognition"}))


@pytest.fixture
def model_dir(comfy_base):
    """Folders made here are removed afterwards, so other tests see an offline model store again."""
    made = []

    def make(name: str) -> Path:
        path = comfy_base / "models" / "facechain" / name
        made.append(path)
        return path

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def crops(folder: str = "obama") -> dict:
    return {
        "1": {"class_type": "FaceChainLoadPhotos", "inputs": {"folder": folder, "max_photos": 20}},
        "2": {"class_type": "FaceChainFaceAlign", "inputs": {
            "photos": ["1", 0], "names": ["1", 1], "size": 512, "face_fraction": 0.4, "face_centre": 0.42,
            "detector": "embedded"}},
    }


def autotag(subject_from="input", tagger="none", trigger=TRIGGER) -> dict:
    p = crops()
    p["3"] = {"class_type": "FaceChainHumanParse", "inputs": {"images": ["2", 0], "faces": ["2", 1],
                                                              "backend": "embedded"}}
    p["4"] = {"class_type": "FaceChainAutoTag", "inputs": {
        "images": ["3", 0], "faces": ["2", 1], "trigger": trigger, "subject": "a person",
        "subject_from": subject_from, "tagger": tagger, "threshold": 0.35}}
    p["5"] = {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}}
    p["6"] = {"class_type": "PreviewAny", "inputs": {"source": ["4", 2]}}
    return p


def text(entry, nid):
    return "\n".join(entry["outputs"][nid]["text"])


def test_wd14_tagger_tags_filtered_by_facechain_rules(client, model_dir):
    build_wd14(model_dir("wd14"))
    for tagger in ("wd14", "auto"):  # auto finds the installed tagger by itself
        entry = client.run(autotag(tagger=tagger))
        captions = text(entry, "5").splitlines()
        assert len(captions) == 4
        for c in captions:
            parts = c.split(", ")
            assert parts[:2] == [TRIGGER, "a person"]
            assert set(parts[2:]) == EXPECTED_TAGS, parts
        # tags on every photo that name hair/face/mouth/skin/smile, most common first, then by name
        assert text(entry, "6") == f"{TRIGGER}, a person, black hair, short hair, smile"
        assert "no descriptive tags" not in text(entry, "4")


def test_fairface_subject_phrase_summed_over_photos(client, model_dir):
    build_fairface(model_dir("fairface"))
    entry = client.run(autotag(subject_from="fairface"))
    captions = text(entry, "5").splitlines()
    assert captions and all(c == f"{TRIGGER}, a mature woman" for c in captions), captions
    assert "from FairFace over 4 photos" in text(entry, "4")


def test_fqa_scores_choose_the_template(client, model_dir):
    build_fqa(model_dir("fqa"))
    p = crops()
    p["3"] = {"class_type": "FaceChainTemplateFace", "inputs": {
        "images": ["2", 0], "faces": ["2", 1], "scorer": "fqa", "min_quality": 0.0}}
    p["4"] = {"class_type": "PreviewAny", "inputs": {"source": ["3", 4]}}
    entry = client.run(p)
    report = text(entry, "3")
    assert report.startswith("Face quality (fqa)")
    scores = {}
    assert report.splitlines()[-1] == "Models: fqa (?, licence unknown: check before commercial use)"
    for line in report.splitlines()[1:-1]:
        name = line[2:].split(":")[0]
        scores[name] = float(line.split(": ")[1].split(" ")[0])  # the score, which is the fqa value
        assert f"fqa {scores[name]:.2f}" in line
    assert len(scores) == 4 and all(0.0 < s < 1.0 for s in scores.values())
    top = max(scores.values())  # printed to 3 decimals: any photo tied at the top may be the template
    assert scores[json.loads(text(entry, "4"))[0]["name"]] == top


def test_learned_backends_missing_offline_say_what_to_fetch(client):
    cases = []
    p = crops()
    p["3"] = {"class_type": "FaceChainHumanParse", "inputs": {"images": ["2", 0], "faces": ["2", 1],
                                                              "backend": "m2fp"}}
    p["4"] = {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}
    cases.append((p, ("'m2fp'", "not installed", "install.py --models m2fp", "embedded")))
    p = crops()
    p["3"] = {"class_type": "FaceChainSkinRetouch", "inputs": {"images": ["2", 0], "faces": ["2", 1],
                                                               "strength": 0.5, "backend": "abpn"}}
    p["4"] = {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}
    cases.append((p, ("'abpn'", "not installed", "install.py --models abpn")))
    cases.append((autotag(tagger="wd14"), ("'wd14_tagger'", "model.onnx", "install.py --models wd14_tagger")))
    cases.append((autotag(subject_from="fairface"), ("'fairface'", "install.py --models fairface")))
    p = crops()
    p["3"] = {"class_type": "FaceChainTemplateFace", "inputs": {"images": ["2", 0], "faces": ["2", 1],
                                                                "scorer": "fqa", "min_quality": 0.3}}
    p["4"] = {"class_type": "PreviewImage", "inputs": {"images": ["3", 3]}}
    cases.append((p, ("'fqa'", "install.py --models fqa")))
    for prompt, words in cases:
        expect_node_error(client, prompt, *words)
    # offline, 'auto' takes the embedded gender/age model for the subject and says which models would add tags
    entry = client.run(autotag(subject_from="auto", tagger="auto"))
    assert text(entry, "5").splitlines()[0] == f"{TRIGGER}, a mature man"
    assert "install.py --models wd14_tagger" in text(entry, "4")


def test_wd14_tag_list_missing_or_mismatched(client, model_dir):
    folder = model_dir("wd14")
    build_wd14(folder)
    (folder / "selected_tags.csv").unlink()
    expect_node_error(client, autotag(tagger="wd14"), "selected_tags.csv", "install.py --models wd14_tagger")
    with open(folder / "selected_tags.csv", "w") as f:
        f.write("tag_id,name,category,count\n1,short_hair,0,5\n")
    expect_node_error(client, autotag(tagger="wd14"), "scores 16 tags", "lists 1")
