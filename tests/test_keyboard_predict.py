"""`fedkb predict`: one process, the 3 suggestions, no Textual or federation imported."""

from __future__ import annotations

import json
import subprocess
import sys

from keyboard.cli import main

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


def test_predict_json_completions(tiny, capsys):
    model, tok = tiny
    assert main(["predict", "and th", "--model", str(model), "--tokenizer", str(tok), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["partial"] == "th" and len(out["suggestions"]) == 3
    assert all(w.lower().startswith("th") for w in out["suggestions"])


def test_predict_plain_next_words_capitalised_at_sentence_start(tiny, capsys):
    model, tok = tiny
    assert main(["predict", "and so. ", "--model", str(model), "--tokenizer", str(tok)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(w[0].isupper() for w in lines)


def test_predict_says_why_when_nothing_completes(tiny, capsys):
    model, tok = tiny
    assert main(["predict", "and zzqxv", "--model", str(model), "--tokenizer", str(tok)]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err == "no suggestions: no word in the vocabulary starts with 'zzqxv'\n"  # silence before


def test_predict_missing_model_is_one_line(tmp_path, tiny, capsys):
    assert main(["predict", "hi", "--model", str(tmp_path), "--tokenizer", str(tiny[1])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedkb predict: error: no model") and "Traceback" not in err


def test_predict_imports_neither_textual_nor_federation(tiny):
    model, tok = tiny
    code = ("import sys; from keyboard.cli import main; main(['predict', 'hello', '--model', sys.argv[1], "
            "'--tokenizer', sys.argv[2]]); print('textual' in sys.modules, 'federation' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(model), str(tok)], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "False False"


def test_eval_names_top_k_by_its_k(tiny, tmp_path, capsys):
    """`fedkb eval -k 5` printed top-5 accuracy as "top3" (and -k 1 top-1 twice)."""
    model, tok = tiny
    path = tmp_path / "text.txt"
    path.write_text("how are you today\nI am fine thanks and you\n")
    got = {}
    for k in (1, 3, 5):
        assert main(["eval", "--text", str(path), "-k", str(k), "--model", str(model), "--tokenizer", str(tok), "--json"]) == 0
        got[k] = json.loads(capsys.readouterr().out)
    assert "top3" not in got[1] and "top3" in got[3] and "top5" in got[5] and "top3" not in got[5]
    assert got[1]["top1"] == got[3]["top1"] == got[5]["top1"] <= got[3]["top3"] <= got[5]["top5"]
    assert main(["eval", "--text", str(path), "-k", "5", "--model", str(model), "--tokenizer", str(tok)]) == 0
    out = capsys.readouterr().out
    assert "top-5 accuracy" in out and "top-3" not in out


def test_predict_after_an_opening_quote_and_a_sentence_end_with_a_symbol(tiny, capsys):
    """A leading "'" was read as part of the word (nothing completes "'th"); "thanks! :) " was not a
    sentence start."""
    model, tok = tiny
    assert main(["predict", "she said 'th", "--model", str(model), "--tokenizer", str(tok), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["partial"] == "th" and out["suggestions"] and all(w.lower().startswith("th") for w in out["suggestions"])
    assert main(["predict", "thanks! :) ", "--model", str(model), "--tokenizer", str(tok)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(w[0].isupper() for w in lines)


def test_a_reader_that_stops_early_ends_predict_silently(tiny):
    """`fedkb predict ... | head -1` printed "fedkb predict: error: Broken pipe" (or Python's "Exception ignored")."""
    model, tok = tiny
    p = subprocess.Popen([sys.executable, "-m", "keyboard.cli", "predict", "how are ", "-k", "500", "--model", str(model),
                          "--tokenizer", str(tok)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the first line
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == ""
