"""Headless Chromium on the test host's editor, for the editor tests (test_editor*.py) and the run report's
page test: finding or installing Chromium, a DevTools-protocol client, and opening the editor once it knows a
node type.

Chromium comes from Debian's `chromium` package (scripts/setup.sh installs it); the browser is driven over the
DevTools protocol with websocket-client, so no driver or extra Python package is needed.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

import pytest

from comfy_host import free_port


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def ensure_chromium() -> str:
    path = find_chromium()
    if path:
        return path
    # CI runs on a fresh machine: scripts/setup.sh installs it; this is the fallback for other set-ups.
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True, timeout=900)
        path = find_chromium()
        if path:
            return path
    pytest.skip("Debian's chromium package is not installed and could not be installed here "
                "(needs root and apt-get: `apt-get install -y chromium`)")


class Browser:
    """Headless Chromium with one page, spoken to over the DevTools protocol."""

    def __init__(self, binary: str):
        import websocket

        self.port = free_port()
        self.profile = tempfile.mkdtemp(prefix="facechain-chromium-")
        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", f"--user-data-dir={self.profile}",
             f"--remote-debugging-port={self.port}", "--window-size=2400,1500", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 60
        ws_url = None
        while time.time() < deadline and ws_url is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=5) as r:
                    pages = [p for p in json.loads(r.read()) if p.get("type") == "page"]
                ws_url = pages[0]["webSocketDebuggerUrl"] if pages else None
            except OSError:
                time.sleep(0.3)
        if ws_url is None:
            self.close()
            raise RuntimeError("headless Chromium did not open its DevTools port")
        self.ws = websocket.create_connection(ws_url, timeout=120, suppress_origin=True)
        self.ids = itertools.count(1)
        self.events: list[dict] = []
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=2400, height=1500, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params) -> dict:
        mid = next(self.ids)
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def evaluate(self, expression: str, timeout: float = 120):
        res = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True,
                        timeout=int(timeout * 1000))
        if "exceptionDetails" in res:
            raise RuntimeError(f"page error: {json.dumps(res['exceptionDetails'])[:2000]}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if self.evaluate(expression):
                    return
            except RuntimeError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"page never satisfied: {expression}")

    def errors(self, since: int = 0) -> list[str]:
        """Exceptions, console errors and warnings the page reported after event number ``since``."""
        out = []
        for e in self.events[since:]:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append(json.dumps(p.get("exceptionDetails", {}))[:1000])
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning"):
                out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(p["entry"].get("text", ""))
        return out

    def screenshot(self, path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


@contextlib.contextmanager
def open_editor(client, node_type: str, ready: str = "", before=()):
    """Headless Chromium on the host's editor, once the editor knows ``node_type`` (and ``ready``, extra JS
    that must hold, is true). ``before``: DevTools calls (method, params) made before the page loads."""
    binary = ensure_chromium()
    # A first visit opens the tutorial dialog over the canvas; mark it seen so the screenshots show the graph.
    req = urllib.request.Request(client.url + "/settings/Comfy.TutorialCompleted", data=b"true", method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30).read()
    browser = Browser(binary)
    try:
        for method, params in before:
            browser.call(method, **params)
        browser.call("Page.navigate", url=client.url + "/")
        browser.wait_for(f"!!(window.app && window.app.graph && window.LiteGraph {ready} && "
                         f"LiteGraph.registered_node_types['{node_type}'])", timeout=180)
        yield browser
    finally:
        browser.close()


LOAD_AS_TEMPLATE = """
(async () => {
  const pack = Object.entries(await (await fetch('/workflow_templates')).json())
                .find(([k, v]) => v.includes(%(name)s));
  if (!pack) return {error: 'not listed by /workflow_templates'};
  const graph = await (await fetch('/api/workflow_templates/' + pack[0] + '/' + %(name)s + '.json')).json();
  const missing = graph.nodes.map(n => n.type).filter(t => !(t in LiteGraph.registered_node_types));
  await window.app.loadGraphData(graph, true, true, %(name)s, {openSource: 'template'});
  const nodes = window.app.graph._nodes.map(n => ({
    id: String(n.id), type: n.type, has_errors: !!n.has_errors,
    widgets: (n.widgets || []).map(w => [w.name, w.value])}));
  const prompt = (await window.app.graphToPrompt()).output;
  return {pack: pack[0], missing, nodes, prompt};
})()
"""
