"""The conda environment and pyproject.toml must pin the same packages."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _normalise(requirement: str) -> str:
    name, _, version = requirement.partition("==")
    name = re.sub(r"[-_.]+", "-", name.strip().lower())
    return f"{name}=={version.strip()}"


def _pyproject_pins() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        pins.extend(extra)
    return {_normalise(p) for p in pins}


def _environment_pins() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pins: list[str] = []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pins.extend(dep.get("pip", []))
    return {_normalise(p) for p in pins}


def test_every_dependency_is_pinned_exactly():
    for pin in _pyproject_pins():
        assert re.fullmatch(r"[a-z0-9-]+(\[[a-z0-9,-]+\])?==[0-9][0-9A-Za-z.+-]*", pin), pin


def test_environment_yml_matches_pyproject():
    pyproject, environment = _pyproject_pins(), _environment_pins()
    assert pyproject - environment == set(), "pinned in pyproject.toml only"
    assert environment - pyproject == set(), "pinned in environment.yml only"


def test_environment_yml_python_matches_requires_python():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    python = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python=")]
    assert python == ["python=3.11"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11,<3.12"
