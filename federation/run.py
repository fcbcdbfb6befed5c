"""A simulation run folder: resumable, append-only, free of user text.

    RUN/config.json                     the SimulationConfig + model / tokenizer / users paths, and
                                        fingerprints (SHA-256) of the model, the tokenizer and the users
    RUN/metrics.jsonl                   one JSON line per round, appended (then fsynced)
    RUN/checkpoints/round-NNNN/         model.safetensors + model.json (save_checkpoint: records the
                                        vocabulary and its version), server.safetensors (server
                                        optimizer state), rng.safetensors (the server generator)
    RUN/latest.json                     {"round": N}: written last, atomically: the commit point
    RUN/.lock                           held (flock) by the one process running the folder's rounds

A round is committed by: checkpoint files (each atomic) -> metrics line -> latest.json.
`resume` reloads the latest committed round, drops metrics lines past it, and continues;
because every random draw comes from the saved generator, a killed and resumed run ends
with exactly the parameters of an uninterrupted one (with the parallel engine, when the sum is
securely aggregated, the default: an integer sum; a plain float64 sum follows the order the
workers finish in, README "Engines"), except with `privacy.secret_noise`, whose DP noise comes
from OS entropy and is saved nowhere (config.json records the setting, which --resume keeps).
Any whole checkpoint is a state to continue from, so a damaged one (its files carry
checksums, models/tensorfile.py) or an unreadable latest.json costs rounds, never the run:
resume takes the newest checkpoint that loads, says what it skipped (`Simulation.notes`), and
redoes the rounds after it, to the same result.  Device folders (users' text) live
OUTSIDE the run folder (default RUN-devices/), so nothing server-side holds user text: a run
folder never lies inside, holds, or is another run's folder or device folders (`refuse_mixing`).
The device folders record the users they were made from (sampling.py's `claim_devices`), so a run
never trains on another users file's text left in them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Collection
from dataclasses import replace
from pathlib import Path

import torch

from federation import vocab_history
from federation.config import SimulationConfig
from federation.discovery import DiscoveryConfig, DiscoveryStep, make_discovery_step
from federation.engine_parallel import make_engine
from federation.rounds import Discover, Evaluator, run_round
from federation.runfolder import CONFIG, DISCOVERY_KEY, LATEST, METRICS, checkpoint_dir, latest_round, read_metrics
from federation.sampling import Population, build_population, devices_to_select, eval_users
from federation.server import ServerState, init_state
from models import atomic
from models.checkpoint import load_checkpoint, load_tensors, save_checkpoint, save_tensors
from models.datasets import UserData, load_users
from models.errors import FedkbError
from models.jsonvalues import is_int
from models.lm import WordLM
from models.modelfile import read_meta
from models.tokenizer import Tokenizer



def read_config(run_dir: Path) -> tuple[dict, SimulationConfig]:
    """A run's config.json and the SimulationConfig in it; FedkbError if it is missing or damaged."""
    path = Path(run_dir) / CONFIG
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise FedkbError(f"{run_dir} is a file, not a simulation run folder")
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(stored, dict):
            raise TypeError("not a JSON object")
        sim = SimulationConfig.from_json(stored["simulation"])
        for key in ("model", "tokenizer", "devices"):
            if not isinstance(stored[key], str):
                raise TypeError(f"{key} is not a path")
        if not isinstance(stored.get("users_file"), str | None):
            raise TypeError("users_file is not a path")
        if not isinstance(stored.get("eval_users", []), list) or not all(isinstance(u, str) for u in stored.get("eval_users", [])):
            raise TypeError("eval_users is not a list of user ids")
        for key in FINGERPRINTS.values():  # absent in runs from before they were recorded
            if not isinstance(stored.get(key, ""), str):
                raise TypeError(f"{key} is not a SHA-256")
        theta = stored.get(DISCOVERY_KEY)
        if theta is not None and not (is_int(theta) and theta >= 1):
            raise TypeError(f"{DISCOVERY_KEY} is not a threshold (a whole number >= 1) or null")
    except FileNotFoundError:
        raise FedkbError(f"{run_dir} is not a simulation run folder ({CONFIG} missing)") from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        why = f"no {e}" if isinstance(e, KeyError) else str(e)
        raise FedkbError(f"{path} is damaged ({why})") from None
    return stored, sim


def lock_run(run_dir: Path) -> tuple[int | None, str | None]:
    """Lock the run folder for this process (models/atomic.py's `lock_folder`): (descriptor, None),
    or (None, why) where the system cannot lock files (the run then goes on unlocked).  Two
    processes running rounds in one folder would interleave checkpoints and metrics lines; the
    second now stops at once."""
    return atomic.lock_folder(Path(run_dir), busy=f"{run_dir} is in use: another fedkb process is running its rounds",
                              unlocked="nothing stops a second process from running this folder")


def refuse_a_file(path: Path, what: str, flag: str) -> None:
    """FedkbError where a file stands at `path` or above it, so no folder can be made there."""
    f = next(p for p in (path, *path.parents) if p.exists())
    if not f.is_dir():
        why = f"{f} is a file, not {what}" if f == path else f"{path} cannot be {what} ({f} is a file)"
        raise FedkbError(f"{why}: choose another {flag}")


def _is_run(folder: Path) -> bool:
    """Whether `folder` is a run folder: a committed round, or the config.json and metrics.jsonl a
    new run writes first."""
    return holds_run(folder) or ((folder / CONFIG).is_file() and (folder / METRICS).is_file())


def _is_device(folder: Path) -> bool:
    """Whether `folder` is a device folder (federation/device.py): it holds a user's text."""
    return (folder / "history.jsonl").is_file() or (folder / "future.jsonl").is_file()


def _children(folder: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)]
    except OSError:  # missing, or not readable: nothing found there
        return []


def _below(folder: Path, depth: int = 3):
    """The folders at most `depth` levels below `folder` (links not followed)."""
    level = [folder]
    for _ in range(depth):
        level = [c for d in level for c in _children(d)]
        yield from level


def refuse_mixing(run_dir: Path, devices_root: Path, resume: bool) -> None:
    """FedkbError where the run folder would be, hold or lie inside another run's folder or device
    folders, or the device folders would lie inside a run folder: a run folder then holds users'
    text (the paths resolved; the run's own device folders are checked apart)."""
    how = "move one of them away to resume the run" if resume else "choose another --out"
    for p in run_dir.parents:
        if _is_run(p):
            raise FedkbError(f"{run_dir} lies inside the run folder {p}: {how}")
        if _is_device(p) or any(_is_device(c) for c in _children(p)):
            raise FedkbError(f"{run_dir} lies inside device folders ({p}, users' text): {how}")
    for d in _below(run_dir):
        if _is_device(d):
            raise FedkbError(f"{run_dir} holds device folders ({d}, users' text): {how}")
        if _is_run(d):
            raise FedkbError(f"{run_dir} holds the run folder {d}: {how}")
    for p in devices_root.parents:
        if _is_run(p):
            which = "the run's device folders" if resume else "the device folders"
            raise FedkbError(f"{which} {devices_root} lie inside the run folder {p}: "
                             f"{'move one of them away to resume the run' if resume else 'choose another --devices'}")


# config.json's fingerprints of what a run started from (absent in runs from before they were recorded)
FINGERPRINTS = {"model": "model_sha256", "tokenizer": "tokenizer_sha256", "users_file": "users_sha256"}


def model_sha256(params: dict[str, torch.Tensor], vocab) -> str:
    """A fingerprint of a model: its weights and its vocabulary (the file's bytes may differ for the same model)."""
    h = hashlib.sha256()
    for k in sorted(params):
        h.update(k.encode())
        h.update(params[k].detach().to(torch.float32).contiguous().numpy().tobytes())
    h.update(json.dumps(vocab.to_json(), sort_keys=True).encode())
    return h.hexdigest()


def users_sha256(users: list[UserData]) -> str:
    """A fingerprint of a population: each user's id, history and future text, in order."""
    h = hashlib.sha256()
    for u in users:
        h.update(json.dumps([u.id, list(u.history), list(u.future)], ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


def _round0_fingerprint(run_dir: Path, what: str, tokenizer: Tokenizer) -> str | None:
    """The fingerprint of the model (`what` "model") or tokenizer ("tokenizer": the SHA-256 its
    model.json names) the run's round-0 checkpoint was saved with; None if it cannot be read."""
    try:
        if what == "tokenizer":
            return read_meta(checkpoint_dir(run_dir, 0)).get("tokenizer_sha256")
        r0 = load_checkpoint(checkpoint_dir(run_dir, 0), tokenizer)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, FedkbError):
        return None
    return model_sha256(r0.model.state_dict(), r0.vocab)


def _rounds_text(rounds: list[int]) -> str:
    """[1, 2, 3, 7] -> "1-3, 7"."""
    spans: list[list[int]] = []
    for r in rounds:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def remove_temporaries(run_dir: Path) -> None:
    """Remove the temporary files of writes a killed process left (models/atomic.py names them
    `.NAME.RANDOM.tmp` beside NAME; only a kill -9 or a power cut leaves one): called under the
    run's lock, so no other process is writing them."""
    for folder in (run_dir, *(run_dir / "checkpoints").glob("round-*")):
        for f in folder.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                f.unlink()


def holds_run(run_dir: Path) -> bool:
    """Whether a round was ever committed here: a latest.json (readable or not) or a checkpoint."""
    return (Path(run_dir) / LATEST).exists() or bool(checkpoint_rounds(run_dir))


def raise_held(run_dir: Path) -> None:
    """FedkbError for a new run in a folder that holds one: resume it, or (its config.json lost, so
    nothing can resume it) say so."""
    if not (Path(run_dir) / CONFIG).exists():
        raise FedkbError(f"{run_dir} already holds a run whose {CONFIG} is missing, so it cannot be resumed: "
                         f"choose another --out")
    raise FedkbError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out")


def checkpoint_rounds(run_dir: Path) -> list[int]:
    """The rounds that have a checkpoint folder (whole or not), newest first."""
    rounds = []
    for d in (Path(run_dir) / "checkpoints").glob("round-*"):
        if d.is_dir() and d.name[6:].isdigit():
            rounds.append(int(d.name[6:]))
    return sorted(rounds, reverse=True)


def split_users(users: list[UserData], sim: SimulationConfig) -> tuple[list[UserData], list[UserData]]:
    """(training population, held-out evaluation users): a fixed seeded subset is held out."""
    if len(users) < 2:
        raise FedkbError("need at least 2 users")
    n_eval = min(sim.eval_users, len(users) // 2)
    probe = Population(Path("."), tuple(u.id for u in users), len(users))
    held = set(eval_users(probe, n_eval, sim.seed))
    return [u for i, u in enumerate(users) if i not in held], [u for i, u in enumerate(users) if i in held]


def _flat(obj: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in obj.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _ignored_on_resume(asked: SimulationConfig, stored: SimulationConfig, given: Collection[str] | None = None) -> list[str]:
    """A resumed run keeps its stored settings but the round count: the settings given that differ from
    the stored ones, in words.  `given`: the settings (flattened: "privacy.noise_multiplier") whose
    flags were given, a flag typed with its default value included; None: those of `asked` that are
    not at their defaults."""
    a, s, d = (_flat(c.to_json()) for c in (asked, stored, SimulationConfig()))
    named = (lambda k: k in given) if given is not None else (lambda k: a[k] != d[k])
    return [f"{k} {a[k]!r} (the run has {s[k]!r})" for k in a if k != "rounds" and a[k] != s[k] and named(k)]


def _stored_discovery(stored: dict, discover: Discover | None, run_dir: Path) -> tuple[Discover | None, list[str]]:
    """On resume, word discovery as the run's config.json recorded it (a run continues with the
    settings it started with, whatever a kill left in vocab.jsonl), and what was asked and not
    taken.  Runs from before the setting was recorded keep the step they were given."""
    if not (discover is None or isinstance(discover, DiscoveryStep)):
        return discover, []
    if DISCOVERY_KEY not in stored:  # a run from before: the threshold its history names, if any
        theta = vocab_history.recorded_theta(run_dir) if discover is not None else None
        if theta is not None:
            discover.cfg = replace(discover.cfg, theta=theta)
        return discover, []
    theta = stored[DISCOVERY_KEY]
    # what was given: the step says whether --discover and which --theta (None: none typed)
    asked = discover.asked_theta if discover is not None else None
    asked_discover = discover is not None and discover.asked_discover
    if theta is None:
        given = (["--discover"] if asked_discover else []) + ([f"--theta {asked}"] if asked is not None else [])
        return None, [f"{' '.join(given)} (the run does not discover words)"] if given else []
    step = discover if discover is not None else make_discovery_step(DiscoveryConfig(theta=theta), run_dir)
    step.cfg = replace(step.cfg, theta=theta)
    if asked is not None and asked != theta:
        return step, [f"--theta {asked} (the run discovers with {theta})"]
    return step, []


def _limits(sim: SimulationConfig, users: int, held: int, population: int) -> list[str]:
    """Settings the users cannot satisfy, in words: the run goes on with what there is."""
    notes = []
    if held < sim.eval_users:
        notes.append(f"{held} users held out for evaluation, not {sim.eval_users}: at most half of the {users} users are")
    asked = devices_to_select(sim.clients_per_round, sim.over_selection)
    if asked > population:
        notes.append(f"-k {sim.clients_per_round} with over-selection asks for {asked} devices a round, more than the "
                     f"population's {population}: each round selects all of them, and aggregates at most {population} updates")
    return notes


class Simulation:
    """Owns a run folder, the engine and the server state; `step()` runs and commits one round."""

    def __init__(self, run_dir: Path, sim: SimulationConfig | None = None, model_dir: Path | None = None,
                 tokenizer_path: Path | None = None, users_file: Path | None = None, devices_root: Path | None = None,
                 resume: bool = False, discover: Discover | None = None, asked: Collection[str] | None = None):
        """`asked`: the settings of `sim` whose flags were given (flattened: "privacy.noise_multiplier"; see
        `_ignored_on_resume`); None: all of them, so a resumed run takes `sim.rounds` as its new total.
        With `asked` lacking "rounds", a resumed run keeps its stored total."""
        from models.checkpoint import default_paths

        self.run_dir = Path(run_dir)
        refuse_a_file(self.run_dir, "a run folder", "--out")
        cfg_path = self.run_dir / CONFIG
        if not resume and holds_run(self.run_dir):
            raise_held(self.run_dir)
        notes: list[str] = []  # becomes self.notes
        stored: dict | None = None  # a resumed run's config.json
        moved: dict[str, Path] = {}  # a path given for a stored one that is gone: taken if its fingerprint matches
        if resume and cfg_path.exists():
            stored, base = read_config(self.run_dir)
            ignored = _ignored_on_resume(sim, base, asked) if sim is not None else []
            keep_total = sim is None or (asked is not None and "rounds" not in asked)
            sim = replace(base, rounds=base.rounds if keep_total else sim.rounds)  # only the round count may change
            given = {"model": model_dir, "tokenizer": tokenizer_path, "users_file": users_file, "devices": devices_root}
            for k, v in given.items():
                if v is None or str(Path(v).resolve()) == stored.get(k):
                    continue
                if k in FINGERPRINTS and stored.get(k) and not Path(stored[k]).exists():
                    moved[k] = Path(v).resolve()
                elif k == "devices" and not Path(stored[k]).is_dir():  # checked against the users (build_population)
                    moved[k] = Path(v).resolve()
                else:
                    ignored.append(f"{k} {str(v)!r} (the run has {stored.get(k)!r})")
            discover, not_taken = _stored_discovery(stored, discover, self.run_dir)
            ignored += not_taken
            if ignored:
                notes.append(f"--resume keeps the run's stored settings but --rounds; not taken: {', '.join(ignored)}")
            for k, flag in (("model", "--model"), ("tokenizer", "--tokenizer"), ("users_file", "--users-file")):
                if stored.get(k) and k not in moved and not Path(stored[k]).exists():
                    raise FedkbError(f"the run's {k.replace('_', ' ')} {stored[k]} is gone (moved?): pass {flag} with its "
                                     f"new place")
            model_dir = moved.get("model") or Path(stored["model"])
            tokenizer_path = moved.get("tokenizer") or Path(stored["tokenizer"])
            users_file = moved.get("users_file") or (Path(stored["users_file"]) if stored.get("users_file") else None)
            devices_root = moved.get("devices") or Path(stored["devices"])
        elif resume:
            raise FedkbError(f"nothing to resume in {self.run_dir} ({CONFIG} missing)")
        if model_dir is None or tokenizer_path is None:  # an installed fedkb without data/ has none
            d_model, d_tok = default_paths()
            model_dir, tokenizer_path = model_dir or d_model, tokenizer_path or d_tok
        self.sim = sim or SimulationConfig()
        self.model_dir = Path(model_dir).resolve()
        self.tokenizer_path = Path(tokenizer_path).resolve()
        self.users_file = Path(users_file).resolve() if users_file else None
        self.devices_root = Path(devices_root or self.run_dir.parent / f"{self.run_dir.name}-devices").resolve()
        run_dir = self.run_dir.resolve()
        if self.devices_root == run_dir or run_dir in self.devices_root.parents:
            raise FedkbError("device folders must live outside the run folder")
        if self.devices_root in run_dir.parents:
            raise FedkbError(f"the run folder must not live inside the device folders ({self.devices_root})")
        refuse_a_file(self.devices_root, "a folder of device folders", "--devices")
        if holds_run(self.devices_root) or (self.devices_root / CONFIG).exists():
            raise FedkbError(f"the run's device folders {self.devices_root} hold a run now: move one of them away to "
                             f"resume the run" if resume else
                             f"{self.devices_root} holds a run, not device folders: choose another --devices")
        refuse_mixing(run_dir, self.devices_root, resume)
        self.discover = discover
        self.tokenizer = Tokenizer(self.tokenizer_path)
        self.fingerprints = {"tokenizer": self.tokenizer.sha256}
        self._same_as_stored("tokenizer", stored, moved)
        base = load_checkpoint(self.model_dir, self.tokenizer)
        self.model_cfg = base.model.cfg
        self.fingerprints["model"] = model_sha256(base.model.state_dict(), base.vocab)
        self._same_as_stored("model", stored, moved)

        users = load_users(self.users_file)
        train, held = split_users(users, self.sim)
        self.eval_ids = [u.id for u in held]
        size = self.sim.users if self.sim.users else len(train)
        if size < 2 and self.sim.aggregation.secure_aggregation:
            raise FedkbError(f"a population of {size} device cannot use secure aggregation (a device alone has no "
                             f"neighbour to mask with, so every round aborts): pass --no-secagg, or more --users")
        self.fingerprints["users_file"] = users_sha256(users)
        if stored is not None:
            self._check_population(stored, size)
        # every user's device folder (held-out ones too), made from these users (the folder records them)
        build_population(self.devices_root, users, fingerprint=self.fingerprints["users_file"])
        self.population = build_population(self.devices_root, train, size)
        msgs = [m for u in held for m in u.future[: self.sim.eval_messages]]
        self.evaluator = Evaluator(WordLM(self.model_cfg), self.tokenizer, msgs) if msgs and self.sim.eval_users else None
        if isinstance(self.discover, DiscoveryStep):
            self.discover.bind(self)
        for k, new in moved.items():
            if k == "devices":
                notes.append(f"the run's device folders {stored[k]} are gone; {new} are the run's now (config.json "
                             f"names them)")
                continue
            notes.append(f"the run's {k.replace('_', ' ')} {stored[k]} is gone; {new}, the same {k.replace('_', ' ')}, "
                         f"is the run's now (config.json names it)")
        self._stored, self._moved = stored, moved

        self.generator = torch.Generator().manual_seed(self.sim.seed)
        # what the run could not do as asked (settings larger than the users allow, a folder that cannot be
        # locked) and what resuming skipped or repaired, for the CLI and the screen to show
        self.notes = notes + _limits(self.sim, len(users), len(held), self.population.size)
        self.engine = None
        self._lock, why = lock_run(self.run_dir)  # before the first write; close() releases it
        self.notes += [why] if why else []
        if self._lock is not None:  # no other process writes here
            remove_temporaries(self.run_dir)
        try:
            self._start(base, resume, cfg_path)
        except BaseException:
            self.close()
            raise

    def _same_as_stored(self, what: str, stored: dict | None, moved: dict[str, Path]) -> None:
        """FedkbError where a resumed run was given a new place for its model or tokenizer (`moved`: the
        stored one is gone) that does not hold the one it started from: the fingerprint config.json
        recorded, or (a run from before it was recorded) its round-0 checkpoint's."""
        if what not in moved:
            return
        ref = stored.get(FINGERPRINTS[what])
        if ref is None:
            ref = _round0_fingerprint(self.run_dir, what, self.tokenizer)
        if ref != self.fingerprints[what]:
            why = "its fingerprint differs" if ref else "its round-0 checkpoint, to compare with, is unreadable"
            raise FedkbError(f"--{what} {moved[what]} is not the {what} this run started from ({why}); the run's "
                             f"{stored[what]} is gone")

    def _check_population(self, stored: dict, size: int) -> None:
        """FedkbError where the users file no longer holds the population a resumed run started with
        (its fingerprint; for runs from before it was recorded, the held-out users and the size)."""
        why = None
        if stored.get(FINGERPRINTS["users_file"]) not in (None, self.fingerprints["users_file"]):
            why = "its users or their text differ"
        elif "eval_users" in stored and stored["eval_users"] != self.eval_ids:
            why = "the held-out users differ"
        elif is_int(stored.get("population")) and stored["population"] != size:
            why = f"{size} training users, the run has {stored['population']}"
        if why:
            name = self.users_file or "data/users.jsonl.gz (the default)"
            raise FedkbError(f"the users file {name} does not hold this run's population ({why}): restore the run's "
                             f"users file, or start a new run")

    def _start(self, base, resume: bool, cfg_path: Path) -> None:
        """A new run's round 0, or the state of the run being resumed."""
        held = holds_run(self.run_dir)  # again, under the lock: another process may just have started one
        if held and not resume:
            raise_held(self.run_dir)
        if not held:
            self.state = init_state(base.model.state_dict(), base.vocab, self.sim.server)
            atomic.write_json(cfg_path, {
                "simulation": self.sim.to_json(), "model": str(self.model_dir), "tokenizer": str(self.tokenizer_path),
                "users_file": str(self.users_file) if self.users_file else None, "devices": str(self.devices_root),
                "eval_users": self.eval_ids, "population": self.population.size,
                DISCOVERY_KEY: self.discover.cfg.theta if isinstance(self.discover, DiscoveryStep) else None,
                **{FINGERPRINTS[k]: v for k, v in self.fingerprints.items()},
            })
            (self.run_dir / METRICS).write_text("")
            m0 = {"round": 0, "kind": "base"}
            if self.evaluator is not None:
                m0.update(self.evaluator(self.state.params, self.state.vocab))
            self._commit(m0)
        else:
            self._resume()
            self._update_config(cfg_path)

    def _update_config(self, cfg_path: Path) -> None:
        """A resumed run's config.json, rewritten (atomically) where it changed: a new total of rounds
        (not one below the rounds already run), a model, tokenizer or users file found at a new place."""
        stored = self._stored
        if stored is None:  # resumed without a config.json to read: nothing to update
            return
        new = {**stored, **{k: str(v) for k, v in self._moved.items()}}
        if self.sim.rounds >= self.state.round and isinstance(stored.get("simulation"), dict):
            new["simulation"] = {**stored["simulation"], "rounds": self.sim.rounds}
        if new != stored:
            atomic.write_json(cfg_path, new)
            self._stored = new

    # -- persistence ------------------------------------------------------------------------
    def _commit(self, metrics: dict | None) -> None:
        try:  # before anything is written: metrics.jsonl is strict JSON (run_round refuses a diverged round)
            line = json.dumps(metrics, allow_nan=False) if metrics is not None else None
        except ValueError:
            bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
            raise FedkbError(f"round {self.state.round}: {', '.join(bad) or 'a figure'} is not a finite number; "
                             f"nothing of this round is committed") from None
        s = self.state
        d = checkpoint_dir(self.run_dir, s.round)
        model = WordLM(self.model_cfg)
        model.load_state_dict(s.params)
        save_checkpoint(d, model, s.vocab, self.tokenizer, meta={
            "kind": "global", "round": s.round, "vocab_version": s.vocab.version, "server_optimizer": s.config.optimizer})
        opt = {f"{name}.{k}": v for name, p in s.opt_state.items() for k, v in p.items()}
        save_tensors(d / "server.safetensors", opt or {"_empty": torch.zeros(1)})
        save_tensors(d / "rng.safetensors", {"server": self.generator.get_state()})
        if line is not None:
            atomic.append_line(self.run_dir / METRICS, line)
        self._write_latest(s.round)
        self._prune(s.round)

    def _write_latest(self, rnd: int) -> None:
        """The commit point: atomically name `rnd` the last committed round."""
        d = checkpoint_dir(self.run_dir, rnd)
        atomic.write_json(self.run_dir / LATEST, {"round": rnd, "checkpoint": str(d.relative_to(self.run_dir))})

    def _prune(self, rnd: int) -> None:
        keep = self.sim.keep_checkpoints
        for r in range(1, rnd - keep + 1):
            d = checkpoint_dir(self.run_dir, r)
            if d.exists():
                shutil.rmtree(d, ignore_errors=True)

    def _resume(self) -> None:
        """Continue from the newest committed round whose checkpoint loads; note what was skipped.

        Committed: at or before latest.json's round; with latest.json unreadable, a round whose
        metrics line was written (the line comes after the checkpoint, before latest.json)."""
        latest = latest_round(self.run_dir)
        have = checkpoint_rounds(self.run_dir)
        lines = read_metrics(self.run_dir)
        logged = {m["round"] for m in lines}
        if latest is None:
            candidates = [r for r in have if r in logged] or have  # no metrics either: any whole checkpoint
            self.notes.append(f"{LATEST} is missing or unreadable: resuming from the newest checkpoint whose round "
                              f"{METRICS} records")
        else:
            candidates = [r for r in have if r <= latest]
            if latest not in have:
                self.notes.append(f"the checkpoint of round {latest} (from {LATEST}) is missing")
        skipped = []
        for r in candidates:
            try:
                self._load(r)
            except FedkbError as e:
                skipped.append(f"round {r}: {e}")
                continue
            self._keep_damaged_metrics(r, lines)
            # drop the lines of rounds never committed (or to run again)
            atomic.write_text(self.run_dir / METRICS, "".join(json.dumps(m) + "\n" for m in lines if m["round"] <= r))
            self.notes += [f"skipped the checkpoint of {why}" for why in skipped]
            if r != latest:
                last = min(latest if latest is not None else max(logged, default=r), self.sim.rounds)
                rounds = f"round {last} runs" if last == r + 1 else f"rounds {r + 1}-{last} run"
                again = f"; {rounds} again (same seed, same result)" if last > r else ""
                self.notes.append(f"resuming from round {r}{again}")
                self._write_latest(r)
            return
        why = f": {'; '.join(skipped)}" if skipped else ""
        raise FedkbError(f"no checkpoint in {self.run_dir} can be resumed from{why}; delete the folder to start over")

    def _keep_damaged_metrics(self, rnd: int, lines: list[dict]) -> None:
        """Before resume rewrites metrics.jsonl from the lines it can read: keep the others in
        metrics.jsonl.damaged, and note the committed rounds (up to `rnd`) that have no line."""
        path = self.run_dir / METRICS
        try:
            raw = path.read_bytes().splitlines()  # the lines `read_metrics` reads (universal newlines)
        except FileNotFoundError:
            raw = []
        unread = []
        for line in raw:
            if not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8", errors="replace"))  # decoded as `read_metrics` decodes it
            except ValueError:
                obj = None
            if not (isinstance(obj, dict) and is_int(obj.get("round"))):
                unread.append(line)  # its bytes as they are
        notes = []
        if unread:
            damaged = path.with_name(METRICS + ".damaged")
            old = damaged.read_bytes() if damaged.is_file() else b""
            atomic.write_bytes(damaged, old + b"".join(line + b"\n" for line in unread))
            notes.append(f"{len(unread)} unreadable line{'s' if len(unread) > 1 else ''} of {METRICS} kept in {damaged.name}")
        logged = {m["round"] for m in lines}
        missing = [n for n in range(rnd + 1) if n not in logged]
        if missing:
            notes.append(f"{METRICS} has no readable line of round{'s' if len(missing) > 1 else ''} {_rounds_text(missing)}: "
                         f"{'their figures are' if len(missing) > 1 else 'its figures are'} lost, `fedkb report` leaves "
                         f"{'them' if len(missing) > 1 else 'it'} out")
        self.notes += ["; ".join(notes)] if notes else []

    def _load(self, rnd: int) -> None:
        d = checkpoint_dir(self.run_dir, rnd)
        ck = load_checkpoint(d, self.tokenizer)
        opt_flat = load_tensors(d / "server.safetensors")
        opt: dict[str, dict] = {}
        for key, v in opt_flat.items():
            if key == "_empty":
                continue
            if "." not in key:
                raise FedkbError(f"{d / 'server.safetensors'} is damaged (its tensor {key!r} names no parameter)")
            name, k = key.split(".", 1)
            opt.setdefault(name, {})[k] = v
        rng = load_tensors(d / "rng.safetensors").get("server")
        try:
            self.generator.set_state(rng)
        except (TypeError, RuntimeError) as e:
            raise FedkbError(f"{d / 'rng.safetensors'} does not hold a generator state ({e})") from None
        self.state = ServerState(ck.model.state_dict(), ck.vocab, rnd, self.sim.server, opt)

    # -- running ----------------------------------------------------------------------------
    @property
    def round(self) -> int:
        return self.state.round

    @property
    def done(self) -> bool:
        return self.state.round >= self.sim.rounds

    def latest_checkpoint(self) -> Path:
        return checkpoint_dir(self.run_dir, self.state.round)

    def step(self) -> dict:
        if self.engine is None:
            self.engine = make_engine(self.sim.engine, self.model_cfg, self.tokenizer_path, self.devices_root,
                                      self.sim.client, self.sim.workers)
        self.state, m = run_round(self.state, self.population, self.sim, self.engine, self.generator,
                                  self.evaluator, self.discover)
        self._commit(m)
        return m

    def evaluate_current(self) -> dict | None:
        return self.evaluator(self.state.params, self.state.vocab) if self.evaluator else None

    def run(self, on_round: Callable[[dict], None] | None = None) -> None:
        try:
            while not self.done:
                m = self.step()
                if on_round:
                    on_round(m)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the engine and release the run folder (this object can still be read, not run)."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor drops the flock
            self._lock = None
