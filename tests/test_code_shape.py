"""The shape the project keeps (CONTRIBUTING.md): no function over 80 lines, no node module importing another
node module, and the README's layout section naming what is in the tree."""

from __future__ import annotations

import ast
import re

from conftest import REPO

MAX_FUNCTION_LINES = 80
SOURCES = [*sorted((REPO / "nodes").glob("*.py")), *sorted((REPO / "facechain_core").rglob("*.py")),
           *sorted((REPO / "scripts").glob("*.py")), REPO / "install.py", REPO / "__init__.py"]
NODE_HELPERS = {"__init__", "common", "sockets", "comfy_backbone", "_learned"}


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 80 lines:\n" + "\n".join(long)


def test_no_node_module_imports_another_node_module():
    node_modules = {p.stem for p in (REPO / "nodes").glob("*.py")} - NODE_HELPERS
    found = []
    for stem in sorted(node_modules):
        tree = ast.parse((REPO / "nodes" / f"{stem}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = {node.module} if node.module else {a.name for a in node.names}
                found += [f"nodes/{stem}.py imports .{n}" for n in names if n.split(".")[0] in node_modules]
    assert not found, "\n".join(found)


def test_readme_layout_names_every_top_level_folder():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Layout", 1)[1].split("```")[1]
    named = set(re.findall(r"^(\S+?)/", layout, re.M)) | set(re.findall(r"^  (\S+?)/ ", layout, re.M))
    tracked = {p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith(".")
               and p.name not in {"artifacts", "models", "example_output", "__pycache__"}}
    assert tracked <= named, f"folders missing from the README's layout: {sorted(tracked - named)}"
    for name in named:
        assert (REPO / name).is_dir() or (REPO / "facechain_core" / name).is_dir(), f"layout names absent {name}/"
    for module in ("sockets.py", "common.py", "comfy_backbone.py"):
        assert module in layout, f"nodes/{module} missing from the layout"
    for name in set(re.findall(r"\b([a-z_]+\.py)\b", layout)):
        assert any((REPO / d / name).is_file() for d in ("", "nodes", "facechain_core", "facechain_core/train")), \
            f"the layout names {name}, which is not in the tree"
