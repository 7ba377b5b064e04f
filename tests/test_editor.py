"""The host's own editor (the frontend the test ComfyUI serves) loads each bundled UI workflow in headless
Chromium, the way its template browser does, with no missing node types and no widget errors.

"No widget errors" is checked by what the editor itself makes of the file: every node's widgets hold the
values the API file gives, and the editor's own graph-to-prompt conversion returns the API file's graph.
A screenshot of each loaded graph is saved under artifacts/.

Chromium and the DevTools client: ``editor_browser.py``.
"""

from __future__ import annotations

import json
import time

import pytest

from conftest import ARTIFACTS, REPO
from editor_browser import LOAD_AS_TEMPLATE, open_editor

WORKFLOWS = REPO / "workflows"
EDITOR_WORKFLOWS = ["facechain_preprocess", "facechain_generate", "facechain_train", "facechain_train_generate"]


@pytest.fixture(scope="module")
def editor(client):
    with open_editor(client, "FaceChainRTSRank") as browser:
        yield browser


@pytest.mark.parametrize("name", EDITOR_WORKFLOWS)
def test_editor_loads_workflow_with_all_nodes_and_widgets(editor, object_info, name):
    api = json.loads((WORKFLOWS / "api" / f"{name}_api.json").read_text())
    before = len(editor.events)
    got = editor.evaluate(LOAD_AS_TEMPLATE % {"name": json.dumps(name)})
    assert "error" not in got, got
    assert got["missing"] == [], f"node types the editor does not know: {got['missing']}"
    time.sleep(1.0)  # let the canvas draw before the screenshot
    editor.screenshot(ARTIFACTS / f"editor_{name}.png")
    nodes = {n["id"]: n for n in got["nodes"]}
    assert set(nodes) == set(api)
    for nid, spec in api.items():
        node = nodes[nid]
        assert node["type"] == spec["class_type"] and not node["has_errors"], node
        widgets = dict((w[0], w[1]) for w in node["widgets"])
        for k, v in spec["inputs"].items():
            if not isinstance(v, list) and k in widgets:
                assert widgets[k] == v, f"node {nid} ({spec['class_type']}) widget {k}: {widgets[k]!r} != {v!r}"
    # The editor's own conversion gives back the API file: every link and widget value where it belongs.
    prompt = got["prompt"]
    assert set(prompt) == set(api)
    for nid, spec in api.items():
        assert prompt[nid]["class_type"] == spec["class_type"]
        # (display-only widgets that editor extensions add, such as PreviewAny's 'preview', are not inputs)
        defined = {k for section in object_info[spec["class_type"]]["input"].values() for k in section}
        inputs = {k: v for k, v in prompt[nid]["inputs"].items() if k in defined}
        assert inputs == spec["inputs"], f"node {nid} ({spec['class_type']})"
    problems = [e for e in editor.errors(before) if "FaceChain" in e or "widget" in e.lower() or "node" in e.lower()]
    assert not problems, problems
