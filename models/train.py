"""Training and loss evaluation on token streams (truncated BPTT).

Follows pytorch/examples word_language_model: the text is one long stream of
word ids split into `batch_size` parallel columns; each step sees `bptt`
words of every column.  The hidden state is carried across steps (so context
spans chunk edges) but detached, so gradients stop at the chunk boundary and
the memory of one step stays flat.  Gradients are clipped by global norm: LSTMs
occasionally produce exploding gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from models import sgd_step
from models.fused import clip_and_step
from models.lm import WordLM, WordTable, sampled_softmax_loss
from models.text import sentence_tokens
from models.vocab import Vocabulary


MAX_EPOCHS = 1_000_000  # more passes than any run could make; more is a typo (and overflows the step count)


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 1.0  # passes over the stream (fractions allowed)
    batch_size: int = 32  # parallel columns of the stream
    bptt: int = 32  # words per truncated-backprop step
    lr: float = 2e-3
    optimizer: str = "adam"  # "adam" or "sgd"
    clip_grad: float = 1.0  # max global gradient norm
    dropout: bool = True  # dropout (drawn from the run's generator) during training
    lr_decay: bool = False  # linear decay to 10% of lr over the run (pretraining)
    sampled_softmax: int = 0  # >0: negatives per step (unigram^0.75 proposal); 0: exact softmax

    def __post_init__(self):
        if not self.epochs > 0 or not self.lr >= 0 or not self.clip_grad > 0:  # `not >` refuses NaN too
            raise ValueError("epochs and gradient clip must be > 0, learning rate >= 0")
        if not (math.isfinite(self.epochs) and math.isfinite(self.lr)):  # inf: an OverflowError, or a model of NaNs
            raise ValueError(f"epochs and learning rate must be finite numbers (epochs={self.epochs}, lr={self.lr})")
        if self.epochs > MAX_EPOCHS:  # 1e308 is finite, but epochs x steps is not
            raise ValueError(f"epochs must be at most {MAX_EPOCHS:,} (epochs={self.epochs})")
        if self.batch_size < 1 or self.bptt < 1 or self.sampled_softmax < 0:
            raise ValueError("batch size and bptt must be >= 1, sampled softmax >= 0")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"unknown optimizer {self.optimizer!r} (adam or sgd)")


def encode(lines: Iterable[str], vocab: Vocabulary, max_words: int | None = None) -> torch.Tensor:
    """One 1-D LongTensor of word ids: each message starts with BOS; OOV words map to UNK.
    With `max_words`, only the first that many ids (no more lines are read than needed)."""
    ids: list[int] = []
    for line in lines:
        ids.extend(vocab.id(t) for t in sentence_tokens(line))
        if max_words is not None and len(ids) >= max_words:
            break
    return torch.tensor(ids[:max_words], dtype=torch.long)


def batchify(stream: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N,) -> (B, N // B): B contiguous columns, the tail dropped. Small streams get fewer columns."""
    b = max(1, min(batch_size, (len(stream) - 1) // 2))
    n = len(stream) // b
    return stream[: n * b].view(b, n)


def make_optimizer(model: WordLM, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def steps_per_run(stream_len: int, cfg: TrainConfig) -> int:
    """How many steps `fit` takes on a stream of this length."""
    b = max(1, min(cfg.batch_size, (stream_len - 1) // 2))
    cols = stream_len // b
    if cols < 2:
        return 0
    return max(1, round(math.ceil((cols - 1) / cfg.bptt) * cfg.epochs))


def fit(
    model: WordLM,
    table: WordTable,
    stream: torch.Tensor,
    cfg: TrainConfig,
    generator: torch.Generator,
    on_step: Callable[[int, int, float], None] | None = None,
    start_step: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    on_state: Callable[[int, tuple[torch.Tensor, torch.Tensor]], None] | None = None,
) -> list[float]:
    """Train in place; returns per-step losses.  `on_step(step, total, loss)` after each step.

    `start_step` skips steps already done (resuming); the generator,
    `optimizer` and `initial_state` (the carried LSTM state, which `on_state`
    reports after every step) must then be the ones saved at that step, and the
    resumed run is bit-for-bit the uninterrupted one.
    """
    data = batchify(stream, cfg.batch_size)
    if data.size(1) < 2:
        return []
    n_chunks = math.ceil((data.size(1) - 1) / cfg.bptt)
    total = max(1, round(n_chunks * cfg.epochs))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer or make_optimizer(model, cfg)
    if cfg.sampled_softmax:
        counts = torch.bincount(stream, minlength=table.size).double() + 1.0
        q = counts**0.75
        log_q = (q / q.sum()).log().float()
    model.train()
    # plain SGD with the native kernels: the same step without autograd (models/sgd_step.py)
    direct = sgd_step.SGDStep(model, table) if sgd_step.applies(model, opt, cfg.sampled_softmax) else None
    losses: list[float] = []
    state = initial_state
    for step in range(start_step, total):
        i = (step % n_chunks) * cfg.bptt
        if i == 0:
            # a new pass starts from a fresh context: the model's start state (WordLM.hidden's
            # default), where the keyboard starts each message; zeros for a model that has none yet
            state = None
        x = data[:, i : i + cfg.bptt]
        y = data[:, i + 1 : i + 1 + cfg.bptt]
        x = x[:, : y.size(1)]
        if cfg.lr_decay:
            for g in opt.param_groups:
                g["lr"] = cfg.lr * (1.0 - 0.9 * step / total)
        drop_gen = generator if cfg.dropout else None
        if direct is not None:
            loss_value, state = direct(x, y, state, drop_gen, opt.param_groups[0]["lr"], cfg.clip_grad)
        else:
            emb, bias = model.compose(table)
            if cfg.sampled_softmax:
                h, state = model.hidden(x, emb, state, drop_gen)
                loss = sampled_softmax_loss(h.reshape(-1, h.size(-1)), y.reshape(-1), emb, bias, log_q, cfg.sampled_softmax, generator)
            else:
                loss, state = model.loss(x, y, emb, bias, state, drop_gen)
            state = (state[0].detach(), state[1].detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip_and_step(opt, params, cfg.clip_grad)  # clip_grad_norm_ + opt.step(), fused for plain SGD (models/fused.py)
            loss_value = loss.item()
        losses.append(loss_value)
        if on_state:
            on_state(step + 1, state)
        if on_step:
            on_step(step + 1, total, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def evaluate_loss(model: WordLM, table: WordTable, stream: torch.Tensor, batch_size: int = 16, bptt: int = 64) -> float:
    """Mean next-word cross-entropy (nats) over the stream; exp() of it is perplexity."""
    data = batchify(stream, batch_size)
    if data.size(1) < 2:
        return float("nan")
    model.eval()
    emb, bias = model.compose(table)
    total, count, state = 0.0, 0, None
    for i in range(0, data.size(1) - 1, bptt):
        x = data[:, i : i + bptt]
        y = data[:, i + 1 : i + 1 + bptt]
        x = x[:, : y.size(1)]
        logits, state = model(x, emb, bias, state)
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"))
        count += y.numel()
    return total / count
