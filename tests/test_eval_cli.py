"""`fedkb eval`: JSON on the tiny model; bad input and broken models are one clear line, exit 2."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from keyboard.cli import main

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
KEYS = {"words", "top1", "top3", "ksr", "oov_rate", "keys_typed", "keys_selected", "keys_without", "messages"}


def _eval(capsys, tiny, *args, model=None, tokenizer=None) -> tuple[int, str, str]:
    model_dir, tok = tiny
    code = main(["eval", *args, "--model", str(model or model_dir), "--tokenizer", str(tokenizer or tok), "--json"])
    out, err = capsys.readouterr()
    return code, out, err


def _text(tmp_path, body: str | bytes) -> str:
    p = tmp_path / "text.txt"
    p.write_bytes(body if isinstance(body, bytes) else body.encode("utf-8"))
    return str(p)


def _check_ranges(r: dict) -> None:
    assert KEYS <= set(r)
    assert r["words"] > 0
    for k in ("top1", "top3", "oov_rate"):
        assert 0.0 <= r[k] <= 100.0
    assert r["top1"] <= r["top3"]
    assert -100.0 < r["ksr"] < 100.0
    assert r["keys_typed"] + r["keys_selected"] <= r["keys_without"] + r["words"]


def test_eval_text_json(capsys, tiny, tmp_path):
    code, out, err = _eval(capsys, tiny, "--text", _text(tmp_path, "How are you today?\n\nI am fine, thanks!\n"))
    assert code == 0 and err == ""
    r = json.loads(out)
    _check_ranges(r)
    assert r["messages"] == 2 and r["words"] == 8 and r["k"] == 3
    assert r["keys_without"] == sum(len(w) + 1 for w in "how are you today i am fine thanks".split())


def test_a_line_is_one_message_whatever_separators_it_holds(capsys, tiny, tmp_path):
    """Lines were split again with str.splitlines, which also breaks at U+2028, form feeds and
    file separators: one line read as three messages, each from the start state."""
    code, out, _ = _eval(capsys, tiny, "--text", _text(tmp_path, "hello there\u2028how are you\x0cdoing today\r\n"))
    assert code == 0 and json.loads(out)["messages"] == 1


def test_eval_users_json(capsys, tiny):
    code, out, _ = _eval(capsys, tiny, "--users", "--users-file", str(FIXTURES / "users.jsonl.gz"), "--limit", "3")
    assert code == 0
    r = json.loads(out)
    _check_ranges(r)
    assert r["users"] == 3 and r["source"] == "users"


def test_eval_table(capsys, tiny, tmp_path):
    model_dir, tok = tiny
    assert main(["eval", "--text", _text(tmp_path, "how are you\n"), "--model", str(model_dir), "--tokenizer", str(tok)]) == 0
    out = capsys.readouterr().out
    assert "top-1 accuracy" in out and "keystroke savings" in out


def test_other_scripts_are_words_outside_the_vocabulary(capsys, tiny, tmp_path):
    code, out, _ = _eval(capsys, tiny, "--text", _text(tmp_path, "Привет как дела\n你好 世界\nγειά σου\n"))
    r = json.loads(out)
    assert code == 0 and r["words"] == 7 and r["oov_rate"] == 100.0 and r["top1"] == 0.0 and r["ksr"] == 0.0


def test_a_1mb_line_is_cut_not_a_crash(capsys, tiny, tmp_path):
    code, out, _ = _eval(capsys, tiny, "--text", _text(tmp_path, ("hello how are you " * 60_000)[:1_000_000] + "\n" + "x" * 1_000_000))
    r = json.loads(out)
    assert code == 0 and r["messages"] == 2 and r["words"] == 201  # 200 words max per message, + one huge OOV "word"


@pytest.mark.parametrize("body", ["", "\n\n  \n", "... !!! ?? ,;:\n", "😀 🎉👍\n❤️\n", b"\xff\xfe\x00bad"])
def test_no_words_or_not_text_is_a_clear_error(capsys, tiny, tmp_path, body):
    code, out, err = _eval(capsys, tiny, "--text", _text(tmp_path, body))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("fedkb eval: error: ") and "Traceback" not in err


def _broken_copy(tiny, tmp_path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(tiny[0], d)
    return d


def _truncate(d: Path) -> None:
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])


def _garbage_json(d: Path) -> None:
    (d / "model.json").write_bytes(b"\x00{not json at all")


def _delete_weights(d: Path) -> None:
    (d / "model.safetensors").unlink()


def _delete_all(d: Path) -> None:
    shutil.rmtree(d)


@pytest.mark.parametrize("breakit, message", [
    (_truncate, "not a valid safetensors file"),
    (_garbage_json, "corrupt"),
    (_delete_weights, "does not exist"),
    (_delete_all, "no model at"),
])
def test_broken_model_is_a_clear_error(capsys, tiny, tmp_path, breakit, message):
    d = _broken_copy(tiny, tmp_path)
    breakit(d)
    code, out, err = _eval(capsys, tiny, "--text", _text(tmp_path, "how are you\n"), model=d)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err


def test_tokenizer_model_mismatch_is_a_clear_error(capsys, tiny, tmp_path):
    code, _, err = _eval(capsys, tiny, "--text", _text(tmp_path, "how are you\n"), tokenizer=REPO / "data" / "tokenizer.model")
    assert code == 2 and "different tokenizer" in err and err.count("\n") == 1


def test_missing_text_file(capsys, tiny, tmp_path):
    code, _, err = _eval(capsys, tiny, "--text", str(tmp_path / "nope.txt"))
    assert code == 2 and "does not exist" in err


def test_whole_process_bad_model_has_no_traceback(tiny, tmp_path):
    d = _broken_copy(tiny, tmp_path)
    _truncate(d)
    p = subprocess.run([sys.executable, "-m", "keyboard.cli", "eval", "--text", _text(tmp_path, "hi there\n"),
                        "--model", str(d), "--tokenizer", str(tiny[1]), "--json"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == "" and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and "safetensors" in p.stderr


def test_more_suggestions_than_words_shows_them_all(capsys, tiny, tmp_path):
    """-k above the vocabulary size was a torch traceback ("selected index k out of range") after the model loaded."""
    code, out, err = _eval(capsys, tiny, "--text", _text(tmp_path, "how are you today zzqxv\n"), "-k", "20000")
    r = json.loads(out)
    assert code == 0 and err == "" and r["k"] == 20000
    assert r["top20000"] == pytest.approx(100 - r["oov_rate"], abs=0.002)  # every known word is among them


def test_the_table_shows_the_path_as_it_is_and_the_keys(capsys, tiny, tmp_path, monkeypatch):
    """The --text path was read as Rich markup: "[red]x.txt" showed as "x.txt" in red, "[/]" was a MarkupError."""
    monkeypatch.chdir(tmp_path)  # a short title, on one line
    (tmp_path / "we[").mkdir()
    model_dir, tok = tiny
    for name in ("[red]x.txt", "we[/]ird.txt"):
        Path(name).write_text("how are you\n")
        assert main(["eval", "--text", name, "--model", str(model_dir), "--tokenizer", str(tok)]) == 0
        out = capsys.readouterr().out
        assert f"({name})" in out
    for row in ("keys typed", "keys to select", "keys without prediction"):  # the README's keys_*
        assert row in out
    assert "12" in out.split("keys without prediction")[1].split("\n")[0]  # 3 + 1, 3 + 1, 3 + 1


@contextlib.contextmanager
def _memory_cap(extra: int = 1 << 30):
    """At most `extra` more bytes of address space: a regression fails with a MemoryError, not by
    taking all the machine's memory."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    used = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    cap = used + extra if hard == resource.RLIM_INFINITY else min(used + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_a_device_or_a_line_too_long_is_refused(capsys, tiny, tmp_path):
    """--text /dev/zero was read until memory ran out (a MemoryError, or the OOM killer)."""
    with _memory_cap():
        code, out, err = _eval(capsys, tiny, "--text", "/dev/zero")
    assert code == 2 and out == "" and err == "fedkb eval: error: /dev/zero is not a regular file (a device or a pipe); " \
                                              "save the text to a file first\n"
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:
        f.write(b"hello there\n")
        f.truncate(17 << 20)  # one line of 17 MiB (zeros; sparse on disk)
    code, out, err = _eval(capsys, tiny, "--text", str(huge))
    assert code == 2 and out == "" and err == f"fedkb eval: error: {huge}: line 2 is longer than 16 MiB; one message a line\n"


def test_a_bad_byte_is_named_where_it_is(capsys, tiny, tmp_path):
    code, _, err = _eval(capsys, tiny, "--text", _text(tmp_path, b"hello there\n\r\nhow \xffare\n"))
    assert code == 2 and err.endswith("is not UTF-8 text (byte 18)\n")


def test_a_reader_that_stops_early_ends_eval_silently(tiny, tmp_path):
    """`fedkb eval ... | head -1` printed "fedkb eval: error: Broken pipe" (or Python's "Exception ignored")."""
    p = subprocess.Popen([sys.executable, "-m", "keyboard.cli", "eval", "--text", _text(tmp_path, "how are you\n"),
                          "--model", str(tiny[0]), "--tokenizer", str(tiny[1]), "--json"],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == ""
