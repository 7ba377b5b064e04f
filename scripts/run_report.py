"""One page about a run of the pipeline: every stage's pictures, the captions, the training loss and the ranking.

``collect`` reads a finished prompt's /history entry (the images of its SaveImage and PreviewImage nodes, the text
of every node that shows some) and sorts it into stages by what each output node is fed from; ``write`` lays that
out as ``report.html`` (the pictures beside it in ``report_images/``) and ``report.png``, a contact sheet of the
same. ``scripts/run_example.py`` calls both after the main job.
"""

from __future__ import annotations

import html
import io
import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from facechain_core.files import write_atomic  # noqa: E402
from facechain_core.train.save import REUSED  # noqa: E402  (TrainFaceLoRA's report when it trained nothing)
from facechain_core.train.trainer import LOSS_CURVE  # noqa: E402  (the training report's loss-curve line)

# (stage, heading, the class types an output node's images come through, nearest first)
STAGES = [
    ("photos", "Photos", None),
    ("aligned", "Aligned crops (FaceAlign)", ("FaceChainFaceAlign",)),
    ("head_masks", "Head masks (HumanParse)", ("MaskToImage", "FaceChainHumanParse")),
    ("retouched", "Retouched crops (SkinRetouch) and their captions (AutoTag)", ("FaceChainSkinRetouch",)),
    ("template", "Template face (Template Face)", ("FaceChainTemplateFace",)),
    ("generated", "Generated, before fusion (KSampler)", ("VAEDecode",)),
    ("portraits", "Portraits: template face fused in (FaceFusion), ranked by likeness (RTS Rank)",
     ("FaceChainRTSRank",)),
]
IMAGE_NODES = ("SaveImage", "PreviewImage")
NO_LOSS = "no loss recorded"
LORA_REUSED = "no training this run: the LoRA saved by an earlier run from the same inputs was reused"
THUMB = 160


@dataclass
class RunReport:
    title: str
    images: dict[str, list[bytes]] = field(default_factory=dict)  # stage -> PNG/JPEG bytes, in output order
    captions: list[str] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    scores: list[str] = field(default_factory=list)  # one label per portrait
    reports: dict[str, str] = field(default_factory=dict)  # node title -> the text it showed
    notes: list[str] = field(default_factory=list)
    loss_note: str = NO_LOSS  # what the loss box says when there is no curve


def feed_chain(prompt: dict, node_id: str, depth: int = 3) -> tuple[str, ...]:
    """Class types of the nodes an output node's first linked input comes through, nearest first."""
    chain, nid = [], node_id
    for _ in range(depth):
        links = [v for v in prompt[nid]["inputs"].values() if isinstance(v, list) and len(v) == 2]
        if not links:
            break
        nid = str(links[0][0])
        chain.append(prompt[nid]["class_type"])
    return tuple(chain)


def stage_of(prompt: dict, node_id: str) -> str | None:
    chain = feed_chain(prompt, node_id)
    for key, _, via in STAGES:
        if via and chain[:len(via)] == via:
            return key
    return None


def title_of(prompt: dict, node_id: str) -> str:
    node = prompt[node_id]
    return node.get("_meta", {}).get("title") or node["class_type"]


def parse_losses(text: str) -> list[float]:
    for line in text.splitlines():
        if line.startswith(LOSS_CURVE):
            return [float(v) for v in line[len(LOSS_CURVE):].split()]
    return []


def portrait_scores(rank_report: str, count: int) -> list[str]:
    """A label per returned portrait (they come most alike first) from RTS Rank's report: rank, likeness in
    percent of the person's own photo-to-photo similarity, and the raw similarity."""
    found = {int(r): (p, float(s)) for p, s, r in
             re.findall(r"likeness (\d+)%, similarity (-?[0-9.]+), rank (\d+)$", rank_report, re.M)}
    if not found:
        return ["unranked: no face of plausible size found"] * count
    return [f"rank {i + 1}, likeness {found[i + 1][0]}% (similarity {found[i + 1][1]:.3f})" if i + 1 in found
            else "unranked" for i in range(count)]


def collect(prompt: dict, entry: dict, fetch: Callable[[dict], bytes], photos: list[Path],
            title: str = "FaceChain run") -> RunReport:
    """Sort a /history entry's outputs into stages. ``fetch`` turns one image record into its bytes (/view)."""
    run = RunReport(title, images={"photos": [p.read_bytes() for p in photos]})
    for nid, out in sorted(entry.get("outputs", {}).items(), key=lambda kv: _id_key(kv[0])):
        node = prompt.get(nid)
        if node is None:
            continue
        if node["class_type"] in IMAGE_NODES and out.get("images"):
            stage = stage_of(prompt, nid)
            if stage:
                run.images.setdefault(stage, []).extend(fetch(img) for img in out["images"])
        text = "\n".join(str(t) for t in out.get("text", []))
        if not text:
            continue
        source = feed_chain(prompt, nid, depth=1)
        if node["class_type"] == "PreviewAny" and source == ("FaceChainAutoTag",):
            run.captions = [ln for ln in text.splitlines() if ln.strip()]
        elif node["class_type"] != "PreviewAny":  # a node's own report (PreviewAny copies show the same text)
            run.reports[title_of(prompt, nid)] = text
            if node["class_type"] == "FaceChainTrainFaceLoRA":
                run.losses = parse_losses(text)
                if REUSED in text:
                    run.loss_note = LORA_REUSED
            if node["class_type"] == "FaceChainRTSRank":
                run.scores = portrait_scores(text, len(run.images.get("portraits", [])) or 99)
    run.scores = run.scores[:len(run.images.get("portraits", []))]
    return run


def _id_key(nid: str):
    return (0, int(nid), "") if nid.isdigit() else (1, 0, nid)


def loss_plot(losses: list[float], width: int = 640, height: int = 220, note: str = NO_LOSS) -> Image.Image:
    """The training loss per run of steps as a line on white, with its range and the step axis labelled
    (``note`` in the box when there is none)."""
    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    left, right, top, bottom = 60, width - 15, 15, height - 35
    d.rectangle([left, top, right, bottom], outline=(120, 120, 120))
    if not losses:
        d.text((left + 10, top + 10), note, fill="black")
        return im
    lo, hi = min(losses), max(losses)
    span = (hi - lo) or 1.0
    n = max(len(losses) - 1, 1)
    pts = [(left + (right - left) * i / n, bottom - (bottom - top) * (v - lo) / span) for i, v in enumerate(losses)]
    if len(pts) > 1:
        d.line(pts, fill=(200, 60, 40), width=2)
    else:
        d.ellipse([pts[0][0] - 3, pts[0][1] - 3, pts[0][0] + 3, pts[0][1] + 3], fill=(200, 60, 40))
    d.text((5, top), f"{hi:.4f}", fill="black")
    d.text((5, bottom - 10), f"{lo:.4f}", fill="black")
    d.text((left, bottom + 8), "first step", fill="black")
    d.text((right - 60, bottom + 8), "last step", fill="black")
    d.text(((left + right) // 2 - 40, bottom + 8), "training loss", fill=(200, 60, 40))
    return im


def _png(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, "white")
        im = Image.alpha_composite(white, im)
    return im.convert("RGB")


def write(run: RunReport, out_dir: Path) -> tuple[Path, Path]:
    """``out_dir/report.html`` (pictures in ``out_dir/report_images``) and the contact sheet ``report.png``."""
    img_dir = out_dir / "report_images"
    img_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[str]] = {}
    for stage, blobs in run.images.items():
        for i, blob in enumerate(blobs):
            name = f"{stage}_{i + 1:02d}.png"
            write_atomic(img_dir / name, lambda p, b=blob: _png(b).save(p, format="PNG"))
            files.setdefault(stage, []).append(name)
    plot = loss_plot(run.losses, note=run.loss_note)
    write_atomic(img_dir / "loss.png", lambda p: plot.save(p, format="PNG"))
    html_path, png_path = out_dir / "report.html", out_dir / "report.png"
    page = render_html(run, files)
    write_atomic(html_path, lambda p: p.write_text(page, encoding="utf-8"))
    sheet = contact_sheet(run, plot)
    write_atomic(png_path, lambda p: sheet.save(p, format="PNG"))
    return html_path, png_path


def _figure(src: str, caption: str, stage: str) -> str:
    return (f'<figure class="{stage}"><img src="report_images/{html.escape(src)}" alt="{html.escape(stage)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _captions_for(run: RunReport, stage: str, count: int) -> list[str]:
    if stage == "retouched" and run.captions:
        return (run.captions + [""] * count)[:count]
    if stage == "portraits":
        return (run.scores + [""] * count)[:count]
    return [f"{i + 1}" for i in range(count)]


def render_html(run: RunReport, files: dict[str, list[str]]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(run.title)}</title>",
             "<style>body{font-family:sans-serif;margin:20px;background:#fafafa;max-width:1340px}"
             ".note{background:#fff3cd;border:2px solid #e0a800;padding:10px 14px;font-size:18px}"
             "section{margin:18px 0}.row{display:flex;flex-wrap:wrap;gap:10px}"
             f"figure{{margin:0;width:{THUMB}px}}figure img{{width:{THUMB}px;height:{THUMB}px;object-fit:contain;"
             "background:#fff;border:1px solid #ccc}figcaption{font-size:12px}"
             "pre{background:#fff;border:1px solid #ddd;padding:8px;white-space:pre-wrap;font-size:12px}"
             "</style></head><body>", f"<h1>{html.escape(run.title)}</h1>"]
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in run.notes]
    for stage, heading, _ in STAGES:
        names = files.get(stage, [])
        caps = _captions_for(run, stage, len(names))
        parts.append(f'<section id="{stage}"><h2>{html.escape(heading)} ({len(names)})</h2><div class="row">')
        parts += [_figure(n, c, stage) for n, c in zip(names, caps)] or ["<p>none in this run</p>"]
        parts.append("</div></section>")
        if stage == "template":
            parts.append('<section id="loss"><h2>Training loss (Train Face LoRA)</h2>'
                         '<img src="report_images/loss.png" alt="loss"></section>')
    parts.append('<section id="reports"><h2>Node reports</h2>')
    parts += [f"<h3>{html.escape(t)}</h3><pre>{html.escape(x)}</pre>" for t, x in run.reports.items()]
    parts.append("</section></body></html>")
    return "\n".join(parts)


def contact_sheet(run: RunReport, plot: Image.Image, width: int = 1200, thumb: int = 128) -> Image.Image:
    """Every stage as a labelled row of thumbnails (captions and scores under them), and the loss curve."""
    rows: list[tuple[str, Image.Image]] = []
    for stage, heading, _ in STAGES:
        blobs = run.images.get(stage, [])
        caps = _captions_for(run, stage, len(blobs)) if stage in ("retouched", "portraits") else []
        rows.append((f"{heading} ({len(blobs)})", _thumb_row(blobs, caps, width - 20, thumb)))
        if stage == "template":
            rows.append(("Training loss (Train Face LoRA)", plot))
    note_lines = [ln for n in run.notes for ln in textwrap.wrap(n, 140)]
    height = 50 + 18 * len(note_lines) + sum(26 + im.height + 10 for _, im in rows)
    sheet = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(sheet)
    d.text((10, 10), run.title, fill="black", font_size=24)
    y = 44
    for ln in note_lines:
        d.text((10, y), ln, fill=(170, 90, 0), font_size=14)
        y += 18
    for label, im in rows:
        d.text((10, y + 4), label, fill="black", font_size=16)
        sheet.paste(im, (10, y + 26))
        y += 26 + im.height + 10
    return sheet


def _thumb_row(blobs: list[bytes], captions: list[str], width: int, thumb: int) -> Image.Image:
    per_row = max(1, width // (thumb + 8))
    text_h = 44 if any(captions) else 0
    lines = max(1, -(-len(blobs) // per_row))
    row = Image.new("RGB", (width, lines * (thumb + text_h + 8)), "white")
    d = ImageDraw.Draw(row)
    if not blobs:
        d.text((0, 10), "none in this run", fill=(150, 0, 0))
    for i, blob in enumerate(blobs):
        x, y = (i % per_row) * (thumb + 8), (i // per_row) * (thumb + text_h + 8)
        im = _png(blob)
        scale = thumb / max(im.size)  # small outputs (64 px samples) are enlarged to the same size as the rest
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
        row.paste(im, (x + (thumb - im.width) // 2, y + (thumb - im.height) // 2))
        if i < len(captions) and captions[i]:
            for j, ln in enumerate(textwrap.wrap(captions[i], 24)[:3]):
                d.text((x, y + thumb + 2 + 13 * j), ln, fill=(40, 40, 40), font_size=11)
    return row
