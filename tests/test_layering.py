"""Imports go one way: keyboard -> federation -> models; the core never needs Textual."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "models": {"federation", "keyboard", "textual"},
    "federation": {"keyboard", "textual"},
}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_one_way(package):
    bad = {}
    for f in sorted((REPO / package).rglob("*.py")):
        hit = _imported_roots(f) & FORBIDDEN[package]
        if hit:
            bad[str(f.relative_to(REPO))] = sorted(hit)
    assert bad == {}


def test_core_does_not_load_textual():
    code = (
        "import sys, models.predictor, models.evaluate, models.checkpoint, federation.device;"
        "print('textual' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_non_editable_install_ships_every_package():
    """pyproject's package list lacked keyboard.commands: after `pip install .` every command but --help
    died with ModuleNotFoundError (an editable install maps the whole folder and hid it)."""
    import tomllib
    from fnmatch import fnmatchcase

    packages = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"]
    find = packages["find"] if isinstance(packages, dict) else None  # [tool.setuptools.packages.find], or a list
    if find is not None:
        assert find.get("where", ["."]) == ["."] and find.get("namespaces") is False  # setuptools' default: True

    def shipped(name: str) -> bool:
        if find is None:
            return name in packages
        return (any(fnmatchcase(name, p) for p in find.get("include", ["*"]))  # as setuptools matches them
                and not any(fnmatchcase(name, p) for p in find.get("exclude", [])))

    folders = {".".join(f.parent.relative_to(REPO).parts) for top in ("models", "federation", "keyboard")
               for f in (REPO / top).rglob("__init__.py")}
    assert "keyboard.commands" in folders
    assert sorted(p for p in folders if not shipped(p)) == []
