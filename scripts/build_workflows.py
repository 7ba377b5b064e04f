"""Write the generate-stage example workflows in both formats from one description each.

    .venv/bin/python scripts/build_workflows.py

writes workflows/facechain_{preprocess,train,generate,train_generate}.json and their API versions in workflows/api/.

Each workflow is described once below (nodes, links, widget values, place on the canvas). The API file
(for /prompt) is that description as is; the UI file (for the editor) is laid out the way the editor
saves graphs: node sockets, links and `widgets_values` in the order the host's /object_info gives the
inputs, with the extra "control after generate" value the editor adds after seed widgets. The host is
started once to read /object_info, so the files always match the nodes as they are.
"""

from __future__ import annotations

import json
import sys
import tempfile
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"  # any SD1.5 portrait checkpoint; FaceChain used a photoreal one
TEMPLATE_IMAGE = "facechain_template.png"  # the template face photo, uploaded into ComfyUI's input folder
FACE_LORA = "facechain/face.safetensors"  # TrainFaceLoRA's default output (models/loras/facechain/face.safetensors)


def node(nid, class_type, pos, title=None, **inputs):
    return {"id": str(nid), "class_type": class_type, "pos": pos, "title": title, "inputs": inputs}


def sampling(first: int, model, clip, vae, x: int, y: int, style_inputs: dict, batch: int = 8):
    """ApplyStyleLoRA -> prompts -> KSampler -> VAE Decode, ids from ``first``; returns (nodes, decoded)."""
    a, p, n, e, k, d = range(first, first + 6)
    nodes = [
        node(a, "FaceChainApplyStyleLoRA", [x, y], model=model, clip=clip, **style_inputs),
        node(p, "CLIPTextEncode", [x + 380, y], "Positive prompt", text=[str(a), 2], clip=[str(a), 1]),
        node(n, "CLIPTextEncode", [x + 380, y + 230], "Negative prompt", text=[str(a), 3], clip=[str(a), 1]),
        node(e, "EmptyLatentImage", [x + 380, y + 460], width=512, height=512, batch_size=batch),
        node(k, "KSampler", [x + 760, y], model=[str(a), 0], positive=[str(p), 0], negative=[str(n), 0],
             latent_image=[str(e), 0], seed=42, steps=40, cfg=7.0, sampler_name="dpmpp_2m", scheduler="karras",
             denoise=1.0),
        node(d, "VAEDecode", [x + 1100, y], samples=[str(k), 0], vae=vae),
    ]
    return nodes, [str(d), 0]


def fuse_rank_save(first: int, images, template, x: int, y: int, photos=None):
    """FaceFusion -> RTSRank -> save; ``photos``: the person's training crops, when the graph has them (the
    likeness reference of both; else the template alone)."""
    f, r, s, t = range(first, first + 4)
    extra = {"reference": photos} if photos else {}
    return [
        node(f, "FaceChainFaceFusion", [x, y], images=images, template=template, strength=1.0, backend="embedded",
             **extra),
        node(r, "FaceChainRTSRank", [x + 340, y], images=[str(f), 0], reference=photos or template, top_n=4,
             backend="embedded", min_face_fraction=0.12, max_face_fraction=0.85, if_none_kept="return unranked",
             detections=[str(f), 3]),
        node(s, "SaveImage", [x + 700, y], "Ranked portraits", images=[str(r), 0],
             filename_prefix="facechain/portrait"),
        node(t, "PreviewAny", [x + 700, y + 380], "Ranking report", source=[str(r), 2]),
    ]


def preparation(first: int, y: int):
    """Load photos -> FaceAlign -> HumanParse -> SkinRetouch -> AutoTag -> TemplateFace, ids from ``first``."""
    p, a, h, r, t, q = (str(i) for i in range(first, first + 6))
    return [
        node(p, "FaceChainLoadPhotos", [0, y], folder="facechain", max_photos=20),
        node(a, "FaceChainFaceAlign", [340, y], photos=[p, 0], names=[p, 1], size=512, face_fraction=0.4,
             face_centre=0.42, detector="embedded"),
        node(h, "FaceChainHumanParse", [680, y], images=[a, 0], faces=[a, 1], backend="embedded", long_hair="keep"),
        node(r, "FaceChainSkinRetouch", [1020, y], images=[h, 0], faces=[a, 1], strength=0.6, backend="embedded"),
        node(t, "FaceChainAutoTag", [1360, y], images=[r, 0], faces=[a, 1], trigger="fcsks", subject="a person",
             subject_from="auto", tagger="auto", threshold=0.35),
        node(q, "FaceChainTemplateFace", [1700, y], images=[r, 0], faces=[a, 1], scorer="embedded",
             min_quality=0.3, captions=[t, 0]),
    ]


def train_nodes(with_outputs: bool = True):
    """Load photos -> FaceAlign -> HumanParse -> SkinRetouch -> AutoTag -> TemplateFace -> TrainFaceLoRA."""
    y = 260
    nodes = [
        node(1, "CheckpointLoaderSimple", [0, 0], ckpt_name=CHECKPOINT),
        *preparation(2, y),
        node(8, "FaceChainTrainFaceLoRA", [2040, y], model=["1", 0], clip=["1", 1], vae=["1", 2], images=["7", 0],
             name=["2", 3], trigger="fcsks", captions=["7", 2], seed=42, overwrite=False),
        node(10, "PreviewAny", [2400, y], "Training report", source=["8", 3]),
    ]
    if with_outputs:
        nodes.append(node(9, "SaveImage", [2400, y + 300], "Template face (use it for generating later)",
                          images=["7", 3], filename_prefix="facechain/template"))
    return nodes + stage_previews(y + 420)


def preprocess_nodes():
    """Load photos -> FaceAlign -> HumanParse -> SkinRetouch -> AutoTag -> TemplateFace, the training set saved."""
    y = 200
    return [
        *preparation(1, y),
        node(7, "SaveImage", [2000, 0], "Training set", images=["6", 0], filename_prefix="facechain/training_set"),
        node(8, "PreviewImage", [2000, 420], "Template face", images=["6", 3]),
        node(9, "PreviewAny", [2340, 0], "Captions of the training set", source=["6", 2]),
        node(10, "PreviewAny", [2340, 420], "Face quality report", source=["6", 5]),
    ]


def stage_previews(y: int):
    """What each preprocessing step made, shown under it in the editor; the run report reads them from /history."""
    return [
        node(21, "PreviewImage", [340, y], "Aligned crops", images=["3", 0]),
        node(22, "MaskToImage", [680, y], "Head masks as images", mask=["4", 1]),
        node(23, "PreviewImage", [680, y + 110], "Head masks", images=["22", 0]),
        node(24, "PreviewImage", [1020, y], "Retouched crops", images=["5", 0]),
        node(25, "PreviewAny", [1360, y], "Captions", source=["6", 1]),
        node(26, "PreviewImage", [1700, y], "Template face", images=["7", 3]),
    ]


def workflows() -> dict[str, list[dict]]:
    style = dict(style="Studio Headshot", face_weight=-1.0, style_weight=-1.0, extra_prompt="")
    # Generate from an existing face LoRA: trigger and subject typed in, a template photo loaded.
    gen_sampling, decoded = sampling(3, ["1", 0], ["1", 1], ["1", 2], 0, 300, dict(
        **style, face_lora=FACE_LORA, trigger="fcsks", subject="a person", shared_tags=""))
    generate = [
        node(1, "CheckpointLoaderSimple", [-380, 300], ckpt_name=CHECKPOINT),
        node(2, "FaceChainLoadTemplatePhoto", [-380, 500], "Template face photo", image=TEMPLATE_IMAGE),
        *gen_sampling,
        *fuse_rank_save(9, decoded, ["2", 0], 1480, 300),
    ]
    # Train and generate in one prompt: the new LoRA reaches ApplyStyleLoRA through its path socket (it is
    # not in the loras list when the prompt is queued), the captions bring trigger, subject and shared tags,
    # and the template face comes from TemplateFace.
    tg_sampling, tg_decoded = sampling(11, ["1", 0], ["1", 1], ["1", 2], 0, 1150, dict(
        **style, face_lora="none", trigger="", subject="", shared_tags="", captions=["7", 2], face_lora_path=["8", 2]))
    train_generate = [*train_nodes(with_outputs=False), *tg_sampling,
                      *fuse_rank_save(17, tg_decoded, ["7", 3], 1480, 1150, photos=["7", 0]),
                      node(27, "PreviewImage", [1100, 1450], "Generated (before fusion)", images=tg_decoded)]
    return {"facechain_preprocess": preprocess_nodes(), "facechain_train": train_nodes(),
            "facechain_generate": generate, "facechain_train_generate": train_generate}


# ---------------------------------------------------------------------------------------------------------

def input_specs(info: dict) -> list[tuple[str, list]]:
    """(name, spec) of a node's inputs in the order the editor makes its slots and widgets."""
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            out.append((name, info["input"][section][name]))
    return out


def is_widget(spec: list) -> bool:
    typ, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    if opts.get("forceInput"):
        return False
    return isinstance(typ, list) or typ in WIDGET_TYPES


def widget_default(spec: list):
    typ, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    if "default" in opts:
        return opts["default"]
    if isinstance(typ, list):
        return typ[0] if typ else ""
    if typ == "COMBO":
        return (opts.get("options") or [""])[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(typ)


def api_prompt(nodes: list[dict], object_info: dict) -> dict:
    """The API format: every widget input filled (the node's default where the description says nothing)."""
    prompt = {}
    for n in nodes:
        info = object_info[n["class_type"]]
        inputs = {}
        for name, spec in input_specs(info):
            if name in n["inputs"]:
                inputs[name] = n["inputs"][name]
            elif is_widget(spec):
                inputs[name] = widget_default(spec)
        unknown = set(n["inputs"]) - {name for name, _ in input_specs(info)}
        if unknown:
            raise SystemExit(f"{n['class_type']} has no input(s) {sorted(unknown)}")
        entry = {"class_type": n["class_type"], "inputs": inputs}
        entry["_meta"] = {"title": n["title"] or info.get("display_name") or n["class_type"]}
        prompt[n["id"]] = entry
    return prompt


def ui_workflow(nodes: list[dict], prompt: dict, object_info: dict) -> dict:
    """The editor's format (version 0.4) for the same graph."""
    links, ui_nodes = [], []
    by_id = {n["id"]: n for n in nodes}
    outputs_links: dict[tuple[str, int], list[int]] = {}
    for n in nodes:
        for name, value in prompt[n["id"]]["inputs"].items():
            if isinstance(value, list):
                link_id = len(links) + 1
                src, slot = value
                typ = object_info[by_id[src]["class_type"]]["output"][slot]
                links.append([link_id, int(src), slot, int(n["id"]), None, typ])
                outputs_links.setdefault((src, slot), []).append(link_id)
    order = _execution_order(nodes, prompt)
    for n in nodes:
        info = object_info[n["class_type"]]
        inputs, widgets = [], []
        for name, spec in input_specs(info):
            value = prompt[n["id"]]["inputs"].get(name)
            if isinstance(value, list):
                link = next(l for l in links if l[3] == int(n["id"]) and l[1] == int(value[0]) and l[2] == value[1]
                            and l[4] is None)
                link[4] = len(inputs)
                slot = {"name": name, "type": spec[0] if isinstance(spec[0], str) else "COMBO", "link": link[0]}
                if is_widget(spec):
                    slot["widget"] = {"name": name}
                    widgets.append(widget_default(spec))
                inputs.append(slot)
            elif is_widget(spec):
                if value is None:
                    continue
                widgets.append(value)
                opts = spec[1] if len(spec) > 1 else {}
                if spec[0] == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed")):
                    widgets.append("fixed")
                if opts.get("image_upload"):
                    widgets.append("image")
            else:
                inputs.append({"name": name, "type": spec[0], "link": None})
        outputs = []
        for slot, (typ, oname) in enumerate(zip(info["output"], info["output_name"])):
            outputs.append({"name": oname, "type": typ, "links": outputs_links.get((n["id"], slot), [])})
        ui = {"id": int(n["id"]), "type": n["class_type"], "pos": n["pos"], "size": _size(info, inputs, widgets),
              "flags": {}, "order": order[n["id"]], "mode": 0, "inputs": inputs, "outputs": outputs,
              "properties": {"Node name for S&R": n["class_type"]}, "widgets_values": widgets}
        if n["title"]:
            ui["title"] = n["title"]
        ui_nodes.append(ui)
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, "comfyui-facechain/" + ",".join(sorted(prompt)))),
            "revision": 0, "last_node_id": max(int(n["id"]) for n in nodes), "last_link_id": len(links),
            "nodes": ui_nodes, "links": links, "groups": [], "config": {},
            "extra": {"ds": _fit_view(ui_nodes)}, "version": 0.4}


def _fit_view(ui_nodes: list[dict], width: int = 2260, height: int = 1260, left: int = 90, top: int = 160) -> dict:
    """Canvas scale and offset that show the whole graph in a 2400x1500 window, clear of the editor's bars."""
    x0 = min(n["pos"][0] for n in ui_nodes)
    y0 = min(n["pos"][1] for n in ui_nodes) - 30  # title bar
    x1 = max(n["pos"][0] + n["size"][0] for n in ui_nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in ui_nodes)
    scale = round(min(1.0, width / (x1 - x0), height / (y1 - y0)), 3)
    return {"scale": scale, "offset": [round(left / scale - x0), round(top / scale - y0)]}


def _size(info, inputs, widgets) -> list[int]:
    rows = max(len(info["output"]), len([i for i in inputs if "widget" not in i])) + len(widgets)
    return [320, 46 + 24 * rows + (60 if any(isinstance(w, str) and len(w) > 40 for w in widgets) else 0)]


def _execution_order(nodes: list[dict], prompt: dict) -> dict[str, int]:
    done, order = set(), {}

    def visit(nid):
        if nid in done:
            return
        for v in prompt[nid]["inputs"].values():
            if isinstance(v, list):
                visit(v[0])
        done.add(nid)
        order[nid] = len(order)

    for n in nodes:
        visit(n["id"])
    return order


def _compact(data) -> str:
    """JSON with one line per node, link or top-level entry: short enough to read, easy to diff."""
    def one(v):
        return json.dumps(v, ensure_ascii=False)

    if isinstance(data, dict) and "nodes" in data:
        parts = []
        for k, v in data.items():
            if k in ("nodes", "links"):
                parts.append(f' "{k}": [\n' + ",\n".join("  " + one(x) for x in v) + "\n ]")
            else:
                parts.append(f' "{k}": {one(v)}')
        return "{\n" + ",\n".join(parts) + "\n}\n"
    return "{\n" + ",\n".join(f' "{k}": {one(v)}' for k, v in data.items()) + "\n}\n"


def write_json(path: Path, data) -> None:
    text = _compact(data)
    assert json.loads(text) == data
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def fetch_object_info() -> dict:
    from comfy_host import ComfyClient, ComfyServer, install_comfyui

    install_comfyui()
    with tempfile.TemporaryDirectory() as base, ComfyServer(Path(base)) as server:
        return ComfyClient(server.url).object_info()


def main() -> None:
    object_info = fetch_object_info()
    for name, nodes in workflows().items():
        prompt = api_prompt(nodes, object_info)
        write_json(REPO / "workflows" / "api" / f"{name}_api.json", prompt)
        write_json(REPO / "workflows" / f"{name}.json", ui_workflow(nodes, prompt, object_info))
        print("wrote", name)


if __name__ == "__main__":
    main()
