"""The work shows in the nodes (issue 13, parts 2 and 3), in the host's real editor in headless Chromium.

The preprocess workflow runs from the editor on a real folder of four photos (one of them a group photo of
other people, which FaceAlign skips): FaceAlign, HumanParse, SkinRetouch and Template Face each hold their
thumbnails (the skipped photo greyed with its reason). A train workflow on the tiny checkpoint then shows the
loss curve growing in TrainFaceLoRA while it trains (two screenshots, the curve longer in the second; the
previews are read back from the editor's own websocket messages), and the final curve stays after the run.
RTSRank's thumbnails (likeness and accept/reject on each portrait) are checked through the API, and the
API's history keeps every output it had.
"""

from __future__ import annotations

import base64
import json
import time

import cv2
import numpy as np
import pytest

from conftest import ARTIFACTS, FACES, REPO, TINY_CKPT, input_folder_of
from facechain_core import previews
from facechain_core.images import load_photo
from facechain_core.previews import curve_extent, look
from editor_browser import open_editor

PHOTOS = ["katy_perry/img26.jpg", "katy_perry/img27.jpg", "katy_perry/img28.jpg", "hard/two_people.jpg"]
PREPROCESS = {"2": "FaceChainFaceAlign", "3": "FaceChainHumanParse", "4": "FaceChainSkinRetouch",
              "6": "FaceChainTemplateFace"}
TRAIN_NODE = "8"

# Listeners the page keeps: finished prompts and every progress preview picture, as data URLs.
WATCH = """
(() => {
  if (window.__fc) return true;
  window.__fc = {finished: [], previews: []};
  const api = window.app.api;
  api.addEventListener('execution_success', e => __fc.finished.push({id: e.detail.prompt_id, ok: true}));
  api.addEventListener('execution_error', e => __fc.finished.push(
    {id: e.detail.prompt_id, ok: false, message: e.detail.exception_message}));
  api.addEventListener('b_preview_with_metadata', e => {
    const reader = new FileReader();
    reader.onload = () => __fc.previews.push({node: String(e.detail.displayNodeId), url: reader.result});
    reader.readAsDataURL(e.detail.blob);
  });
  return true;
})()
"""

LOAD_AND_QUEUE = """
(async () => {
  await window.app.loadGraphData(%(graph)s, true, true, %(name)s);
  for (const [id, name, value] of %(widgets)s) {
    const node = window.app.graph.getNodeById(Number(id));
    const widget = node.widgets.find(w => w.name === name);
    if (!widget) return {error: `node ${id} has no widget ${name}`};
    widget.value = value;
  }
  const before = __fc.finished.length;
  await window.app.queuePrompt(0, 1);
  return {before};
})()
"""

# What a node shows now: its progress preview if it has one, else its output images (the editor's own rule).
SHOWN = """
(async () => {
  const id = %(id)s;
  const urls = (window.app.nodePreviewImages || {})[id];
  const outs = (window.app.nodeOutputs[id] || {}).images || [];
  const list = urls && urls.length ? urls : outs.map(i => '/view?' + new URLSearchParams(i).toString());
  const data = [];
  for (const url of list) {
    const blob = await (await fetch(url)).blob();
    data.push(await new Promise(r => {
      const f = new FileReader(); f.onload = () => r(f.result); f.readAsDataURL(blob); }));
  }
  return {from: urls && urls.length ? 'preview' : 'outputs', data};
})()
"""


def decode(data_url: str) -> np.ndarray:
    raw = base64.b64decode(data_url.split(",", 1)[1])
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def fetch_png(client, image: dict) -> np.ndarray:
    raw = client.view(image["filename"], image.get("subfolder", ""), image.get("type", "output"))
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def saturation(picture: np.ndarray) -> float:
    """Mean colour saturation of the tile's upper middle (the picture, away from the frame and the caption)."""
    h, w = picture.shape[:2]
    inner = picture[h // 8: h // 2, w // 6: 5 * w // 6]
    return float(cv2.cvtColor(inner, cv2.COLOR_RGB2HSV)[..., 1].mean())


def frame_colour(picture: np.ndarray) -> np.ndarray:
    """The mean colour of the thumbnail's left edge (its frame)."""
    return picture[picture.shape[0] // 3: 2 * picture.shape[0] // 3, :2].reshape(-1, 3).mean(axis=0)


def sheet(path, rows: list[list[np.ndarray]], cell: int = 200) -> None:
    """A contact sheet: one row per list, each picture on a white cell."""
    canvas = np.full((cell * len(rows), cell * max(len(r) for r in rows), 3), 255, np.uint8)
    for y, row in enumerate(rows):
        for x, pic in enumerate(row):
            h, w = pic.shape[:2]
            canvas[y * cell: y * cell + h, x * cell: x * cell + w] = pic[:cell, :cell]
    path.parent.mkdir(parents=True, exist_ok=True)
    previews.write_png(path, canvas)


# --- the pictures themselves, in process (fast layer) ---------------------------------------------------------

def test_thumbnails_are_one_size_and_left_out_photos_are_greyed_with_a_short_reason():
    photo = load_photo(FACES / "obama" / "obama1.jpg")
    side = look()["thumb_side"]
    kept = previews.kept_thumbnail(photo, "quality 0.81")
    small = previews.kept_thumbnail(photo[200:264, 380:428], "#1 118% accept")  # small crops grow to the tile
    grey = previews.marked_thumbnail(photo, "skipped", "2 faces, none matches the set's identity (the face of "
                                     "obama1.jpg, the medoid of 3 photos); SFace similarity 0.11")
    assert kept.shape == small.shape == grey.shape == (side, side, 3)
    assert saturation(grey) < 0.5 * saturation(kept)
    assert np.abs(frame_colour(kept) - look()["colours"]["kept"]).max() < 30
    assert np.abs(frame_colour(grey) - look()["colours"]["skipped"]).max() < 30
    assert previews.short_reason("2 faces, none matches (x); y") == "2 faces, none matches"
    sheet(ARTIFACTS / "previews_thumbnails.png", [[kept, small, grey]])


def test_rank_tiles_show_every_returned_image_and_at_most_max_tiles_in_all():
    photo = load_photo(FACES / "obama" / "obama2.jpg")
    images = [photo] * 40
    tiles = previews.ranked_pictures(images, [0, 1, 2], [121.0, 118.0, 64.0], [True, True, False],
                                     [(i, "likeness 20% below the accept threshold 70%") for i in range(3, 40)])
    assert len(tiles) == look()["max_tiles"]
    assert saturation(tiles[2]) > 2 * saturation(tiles[3])  # returned below the threshold: in colour, red frame
    assert np.abs(frame_colour(tiles[2]) - look()["colours"]["skipped"]).max() < 30


def test_loss_curve_grows_to_the_right_and_is_cheap():
    losses = list(0.2 * np.exp(-np.arange(300) / 80) + 0.05 + 0.03 * np.random.default_rng(0).random(300))
    t0 = time.perf_counter()
    pictures = [previews.loss_curve(losses[:n], 300) for n in (10, 100, 300)]
    per_curve = (time.perf_counter() - t0) / 3
    reach = [curve_extent(p) for p in pictures]
    assert reach[0] < reach[1] < reach[2] and abs(reach[2] - (look()["curve_width"] - 8)) <= 2  # to the edge
    assert pictures[0].shape == (look()["curve_height"], look()["curve_width"], 3)
    assert curve_extent(previews.loss_curve([], 300)) == -1
    assert per_curve < 0.05, f"{per_curve * 1000:.1f} ms per curve"
    sheet(ARTIFACTS / "previews_loss_curves.png", [pictures], cell=260)


# --- RTSRank through the API: the same outputs as before, plus its thumbnails ----------------------------------

def test_rts_rank_shows_ranked_portraits_with_likeness_and_rejects_greyed(client, comfy_base):
    images = input_folder_of(comfy_base, "previews_rank", ["obama/obama2.jpg", "obama/obama3.jpg",
                                                           "biden/biden1.jpg", "rose_leslie/rose1.jpg"])
    reference = input_folder_of(comfy_base, "previews_rank_ref", ["obama/obama1.jpg"])
    prompt = {
        "1": {"class_type": "FaceChainLoadPhotos", "inputs": {"folder": images, "max_photos": 20}},
        "2": {"class_type": "FaceChainLoadPhotos", "inputs": {"folder": reference, "max_photos": 20}},
        "3": {"class_type": "FaceChainRTSRank", "inputs": {
            "images": ["1", 0], "names": ["1", 1], "reference": ["2", 0], "top_n": 4, "backend": "embedded",
            "min_face_fraction": 0.12, "max_face_fraction": 0.85, "if_none_kept": "return unranked"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "previews_rank"}},
    }
    entry = client.run(prompt)
    out = entry["outputs"]["3"]
    report = "\n".join(out["text"])
    assert "obama2.jpg: likeness" in report and "biden1.jpg: rejected" in report, report
    assert len(entry["outputs"]["4"]["images"]) == 2  # the API's SaveImage output is what it was
    pictures = [fetch_png(client, i) for i in out["images"]]
    assert [i["type"] for i in out["images"]] == ["temp"] * 4
    green, red = (np.array(look()["colours"][k]) for k in ("kept", "skipped"))
    assert all(np.abs(frame_colour(p) - green).max() < 30 for p in pictures[:2]), "the accepted two first"
    assert all(np.abs(frame_colour(p) - red).max() < 30 for p in pictures[2:]), "then the rejected two"
    assert min(saturation(p) for p in pictures[:2]) > 2 * max(saturation(p) for p in pictures[2:])
    sheet(ARTIFACTS / "editor_previews_rank.png", [pictures])


# --- the editor -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def page(client):
    with open_editor(client, "FaceChainTrainFaceLoRA", "&& window.app.api") as browser:
        assert browser.evaluate(WATCH)
        yield browser


@pytest.fixture(scope="module")
def folder(comfy_base):
    return input_folder_of(comfy_base, "previews_katy", PHOTOS)


def queue_from_editor(page, workflow: str, widgets: list) -> int:
    graph = json.loads((REPO / "workflows" / f"{workflow}.json").read_text())
    got = page.evaluate(LOAD_AND_QUEUE % {"graph": json.dumps(graph), "name": json.dumps(workflow),
                                          "widgets": json.dumps(widgets)})
    assert "error" not in got, got
    return got["before"]


def wait_finished(page, before: int, timeout: float) -> dict:
    page.wait_for(f"__fc.finished.length > {before}", timeout=timeout)
    done = page.evaluate(f"__fc.finished[{before}]")
    assert done["ok"], done
    return done


def fit_and_shoot(page, path, settle: float = 1.5) -> None:
    page.evaluate("(() => { const c = window.app.canvas; c.ds.scale = 0.8; c.ds.offset = [40, 40];"
                  " c.setDirty(true, true); return true; })()")
    time.sleep(settle)
    page.screenshot(path)


def test_preprocess_nodes_show_their_thumbnails_in_the_editor(page, client, folder):
    before = queue_from_editor(page, "facechain_preprocess", [["1", "folder", folder]])
    wait_finished(page, before, timeout=600)
    fit_and_shoot(page, ARTIFACTS / "editor_previews_preprocess.png")
    outputs = page.evaluate("JSON.parse(JSON.stringify(window.app.nodeOutputs))")
    side = look()["thumb_side"]
    counts = {}
    for nid, cls in PREPROCESS.items():
        images = outputs[nid]["images"]
        assert images and all(i["type"] == "temp" and i["filename"].startswith("facechain_") for i in images), cls
        pictures = [fetch_png(client, i) for i in images]
        assert all(max(p.shape[:2]) <= side for p in pictures), cls
        counts[cls] = pictures
        assert outputs[nid].get("text"), f"{cls} lost its text report"
    # FaceAlign: the three crops of Katy Perry, then the group photo of other people greyed with its reason
    align = counts["FaceChainFaceAlign"]
    assert len(align) == 4 and "two_people.jpg: skipped" in "\n".join(outputs["2"]["text"])
    assert saturation(align[3]) < 0.5 * min(saturation(p) for p in align[:3])
    assert [len(counts[c]) for c in PREPROCESS.values()][1:] == [3, 3, 3]
    # the editor holds the pictures in the nodes themselves (no Preview node is connected to these outputs)
    held = page.evaluate("""(() => { const out = {};
        for (const id of %s) { const n = window.app.graph.getNodeById(Number(id));
          out[id] = (n.imgs || []).filter(i => i.complete && i.naturalWidth > 0).length; }
        return out; })()""" % json.dumps(list(PREPROCESS)))
    assert held == {"2": 4, "3": 3, "4": 3, "6": 3}, held


def test_training_shows_a_growing_loss_curve_and_keeps_the_final_one(page, client, folder):
    widgets = [["1", "ckpt_name", TINY_CKPT.name], ["2", "folder", folder], ["3", "size", 64],
               [TRAIN_NODE, "samples", 60], [TRAIN_NODE, "batch_size", 1], [TRAIN_NODE, "learning_rate", 1e-3],
               [TRAIN_NODE, "overwrite", True]]
    count = f"__fc.previews.filter(p => p.node === '{TRAIN_NODE}').length"
    before = queue_from_editor(page, "facechain_train", widgets)
    page.wait_for(f"{count} >= 2", timeout=600)
    fit_and_shoot(page, ARTIFACTS / "editor_loss_1.png", settle=0.3)
    first = page.evaluate(SHOWN % {"id": json.dumps(TRAIN_NODE)})
    seen = page.evaluate(count)
    # ten more pictures later (on a fast machine the run may end first: then its last picture, the whole curve)
    page.wait_for(f"{count} >= {seen + 10} || __fc.finished.length > {before}", timeout=600)
    fit_and_shoot(page, ARTIFACTS / "editor_loss_2.png", settle=0.3)
    second = page.evaluate(SHOWN % {"id": json.dumps(TRAIN_NODE)})
    assert first["from"] == second["from"] == "preview"
    a, b = curve_extent(decode(first["data"][0])), curve_extent(decode(second["data"][0]))
    assert 0 < a < b, (a, b)
    sent = [curve_extent(decode(p["url"])) for p in page.evaluate(
        f"__fc.previews.filter(p => p.node === '{TRAIN_NODE}')")]
    assert sent == sorted(sent), f"the curve shrank between previews: {sent}"

    wait_finished(page, before, timeout=900)
    time.sleep(3.0)  # past the editor's delay for dropping old previews
    fit_and_shoot(page, ARTIFACTS / "editor_loss_final.png")
    final = page.evaluate(SHOWN % {"id": json.dumps(TRAIN_NODE)})
    print(f"after the run the node shows its {final['from']}: {len(final['data'])} picture(s)")
    outputs = page.evaluate(f"JSON.parse(JSON.stringify(window.app.nodeOutputs['{TRAIN_NODE}']))")
    assert len(outputs["images"]) == 1 and "LoRA saved" in outputs["text"][0]
    kept = fetch_png(client, outputs["images"][0])
    full = look()["curve_width"] - 8  # the plot's right edge
    assert curve_extent(kept) >= full - 3 > b
    assert all(curve_extent(decode(d)) >= full - 3 for d in final["data"]), final["from"]
