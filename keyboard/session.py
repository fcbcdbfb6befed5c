"""The keyboard's state outside the UI: which device (profile), which model, the personal delta.

A profile is a device folder (federation/device.py): "me" (the person at the
terminal) or one simulated user of the federated population, whose folder is
laid out from its UserData (history + held-out future) the first time it is
opened.  The model in use is the global checkpoint (base, or global round N)
plus, if the device has one, its personal delta:

    params = global + delta          (delta = local - global, models/params.py)

stored on the device as `personal/delta.safetensors` + `personal/delta.json`
(never leaves it).  Personalisation by fine-tuning the global model on the
device's own history follows Wang et al. 2019, "Federated Evaluation of
On-device Personalization".  Like the typing logic, this module never imports
Textual: the app runs `learn` in a process of its own (keyboard/learner.py, which
opens the same profile from its files), then makes the new personal model ready
in a worker thread (`ready`: the delta read, the word table composed) and swaps it
in on the UI thread (`install`), as it does with each new global model of the live
rounds; the live predictor is only touched from the UI thread.

Typing runs on NumPy: the weights are read without torch (models/modelfile.py)
and suggestions come from models/numpy_predictor.py, as a phone's keyboard runs
an inference runtime and loads the training framework only to learn.  Measuring
(`evaluate`, `evaluate_user`: simulated typing of held-out text) runs on the same
NumPy predictor; only `learn` imports torch, in the learner's process, so the keyboard
opens in well under a second instead of after `import torch`'s ~1.5-2 s, and its
process never holds torch.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import safetensors.numpy

from federation.config import ClientConfig, personalization_config
from federation.device import Device
from models import atomic, tensorfile
from models.datasets import UserData, load_users
from models.errors import FedkbError
from models.jsonvalues import is_number
from models.modelfile import Arrays, ModelFile, default_paths, read_arrays, read_model, shapes
from models.numpy_predictor import NumpyPredictor, Tables
from models.text import is_word
from models.tokenizer import Tokenizer
from models.vocab import Vocabulary

ME = "me"
DELTA_FILE = "delta.safetensors"
DELTA_META = "delta.json"
EVAL_ON = ("held-out future text", "typed history")  # what a learning measures on (delta.json's eval_on)


def _stamp(device: Device) -> tuple | None:
    """The device's delta file as it is now (None: it has none), so that a model made ready with one
    delta is never installed after another replaced it (atomic writes give the file a new inode)."""
    try:
        st = (device.delta_dir / DELTA_FILE).stat()
    except OSError:  # none, or no folder where it goes
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _unusable(e: FedkbError) -> str:
    return f"personal model not used ({e}); typing with the global model; Learn now makes a new one"


@dataclass(frozen=True, eq=False)
class ReadyModel:
    """What a device types with, made ready off the UI thread (`KeyboardSession.ready`)."""

    model_dir: Path | None  # a new global model's folder; None: the global model in use
    file: ModelFile | None  # that model, as read
    global_weights: Arrays  # the global weights it was made with
    user_id: str
    stamp: tuple | None  # the device's delta file as it was read
    personal: Arrays | None  # global + that delta; None: the global model is typed with
    delta_error: str | None  # why the delta could not be used
    personal_words: list[str]  # the device's, as read
    base_vocab: Vocabulary  # the global model's vocabulary
    vocab: Vocabulary  # base_vocab with the personal words
    tables: Tables  # the predictor's, for these weights and that vocabulary


class _Profile(NamedTuple):
    """A profile as `KeyboardSession._load` read it, for `_commit` to make it the session's."""

    user: UserData | None  # a simulated user's data; None: "me", or a device whose user is not in the users file
    device: Device
    blocked: list[str]  # its words file's forgotten words
    vocab: Vocabulary  # the global vocabulary with its personal words
    personal: Arrays | None  # global + its delta; None: the global model is typed with
    delta_error: str | None  # why its delta could not be used


def default_devices_root() -> Path:
    """$FEDKB_HOME/devices if FEDKB_HOME is set, else ~/.local/share/fedkb/devices."""
    home = os.environ.get("FEDKB_HOME")
    if home:
        return Path(home).expanduser() / "devices"
    return Path.home() / ".local" / "share" / "fedkb" / "devices"


@dataclass(frozen=True)
class LearnConfig:
    """On-device fine-tuning of the personal delta ("Learn now")."""

    client: ClientConfig = field(default_factory=personalization_config)  # a federated client's step, lr 0.1 x 3 epochs
    max_messages: int = 2000  # most recent messages trained on
    eval_messages: int = 200  # messages of held-out text for before/after accuracy
    seed: int = 0  # of the fine-tuning generator (dropout, ...)


@dataclass(frozen=True)
class LearnResult:
    before: dict  # simulate_typing summary with the model in use before learning
    after: dict  # ... with the new personal model
    eval_on: str  # "held-out future text" or "typed history"
    messages: int  # messages trained on
    seconds: float


def model_label(meta: dict) -> str:
    """"base" or "global round N" from a checkpoint's meta."""
    kind = meta.get("kind", "base")
    if kind == "base":
        return "base"
    rnd = meta.get("round")
    return f"{kind} round {rnd}" if rnd is not None else str(kind)


class KeyboardSession:
    """One open profile: device folder + global model + personal delta + predictor."""

    def __init__(
        self,
        model_dir: Path | None = None,
        tokenizer_path: Path | None = None,
        devices_root: Path | None = None,
        user_id: str = ME,
        incognito: bool = False,
        users_file: Path | None = None,
        learn_cfg: LearnConfig = LearnConfig(),
    ):
        base = tok = None
        if model_dir is None or tokenizer_path is None:  # an installed fedkb without data/ has none
            base, tok = default_paths()
        self.tokenizer = Tokenizer(tokenizer_path or tok)
        f = read_model(model_dir or base, self.tokenizer)
        self.model_dir = model_dir
        self.meta, self.vocab, self.config = f.meta, f.vocab, f.config  # config: model.json's, for torch's WordLM
        self.global_weights = f.weights  # the global model's arrays; never changed in place
        self.weights = f.weights  # the model in use: global, or global + the device's delta
        self.devices_root = Path(devices_root) if devices_root else default_devices_root()
        self.users_file = users_file
        self.learn_cfg = learn_cfg
        self.incognito = incognito
        self._users: dict[str, UserData] | None = None
        self.has_delta = False
        self.delta_error: str | None = None  # why the device's personal delta could not be used, if it could not
        # user id -> the words forgotten in this session, kept for it where the words file lacks them
        # (incognito, a write that failed) so that no new model brings them back
        self._forgotten: dict[str, set[str]] = {}
        self.predictor = NumpyPredictor(self.global_weights, self.vocab, self.tokenizer)
        self.open(user_id)

    # -- profiles ----------------------------------------------------------------------
    def users(self) -> dict[str, UserData]:
        """The simulated population (loaded once)."""
        if self._users is None:
            self._users = {u.id: u for u in load_users(self.users_file)}
        return self._users

    def profile_ids(self) -> list[str]:
        return [ME, *self.users()]

    def open(self, user_id: str) -> None:
        """Switch to profile `user_id` ("me" or a simulated user); lays out a simulated device if absent.
        All or nothing: everything is read first, so that where anything fails (FedkbError: an unknown
        user, a damaged words file, a history that cannot be read; OSError: a folder that cannot be laid
        out) the session stays on the profile it was on."""
        profile = self._load(user_id, self.global_weights, self.vocab)
        profile.device.history()  # a history that cannot be read is refused here, as a damaged words file is
        self._commit(profile)

    def _load(self, user_id: str, global_weights: Arrays, vocab: Vocabulary) -> _Profile:
        """Profile `user_id` read (laid out first if it is a simulated user's), with the global model
        `global_weights`/`vocab`, into values that `_commit` makes the session's; changes no live state."""
        device = Device(self.devices_root, user_id)
        user: UserData | None = None
        if user_id != ME:
            try:
                user = self.users().get(user_id)
            except FedkbError:
                user = None
            if user is None and not device.exists():
                raise FedkbError(f"unknown user {user_id!r}: use 'me' or a simulated user id such as "
                                 f"{', '.join(list(self.users())[:3]) or '(none found)'}")
            if user is not None and not device.history_file.exists():
                device.write_simulated(user.history, user.future)
        words, blocked = self._read_words(device)
        personal, error = self._load_delta(device, global_weights)
        return _Profile(user, device, blocked, vocab.add(words), personal, error)

    def _commit(self, profile: _Profile) -> None:
        """Type as `profile` (what `_load` read); nothing here fails."""
        self.user, self.device, self.user_id = profile.user, profile.device, profile.device.user_id
        self.predictor.blocked = self._blocked(profile.blocked)
        self.predictor.vocab, self.predictor.base_vocab = profile.vocab, self.vocab
        self.delta_error = profile.delta_error
        self.apply_params(profile.personal)

    def _read_words(self, device: Device | None = None) -> tuple[list[str], list[str]]:
        """A device's (default: this one's) (personal, blocked) words, from one read of its words file;
        FedkbError if damaged."""
        state = (device or self.device).word_state()
        return list(state["personal"]), list(state["blocked"])

    def _blocked(self, blocked: Sequence[str]) -> set[str]:
        """This device's forgotten words: those of its words file and those forgotten in this session only."""
        return set(blocked) | self._forgotten.get(self.user_id, set())

    def _device_words(self, ready: ReadyModel, read: tuple[list[str], list[str]]) -> None:
        """The device's blocked and personal words (`read`: as `_read_words` just read them) on the
        predictor (its caches are rebuilt by the `apply_params` that follows); the vocabulary `ready`
        made where its personal words are still the device's."""
        words, blocked = read
        self.predictor.blocked = self._blocked(blocked)
        same = ready.base_vocab is self.vocab and ready.personal_words == words
        self.predictor.vocab = ready.vocab if same else self.vocab.add(words)
        self.predictor.base_vocab = self.vocab

    def read_global(self, model_dir: Path) -> ModelFile:
        """Another global model's files, read and checked (safe in a worker: touches no live state)."""
        f = read_model(Path(model_dir), self.tokenizer)
        if shapes(f.config) != shapes(self.config):
            raise FedkbError(f"{model_dir} has another architecture than the model in use")
        return f

    # -- a new model, made ready off the UI thread ---------------------------------------
    def ready(self, model_dir: Path | None = None) -> ReadyModel:
        """What this device will type with, made ready in a worker thread (touches no live state):
        the global model in `model_dir` (None: the one in use), the device's delta as it is on disk
        now (a learning just wrote it) on top of it, and the predictor's word table for them.
        FedkbError if the global model cannot be used; a delta that cannot be is said in
        `delta_error`, and the global model is typed with.  `install` swaps it in."""
        f = self.read_global(model_dir) if model_dir is not None else None
        global_weights, vocab = (f.weights, f.vocab) if f is not None else (self.global_weights, self.vocab)
        device = self.device
        stamp = _stamp(device)  # before reading: a delta replaced meanwhile makes the stamp stale, never wrong
        personal, error = None, None
        if stamp is not None:
            try:
                personal = self._personal(self.read_delta(device.user_id), global_weights)
            except FedkbError as e:
                error = _unusable(e)
        words = device.personal_words()
        with_words = vocab.add(words)
        tables = self.predictor.tables(personal if personal is not None else global_weights, with_words)
        return ReadyModel(Path(model_dir) if model_dir is not None else None, f, global_weights, device.user_id,
                          stamp, personal, error, words, vocab, with_words, tables)

    def install(self, ready: ReadyModel) -> None:
        """Type with a model `ready` made ready; call from the UI thread.  Where the device changed since
        (another profile, a new delta, a cleared device, another global model), what is now on disk is
        read again here instead, so a stale personal model is never typed with.  FedkbError where the
        device's words file is damaged, OSError where a simulated user's folder cannot be laid out
        again (a full disk): then nothing has changed."""
        read = self._read_words()  # first: a damaged words file raises before anything changes
        f = ready.file
        global_weights, vocab = (f.weights, f.vocab) if f is not None else (self.global_weights, self.vocab)
        profile = None
        if ready.user_id != self.user_id or ready.global_weights is not global_weights \
                or ready.stamp != _stamp(self.device):
            profile = self._load(self.user_id, global_weights, vocab)  # raises before anything changes too
        if f is not None:
            self.model_dir, self.meta, self.vocab, self.config = ready.model_dir, f.meta, f.vocab, f.config
            self.global_weights = f.weights
        if profile is not None:
            self._commit(profile)
            return
        self._device_words(ready, read)
        self.delta_error = ready.delta_error
        self.apply_params(ready.personal, ready.tables)

    def use_global(self, model_dir: Path) -> None:
        """Switch to another global model (e.g. a new federated round), all on this thread (the app
        runs `ready` in a worker and `install` on its UI thread).  The device's personal delta, if
        any, is applied on top of the new global model (personal = global + delta, as on a phone
        whose base model was updated)."""
        self.install(self.ready(model_dir))

    @property
    def simulated(self) -> bool:
        return self.user_id != ME

    @property
    def label(self) -> str:
        """The model in use, as the stats bar shows it."""
        return model_label(self.meta) + (" + personal delta" if self.has_delta else "")

    # -- the personal delta ------------------------------------------------------------
    def _load_delta(self, device: Device, global_weights: Arrays) -> tuple[Arrays | None, str | None]:
        """(`global_weights` + `device`'s delta, None), or (None, None) where it has none, or (None, why)
        where it has one that cannot be used."""
        if _stamp(device) is None:
            return None, None
        try:
            return self._personal(self.read_delta(device.user_id), global_weights), None
        except FedkbError as e:  # a delta for another model shape, or a damaged file: run on the global model, say so
            return None, _unusable(e)

    def read_delta(self, user_id: str) -> Arrays:
        """A device's personal delta, read and checked against the model's shapes (safe in a worker);
        FedkbError if it is damaged or another model's."""
        return read_arrays(Device(self.devices_root, user_id).delta_dir / DELTA_FILE, reference=shapes(self.config))

    def _personal(self, delta: Arrays, global_weights: Arrays | None = None) -> Arrays:
        """The global weights (default: those in use) + a delta (models/params.py's add, on arrays)."""
        return {k: g + delta[k] for k, g in (global_weights or self.global_weights).items()}

    def delta_info(self) -> dict:
        """The last learning's record (delta.json), {} if there is none or it is unreadable; its
        before/after scores are kept only where they are whole, and what they were measured on only
        where it is one of EVAL_ON (a record the app can show)."""
        try:
            info = json.loads((self.device.delta_dir / DELTA_META).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(info, dict):
            return {}
        whole = lambda d: isinstance(d, dict) and all(is_number(d.get(k)) for k in ("top1", "top3", "ksr"))
        if not (whole(info.get("before")) and whole(info.get("after"))):
            info = {k: v for k, v in info.items() if k not in ("before", "after")}
        if info.get("eval_on") not in EVAL_ON:
            info.pop("eval_on", None)
        return info

    def apply_params(self, personal: Arrays | None, tables: Tables | None = None) -> None:
        """Type with the global model (None) or personal weights (global + a delta); call from the UI
        thread (with `tables`, the predictor's for these weights, only swapped in)."""
        self.weights = personal if personal is not None else self.global_weights
        self.has_delta = personal is not None
        self.predictor.set_weights(tables if tables is not None else self.weights)

    def _save_delta(self, personal: Arrays, info: dict) -> None:
        """The delta and its record (`info`), replaced together: where either cannot be written (a full
        disk) neither is, so a learning that failed is never typed with beside an older record."""
        d = self.device.delta_dir
        self.device.make_folder()  # private, as the device's other files
        d.mkdir(mode=0o700, exist_ok=True)
        delta = {k: personal[k] - g for k, g in self.global_weights.items()}  # params.delta, on arrays
        # what models.checkpoint.save_tensors writes: safetensors with its checksum (models/tensorfile.py)
        blob = tensorfile.with_checksum(safetensors.numpy.save(delta, metadata={"global": model_label(self.meta)}))
        atomic.write_files({d / DELTA_FILE: blob, d / DELTA_META: atomic.json_bytes(info)}, atomic.PRIVATE)

    # -- typing side effects -----------------------------------------------------------
    def finish_message(self, text: str) -> bool:
        """Store a finished message in the device history (not in incognito). True if stored."""
        if self.incognito or not text.strip():
            return False
        self.device.append_message(text, vocab=self.vocab)
        return True

    def add_personal_words(self, words: Sequence[str]) -> list[str]:
        """Words the vocabulary lacks become personal words of this device (not in incognito)."""
        if self.incognito:
            return []
        fresh = [w for w in words if is_word(w) and w not in self.vocab and w not in self.predictor.blocked]
        if not fresh:
            return []
        added = self.device.add_personal_words(fresh)
        if added:
            self.predictor.add_personal_words(added)
        return added

    def take_back_personal_words(self, words: Sequence[str]) -> None:
        """Personal words added by a message that then became private (incognito came on while it
        was typed): off this device and out of the suggestions.  OSError or FedkbError where the
        words file cannot be read or written."""
        keep = self.device.remove_personal_words(words)
        self.predictor.vocab = self.vocab.add(keep)
        self.apply_params(self.weights if self.has_delta else None)  # the word table composed again without them

    def forget(self, word: str) -> bool:
        """Never suggest `word` again on this device: True where that is stored on it, False in
        incognito, where it holds for this session only (as it does where the write fails: the
        OSError or FedkbError is raised), whatever model is swapped in meanwhile."""
        word = word.lower()
        self.predictor.block(word)
        self._forgotten.setdefault(self.user_id, set()).add(word)
        if self.incognito:
            return False
        self.device.block_word(word)
        return True

    def clear(self) -> None:
        """Delete everything typed and learned on this device; back to the global model.  Where that
        fails part-way (OSError: a folder that cannot be removed or written), the session types with
        what is left on the device, and the error is raised."""
        try:
            self.device.clear()
            if self.user is not None:  # a simulated user keeps its (public, simulated) data
                self.device.write_simulated(self.user.history, self.user.future)
        except (OSError, FedkbError):
            try:
                self.open(self.user_id)  # what is left of it, read again (a simulated user's data laid out again)
            except (OSError, FedkbError):  # that fails too: at least never a personal model no longer there
                personal, self.delta_error = self._load_delta(self.device, self.global_weights)
                self.apply_params(personal)
            raise
        self._forgotten.pop(self.user_id, None)
        self._commit(_Profile(self.user, self.device, [], self.vocab, None, None))  # no words, no delta

    # -- evaluation and learning -------------------------------------------------------
    def eval_texts(self) -> tuple[list[str], str]:
        """Text to measure the model on: a simulated user's held-out future, else 'me''s own history."""
        n = self.learn_cfg.eval_messages
        if self.simulated:
            fut = self.device.future()
            if fut:
                return fut[:n], EVAL_ON[0]
        return self.device.history()[-n:], EVAL_ON[1]

    def evaluate(self, weights: Arrays | None = None) -> dict:
        """simulate_typing on eval_texts() with `weights` (default: the model in use); safe in a worker."""
        from models.evaluate import simulate_typing

        texts, _ = self.eval_texts()
        pred = NumpyPredictor(weights if weights is not None else self.weights, self.vocab, self.tokenizer,
                              self.device.personal_words(), self.device.blocked_words())
        return simulate_typing(pred, texts)

    def evaluate_user(self, user_id: str) -> dict:
        """How the models do on a simulated user's held-out future text (worker-safe; touches no live state).

        {"user", "messages", "global": summary, "personal": summary or None (if that device has a delta)}.
        """
        from models.evaluate import simulate_typing

        user = self.users().get(user_id)
        if user is None:
            raise FedkbError(f"unknown user {user_id!r}")
        device = Device(self.devices_root, user_id)
        texts = list(user.future[: self.learn_cfg.eval_messages])
        words = device.personal_words() if device.exists() else []
        blocked = device.blocked_words() if device.exists() else set()

        pred = NumpyPredictor(self.global_weights, self.vocab, self.tokenizer, words, blocked)
        out = {"user": user_id, "messages": len(texts), "history": len(user.history),
               "global": simulate_typing(pred, texts), "personal": None}
        f = device.delta_dir / DELTA_FILE
        if f.exists():
            try:
                personal = self._personal(self.read_delta(user_id))
            except FedkbError:
                pass
            else:
                pred.set_weights(personal)  # the same predictor: its vocabulary's pieces and order are kept
                out["personal"] = simulate_typing(pred, texts)
        return out

    def learn(self, on_step: Callable[[int, int, float], None] | None = None) -> LearnResult:
        """Fine-tune a personal model on the device history and save its delta on the device
        (keyboard/learner.py's process runs this; the app then types with it through `ready` and `install`)."""
        if self.incognito:
            raise FedkbError("incognito: nothing is learned")
        texts = self.device.history()[-self.learn_cfg.max_messages:]
        if not texts:
            raise FedkbError("nothing to learn from yet: type and send (Enter) a few messages first")
        t0 = time.perf_counter()
        before = self.evaluate(self.weights)
        personal = finetune(self.config, self.global_weights, self.vocab, self.tokenizer, texts, self.learn_cfg, on_step)
        weights = {k: v.numpy() for k, v in personal.items()}
        after = self.evaluate(weights)
        _, eval_on = self.eval_texts()
        result = LearnResult(before, after, eval_on, len(texts), time.perf_counter() - t0)
        self._save_delta(weights, {"global": model_label(self.meta), "messages": len(texts),
                                    "config": asdict(self.learn_cfg), "before": before, "after": after,
                                    "eval_on": eval_on})
        return result


def _tensors(weights: Arrays) -> dict:
    """Arrays as torch tensors (copies: the arrays stay the typing side's); imports torch."""
    import torch

    return {k: torch.tensor(v) for k, v in weights.items()}


def finetune(config: dict, global_weights: Arrays, vocab, tokenizer, texts: list[str], learn: LearnConfig,
             on_step: Callable[[int, int, float], None] | None = None) -> dict:
    """New personal params (tensors): the global model fine-tuned on `texts` (federation.client.local_finetune)."""
    import torch

    from federation.client import local_finetune
    from models.lm import LMConfig, WordLM

    model = WordLM(LMConfig.from_json(config))
    model.load_state_dict(_tensors(global_weights))
    gen = torch.Generator().manual_seed(learn.seed)
    return local_finetune(model, vocab, tokenizer, texts, learn.client, gen, on_step=on_step)
