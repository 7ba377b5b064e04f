"""Install step for comfyui-facechain (ComfyUI-Manager runs it after requirements.txt).

    python install.py                      install requirements.txt into this Python (no model downloads)
    python install.py --list               show every learned model, where it goes and whether it is there
    python install.py --models all         fetch every learned model (needs internet)
    python install.py --models damofd m2fp fetch some of them
    python install.py --no-requirements --models damofd
    python install.py --styles autumn_poplars   fetch a style's LoRA into ComfyUI's models/loras ('all' for every one)

Learned models go into ComfyUI's models/facechain folder when this pack sits in ComfyUI/custom_nodes,
else into $FACECHAIN_MODELS, else ~/.cache/facechain/models. The offline defaults need no download.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(os.path.abspath(__file__)).parent  # not resolve(): keep a custom_nodes symlink
sys.path.insert(0, str(HERE))


def comfy_models_root() -> Path | None:
    """<ComfyUI>/models/facechain when this folder is ComfyUI/custom_nodes/<pack>."""
    comfy = HERE.parent.parent
    if HERE.parent.name == "custom_nodes" and (comfy / "models").is_dir():
        return comfy / "models" / "facechain"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Install comfyui-facechain's requirements and, if asked, its learned models.")
    ap.add_argument("--models", nargs="*", default=[], help="learned models to fetch ('all' for every one)")
    ap.add_argument("--list", action="store_true", help="list the learned models and exit")
    ap.add_argument("--no-requirements", action="store_true", help="skip pip install -r requirements.txt")
    ap.add_argument("--styles", nargs="*", default=[], help="styles whose LoRA to fetch ('all' for every one)")
    ap.add_argument("--loras-dir", type=Path, help="where style LoRAs go (default: ComfyUI's models/loras)")
    args = ap.parse_args(argv)

    from facechain_core import model_store

    root = comfy_models_root()
    if root is not None:
        model_store.set_models_root(root)
    if args.list:
        for name in model_store.learned_names():
            entry = model_store.catalogue()["learned"][name]
            state = "present" if model_store.is_present(name) else "missing"
            print(f"{name:12s} {state:8s} {model_store.models_root() / entry['path']}  ({entry['task']})")
            if entry.get("needs"):
                print(f"{'':21s} needs {entry['needs']}")
        return 0
    if not args.no_requirements:
        subprocess.run([sys.executable, "-m", "pip", "install", "-r", str(HERE / "requirements.txt")], check=True)
    names = model_store.learned_names() if "all" in args.models else args.models
    for name in names:
        print(f"fetching {name} into {model_store.models_root()} ...", flush=True)
        print(f"  {model_store.fetch(name)}")
    if args.styles:
        fetch_styles(args.styles, args.loras_dir or (root.parent / "loras" if root is not None else None))
    return 0


def fetch_styles(wanted: list[str], loras_dir: Path | None) -> None:
    """Style LoRAs (facechain_core/data/styles) into <loras>/facechain_styles/, each atomically."""
    from facechain_core import styles

    if loras_dir is None:
        raise SystemExit("Not inside ComfyUI/custom_nodes: give --loras-dir (ComfyUI's models/loras folder).")
    cat = styles.catalogue()
    chosen = [s for s in cat.styles.values() if not s.prompt_only] if "all" in wanted else [cat.get(w) for w in wanted]
    for style in chosen:
        if style.prompt_only:
            print(f"{style.key}: prompt-only, nothing to fetch")
            continue
        print(f"fetching the LoRA of style {style.key} into {loras_dir} ...", flush=True)
        print(f"  {styles.fetch_style_lora(style, loras_dir)}")


if __name__ == "__main__":
    sys.exit(main())
