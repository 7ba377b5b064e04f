"""The style catalogue: one small JSON file per style, read from the pack and from the user's folder.

A style says how a portrait should look: its prompt and negative prompt (written for this project), an
optional style LoRA with its weight, the face-LoRA weight it pairs with (FaceChain's pairs: face ~0.9-1.0,
style ~0.2-0.55) and a preview swatch. Styles without a LoRA ("prompt-only") need no download.

Where styles come from, later folders overriding earlier ones by name:
1. ``facechain_core/data/styles/`` (shipped with the pack);
2. ``<models root>/styles/`` (inside ComfyUI: ``models/facechain/styles``), where users drop their own.

A broken file never stops start-up: it is skipped and listed in ``Catalogue.problems`` with the reason.
Files whose names start with ``_`` are not styles (``_common.json`` holds the text every style shares).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import model_store
from .model_cache import cached
from .errors import FaceChainError, ModelMissingError

BUILTIN_DIR = Path(__file__).with_name("data") / "styles"
COMMON_FILE = "_common.json"
# Style LoRAs live in ComfyUI's models/loras, in this subfolder, so the loras list keeps them together.
LORA_SUBFOLDER = "facechain_styles"
PREVIEW_SIZE = 96
_FIELDS = {"name", "description", "preview", "palette", "style_lora", "face_lora_weight", "positive", "negative",
           "base_model", "licence"}


@dataclass(frozen=True)
class StyleLora:
    file: str  # path relative to a ComfyUI loras folder, '/'-separated
    weight: float
    source: dict  # {"modelscope": id, "revision": rev, "file": name} or {"huggingface": id, "file": name} or {"url": u}

    def where_to_get(self) -> str:
        s = self.source
        if "modelscope" in s:
            rev = f" (revision {s['revision']})" if s.get("revision") else ""
            return f"ModelScope model '{s['modelscope']}'{rev}, file '{s.get('file', Path(self.file).name)}'"
        if "huggingface" in s:
            return f"Hugging Face repository '{s['huggingface']}', file '{s.get('file', Path(self.file).name)}'"
        if "url" in s:
            return s["url"]
        return "its author (the style file names no source)"


@dataclass(frozen=True)
class Style:
    key: str  # file stem: what scripts and install.py call it
    name: str  # what the node's list shows
    positive: str
    negative: str = ""
    description: str = ""
    face_lora_weight: float = 0.95
    style_lora: StyleLora | None = None
    preview: Path | None = None
    palette: tuple[str, ...] = ()
    path: Path | None = None

    @property
    def prompt_only(self) -> bool:
        return self.style_lora is None


@dataclass
class Catalogue:
    styles: dict[str, Style] = field(default_factory=dict)  # by name, in display order
    problems: list[str] = field(default_factory=list)
    common: dict = field(default_factory=dict)

    def names(self) -> list[str]:
        return list(self.styles)

    def get(self, name_or_key: str) -> Style:
        """A style by its shown name or its file stem, case and spacing forgiven."""
        want = _norm(name_or_key)
        for s in self.styles.values():
            if _norm(s.name) == want or _norm(s.key) == want:
                return s
        known = ", ".join(self.styles) or "none"
        extra = f" Skipped style files: {'; '.join(self.problems)}." if self.problems else ""
        raise FaceChainError(f"Unknown style '{name_or_key}'. Known styles: {known}.{extra}")

    def positive_prompt(self, style: Style, subject_parts: list[str], extra: str = "") -> str:
        """FaceChain's order: trigger, subject phrase, shared tags, then the style's own text."""
        parts = [*subject_parts, style.positive, extra, self.common.get("quality", "")]
        return join_prompt(parts)

    def negative_prompt(self, style: Style, extra: str = "") -> str:
        return join_prompt([style.negative, extra, self.common.get("negative", "")])


@dataclass(frozen=True)
class StylePlan:
    """What a style asks of one generation: the prompts and the weights of the face and style LoRAs."""
    style: Style
    positive: str
    negative: str
    face_weight: float
    style_weight: float  # 0 for prompt-only styles
    trigger: str
    subject: str
    shared_tags: str


def plan_style(cat: Catalogue, style: str, captions: dict | None = None, face_weight: float = -1.0,
               style_weight: float = -1.0, trigger: str = "", subject: str = "", shared_tags: str = "",
               extra_prompt: str = "") -> StylePlan:
    """ApplyStyleLoRA's choices, also used by the standalone pipeline: trigger, subject and shared tags typed
    in or from AutoTag's captions; a weight of -1 takes the style's own pairing."""
    chosen = cat.get(style)
    caps = captions if isinstance(captions, dict) else {}
    trigger = trigger.strip() or str(caps.get("trigger", "")).strip()
    subject = subject.strip() or str(caps.get("subject", "")).strip()
    tags = shared_tags.strip()
    if not tags:
        t = caps.get("shared_tags", [])
        tags = ", ".join(str(x) for x in t) if isinstance(t, (list, tuple)) else str(t)
    fw = chosen.face_lora_weight if face_weight < 0 else float(face_weight)
    sw = 0.0
    if chosen.style_lora is not None:
        sw = chosen.style_lora.weight if style_weight < 0 else float(style_weight)
    return StylePlan(chosen, cat.positive_prompt(chosen, [trigger, subject, tags], extra_prompt),
                     cat.negative_prompt(chosen), fw, sw, trigger, subject, tags)


def _norm(s: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(s)).strip().lower()


def join_prompt(parts: list[str]) -> str:
    """Comma-join non-empty parts, dropping a tag that an earlier part already has."""
    seen, out = set(), []
    for part in parts:
        for tag in (t.strip() for t in (part or "").split(",")):
            if tag and tag.lower() not in seen:
                seen.add(tag.lower())
                out.append(tag)
    return ", ".join(out)


def user_styles_dir() -> Path:
    return model_store.models_root() / "styles"


def style_dirs() -> list[Path]:
    return [BUILTIN_DIR, user_styles_dir()]


def _number(data: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = data.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= float(v) <= hi:
        raise ValueError(f"'{key}' must be a number from {lo} to {hi}, got {v!r}")
    return float(v)


def _text(data: dict, key: str, required: bool = False) -> str:
    v = data.get(key, "")
    if not isinstance(v, str):
        raise ValueError(f"'{key}' must be text, got {type(v).__name__}")
    if required and not v.strip():
        raise ValueError(f"'{key}' is missing or empty")
    return v.strip()


def safe_relative(path: str, what: str) -> str:
    """A '/'-separated relative path that cannot leave the folder it is joined to."""
    p = str(path).replace("\\", "/").strip()
    parts = p.split("/")
    if not p or p.startswith("/") or re.match(r"^[A-Za-z]:", p) or any(x in ("", ".", "..") for x in parts):
        raise ValueError(f"{what} '{path}' must be a plain relative path inside the folder (no '..', no drive)")
    return p


def parse_style(path: Path, data) -> Style:
    """Check one style file's content; raise ValueError saying what is wrong."""
    if not isinstance(data, dict):
        raise ValueError("the file must hold one JSON object")
    unknown = sorted(set(data) - _FIELDS - {"_comment"})
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(_FIELDS))}")
    lora = data.get("style_lora")
    style_lora = None
    if lora is not None:
        if not isinstance(lora, dict):
            raise ValueError("'style_lora' must be an object with 'file', 'weight' and 'source', or null")
        file = safe_relative(_text(lora, "file", required=True), "style_lora.file")
        if not file.endswith((".safetensors", ".pt", ".ckpt", ".bin")):
            raise ValueError(f"style_lora.file '{file}' is not a LoRA file (.safetensors)")
        source = lora.get("source") or {}
        if not isinstance(source, dict):
            raise ValueError("style_lora.source must be an object")
        style_lora = StyleLora(file, _number(lora, "weight", 0.35, -2.0, 2.0), source)
    preview = data.get("preview")
    preview_path = None
    if preview:
        preview_path = path.parent / safe_relative(preview, "preview")
    palette = data.get("palette", [])
    if not isinstance(palette, list) or not all(isinstance(c, str) and re.fullmatch(r"#[0-9a-fA-F]{6}", c)
                                                for c in palette):
        raise ValueError("'palette' must be a list of colours like \"#a0b0c0\"")
    return Style(key=path.stem, name=_text(data, "name", required=True),
                 positive=_text(data, "positive", required=True),
                 negative=_text(data, "negative"), description=_text(data, "description"),
                 face_lora_weight=_number(data, "face_lora_weight", 0.95, 0.0, 2.0), style_lora=style_lora,
                 preview=preview_path, palette=tuple(palette), path=path)


def load_catalogue(dirs: list[Path] | None = None) -> Catalogue:
    """Read every style file; broken ones are skipped and described in ``problems``."""
    cat = Catalogue()
    by_name: dict[str, Style] = {}
    for folder in dirs if dirs is not None else style_dirs():
        folder = Path(folder)
        if not folder.is_dir():
            continue
        common = folder / COMMON_FILE
        if common.is_file():
            try:
                with open(common, encoding="utf-8") as f:
                    data = json.load(f)
                if not isinstance(data, dict):
                    raise ValueError("the file must hold one JSON object")
                cat.common.update({k: v for k, v in data.items() if isinstance(v, str)})
            except (OSError, ValueError) as e:
                cat.problems.append(f"{common.name} in {folder}: {e}")
        for path in sorted(folder.glob("*.json")):
            if path.name.startswith("_"):
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
                style = parse_style(path, data)
            except json.JSONDecodeError as e:
                cat.problems.append(f"{path.name} in {folder}: not valid JSON "
                                    f"(line {e.lineno}, column {e.colno}: {e.msg})")
                continue
            except (OSError, UnicodeDecodeError, ValueError) as e:
                cat.problems.append(f"{path.name} in {folder}: {e}")
                continue
            by_name.pop(_norm(style.name), None)  # a later folder overrides a style of the same name
            by_name[_norm(style.name)] = style
    cat.styles = {s.name: s for s in by_name.values()}
    return cat


def catalogue() -> Catalogue:
    """The catalogue, read again only when a style file was added, removed or changed."""
    files = [p for folder in style_dirs() if folder.is_dir() for p in sorted(folder.glob("*.json"))]
    return cached(("styles",), load_catalogue, files)


def find_style_lora(style: Style, lora_dirs: list[str | os.PathLike]) -> Path:
    """The style LoRA file in one of ComfyUI's loras folders, or an error that says how to get it."""
    if style.style_lora is None:
        raise FaceChainError(f"Style '{style.name}' is prompt-only: it has no style LoRA.")
    rel = style.style_lora.file
    for d in lora_dirs:
        p = Path(d) / rel
        if p.is_file():
            return p
    where = Path(lora_dirs[0]) / rel if lora_dirs else Path("models/loras") / rel
    raise ModelMissingError(
        f"Style '{style.name}' needs its style LoRA '{rel}', which is not in ComfyUI's loras folder "
        f"(expected '{where}'). Get it with `python install.py --styles {style.key}` from the comfyui-facechain "
        f"folder (needs internet), or download it yourself from {style.style_lora.where_to_get()} and save it as "
        f"'{where}'. Or choose a prompt-only style, which needs no download.")


def fetch_style_lora(style: Style, loras_dir: str | os.PathLike, force: bool = False) -> Path:
    """Download a style's LoRA into ``loras_dir`` (needs internet); temp name, then rename."""
    if style.style_lora is None:
        raise FaceChainError(f"Style '{style.name}' is prompt-only: nothing to fetch.")
    target = Path(loras_dir) / style.style_lora.file
    if target.is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    src = style.style_lora.source
    tmp_dir = target.parent / f".{target.name}.download"
    tmp_dir.mkdir(exist_ok=True)
    try:
        if "modelscope" in src:
            from modelscope.hub.file_download import model_file_download

            got = model_file_download(src["modelscope"], src.get("file", target.name),
                                      revision=src.get("revision"), local_dir=str(tmp_dir))
        elif "huggingface" in src:
            from huggingface_hub import hf_hub_download

            got = hf_hub_download(src["huggingface"], src.get("file", target.name), revision=src.get("revision"),
                                  local_dir=str(tmp_dir))
        elif "url" in src:
            import shutil
            import urllib.request

            got = tmp_dir / target.name
            with urllib.request.urlopen(src["url"], timeout=120) as r, open(got, "wb") as out:
                shutil.copyfileobj(r, out)
        else:
            raise FaceChainError(f"Style '{style.name}' names no download source for '{style.style_lora.file}'.")
        os.replace(got, target)
    finally:
        import shutil

        shutil.rmtree(tmp_dir, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------------------
# Preview swatches: drawn here from each style's palette, so no picture is borrowed from anywhere.

def _hex(c: str) -> np.ndarray:
    return np.array([int(c[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.float32)


def render_preview(palette: tuple[str, ...] | list[str], size: int = PREVIEW_SIZE) -> np.ndarray:
    """A head-and-shoulders silhouette on a gradient of the palette: RGB uint8, size x size.

    The first colours make the background from top to bottom, the last one the figure."""
    cols = [_hex(c) for c in palette] or [_hex("#b8b8b8"), _hex("#707070"), _hex("#404040")]
    if len(cols) == 1:
        cols = [cols[0], cols[0] * 0.6]
    bg_cols, figure = cols[:-1] if len(cols) > 2 else cols, cols[-1]
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)
    stops = np.linspace(0.0, 1.0, len(bg_cols))
    column = np.stack([np.interp(t, stops, [c[ch] for c in bg_cols]) for ch in range(3)], axis=-1)
    img = np.repeat(column[:, None, :], size, axis=1)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    head = ((xx - 0.5) / 0.16) ** 2 + ((yy - 0.40) / 0.21) ** 2 <= 1.0
    shoulders = (((xx - 0.5) / 0.42) ** 2 + ((yy - 1.05) / 0.36) ** 2 <= 1.0)
    neck = (np.abs(xx - 0.5) < 0.07) & (yy > 0.5) & (yy < 0.75)
    img[head | shoulders | neck] = figure
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def preview_image(style: Style, size: int = PREVIEW_SIZE) -> np.ndarray:
    """The style's preview file if it has a readable one, else a swatch from its palette."""
    if style.preview is not None and style.preview.is_file():
        try:
            from PIL import Image

            with Image.open(style.preview) as im:
                return np.asarray(im.convert("RGB").resize((size, size)), dtype=np.uint8)
        except (OSError, ValueError):
            pass
    return render_preview(style.palette, size)


def write_previews(folder: Path = BUILTIN_DIR) -> list[Path]:
    """(Re)draw the preview PNG of every style in ``folder`` that names one; used when styles are edited."""
    from .images import save_png_atomic

    written = []
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith("_"):
            continue
        style = parse_style(path, json.loads(path.read_text(encoding="utf-8")))
        if style.preview is not None:
            written.append(save_png_atomic(render_preview(style.palette), style.preview))
    return written


if __name__ == "__main__":  # python -m facechain_core.styles: redraw the shipped previews, list the styles
    for p in write_previews():
        print("drew", p)
    cat = load_catalogue([BUILTIN_DIR])
    for s in cat.styles.values():
        print(f"{s.key:24s} {'prompt-only' if s.prompt_only else s.style_lora.file:44s} {s.name}")
    for problem in cat.problems:
        print("problem:", problem)
