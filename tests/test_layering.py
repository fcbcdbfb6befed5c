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
