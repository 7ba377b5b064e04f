"""Make portraits of one person with a running ComfyUI that has comfyui-facechain installed.

    python scripts/facechain_client.py --photos DIR --checkpoint CKPT.safetensors --style "Studio Headshot"
    python scripts/facechain_client.py --photos DIR --checkpoint CKPT --face-lora facechain/face.safetensors

The first form runs workflows/api/facechain_train_generate_api.json: it uploads the photos, trains a face LoRA,
generates portraits in the style, fuses the face and ranks them. The second skips training: it runs
workflows/api/facechain_generate_api.json with an existing face LoRA and the first photo (or --template) as
the template face. Progress comes from the server's websocket; the ranked portraits are saved in --out as
rank_01.png, rank_02.png, ... with the ranking report beside them.

Needs only the Python standard library (plus `websocket-client` for live progress; without it the
script polls the server instead). --list-styles prints the styles the server offers.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PHOTO_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


class Server:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.client_id = uuid.uuid4().hex

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.loads(r.read() or b"null")

    def post(self, path: str, data: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                answer = json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            raise SystemExit(f"the server refused the prompt: {describe_refusal(e.read())}") from None
        if path == "/prompt" and isinstance(answer, dict) and answer.get("node_errors"):
            # ComfyUI queues a prompt when some outputs are valid (the preview nodes) and drops the broken ones:
            # take it off the queue and say what was wrong, as for a refused prompt.
            reason = describe_refusal(json.dumps(answer).encode())
            try:
                self.post("/queue", {"delete": [answer.get("prompt_id")]})
            except (SystemExit, OSError):
                pass  # already running or gone: the reason below is what matters
            raise SystemExit(f"the server refused the prompt: {reason}")
        return answer

    def upload(self, path: Path, subfolder: str, name: str | None = None) -> str:
        """POST /upload/image into input/<subfolder>; returns the name the server stored."""
        boundary = uuid.uuid4().hex
        name = name or path.name
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        parts = []
        for field, value in (("subfolder", subfolder), ("type", "input"), ("overwrite", "true")):
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"\r\n\r\n{value}\r\n'.encode())
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                     f"Content-Type: {ctype}\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        req = urllib.request.Request(self.url + "/upload/image", data=b"".join(parts),
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())["name"]

    def view(self, image: dict) -> bytes:
        q = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                    "type": image.get("type", "output")})
        with urllib.request.urlopen(f"{self.url}/view?{q}", timeout=120) as r:
            return r.read()


def describe_refusal(body: bytes) -> str:
    try:
        info = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")[:2000]
    lines = [info.get("error", {}).get("message", "")]
    for nid, err in (info.get("node_errors") or {}).items():
        for e in err.get("errors", []):
            lines.append(f"node {nid} ({err.get('class_type')}): {e.get('message')}: {e.get('details')}")
    return "\n".join(x for x in lines if x)


def ids_of(prompt: dict, class_type: str) -> list[str]:
    return [k for k, v in prompt.items() if v["class_type"] == class_type]


def set_all(prompt: dict, class_type: str, **values) -> None:
    for nid in ids_of(prompt, class_type):
        for k, v in values.items():
            if v is not None:
                prompt[nid]["inputs"][k] = v


def ranked_output_node(prompt: dict) -> str:
    """The SaveImage fed by RTSRank."""
    for nid in ids_of(prompt, "SaveImage"):
        src = prompt[nid]["inputs"]["images"][0]
        if prompt[src]["class_type"] == "FaceChainRTSRank":
            return nid
    raise SystemExit("the workflow has no SaveImage fed by RTSRank")


def photo_files(folder: Path | None) -> list[Path]:
    """The photos of --photos; a clear message (no traceback) when it is not a readable folder."""
    if folder is None:
        return []
    if not folder.exists():
        raise SystemExit(f"--photos {folder}: no such folder")
    if not folder.is_dir():
        raise SystemExit(f"--photos {folder}: not a folder; give the folder that holds the photos")
    try:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_EXTENSIONS)
    except OSError as e:
        raise SystemExit(f"--photos {folder}: cannot be read ({e.strerror or e})") from None


def upload_name(index: int, path: Path) -> str:
    """A plain file name for the upload: the photo's own when it is safe, else photo_<n> (never a path)."""
    name = path.name
    safe = name and name not in (".", "..") and not name.startswith(".") and len(name.encode()) <= 120 and \
        all(ch.isalnum() or ch in "-_. " for ch in name)
    return name if safe else f"photo_{index:02d}{path.suffix.lower()}"


def build_prompt(args, server: Server) -> dict:
    photos = photo_files(args.photos)
    training = args.face_lora is None
    if training and not photos:
        raise SystemExit(f"no photos (.jpg, .png, .webp) in {args.photos}")
    name = args.workflow or ("facechain_train_generate_api.json" if training else "facechain_generate_api.json")
    path = Path(name) if Path(name).is_file() else REPO / "workflows" / "api" / name
    prompt = json.loads(path.read_text())
    run = f"facechain_{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:6]}"
    if ids_of(prompt, "FaceChainLoadPhotos"):
        for i, p in enumerate(photos, start=1):
            server.upload(p, run, upload_name(i, p))
        set_all(prompt, "FaceChainLoadPhotos", folder=run, max_photos=max(len(photos), 1))
        print(f"uploaded {len(photos)} photos into input/{run}", flush=True)
    loaders = [c for c in ("FaceChainLoadTemplatePhoto", "LoadImage") if ids_of(prompt, c)]
    if loaders:
        template = args.template or (photos[0] if photos else None)
        if template is None:
            raise SystemExit("give --template PHOTO (or --photos) for the template face")
        if not template.is_file():
            raise SystemExit(f"--template {template}: no such photo")
        stored = server.upload(template, "", f"{run}_template{template.suffix.lower()}")
        for loader in loaders:
            set_all(prompt, loader, image=stored)
        print(f"uploaded the template face {template.name} as input/{stored}", flush=True)
    set_all(prompt, "CheckpointLoaderSimple", ckpt_name=args.checkpoint)
    set_all(prompt, "FaceChainApplyStyleLoRA", style=args.style)
    if not training:
        set_all(prompt, "FaceChainApplyStyleLoRA", face_lora=args.face_lora, trigger=args.trigger)
    set_all(prompt, "FaceChainTrainFaceLoRA", name=args.lora_name or run, samples=args.samples)
    set_all(prompt, "EmptyLatentImage", width=args.size, height=args.size, batch_size=args.count)
    set_all(prompt, "KSampler", steps=args.steps, seed=args.seed)
    set_all(prompt, "FaceChainRTSRank", top_n=args.top)
    for item in args.set:
        key, value = item.split("=", 1)
        nid, field = key.split(".", 1)
        if nid not in prompt:
            raise SystemExit(f"--set {item}: the workflow has no node {nid}")
        prompt[nid]["inputs"][field] = json.loads(value)
    return prompt


class Progress:
    """Prints what the server reports: which node runs, its progress bar, its text (training loss)."""

    def __init__(self, prompt: dict):
        self.prompt = prompt
        self.last = ""

    def say(self, text: str) -> None:
        if text != self.last:
            print(text, flush=True)
            self.last = text

    def title(self, nid) -> str:
        node = self.prompt.get(str(nid), {})
        return node.get("_meta", {}).get("title") or node.get("class_type", str(nid))

    def event(self, msg: dict) -> None:
        kind, data = msg.get("type"), msg.get("data", {})
        if kind == "executing" and data.get("node") is not None:
            self.say(f"[{data['node']}] {self.title(data['node'])} ...")
        elif kind == "progress":
            v, m = data.get("value", 0), data.get("max", 1)
            if m and (v == m or v % max(1, m // 10) == 0):
                self.say(f"[{data.get('node')}] {self.title(data.get('node'))}: {v}/{m}")
        elif kind == "execution_cached" and data.get("nodes"):
            self.say(f"cached: {', '.join(self.title(n) for n in data['nodes'])}")

    def text(self, node_id: str, text: str) -> None:
        self.say(f"[{node_id}] {self.title(node_id)}: {text}")


def queue(server: Server, prompt: dict) -> str:
    """Queue the prompt (``Server.post`` refuses it whole when the host found errors in some nodes)."""
    return server.post("/prompt", {"prompt": prompt, "client_id": server.client_id})["prompt_id"]


def wait_with_websocket(server: Server, prompt: dict, progress: Progress, ws) -> str:
    prompt_id = queue(server, prompt)
    print(f"queued prompt {prompt_id}", flush=True)
    while True:
        raw = ws.recv()
        if isinstance(raw, bytes):  # binary frames: previews (skipped) and progress text
            if len(raw) >= 8 and struct.unpack(">I", raw[:4])[0] == 3:
                n = struct.unpack(">I", raw[4:8])[0]
                progress.text(raw[8:8 + n].decode(errors="replace"), raw[8 + n:].decode(errors="replace"))
            continue
        msg = json.loads(raw)
        data = msg.get("data", {})
        if data.get("prompt_id") not in (None, prompt_id):
            continue
        progress.event(msg)
        if msg["type"] == "execution_error":
            raise SystemExit(f"{data.get('node_type')} failed: {data.get('exception_message', '').strip()}")
        if msg["type"] == "execution_interrupted":
            raise SystemExit("the run was cancelled on the server")
        if msg["type"] == "execution_success" or (msg["type"] == "executing" and data.get("node") is None):
            return prompt_id


def wait_polling(server: Server, prompt: dict) -> str:
    prompt_id = queue(server, prompt)
    print(f"queued prompt {prompt_id} (install websocket-client for live progress; polling)", flush=True)
    while True:
        hist = server.get(f"/history/{prompt_id}")
        if hist and prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
            return prompt_id
        time.sleep(1.0)


def finish(server: Server, prompt: dict, prompt_id: str, out: Path) -> list[Path]:
    for _ in range(50):  # the history entry lands a moment after the last websocket message
        hist = server.get(f"/history/{prompt_id}") or {}
        if prompt_id in hist:
            break
        time.sleep(0.2)
    entry = hist[prompt_id]
    status = entry.get("status", {})
    if status.get("status_str") == "error":
        for kind, data in status.get("messages", []):
            if kind == "execution_error":
                raise SystemExit(f"{data.get('node_type')} failed: {data.get('exception_message', '').strip()}")
        raise SystemExit("the prompt failed")
    nid = ranked_output_node(prompt)
    images = entry.get("outputs", {}).get(nid, {}).get("images", [])
    out.mkdir(parents=True, exist_ok=True)
    saved = []
    for i, image in enumerate(images, start=1):
        path = out / f"rank_{i:02d}.png"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(server.view(image))
        tmp.replace(path)
        saved.append(path)
    rank_id = prompt[nid]["inputs"]["images"][0]
    report = "\n".join(entry.get("outputs", {}).get(rank_id, {}).get("text", []))
    if report:
        (out / "ranking.txt").write_text(report + "\n")
        print(report, flush=True)
    print(f"saved {len(saved)} portraits in {out}", flush=True)
    return saved


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI's address")
    ap.add_argument("--photos", type=Path, help="folder with 3-20 photos of one person")
    ap.add_argument("--checkpoint", help="an SD1.5 checkpoint in the server's models/checkpoints")
    ap.add_argument("--style", default="Studio Headshot", help="a style name (see --list-styles)")
    ap.add_argument("--face-lora", help="use this face LoRA (relative to models/loras) instead of training one")
    ap.add_argument("--trigger", default="fcsks", help="the face LoRA's trigger word (with --face-lora)")
    ap.add_argument("--template", type=Path, help="template face photo (with --face-lora; default: first photo)")
    ap.add_argument("--lora-name", help="file name for the trained LoRA (default: one per run)")
    ap.add_argument("--count", type=int, help="images to generate (default: the workflow's 8)")
    ap.add_argument("--top", type=int, help="portraits to keep after ranking (default: 4)")
    ap.add_argument("--size", type=int, help="image side in pixels (default: 512)")
    ap.add_argument("--steps", type=int, help="sampling steps (default: the workflow's)")
    ap.add_argument("--seed", type=int, help="sampling seed")
    ap.add_argument("--samples", type=int, help="training samples (default: the workflow's)")
    ap.add_argument("--workflow", help="another API workflow file")
    ap.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=JSON", help="override any input")
    ap.add_argument("--out", type=Path, default=Path("facechain_portraits"), help="where to save the portraits")
    ap.add_argument("--list-styles", action="store_true", help="print the server's styles and exit")
    args = ap.parse_args(argv)
    server = Server(args.server)
    try:
        info = server.get("/object_info/FaceChainApplyStyleLoRA")
    except OSError as e:
        raise SystemExit(f"cannot reach ComfyUI at {args.server} ({e}); start it first") from None
    if not info:
        raise SystemExit("the server has no FaceChain nodes: install comfyui-facechain into its custom_nodes")
    styles = info["FaceChainApplyStyleLoRA"]["input"]["required"]["style"][0]
    if args.list_styles:
        print("\n".join(styles))
        return 0
    if not args.checkpoint:
        ap.error("--checkpoint is required")
    if args.style not in styles:
        raise SystemExit(f"unknown style {args.style!r}; the server offers: {', '.join(styles)}")
    if args.face_lora is None and not args.photos:
        ap.error("give --photos (to train a face LoRA) or --face-lora")
    prompt = build_prompt(args, server)
    progress = Progress(prompt)
    try:
        import websocket
    except ImportError:
        websocket = None
    if websocket is not None:
        ws_url = server.url.replace("http", "ws", 1) + f"/ws?clientId={server.client_id}"
        ws = websocket.create_connection(ws_url, timeout=3600)
        try:
            prompt_id = wait_with_websocket(server, prompt, progress, ws)
        finally:
            ws.close()
    else:
        prompt_id = wait_polling(server, prompt)
    finish(server, prompt, prompt_id, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
