"""models.datasets: the shipped fixtures load; missing or corrupt files are a clear FedkbError."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models import datasets
from models.datasets import UserData, iter_users, load_pretrain_lines, load_shakespeare, load_users
from models.errors import FedkbError
from models.text import words

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REPO = Path(__file__).resolve().parent.parent


def test_shipped_fixtures_load():
    lines = load_pretrain_lines(FIXTURES / "pretrain.txt.gz")
    assert len(lines) == 3500 and all(words(ln) for ln in lines)
    users = load_users(FIXTURES / "users.jsonl.gz")
    assert len(users) == 24 and [u.id for u in users] == sorted(u.id for u in users)
    assert all(isinstance(u, UserData) for u in users)
    assert all(1 <= len(u.history) <= 60 and 1 <= len(u.future) <= 20 for u in users)
    assert list(iter_users(FIXTURES / "users.jsonl.gz")) == users
    roles = load_shakespeare(FIXTURES / "shakespeare.jsonl.gz")
    assert len(roles) == 5 and all("." in r.id and r.history and r.future for r in roles)


def test_user_data_is_frozen():
    u = UserData("u0000", ("a",), ("b",))
    with pytest.raises(Exception):
        u.id = "x"  # type: ignore[misc]


def _gz(path: Path, text: str) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(text)
    return path


def test_shakespeare_80_20(tmp_path):
    lines = [f"line {i}" for i in range(10)]
    path = _gz(tmp_path / "s.jsonl.gz", json.dumps({"id": "p/A", "lines": lines}) + "\n")
    (role,) = load_shakespeare(path)
    assert role.history == tuple(lines[:8]) and role.future == tuple(lines[8:])


def test_a_roles_file_is_a_users_file():
    """Every command that takes --users-file takes the Shakespeare roles too (80/20 split per role)."""
    roles = load_shakespeare(FIXTURES / "shakespeare.jsonl.gz")
    assert load_users(FIXTURES / "shakespeare.jsonl.gz") == roles
    assert list(iter_users(FIXTURES / "shakespeare.jsonl.gz")) == roles


@pytest.mark.parametrize("loader", [load_pretrain_lines, load_users, load_shakespeare])
def test_missing_file(loader, tmp_path):
    with pytest.raises(FedkbError, match=r"nope\.gz.*fedkb prepare"):
        loader(tmp_path / "nope.gz")


@pytest.mark.parametrize("loader", [load_pretrain_lines, load_users, load_shakespeare])
def test_not_gzip(loader, tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(b"this is not gzip at all")
    with pytest.raises(FedkbError, match=r"bad\.gz.*corrupt.*fedkb prepare"):
        loader(path)


@pytest.mark.parametrize("loader", [load_pretrain_lines, load_users])
def test_truncated_gzip(loader, tmp_path):
    data = (FIXTURES / "users.jsonl.gz").read_bytes()
    path = tmp_path / "cut.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FedkbError, match=r"cut\.gz.*fedkb prepare"):
        loader(path)


@pytest.mark.parametrize("loader", [load_users, load_shakespeare])
@pytest.mark.parametrize("body", ['{"id": "u0", "history": [', '[1, 2]\n', '{"id": "u0", "history": "x"}\n',
                                  '{"id": "u0", "history": [], "future": [], "lines": []}\n' * 2])  # one id twice
def test_corrupt_json(loader, body, tmp_path):
    path = _gz(tmp_path / "bad.jsonl.gz", body)
    with pytest.raises(FedkbError, match=r"bad\.jsonl\.gz.*fedkb prepare"):
        loader(path)


def test_data_dir_default_and_env(tmp_path):
    code = "from models.datasets import DATA_DIR; print(DATA_DIR)"
    env = {k: v for k, v in os.environ.items() if k != "FEDKB_DATA"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert Path(out) == REPO / "data"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path,
                         env={**env, "PYTHONPATH": str(REPO), "FEDKB_DATA": str(tmp_path)},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert Path(out) == tmp_path


def test_default_paths_follow_data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "DATA_DIR", tmp_path)
    (tmp_path / "pretrain.txt.gz").write_bytes((FIXTURES / "pretrain.txt.gz").read_bytes())
    assert len(load_pretrain_lines()) == 3500
    with pytest.raises(FedkbError, match="users.jsonl.gz"):
        load_users()


@pytest.mark.parametrize("manifest", ['[]', '{"counts": null}', '{"counts": {"pretrain_chitchat_lines": "x"}}',
                                      '{"counts": {"pretrain_chitchat_lines": 1.5}}', '{"counts": {"pretrain_chitchat_lines": -1}}',
                                      '{"counts": {"pretrain_chitchat_lines": 100000}}'])
def test_a_manifest_of_another_shape_is_one_line(tmp_path, manifest):
    """Valid JSON of the wrong shape raised TypeError through `fedkb pretrain` and `start-state`."""
    import shutil

    from keyboard.commands.pretrain import pretraining_lines

    shutil.copy(FIXTURES / "pretrain.txt.gz", tmp_path / "pretrain.txt.gz")
    (tmp_path / "manifest.json").write_text(manifest)
    with pytest.raises(FedkbError, match="manifest.json is missing or corrupt; run `fedkb prepare`"):
        pretraining_lines(0, tmp_path)
    (tmp_path / "manifest.json").write_text('{"counts": {"pretrain_chitchat_lines": 3}}')
    assert len(pretraining_lines(0, tmp_path)) == 3
