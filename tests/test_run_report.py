"""The run report: the bundled train-and-generate workflow (the main job's default) on the real host with the tiny
checkpoint, its /history turned into report.html and report.png by scripts/run_report.py, and the page opened in
headless Chromium. Every stage must show its pictures there; the screenshot and the contact sheet go to artifacts/."""

from __future__ import annotations

import base64
import json
import shutil

import run_report
from conftest import ARTIFACTS, FACES
from run_example import TINY_MODEL_NOTE
from editor_browser import Browser, ensure_chromium
from test_workflows import load, tiny

STAGE_COUNTS = """
(() => Object.fromEntries([...document.querySelectorAll('section')].map(s => [s.id, {
  images: s.querySelectorAll('img').length,
  loaded: [...s.querySelectorAll('img')].filter(i => i.complete && i.naturalWidth > 0).length}])))()
"""


def test_run_report_shows_every_stage(client, tmp_path):
    prompt = tiny(load("facechain_train_generate"), lora_name="run_report")
    entry = client.run(prompt)
    max_photos = next(n for n in prompt.values() if n["class_type"] == "FaceChainLoadPhotos")["inputs"]["max_photos"]
    photos = sorted((FACES / "obama").iterdir())[:max_photos]
    run = run_report.collect(prompt, entry, lambda img: client.view(img["filename"], img.get("subfolder", ""),
                                                                    img.get("type", "output")), photos)
    run.notes.append(TINY_MODEL_NOTE)
    counts = {stage: len(run.images.get(stage, [])) for stage, _, _ in run_report.STAGES}
    n = len(photos)
    assert counts == {"photos": n, "aligned": n, "head_masks": n, "retouched": n, "template": 1, "generated": 2,
                      "portraits": 2}, counts
    assert len(run.captions) == n and all(c.startswith("fcsks, ") for c in run.captions)
    assert len(run.losses) == 2 and all(v > 0 for v in run.losses)  # 8 samples at batch 4
    assert run.scores == ["unranked: no face of plausible size found"] * 2  # the tiny model draws no face
    assert any("Models: yunet" in text for text in run.reports.values())

    out = tmp_path / "example_output"
    page, sheet = run_report.write(run, out)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(sheet, ARTIFACTS / "run_report_sheet.png")
    browser = Browser(ensure_chromium())
    try:
        browser.call("Page.navigate", url=page.as_uri())
        browser.wait_for("document.readyState === 'complete'", timeout=60)
        shown = browser.evaluate(STAGE_COUNTS)
        assert "The portraits are noise" in browser.evaluate("document.querySelector('.note').innerText")
        bottom = browser.evaluate("document.getElementById('reports').getBoundingClientRect().top + scrollY")
        shot = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                            clip={"x": 0, "y": 0, "width": 1400, "height": int(bottom), "scale": 1})
        (ARTIFACTS / "run_report_page.png").write_bytes(base64.b64decode(shot["data"]))
    finally:
        browser.close()
    for stage, count in counts.items():
        assert shown[stage] == {"images": count, "loaded": count}, (stage, json.dumps(shown))
    assert shown["loss"] == {"images": 1, "loaded": 1}


def test_portrait_labels_come_from_the_ranking_report():
    """A real ranking (SFace on real photos, in process) read back as the page's per-portrait likeness labels."""
    from facechain_core.images import load_photo
    from facechain_core.rank import RankSettings, rank_images

    images = [load_photo(FACES / "obama" / f) for f in ("obama2.jpg", "obama3.jpg")]
    images.append(load_photo(FACES / "biden" / "biden1.jpg"))
    settings = RankSettings(top_n=3, min_face_fraction=0.02)
    result = rank_images(images, [load_photo(FACES / "obama" / "obama1.jpg")], settings, ["obama2", "obama3", "biden1"])
    labels = run_report.portrait_scores(result.report_text(), len(result.order))
    assert labels == [f"rank {i + 1}, likeness {p:.0f}% (similarity {s:.3f})"
                      for i, (p, s) in enumerate(zip(result.likeness, result.scores))]
    # biden is rejected below the accept threshold: only the two obama photos come back, most alike first
    assert len(labels) == 2 and result.scores[0] > result.scores[-1]
