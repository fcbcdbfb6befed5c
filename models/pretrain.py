"""Central pretraining of the base model, resumable.

The vocabulary (the `base_vocab` most frequent words of the pretraining text)
and the model are built here; training state (weights, Adam moments, the
generator, the step) is saved atomically every `save_every` steps under
`work_dir`, so a killed run resumes where it stopped.  The finished model is
written as a checkpoint directory (shipped as `data/base/`).  A second stage
continues a finished model (`init`), e.g. with the exact softmax after a
sampled-softmax first stage (Jean et al. 2015, "On Using Very Large Target
Vocabulary for Neural Machine Translation").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from models import atomic
from models.checkpoint import WEIGHTS, load_checkpoint, load_tensors, save_checkpoint, save_tensors
from models.lm import LMConfig, WordLM, WordTable
from models.start_state import set_mean_start_state
from models.text import sentence_tokens
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


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, (p, st) in enumerate(opt.state.items()):
        for k, v in st.items():
            out[f"{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    for key, v in tensors.items():
        i, name = key.split(".", 1)
        p = params[int(i)]
        opt.state[p][name] = v if name == "step" else v.to(p.device)  # Adam keeps its step count on the CPU


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
) -> None:
    """Train from scratch, or, with `init` (a checkpoint directory), continue training that
    model with its vocabulary and architecture (a second stage, e.g. with the exact softmax;
    `cfg.model` is then ignored; `cfg.dropout` still applies).

    `device` "cuda" trains on a GPU with cuDNN's LSTM: the same recipe, not bit for bit the
    CPU's result; the weights are initialised on the CPU either way and saved there.

    The saved model starts messages from its mean state at message starts in `start_lines`
    (chat text; default `lines`), see models/start_state.py."""
    work_dir = Path(work_dir)
    gen = torch.Generator().manual_seed(cfg.seed)
    init_id, parent = None, None
    if init is not None:
        parent = load_checkpoint(init, tokenizer)
        model, vocab, model_cfg = parent.model, parent.vocab, parent.model.cfg
        init_id = hashlib.sha256((Path(init) / WEIGHTS).read_bytes()).hexdigest()
    else:
        vocab = build_vocab((sentence_tokens(l) for l in lines), cfg.model.base_vocab)
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
    start, lstm_state = 0, None
    carried: dict[str, tuple] = {}
    state_json = work_dir / "state.json"
    if state_json.exists():
        st = json.loads(state_json.read_text())
        if st.get("fingerprint") == fingerprint:  # same data, config and tokenizer: resume
            model.load_state_dict(load_tensors(work_dir / "model.safetensors", model.state_dict()))
            opt_tensors = load_tensors(work_dir / "optimizer.safetensors")
            _restore_optimizer(opt, opt_tensors)
            gen.set_state(load_tensors(work_dir / "generator.safetensors")["state"])
            start = int(st["step"])
            if st.get("has_lstm_state"):
                t = load_tensors(work_dir / "lstm_state.safetensors")
                lstm_state = (t["h"].to(device), t["c"].to(device))

    def state_hook(step: int, state: tuple) -> None:
        carried["state"] = state

    def step_hook(step: int, n: int, loss: float) -> None:
        if on_step:
            on_step(step, n, loss)
        if step % cfg.save_every == 0 or step == n:
            save_tensors(work_dir / "model.safetensors", model.state_dict())
            save_tensors(work_dir / "optimizer.safetensors", _optimizer_tensors(opt))
            save_tensors(work_dir / "generator.safetensors", {"state": gen.get_state()})
            h, c = carried["state"]
            save_tensors(work_dir / "lstm_state.safetensors", {"h": h, "c": c})
            # the JSON last: it names a step only once every file of that step is in place
            atomic.write_json(state_json, {"step": step, "total": n, "vocab_size": len(vocab), "loss": loss,
                                          "has_lstm_state": True, "fingerprint": fingerprint})

    losses = fit(model, table, stream, cfg.train, gen, on_step=step_hook, start_step=start, optimizer=opt,
                 initial_state=lstm_state, on_state=state_hook)
    start_info = set_mean_start_state(model, table, vocab, lines if start_lines is None else start_lines)
    save_checkpoint(out_dir, model, vocab, tokenizer, meta={
        "kind": "base",
        "round": 0,
        "trained_words": int(len(stream)),
        "steps": total,
        "final_loss": losses[-1] if losses else None,
        "train": asdict(cfg.train),
        "seed": cfg.seed,
        "start_state": start_info,
        **({"dropout": cfg.dropout} if cfg.dropout is not None else {}),
        **({"device": device} if device != "cpu" else {}),
        **({"init": {"weights_sha256": init_id, "meta": parent.meta}} if parent else {}),
    })
