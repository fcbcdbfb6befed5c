"""The client update: fine-tune the global model on one user's history, report the delta.

FedAvg's local step (McMahan et al. 2017, "Communication-Efficient Learning of Deep
Networks from Decentralized Data"): start from the current global parameters, run
`epochs` of SGD over the device's data, and report `delta = local - global` with the
number of words trained on (the FedAvg weight).  The same `local_finetune` is the
keyboard's on-device "Learn now".
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from federation.config import ClientConfig
from models import params as P
from models.lm import WordLM, WordTable
from models.tokenizer import Tokenizer
from models.train import encode, fit
from models.vocab import Vocabulary


@dataclass
class ClientResult:
    delta: dict[str, Tensor]  # local - global
    num_words: int  # training words (the FedAvg weight)
    loss: float  # mean training loss over the local steps (nan if no step)
    steps: int
    seconds: float
    slot: int = -1  # position in the round's reporting order (set by the engine)


def user_stream(texts: Sequence[str], vocab: Vocabulary, cfg: ClientConfig) -> Tensor:
    """The user's word-id stream, capped to the last `cfg.max_words` ids."""
    stream = encode(texts, vocab)
    if cfg.max_words and len(stream) > cfg.max_words:
        stream = stream[-cfg.max_words:]
    return stream


def local_finetune(
    model: WordLM,
    vocab: Vocabulary,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    cfg: ClientConfig,
    generator: torch.Generator,
    on_step: Callable[[int, int, float], None] | None = None,
) -> dict[str, Tensor]:
    """Fine-tune a COPY of `model` on `texts`; return the new parameters (model is untouched)."""
    work = copy.deepcopy(model)
    table = WordTable.build(vocab, tokenizer, model.cfg.base_vocab)
    fit(work, table, user_stream(texts, vocab, cfg), cfg.train_config(), generator, on_step=on_step)
    return P.clone(work.state_dict())


def client_update(
    global_params: dict[str, Tensor],
    model: WordLM,
    vocab: Vocabulary,
    tokenizer: Tokenizer,
    user_texts: Sequence[str],
    cfg: ClientConfig,
    generator: torch.Generator,
    table: WordTable | None = None,
    stream: Tensor | None = None,
    out: dict[str, Tensor] | None = None,
) -> ClientResult:
    """Train `model` (a workspace whose weights are overwritten) from `global_params`; report the delta.

    `table` / `stream` may be passed precomputed (engines cache them per vocabulary version); the
    delta is written into `out`'s tensors when given (the parallel engine's shared buffers).
    """
    t0 = time.perf_counter()
    with torch.no_grad():
        for k, p in model.state_dict().items():
            p.copy_(global_params[k])
    if table is None:
        table = WordTable.build(vocab, tokenizer, model.cfg.base_vocab)
    if stream is None:
        stream = user_stream(user_texts, vocab, cfg)
    losses = fit(model, table, stream, cfg.train_config(), generator)
    delta = P.delta(model.state_dict(), global_params, out)
    loss = sum(losses) / len(losses) if losses else float("nan")
    return ClientResult(delta, int(len(stream)) if losses else 0, loss, len(losses), time.perf_counter() - t0)
