"""The bundled generate-stage workflows, run end to end through the real host on the tiny checkpoint.

The API files are run as shipped except for sizes and counts (tiny images, few steps, few training
samples) and the names of the checkpoint, photos and LoRA that exist on the test host. The tiny model's
images hold no face, so FaceFusion passes them through and RTSRank returns them unranked; what the tests
check is that every stage ran in one prompt and said so.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from conftest import FACES, REPO, TINY_CKPT, png_arrays

WORKFLOWS = REPO / "workflows"
MINE = ["facechain_generate", "facechain_train", "facechain_train_generate"]


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}_api.json").read_text())


def ids_of(prompt: dict, class_type: str) -> list[str]:
    return [k for k, v in prompt.items() if v["class_type"] == class_type]


def set_inputs(prompt: dict, class_type: str, **values) -> None:
    ids = ids_of(prompt, class_type)
    assert ids, f"no {class_type} in the workflow"
    for nid in ids:
        for k, v in values.items():
            assert k in prompt[nid]["inputs"], f"{class_type} has no input {k}"
            prompt[nid]["inputs"][k] = v


def tiny(prompt: dict, lora_name: str | None = None) -> dict:
    """Shrink sizes and counts; point at what the test host has."""
    set_inputs(prompt, "CheckpointLoaderSimple", ckpt_name=TINY_CKPT.name)
    if ids_of(prompt, "EmptyLatentImage"):
        set_inputs(prompt, "EmptyLatentImage", width=64, height=64, batch_size=2)
        set_inputs(prompt, "KSampler", steps=3)
    if ids_of(prompt, "FaceChainLoadPhotos"):
        set_inputs(prompt, "FaceChainLoadPhotos", folder="obama", max_photos=3)
        set_inputs(prompt, "FaceChainFaceAlign", size=128)
    if ids_of(prompt, "FaceChainTrainFaceLoRA"):
        set_inputs(prompt, "FaceChainTrainFaceLoRA", name=lora_name, samples=8, batch_size=4, overwrite=True)
    return prompt


def text_of(entry: dict, nid: str) -> str:
    return "\n".join(entry["outputs"][nid]["text"])


def preview_text(entry: dict, prompt: dict, source_class: str) -> str:
    """What a PreviewAny node showing ``source_class``'s output displayed."""
    for nid in ids_of(prompt, "PreviewAny"):
        src = prompt[nid]["inputs"]["source"][0]
        if prompt[src]["class_type"] == source_class:
            return "\n".join(entry["outputs"][nid]["text"])
    raise AssertionError(f"no PreviewAny shows {source_class}")


def saved_images(client, entry: dict, prompt: dict) -> list[np.ndarray]:
    (save,) = ids_of(prompt, "SaveImage")
    return png_arrays(client.output_images(entry, save))


def check_generate_part(client, entry: dict, prompt: dict) -> str:
    """ApplyStyleLoRA, sampling, FaceFusion and RTSRank all ran; returns ApplyStyleLoRA's report."""
    (style,) = ids_of(prompt, "FaceChainApplyStyleLoRA")
    (fusion,) = ids_of(prompt, "FaceChainFaceFusion")
    (rank,) = ids_of(prompt, "FaceChainRTSRank")
    style_report = text_of(entry, style)
    assert "Style: Studio Headshot (prompt only)" in style_report
    fusion_report = text_of(entry, fusion)
    assert fusion_report.startswith("FaceFusion: fused the template face into 0 of 2 images")
    assert fusion_report.count("no face found, left unchanged") == 2
    rank_report = text_of(entry, rank)
    assert rank_report.startswith("RTSRank: 0 of 2 images returned")
    assert "returned the first ones unranked" in rank_report
    assert preview_text(entry, prompt, "FaceChainRTSRank") == rank_report
    images = saved_images(client, entry, prompt)
    assert len(images) == 2 and all(im.shape == (64, 64, 3) and im.std() > 1.0 for im in images)
    return style_report


def test_generate_workflow_runs_end_to_end(client, comfy_base):
    from test_generate import TEST_FACE_LORA, make_lora

    make_lora(comfy_base / "models" / "loras" / TEST_FACE_LORA, seed=11)
    Image.open(FACES / "obama" / "obama1.jpg").convert("RGB").save(comfy_base / "input" / "facechain_template.png")
    prompt = tiny(load("facechain_generate"))
    set_inputs(prompt, "FaceChainApplyStyleLoRA", face_lora=TEST_FACE_LORA)
    entry = client.run(prompt)
    report = check_generate_part(client, entry, prompt)
    assert "Face LoRA: face_a.safetensors at 0.95" in report
    assert re.search(r"^Positive: fcsks, a person, professional headshot", report, re.M)


def test_train_workflow_runs_end_to_end(client, comfy_base):
    prompt = tiny(load("facechain_train"), lora_name="wf_train")
    entry = client.run(prompt)
    assert (comfy_base / "models" / "loras" / "facechain" / "wf_train.safetensors").is_file()
    train_report = preview_text(entry, prompt, "FaceChainTrainFaceLoRA")
    assert "wf_train.safetensors" in train_report
    (template,) = saved_images(client, entry, prompt)
    assert template.shape == (128, 128, 3)


def test_train_and_generate_workflow_runs_in_one_prompt(client, comfy_base):
    prompt = tiny(load("facechain_train_generate"), lora_name="wf_train_generate")
    entry = client.run(prompt)
    assert (comfy_base / "models" / "loras" / "facechain" / "wf_train_generate.safetensors").is_file()
    assert "wf_train_generate.safetensors" in preview_text(entry, prompt, "FaceChainTrainFaceLoRA")
    report = check_generate_part(client, entry, prompt)
    # the LoRA trained in this prompt, reached through the path socket; trigger and subject from AutoTag
    assert "Face LoRA: wf_train_generate.safetensors at 0.95" in report
    assert re.search(r"^Positive: fcsks, a (handsome|mature) man, ", report, re.M)  # AutoTag, offline


@pytest.mark.parametrize("name", MINE)
def test_ui_file_holds_the_api_graph(name, object_info):
    """Same nodes, links and widget values in both files (the editor test also loads it in a browser)."""
    ui, api = json.loads((WORKFLOWS / f"{name}.json").read_text()), load(name)
    assert ui["version"] == 0.4
    nodes = {str(n["id"]): n for n in ui["nodes"]}
    assert set(nodes) == set(api)
    links = {link[0]: link for link in ui["links"]}
    for nid, spec in api.items():
        node = nodes[nid]
        assert node["type"] == spec["class_type"] and spec["class_type"] in object_info
        linked = {i["name"]: links[i["link"]] for i in node["inputs"] if i.get("link") is not None}
        wired = {k: v for k, v in spec["inputs"].items() if isinstance(v, list)}
        assert set(linked) == set(wired), nid
        for k, (src, slot) in wired.items():
            link = linked[k]
            assert (str(link[1]), link[2], str(link[3])) == (src, slot, nid)
            assert object_info[api[src]["class_type"]]["output"][slot] == link[5]
        values = [v for v in spec["inputs"].values() if not isinstance(v, list)]
        extras = ("KSampler", "FaceChainTrainFaceLoRA", "FaceChainLoadTemplatePhoto")  # seed control, upload button
        widgets = [w for w in node["widgets_values"] if w not in ("fixed", "randomize", "image")] \
            if spec["class_type"] in extras else node["widgets_values"]
        unlinked_widget_values = [w for w in widgets]
        for v in values:
            assert v in unlinked_widget_values, (nid, v)
    for link in ui["links"]:
        lid, src, slot, dst, dslot, _ = link
        assert lid in nodes[str(src)]["outputs"][slot]["links"]
        assert nodes[str(dst)]["inputs"][dslot]["link"] == lid


def test_host_template_browser_lists_and_serves_the_ui_workflows(client):
    listed = client.get("/workflow_templates")
    pack = next(k for k, v in listed.items() if "facechain_generate" in v)
    for name in MINE:
        assert name in listed[pack]
        served = client.get(f"/api/workflow_templates/{pack}/{name}.json")
        assert served == json.loads((WORKFLOWS / f"{name}.json").read_text())
    for name in listed[pack]:  # the browser lists only graphs the editor can open (API files sit in api/)
        served = client.get(f"/api/workflow_templates/{pack}/{name}.json")
        assert "nodes" in served and "links" in served, f"{name} is not a UI-format workflow"
