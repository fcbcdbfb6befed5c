"""Central pretraining of the base model, resumable.

The vocabulary (the `base_vocab` most frequent words of the pretraining text)
and the model are built here; training state (weights, Adam moments, the
generator, the carried LSTM state) is saved every `save_every` steps in a folder
of its own, `work_dir/step-N/`, which `work_dir/state.json` names once all its
files are in place (then the older folder is deleted), so a killed run resumes
where it stopped, never from files of two steps.  One process at a time trains
in a work folder (a `flock` on `work_dir/.lock`).  The finished model is
written as a checkpoint directory (shipped as `data/base/`).  A second stage
continues a finished model (`init`), e.g. with the exact softmax after a
sampled-softmax first stage (Jean et al. 2015, "On Using Very Large Target
Vocabulary for Neural Machine Translation").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from models import atomic, params
from models.checkpoint import WEIGHTS, load_checkpoint, load_tensors, save_checkpoint, save_tensors
from models.errors import FedkbError
from models.jsonvalues import is_int, is_number
from models.lm import LMConfig, WordLM, WordTable
from models.start_state import set_mean_start_state
from models.text import SPECIALS, sentence_tokens
from models.tokenizer import Tokenizer
from models.train import TrainConfig, encode, fit, make_optimizer, steps_per_run
from models.vocab import build_vocab


@dataclass(frozen=True)
class PretrainConfig:
    model: LMConfig = field(default_factory=LMConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1.0, batch_size=64, bptt=32, lr=3e-3, lr_decay=True))
    seed: int = 0
    save_every: int = 200  # steps between resumable training states
    dropout: float | None = None  # override the model's dropout (also when continuing a model); None = keep it

    def __post_init__(self):
        if self.model.base_vocab <= len(SPECIALS):
            raise ValueError(f"the vocabulary size must be >= {len(SPECIALS) + 1}: {', '.join(SPECIALS)} and at least one word "
                             f"(base_vocab={self.model.base_vocab})")
        if not (is_int(self.seed) and 0 <= self.seed < 2**63):
            raise ValueError(f"the seed must be a whole number in [0, 2^63), not {self.seed}")


STATE = "state.json"
STATE_FILES = ("model.safetensors", "optimizer.safetensors", "generator.safetensors", "lstm_state.safetensors")


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's state as "I.NAME" tensors, I the parameter's position in its param groups (the
    order `_restore_optimizer` reads them in).  Not the position in `opt.state`: a restored optimizer
    fills that in the file's key order, so a resumed run's saves filed each moment under another
    parameter, and the second resume crashed on mismatched shapes (or trained with wrong moments)."""
    pos = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    out = {}
    for p, st in opt.state.items():
        for k, v in st.items():
            out[f"{pos[id(p)]}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    for key, v in tensors.items():
        i, name = key.split(".", 1)
        p = params[int(i)]
        opt.state[p][name] = v if name == "step" else v.to(p.device)  # Adam keeps its step count on the CPU


def _check_writable(folder: Path) -> None:
    """FedkbError unless `folder` is, or can be made, a folder this process may write in;
    nothing is created (checked before training, not hours later)."""
    there = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not there.is_dir():
        raise FedkbError(f"cannot write {folder}: {there} is a file, not a folder")
    if not os.access(there, os.W_OK | os.X_OK):
        raise FedkbError(f"cannot write {folder}: no permission to write in {there}")


@contextlib.contextmanager
def _locked(work_dir: Path, note: Callable[[str], None]) -> Iterator[None]:
    """Hold WORK's lock (models/atomic.py's `lock_folder`): a second pretrain in the same work folder
    stops at once instead of interleaving its saves with this one's.  Where files cannot be
    locked, training goes on unlocked, and `note` says so."""
    try:
        fd, why = atomic.lock_folder(work_dir, busy=f"{work_dir} is in use: another fedkb pretrain is training there "
                                                     "(give this one another --work)",
                                     unlocked=f"nothing stops a second pretrain from using {work_dir}")
    except OSError as e:
        raise FedkbError(f"cannot write {work_dir}: {e.strerror or e}") from None
    if why:
        note(why)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _read_state(work_dir: Path) -> dict | None:
    """WORK/state.json, checked (an object with a fingerprint and a step); None if there is none."""
    path = work_dir / STATE
    try:
        st = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(st, dict):
            raise ValueError("not a JSON object")
        if not isinstance(st.get("fingerprint"), str) or not (is_int(st.get("step")) and st["step"] >= 0):
            raise ValueError("no fingerprint and step")
        if "folder" in st and st["folder"] != f"step-{st['step']}":
            raise ValueError(f"folder {st['folder']!r} is not step-{st['step']}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise FedkbError(f"{path} is damaged ({e}): delete {work_dir} to start over") from None
    return st


def pretrain(
    lines: list[str],
    tokenizer: Tokenizer,
    out_dir: Path,
    work_dir: Path,
    cfg: PretrainConfig = PretrainConfig(),
    on_step: Callable[[int, int, float], None] | None = None,
    init: Path | None = None,
    device: str = "cpu",
    start_lines: list[str] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> None:
    """Train from scratch, or, with `init` (a checkpoint directory), continue training that
    model with its vocabulary and architecture (a second stage, e.g. with the exact softmax;
    `cfg.model` is then ignored; `cfg.dropout` still applies).

    `device` "cuda" trains on a GPU with cuDNN's LSTM: the same recipe, not bit for bit the
    CPU's result; the weights are initialised on the CPU either way and saved there.

    The saved model starts messages from its mean state at message starts in `start_lines`
    (chat text; default `lines`), see models/start_state.py.

    `out_dir` and `work_dir` are checked before training; a run whose loss or weights stop
    being finite stops with a FedkbError and writes nothing to `out_dir`.  `on_note` gets what
    the caller should tell the user (work that is started over, a folder that cannot be locked)."""
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    note = on_note or (lambda message: None)
    _check_writable(out_dir)
    _check_writable(work_dir)
    with _locked(work_dir, note):
        _pretrain(lines, tokenizer, out_dir, work_dir, cfg, on_step, init, device, start_lines, note)


def _pretrain(lines, tokenizer, out_dir, work_dir, cfg, on_step, init, device, start_lines, note) -> None:
    """`pretrain`, under the work folder's lock."""
    gen = torch.Generator().manual_seed(cfg.seed)
    init_id, parent = None, None
    if init is not None:
        parent = load_checkpoint(init, tokenizer)
        model, vocab, model_cfg = parent.model, parent.vocab, parent.model.cfg
        init_id = hashlib.sha256((Path(init) / WEIGHTS).read_bytes()).hexdigest()
    else:
        vocab = build_vocab((sentence_tokens(l) for l in lines), cfg.model.base_vocab)
        if len(vocab) == len(SPECIALS):
            raise FedkbError("no word occurs twice in the pretraining text: nothing to build a vocabulary from")
        model_cfg = LMConfig(**{**asdict(cfg.model), "num_pieces": tokenizer.num_pieces})
        model = WordLM(model_cfg)
        model.reset_parameters(gen)
    if cfg.dropout is not None:
        model.cfg = replace(model.cfg, dropout=cfg.dropout)
    table = WordTable.build(vocab, tokenizer, model_cfg.base_vocab).to(device)
    stream = encode(lines, vocab).to(device)
    model.to(device)
    if device != "cpu":  # dropout masks are drawn on the device, from a generator of its own
        gen = torch.Generator(device).manual_seed(cfg.seed)
    opt = make_optimizer(model, cfg.train)
    total = steps_per_run(len(stream), cfg.train)

    keys = [asdict(cfg), tokenizer.sha256, len(stream), int(stream.sum()), init_id] + ([device] if device != "cpu" else [])
    fingerprint = hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]
    start, lstm_state, resumed_loss = 0, None, None
    carried: dict[str, tuple] = {}
    state_json = work_dir / STATE
    st = _read_state(work_dir)
    if st is not None and st["fingerprint"] != fingerprint:
        note(f"starting over: {work_dir} holds another run's training state (other data or settings, step "
             f"{st['step']} of {st.get('total')}), which this run's first save replaces")
    elif st is not None:  # same data, config and tokenizer: resume
        folder = work_dir / st.get("folder", "")  # a state saved before step folders: the files in work_dir itself
        try:
            if st["step"] > total:
                raise FedkbError(f"{state_json} names step {st['step']}, past this run's last ({total})")
            model.load_state_dict(load_tensors(folder / "model.safetensors", model.state_dict()))
            _restore_optimizer(opt, load_tensors(folder / "optimizer.safetensors"))
            gen.set_state(load_tensors(folder / "generator.safetensors")["state"])
            if st.get("has_lstm_state"):
                t = load_tensors(folder / "lstm_state.safetensors")
                lstm_state = (t["h"].to(device), t["c"].to(device))
        except FedkbError as e:
            raise FedkbError(f"{e}; delete {work_dir} to start over") from None
        except (KeyError, IndexError, ValueError, RuntimeError) as e:  # tensors of another shape or kind
            raise FedkbError(f"the training state in {folder} does not fit this run ({e}); delete {work_dir} to start over") from None
        start = st["step"]
        resumed_loss = st.get("loss") if is_number(st.get("loss")) and math.isfinite(st["loss"]) else None

    def diverged(step: int, what: str) -> FedkbError:
        return FedkbError(f"training diverged ({what} at step {step}): nothing written to {out_dir}; "
                          "lower the learning rate (--lr)")

    def state_hook(step: int, state: tuple) -> None:
        carried["state"] = state

    def step_hook(step: int, n: int, loss: float) -> None:
        if on_step:
            on_step(step, n, loss)
        if not math.isfinite(loss):
            raise diverged(step, f"loss {loss}")
        if step % cfg.save_every == 0 or step == n:
            if not params.all_finite(model.state_dict()):
                raise diverged(step, "weights not finite")
            folder = work_dir / f"step-{step}"
            save_tensors(folder / "model.safetensors", model.state_dict())
            save_tensors(folder / "optimizer.safetensors", _optimizer_tensors(opt))
            save_tensors(folder / "generator.safetensors", {"state": gen.get_state()})
            h, c = carried["state"]
            save_tensors(folder / "lstm_state.safetensors", {"h": h, "c": c})
            # the JSON last: it names the step's folder only once every file of it is in place
            atomic.write_json(state_json, {"step": step, "total": n, "vocab_size": len(vocab), "loss": loss,
                                          "has_lstm_state": True, "fingerprint": fingerprint, "folder": folder.name})
            for old in work_dir.glob("step-[0-9]*"):
                if old != folder:
                    shutil.rmtree(old, ignore_errors=True)
            for name in STATE_FILES:  # a state saved before step folders
                (work_dir / name).unlink(missing_ok=True)

    losses = fit(model, table, stream, cfg.train, gen, on_step=step_hook, start_step=start, optimizer=opt,
                 initial_state=lstm_state, on_state=state_hook)
    start_info = set_mean_start_state(model, table, vocab, lines if start_lines is None else start_lines)
    if not params.all_finite(model.state_dict()):
        raise diverged(total, "weights not finite")
    save_checkpoint(out_dir, model, vocab, tokenizer, meta={
        "kind": "base",
        "round": 0,
        "trained_words": int(len(stream)),
        "steps": total,
        "final_loss": losses[-1] if losses else resumed_loss,  # a finished run rerun trains no step
        "train": asdict(cfg.train),
        "seed": cfg.seed,
        "start_state": start_info,
        **({"dropout": cfg.dropout} if cfg.dropout is not None else {}),
        **({"device": device} if device != "cpu" else {}),
        **({"init": {"weights_sha256": init_id, "meta": parent.meta}} if parent else {}),
    })
