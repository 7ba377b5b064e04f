"""The pack's metadata agrees with itself: what ComfyUI-Manager installs is what the registry declares."""

import tomllib

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
