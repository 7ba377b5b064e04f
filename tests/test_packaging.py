"""The pack's metadata agrees with itself: what ComfyUI-Manager installs is what the registry declares."""

import re
import tomllib

from PIL import Image

from conftest import REPO


def requirement_lines() -> list[str]:
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]


def test_pyproject_dependencies_match_requirements_txt():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps = [d.replace("'", '"') for d in project["project"]["dependencies"]]
    assert deps == requirement_lines()
    comfy = project["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]


def test_requirements_never_pin_what_the_host_provides():
    hosted = {"torch", "torchvision", "torchaudio", "transformers"}
    names = {ln.split(";")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower() for ln in requirement_lines()}
    assert not names & hosted
    assert not any(ln.lower().startswith("numpy") and ("==" in ln or "<" in ln) for ln in requirement_lines())


def test_readme_commands_are_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "bash scripts/run_example.sh" in readme and "bash scripts/test.sh" in readme
    assert "scripts/test.sh" in ci


# The Comfy Registry's rules for a node id (docs.comfy.org/registry/specifications): under 100 characters,
# letters, digits, '-', '_' and '.', no two special characters in a row, starting with a letter.
REGISTRY_ID = re.compile(r"^[A-Za-z](?:[A-Za-z0-9]|[-_.](?=[A-Za-z0-9]))*$")


def test_registry_id_is_our_own_and_valid():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    node_id = project["project"]["name"]
    assert REGISTRY_ID.match(node_id) and len(node_id) < 100
    # THtianhao/ComfyUI-FaceChain publishes "comfyui-facechain"; the registry advises against "comfyui" in ids
    assert "comfyui" not in node_id.lower() and node_id.lower() not in ("facechain", "comfyui-facechain")
    assert re.match(r"^\d+\.\d+\.\d+$", project["project"]["version"])
    assert project["project"]["urls"]["Repository"].startswith("https://github.com/")


def test_registry_publisher_name_and_icon():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    comfy = project["tool"]["comfy"]
    assert REGISTRY_ID.match(comfy["PublisherId"]) and comfy["PublisherId"] == comfy["PublisherId"].lower()
    assert "comfyui" not in comfy["PublisherId"].lower()
    assert comfy["DisplayName"].strip() and "comfyui" not in comfy["DisplayName"].lower()
    # The icon URL serves a file of this repository: a square image of at most 400 px.
    repo = project["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repo}/main/"
    assert comfy["Icon"].startswith(prefix), comfy["Icon"]
    with Image.open(REPO / comfy["Icon"].removeprefix(prefix)) as icon:
        assert icon.width == icon.height <= 400
