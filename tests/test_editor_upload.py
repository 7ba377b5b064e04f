"""Issue 13, part 1: photos uploaded from the host's own editor, and the folder list of Load Face Photos.

The Chromium tests drive the real editor of the test ComfyUI as a user does: a real mouse click on the node's
"upload photos" button opens the file chooser (DevTools intercepts it and fills it with real photos), the
folder name is typed into the editor's dialog, the files go through the host's /upload/image, and the
preprocessing workflow is queued from the editor. Screenshots land in artifacts/editor_upload_*.png.
Folder names that would leave input/ are refused by the button, by the host's upload and by the node.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import ARTIFACTS, FACES, expect_node_error
from facechain_core.images import photo_folders
from editor_browser import LOAD_AS_TEMPLATE, Browser, open_editor

PHOTOS = [FACES / "obama" / n for n in ("obama1.jpg", "obama2.jpg", "obama3.jpg", "obama4_240p.jpg")]
NODE_ID = 1  # Load Face Photos in workflows/facechain_preprocess.json


# --- the folder list, in process -------------------------------------------------------------------------

def test_photo_folders_lists_nested_folders_that_hold_photos(tmp_path):
    root, outside = tmp_path / "input", tmp_path / "outside"
    for rel in ("people/obama/a.jpg", "people/biden/b.PNG", "people/empty_parent/x/c.webp", "loose.jpg",
                "texts/readme.txt", ".hidden/d.jpg", "people/.cache/e.jpg", "only_dot/.f.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"not decoded here")
    (root / "no_photos").mkdir()
    (outside / "stranger").mkdir(parents=True)
    (outside / "stranger" / "s.jpg").write_bytes(b"x")
    (root / "link_out").symlink_to(outside / "stranger", target_is_directory=True)
    (root / "file_link").mkdir()
    (root / "file_link" / "s.jpg").symlink_to(outside / "stranger" / "s.jpg")
    # Only real folders inside input/ with a photo of their own; never the root, a link or a hidden folder.
    assert photo_folders(root) == ["people/biden", "people/empty_parent/x", "people/obama"]
    assert photo_folders(root, max_depth=2) == ["people/biden", "people/obama"]


# --- the host's upload and the node over the API ---------------------------------------------------------

def post_upload(url: str, filename: str, subfolder: str, data: bytes) -> tuple[int, dict | None]:
    """POST /upload/image as a browser's form does; (status, JSON answer or None)."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in (("subfolder", subfolder), ("type", "input"), ("overwrite", "false"))]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                 f"Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    req = urllib.request.Request(url + "/upload/image", data=b"".join(parts),
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, None


def tree(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def test_host_upload_refuses_names_that_leave_input(client, comfy_base, tmp_path):
    outside = tmp_path / "abs_target"
    before = tree(comfy_base)
    cases = [("obama1.jpg", "../escaped"), ("obama1.jpg", "people/../../escaped"), ("obama1.jpg", str(outside)),
             ("../escaped.jpg", ""), ("../../escaped.jpg", "api_upload"), (str(outside / "x.jpg"), "api_upload")]
    for filename, subfolder in cases:
        status, answer = post_upload(client.url, filename, subfolder, PHOTOS[0].read_bytes())
        assert status in (400, 500), (filename, subfolder, status, answer)
    # (an absolute file name fails with 500 after the host made the subfolder: it lost the leading '/' and tried
    # to write input/api_upload/tmp/..., whose folders do not exist)
    assert tree(comfy_base) - before <= {"input/api_upload"} and not outside.exists()
    assert not list(comfy_base.parent.glob("*escaped*")) and not list(comfy_base.glob("*escaped*"))
    before = tree(comfy_base)
    # The host takes '../' in a file name as long as the file stays inside input/: it lands one folder up.
    status, answer = post_upload(client.url, "../moved_up.jpg", "api_upload/deeper", PHOTOS[1].read_bytes())
    assert status == 200, answer
    assert (comfy_base / "input" / "api_upload" / "moved_up.jpg").read_bytes() == PHOTOS[1].read_bytes()
    assert tree(comfy_base) - before <= {"input/api_upload", "input/api_upload/deeper", "input/api_upload/moved_up.jpg"}
    # A plain name into a nested folder is taken, and the folder list offers it at once.
    status, answer = post_upload(client.url, "obama1.jpg", "api_upload/obama", PHOTOS[0].read_bytes())
    assert status == 200 and answer["name"] == "obama1.jpg", answer
    assert (comfy_base / "input" / "api_upload" / "obama" / "obama1.jpg").read_bytes() == PHOTOS[0].read_bytes()
    folders = client.get("/object_info/FaceChainLoadPhotos")["FaceChainLoadPhotos"]["input"]["required"]["folder"][0]
    assert {"api_upload", "api_upload/obama", "obama"} <= set(folders) and "api_upload/deeper" not in folders


@pytest.mark.parametrize("folder", ["../input/obama", "../../", "/etc", str(FACES / "obama")])
def test_node_refuses_folders_outside_input_over_the_api(client, folder):
    prompt = {"1": {"class_type": "FaceChainLoadPhotos", "inputs": {"folder": folder, "max_photos": 4}},
              "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 2]}}}
    message = expect_node_error(client, prompt, "points outside ComfyUI's input directory", folder)
    assert str(FACES) not in message.replace(folder, "")  # no other server path is shown


def test_node_takes_a_typed_folder_name_that_is_not_in_the_list(client, comfy_base):
    """API clients name folders the list has never offered (made after it was read): no 'value not in list'."""
    listed = client.get("/object_info/FaceChainLoadPhotos")["FaceChainLoadPhotos"]["input"]["required"]["folder"][0]
    name = "typed_later/obama_" + uuid.uuid4().hex[:6]
    assert name not in listed
    (comfy_base / "input" / name).mkdir(parents=True)
    for p in PHOTOS[:2]:
        (comfy_base / "input" / name / p.name).write_bytes(p.read_bytes())
    entry = client.run({"1": {"class_type": "FaceChainLoadPhotos", "inputs": {"folder": name, "max_photos": 4}},
                        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 2]}}})
    assert f"2 photos from '{name}'" in "\n".join(entry["outputs"]["2"]["text"])


# --- the editor ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def page(client):
    with open_editor(client, "FaceChainLoadPhotos", before=[("DOM.enable", {})]) as browser:
        browser.call("Page.setInterceptFileChooserDialog", enabled=True)
        yield browser


def load_preprocess(page: Browser) -> dict:
    got = page.evaluate(LOAD_AS_TEMPLATE % {"name": json.dumps("facechain_preprocess")})
    assert "error" not in got and got["missing"] == [], got
    time.sleep(1.0)
    return got


def node_state(page: Browser) -> dict:
    return page.evaluate(f"""(() => {{
      const n = app.graph.getNodeById({NODE_ID});
      const folder = n.widgets.find(w => w.name === 'folder');
      return {{folder: folder.value, type: folder.type, values: [...(folder.options.values || [])],
               widgets: n.widgets.map(w => [w.name, w.type, w.label || null]),
               saved: n.serialize().widgets_values}};
    }})()""")


def widget_centre(page: Browser, name: str) -> tuple[float, float]:
    """Where the canvas draws a widget of Load Face Photos, in page pixels."""
    return page.evaluate(f"""(() => {{
      const n = app.graph.getNodeById({NODE_ID});
      const w = n.widgets.find(w => w.name === {json.dumps(name)});
      const h = w.computedHeight || LiteGraph.NODE_WIDGET_HEIGHT;
      const [cx, cy] = app.canvas.ds.convertOffsetToCanvas([n.pos[0] + n.size[0] / 2, n.pos[1] + w.y + h / 2]);
      const r = app.canvas.canvas.getBoundingClientRect();
      return [r.left + cx, r.top + cy];
    }})()""")


def click(page: Browser, x: float, y: float) -> None:
    """A real mouse click (move, press, release), as DevTools sends one."""
    page.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
    for kind in ("mousePressed", "mouseReleased"):
        page.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)


def click_upload_button(page: Browser) -> None:
    click(page, *widget_centre(page, "upload_photos"))


def pick_from_folder_list(page: Browser, folder: str, screenshot: Path) -> list[str]:
    """Open the folder combo with the mouse, screenshot its list, click ``folder`` in it; returns the entries."""
    click(page, *widget_centre(page, "folder"))
    page.wait_for("!!document.querySelector('.litecontextmenu')", timeout=30)
    time.sleep(0.5)
    page.screenshot(screenshot)
    entries = page.evaluate("[...document.querySelectorAll('.litecontextmenu .litemenu-entry')].map(e => e.innerText)")
    x, y = page.evaluate(f"""(() => {{
      const e = [...document.querySelectorAll('.litecontextmenu .litemenu-entry')]
                .find(e => e.innerText === {json.dumps(folder)});
      const r = e.getBoundingClientRect();
      return [r.left + r.width / 2, r.top + r.height / 2];
    }})()""")
    click(page, x, y)
    page.wait_for("!document.querySelector('.litecontextmenu')", timeout=30)
    return entries


def choose_files(page: Browser, files: list[Path], since: int) -> dict:
    deadline = time.time() + 30
    while time.time() < deadline:
        page.evaluate("1")  # let the DevTools events arrive
        opened = [e for e in page.events[since:] if e.get("method") == "Page.fileChooserOpened"]
        if opened:
            params = opened[-1]["params"]
            page.call("DOM.setFileInputFiles", files=[str(f) for f in files], backendNodeId=params["backendNodeId"])
            return params
        time.sleep(0.3)
    raise TimeoutError("the upload button did not open a file chooser")


def type_folder_in_dialog(page: Browser, folder: str) -> str:
    """Type ``folder`` into the editor's prompt dialog and press Enter; returns the value it offered first."""
    page.wait_for("!!document.querySelector('.p-dialog input')", timeout=30)
    offered = page.evaluate("(() => { const i = document.querySelector('.p-dialog input'); i.focus(); i.select();"
                            " return i.value; })()")
    page.call("Input.insertText", text=folder)
    for kind in ("keyDown", "keyUp"):
        page.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                  nativeVirtualKeyCode=13)
    page.wait_for("!document.querySelector('.p-dialog input')", timeout=30)
    return offered


def toasts(page: Browser) -> str:
    return page.evaluate("[...document.querySelectorAll('.p-toast-message')].map(e => e.innerText).join('\\n')")


def upload_through_button(page: Browser, folder: str, files: list[Path]) -> str:
    since = len(page.events)
    click_upload_button(page)
    chooser = choose_files(page, files, since)
    assert chooser["mode"] == "selectMultiple", chooser
    return type_folder_in_dialog(page, folder)


REFUSED = [("../escaped_by_button", "'..'"), ("/tmp/facechain_abs_upload", "absolute path"),
           ("\\\\server\\share", "absolute path"), ("C:/Users/x", "drive letter"), ("people//anna", "empty part"),
           ("people/anna/", "empty part"), ("people\\anna", "'\\'")]


def test_upload_button_refuses_folder_names_that_leave_input(page, comfy_base):
    load_preprocess(page)
    before = tree(comfy_base)
    for i, (name, words) in enumerate(REFUSED):
        page.evaluate("app.extensionManager.toast.removeAll(); 1")
        page.wait_for("!document.querySelector('.p-toast-message')", timeout=30)
        upload_through_button(page, name, PHOTOS[:1])
        page.wait_for("[...document.querySelectorAll('.p-toast-message')].some(e => e.innerText.includes("
                      f"{json.dumps(words)}))", timeout=30)
        if i == 0:
            time.sleep(1.0)  # the toast slides in
            page.screenshot(ARTIFACTS / "editor_upload_0_refused.png")
        assert node_state(page)["folder"] == "facechain", name  # the selection is left alone
    assert tree(comfy_base) == before
    assert not Path("/tmp/facechain_abs_upload").exists() and not (comfy_base / "escaped_by_button").exists()
    # The same rules, as the extension states them, for names that are fine too.
    rules = page.evaluate("""(async () => {
      const url = (await (await fetch('/extensions')).json()).find(p => p.endsWith('/facechain_upload.js'));
      const mod = await import(url);
      return %s.map(n => [n, mod.folderProblem(n)]);
    })()""" % json.dumps([n for n, _ in REFUSED] + ["obama", "people/anna", "people/anna.b", "x y-z_1"]))
    problems = dict(rules)
    assert all(problems[n] for n, _ in REFUSED), rules
    assert not any(problems[n] for n in ("obama", "people/anna", "people/anna.b", "x y-z_1")), rules


def test_upload_button_puts_photos_in_a_new_folder_and_the_workflow_runs_from_the_editor(page, client, comfy_base):
    load_preprocess(page)
    page.evaluate("app.extensionManager.toast.removeAll(); 1")
    state = node_state(page)
    assert state["type"] == "combo" and {"obama", "biden"} <= set(state["values"]), state
    assert ["upload_photos", "button", "upload photos"] in state["widgets"], state
    assert state["saved"] == ["facechain", 20], state  # the button is not saved into the workflow
    folder = "editor/obama_" + uuid.uuid4().hex[:6]
    assert folder not in state["values"]

    offered = upload_through_button(page, folder, PHOTOS)
    assert offered == "facechain"  # the dialog offers the selected folder first
    page.wait_for(f"app.graph.getNodeById({NODE_ID}).widgets.find(w => w.name === 'folder').value === "
                  f"{json.dumps(folder)}", timeout=120)
    page.wait_for("[...document.querySelectorAll('.p-toast-message')].some(e => e.innerText.includes('Uploaded'))",
                  timeout=30)
    assert f"Uploaded 4 of 4 photos to input/{folder}" in toasts(page)
    time.sleep(1.0)  # the toast slides in
    page.screenshot(ARTIFACTS / "editor_upload_1_uploaded.png")

    landed = comfy_base / "input" / folder
    assert sorted(p.name for p in landed.iterdir()) == sorted(p.name for p in PHOTOS)
    for p in PHOTOS:
        assert (landed / p.name).read_bytes() == p.read_bytes()
    state = node_state(page)
    assert folder in state["values"] and state["folder"] == folder and state["saved"] == [folder, 20]
    listed = client.get("/object_info/FaceChainLoadPhotos")["FaceChainLoadPhotos"]["input"]["required"]["folder"][0]
    assert folder in listed
    entries = pick_from_folder_list(page, folder, ARTIFACTS / "editor_upload_2_folder_list.png")
    assert folder in entries and {"obama", "biden"} <= set(entries), entries
    assert node_state(page)["folder"] == folder

    # Queue from the editor, as its Run button does, and wait for the host to finish the prompt.
    queued = page.evaluate("(async () => { const before = Object.keys(await (await fetch('/history')).json());"
                           " await app.queuePrompt(0, 1); return before; })()")
    deadline, entry = time.time() + 900, None
    while time.time() < deadline and entry is None:
        for pid, e in client.get("/history").items():
            if pid not in queued and e.get("status", {}).get("status_str") in ("success", "error"):
                entry = e
        time.sleep(1.0)
    assert entry is not None, "the prompt queued from the editor did not finish"
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    assert entry["prompt"][2]["1"]["inputs"]["folder"] == folder
    saved = client.output_images(entry, "7")
    assert 3 <= len(saved) <= 4, len(saved)  # the training set: every usable uploaded photo, cropped
    time.sleep(2.0)  # let the canvas draw the previews
    page.screenshot(ARTIFACTS / "editor_upload_3_ran.png")


