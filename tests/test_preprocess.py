"""Train-stage preprocessing through the real host: the bundled API workflow on obama/, measured on its
outputs (white outside the head, face covered, retouch only inside skin, captions, template face), and
bad input that must give a clear node error while the server keeps serving."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import FACES, REPO, expect_node_error, png_arrays

WORKFLOW = REPO / "workflows" / "api" / "facechain_preprocess_api.json"
UI_WORKFLOW = REPO / "workflows" / "facechain_preprocess.json"
TRIGGER = "fcsks"


def workflow(folder: str) -> dict:
    prompt = json.loads(WORKFLOW.read_text())
    loaders = [n for n in prompt.values() if n["class_type"] == "FaceChainLoadPhotos"]
    assert len(loaders) == 1
    loaders[0]["inputs"]["folder"] = folder
    return prompt


def node_id(prompt: dict, class_type: str) -> str:
    ids = [k for k, n in prompt.items() if n["class_type"] == class_type]
    assert len(ids) == 1, class_type
    return ids[0]


def text_of(entry: dict, nid: str) -> str:
    return "\n".join(entry["outputs"][nid]["text"])


@pytest.fixture(scope="module")
def obama_run(client):
    """The bundled API workflow on obama/, plus output nodes that expose what the tests measure."""
    prompt = workflow("obama")
    align, parse = node_id(prompt, "FaceChainFaceAlign"), node_id(prompt, "FaceChainHumanParse")
    retouch, tag = node_id(prompt, "FaceChainSkinRetouch"), node_id(prompt, "FaceChainAutoTag")
    template, saved = node_id(prompt, "FaceChainTemplateFace"), node_id(prompt, "SaveImage")
    extra = {
        "m_head_img": {"class_type": "SaveImage", "inputs": {"images": [parse, 0], "filename_prefix": "pp_head"}},
        "m_head_mask": {"class_type": "MaskToImage", "inputs": {"mask": [parse, 1]}},
        "m_head_mask_save": {"class_type": "SaveImage", "inputs": {"images": ["m_head_mask", 0],
                                                                   "filename_prefix": "pp_head_mask"}},
        "m_face_mask": {"class_type": "MaskToImage", "inputs": {"mask": [parse, 2]}},
        "m_face_mask_save": {"class_type": "SaveImage", "inputs": {"images": ["m_face_mask", 0],
                                                                   "filename_prefix": "pp_face_mask"}},
        "m_retouched": {"class_type": "SaveImage", "inputs": {"images": [retouch, 0], "filename_prefix": "pp_ret"}},
        "m_skin": {"class_type": "MaskToImage", "inputs": {"mask": [retouch, 1]}},
        "m_skin_save": {"class_type": "SaveImage", "inputs": {"images": ["m_skin", 0], "filename_prefix": "pp_skin"}},
        "m_faces": {"class_type": "PreviewAny", "inputs": {"source": [align, 1]}},
        "m_captions": {"class_type": "PreviewAny", "inputs": {"source": [tag, 1]}},
        "m_template_face": {"class_type": "PreviewAny", "inputs": {"source": [template, 4]}},
    }
    prompt.update(extra)
    entry = client.run(prompt)

    def images(nid):
        return png_arrays(client.output_images(entry, nid))

    return {
        "prompt": prompt, "entry": entry,
        "head": images("m_head_img"), "head_mask": [m[..., 0] > 127 for m in images("m_head_mask_save")],
        "face_mask": [m[..., 0] > 127 for m in images("m_face_mask_save")],
        "retouched": images("m_retouched"), "skin": [m[..., 0] > 127 for m in images("m_skin_save")],
        "faces": json.loads(text_of(entry, "m_faces")), "captions": text_of(entry, "m_captions").splitlines(),
        "template_face": json.loads(text_of(entry, "m_template_face")),
        "training_set": images(saved),
    }


def test_every_output_is_512_and_white_outside_the_head(obama_run):
    n = len(list((FACES / "obama").glob("*.jpg")))
    assert len(obama_run["head"]) == len(obama_run["retouched"]) == len(obama_run["head_mask"]) == n
    for img, head in zip(obama_run["head"] + obama_run["retouched"], obama_run["head_mask"] * 2):
        assert img.shape == (512, 512, 3)
        assert (img[~head] == 255).all(), "a pixel outside the head mask is not white"
        border = np.concatenate([img[:4].reshape(-1, 3), img[-4:].reshape(-1, 3),
                                 img[:, :4].reshape(-1, 3), img[:, -4:].reshape(-1, 3)])
        assert (border == 255).all(), "the crop's border is not white"
        assert 0.08 < head.mean() < 0.45, f"head mask covers {head.mean():.2f} of the crop"


def test_face_mask_covers_the_face_and_head_contains_it(obama_run):
    for face, head, info in zip(obama_run["face_mask"], obama_run["head_mask"], obama_run["faces"]):
        k = np.array(info["keypoints"])
        # the face between and around the keypoints: eyes, nose, mouth corners and the cheeks beside them
        ys, xs = np.mgrid[0:512, 0:512]
        x0, x1 = k[:, 0].min() - 10, k[:, 0].max() + 10
        y0, y1 = k[:, 1].min() - 10, k[:, 1].max() + 10
        core = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
        assert face[core].mean() > 0.98, f"face mask covers {face[core].mean():.3f} of the keypoint box"
        bx, by, bw, bh = info["box"]
        box = (xs >= bx) & (xs <= bx + bw) & (ys >= by) & (ys <= by + bh)
        assert face[box].mean() > 0.75, f"face mask covers {face[box].mean():.3f} of the detector's box"
        assert not (face & ~head).any(), "face outside the head mask"
        assert face.mean() < 0.25


def test_retouch_changes_only_skin(obama_run):
    for before, after, skin in zip(obama_run["head"], obama_run["retouched"], obama_run["skin"]):
        diff = np.abs(before.astype(int) - after.astype(int)).max(axis=-1)
        assert diff[~skin].max() == 0, "a pixel outside the skin mask changed"
        assert skin.mean() > 0.03, "the skin mask is (nearly) empty"
        assert (diff[skin] > 0).mean() > 0.3, "the retouch changed almost nothing on the skin"


def test_retouch_keeps_eyes_and_mouth(obama_run):
    for skin, info in zip(obama_run["skin"], obama_run["faces"]):
        for x, y in np.round(info["keypoints"]).astype(int)[[0, 1, 3, 4]]:
            assert not skin[y - 3:y + 4, x - 3:x + 4].any(), "an eye or mouth corner lies in the skin mask"


def test_captions_start_with_trigger_and_template_is_full_resolution(obama_run):
    captions = obama_run["captions"]
    assert len(captions) == len(obama_run["head"])
    assert all(c.startswith(TRIGGER + ",") for c in captions), captions
    template = obama_run["template_face"]
    assert len(template) == 1 and template[0]["name"] != "obama4_240p.jpg"
    assert min(template[0]["source_size"]) > 240
    entry, prompt = obama_run["entry"], obama_run["prompt"]
    report = text_of(entry, node_id(prompt, "FaceChainTemplateFace"))
    assert f"template face: {template[0]['name']}" in report
    tag_report = text_of(entry, node_id(prompt, "FaceChainAutoTag"))
    assert "install.py --models wd14_tagger" in tag_report and "install.py --models fairface" in tag_report
    assert len(obama_run["training_set"]) == len(captions)


def test_ui_workflow_matches_api_workflow():
    """The editor's file holds the same nodes, links and widget values as the API file."""
    ui, api = json.loads(UI_WORKFLOW.read_text()), json.loads(WORKFLOW.read_text())
    assert ui["version"] == 0.4
    nodes = {str(n["id"]): n for n in ui["nodes"]}
    assert set(nodes) == set(api)
    links = {l[0]: l for l in ui["links"]}
    for nid, spec in api.items():
        node = nodes[nid]
        assert node["type"] == spec["class_type"]
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        for name, value in spec["inputs"].items():
            if isinstance(value, list):
                link = linked[name]
                assert [str(link[1]), link[2]] == [value[0], value[1]] and str(link[3]) == nid, (nid, name)
        widgets = [v for k, v in spec["inputs"].items() if not isinstance(v, list)]
        assert node.get("widgets_values", []) == widgets, nid
    for link in ui["links"]:
        lid, src, slot, dst, dslot, typ = link
        assert lid in nodes[str(src)]["outputs"][slot]["links"]
        assert nodes[str(dst)]["inputs"][dslot]["link"] == lid


# --- bad input -----------------------------------------------------------------------------------------

def stage(folder: str, prefix: str) -> dict:
    """LoadFacePhotos -> FaceAlign with ids prefixed, to combine two folders in one prompt."""
    return {
        f"{prefix}1": {"class_type": "FaceChainLoadPhotos", "inputs": {"folder": folder, "max_photos": 20}},
        f"{prefix}2": {"class_type": "FaceChainFaceAlign", "inputs": {
            "photos": [f"{prefix}1", 0], "names": [f"{prefix}1", 1], "size": 512, "face_fraction": 0.4,
            "face_centre": 0.42, "detector": "embedded"}},
    }


def test_bad_input_gives_clear_errors_and_server_keeps_serving(client, comfy_base):
    # masks of the wrong size
    p = stage("obama", "a")
    p["m"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
    p["r"] = {"class_type": "FaceChainSkinRetouch", "inputs": {"images": ["a2", 0], "faces": ["a2", 1], "strength": 0.6,
                                                               "backend": "embedded", "mask": ["m", 0]}}
    p["s"] = {"class_type": "PreviewImage", "inputs": {"images": ["r", 0]}}
    expect_node_error(client, p, "mask", "64x64", "512x512")

    # face data of other images
    p = {**stage("obama", "a"), **stage("biden", "b")}
    p["h"] = {"class_type": "FaceChainHumanParse", "inputs": {"images": ["a2", 0], "faces": ["b2", 1],
                                                              "backend": "embedded"}}
    p["s"] = {"class_type": "PreviewImage", "inputs": {"images": ["h", 0]}}
    expect_node_error(client, p, "4 images", "face data for 2")

    # captions for a different number of images
    p = {**stage("obama", "a"), **stage("biden", "b")}
    p["t"] = {"class_type": "FaceChainAutoTag", "inputs": {
        "images": ["b2", 0], "faces": ["b2", 1], "trigger": TRIGGER, "subject": "a man", "subject_from": "input",
        "tagger": "none", "threshold": 0.35}}
    p["q"] = {"class_type": "FaceChainTemplateFace", "inputs": {
        "images": ["a2", 0], "faces": ["a2", 1], "scorer": "embedded", "min_quality": 0.3, "captions": ["t", 0]}}
    p["s"] = {"class_type": "PreviewImage", "inputs": {"images": ["q", 3]}}
    expect_node_error(client, p, "captions for 2 images", "4")

    # every photo filtered out: an empty training set is refused with the best score named
    p = stage("obama", "a")
    p["q"] = {"class_type": "FaceChainTemplateFace", "inputs": {
        "images": ["a2", 0], "faces": ["a2", 1], "scorer": "embedded", "min_quality": 1.0}}
    p["s"] = {"class_type": "PreviewImage", "inputs": {"images": ["q", 3]}}
    expect_node_error(client, p, "below the minimum quality", "lower min_quality")

    # an empty trigger token
    p = stage("obama", "a")
    p["t"] = {"class_type": "FaceChainAutoTag", "inputs": {
        "images": ["a2", 0], "faces": ["a2", 1], "trigger": "  ", "subject": "a man", "subject_from": "input",
        "tagger": "none", "threshold": 0.35}}
    p["s"] = {"class_type": "PreviewAny", "inputs": {"source": ["t", 1]}}
    expect_node_error(client, p, "trigger token is empty")

    # a grayscale photo: the classical parser and the retouch find skin by colour (the embedded parser's
    # person mask and face mesh work on it)
    gray = comfy_base / "input" / "gray_obama"
    gray.mkdir(exist_ok=True)
    Image.open(FACES / "obama" / "obama1.jpg").convert("L").save(gray / "obama1_bw.jpg", quality=95)
    p = stage("gray_obama", "g")
    p["h"] = {"class_type": "FaceChainHumanParse", "inputs": {"images": ["g2", 0], "faces": ["g2", 1],
                                                              "backend": "classical"}}
    p["s"] = {"class_type": "PreviewImage", "inputs": {"images": ["h", 0]}}
    expect_node_error(client, p, "obama1_bw.jpg", "grayscale", "colour photo")

    # and the server still serves a good prompt
    p = stage("biden", "b")
    p["h"] = {"class_type": "FaceChainHumanParse", "inputs": {"images": ["b2", 0], "faces": ["b2", 1],
                                                              "backend": "embedded"}}
    p["s"] = {"class_type": "PreviewImage", "inputs": {"images": ["h", 0]}}
    entry = client.run(p)
    assert len(client.output_images(entry, "s")) == 2
