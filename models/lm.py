"""The word-level LSTM language model with subword-composed, tied embeddings.

Architecture (Hard et al. 2018, "Federated Learning for Mobile Keyboard
Prediction": a CIFG-LSTM of 670 units with a 96-d projection and tied
input/output embeddings; here a standard LSTM cell with `proj_size`):

    word w  ->  E[w] = mean(piece_emb[pieces(w)]) + residual[w]   (residual only for base words)
                b[w] = mean(piece_bias[pieces(w)]) + word_bias[w]
    tokens (B, T) -> E -> LSTM(670, proj 96) -> h (B, T, 96) -> logits = h @ E^T + b   (B, T, V)

Every parameter's shape is fixed by the config, not by the vocabulary: adding a
word adds a row to the *composed* table only, so a federated delta has the same
shape whatever vocabulary version a device has, and a new word is predictable
at once.  (Composition of word embeddings from subwords: Bojanowski et al. 2017,
"Enriching Word Vectors with Subword Information".)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.fused import compose_words, composition_transpose, lstm_projected, shared_lookup, tied_softmax_cross_entropy
from models.jsonvalues import is_number
from models.modelfile import START_STATE_KEYS, shapes  # noqa: F401 (START_STATE_KEYS: WordLM's buffers, named where torch-free readers see them)
from models.tokenizer import Tokenizer
from models.vocab import Vocabulary


# PyTorch has no oneDNN kernel for projected LSTMs and says so on every call; the default one is used.
warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")



MAX_BASE_VOCAB = 1_000_000  # residual rows: 384 MB at embed_dim 96 (3x that with Adam's moments); more is a typo


@dataclass(frozen=True)
class LMConfig:
    num_pieces: int = 4000  # sentencepiece vocabulary size
    base_vocab: int = 10000  # rows of the residual table: the pretraining vocabulary
    embed_dim: int = 96  # projection / embedding size (Gboard: 96)
    hidden: int = 670  # LSTM units (Gboard: 670)
    dropout: float = 0.1  # on embeddings and LSTM outputs, training only

    def __post_init__(self):
        shapes(asdict(self))  # ValueError for sizes that are not whole numbers >= 1
        if self.base_vocab > MAX_BASE_VOCAB:  # its residual table alone would be base_vocab x embed_dim floats
            raise ValueError(f"base_vocab must be at most {MAX_BASE_VOCAB:,} words (base_vocab={self.base_vocab})")
        if not (is_number(self.dropout) and 0 <= self.dropout < 1):
            raise ValueError(f"model dropout must be in [0, 1) (dropout={self.dropout!r})")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> "LMConfig":
        return cls(**{k: obj[k] for k in cls.__dataclass_fields__ if k in obj})


@dataclass(frozen=True)
class WordTable:
    """How each word of one vocabulary is composed: flat piece ids + offsets (for embedding_bag)."""

    pieces: Tensor  # (total pieces,) long
    offsets: Tensor  # (V,) long
    residual_rows: int  # words [0, residual_rows) add their residual row
    size: int  # V
    _transposes: dict = field(default_factory=dict, compare=False, repr=False)  # num_pieces -> S^T

    def composition_transpose(self, num_pieces: int) -> Tensor:
        """The sparse S^T the training backward of the composition uses, built once per table."""
        if num_pieces not in self._transposes:
            self._transposes[num_pieces] = composition_transpose(self.pieces, self.offsets, num_pieces)
        return self._transposes[num_pieces]

    def to(self, device: torch.device | str) -> "WordTable":
        """The same table with its piece ids on `device` (training on a GPU)."""
        return WordTable(self.pieces.to(device), self.offsets.to(device), self.residual_rows, self.size)

    @classmethod
    def build(cls, vocab: Vocabulary, tokenizer: Tokenizer, base_vocab: int) -> "WordTable":
        flat: list[int] = []
        offsets: list[int] = []
        for w in vocab.words:
            offsets.append(len(flat))
            flat.extend(tokenizer.pieces(w))
        return cls(
            torch.tensor(flat, dtype=torch.long),
            torch.tensor(offsets, dtype=torch.long),
            min(vocab.base_size, base_vocab),
            len(vocab),
        )


class WordLM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.piece_emb = nn.Parameter(torch.empty(cfg.num_pieces, d))
        self.piece_bias = nn.Parameter(torch.zeros(cfg.num_pieces))
        self.residual = nn.Parameter(torch.zeros(cfg.base_vocab, d))
        self.word_bias = nn.Parameter(torch.zeros(cfg.base_vocab))
        self.lstm = nn.LSTM(d, cfg.hidden, proj_size=d, batch_first=True)
        # The state a message starts from when predicting (models/start_state.py); zeros, as
        # nn.LSTM's default, until computed. Buffers: saved with the weights, never trained.
        self.register_buffer("start_h", torch.zeros(d))
        self.register_buffer("start_c", torch.zeros(cfg.hidden))

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Deterministic init from `generator` (uniform, as in pytorch/examples word_language_model)."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name in ("piece_bias", "residual", "word_bias"):
                    p.zero_()
                elif name == "piece_emb":
                    p.uniform_(-0.1, 0.1, generator=generator)
                else:
                    bound = 1.0 / self.cfg.hidden**0.5
                    p.uniform_(-bound, bound, generator=generator)

    def compose(self, table: WordTable) -> tuple[Tensor, Tensor]:
        """Word embeddings (V, d) and output biases (V,) for one vocabulary."""
        return compose_words(table, self.piece_emb, self.piece_bias, self.residual, self.word_bias)

    def start_state(self, batch: int = 1) -> tuple[Tensor, Tensor]:
        """The LSTM state (h, c), each (1, batch, size), that a message starts from when predicting."""
        return (self.start_h.expand(1, batch, -1).contiguous(), self.start_c.expand(1, batch, -1).contiguous())

    def forward(
        self,
        tokens: Tensor,  # (B, T) word ids
        emb: Tensor,  # (V, d) from compose()
        bias: Tensor,  # (V,)
        state: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Next-word logits (B, T, V) and the new state (evaluation; training uses `loss`)."""
        h, state = self.hidden(tokens, emb, state)
        return h @ emb.t() + bias, state

    def loss(self, tokens: Tensor, targets: Tensor, emb: Tensor, bias: Tensor, state=None,
             generator: torch.Generator | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Training loss (mean next-word cross-entropy, exact softmax) and the new state.

        The cross-entropy of `forward`'s logits up to float rounding, with the fused
        output-layer backward of models/fused.py and no (B, T, V) logits kept."""
        if torch.is_grad_enabled() and emb.device.type == "cpu":
            table, x = shared_lookup(emb, tokens)  # one backward for the table's two uses (models/fused.py)
        else:
            table, x = emb, emb[tokens]
        h, state = self.run_lstm(x, state, generator)
        return tied_softmax_cross_entropy(h.reshape(-1, h.size(-1)), table, bias, targets.reshape(-1)), state

    def hidden(self, tokens: Tensor, emb: Tensor, state=None, generator: torch.Generator | None = None):
        """LSTM outputs (B, T, d) before the tied output layer, and the new state.

        Without `state` the rows start from `start_state()` (so do `forward` and `loss`)."""
        return self.run_lstm(emb[tokens], state, generator)

    def run_lstm(self, x: Tensor, state=None, generator: torch.Generator | None = None):
        """`hidden` from the looked-up inputs x (B, T, d)."""
        if state is None:
            state = self.start_state(x.size(0))
        if generator is not None:
            x = _dropout(x, self.cfg.dropout, generator)
        if torch.is_grad_enabled() and x.device.type == "cpu":
            # training on the CPU: the same function with a hand-written backward (models/fused.py);
            # on a GPU, cuDNN's fused LSTM beats a Python loop over time steps
            h, state = lstm_projected(self.lstm, x, state)  # (B, T, d)
        else:
            h, state = self.lstm(x, state)
        if generator is not None:
            h = _dropout(h, self.cfg.dropout, generator)
        return h, state

    def step(self, token: int, emb: Tensor, bias: Tensor, state) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One word in, next-word log-probabilities (V,) out: the keyboard's per-word cost.
        Without `state` it starts from `start_state()`."""
        x = emb[token].view(1, 1, -1)
        h, state = self.lstm(x, state if state is not None else self.start_state())
        logits = h.view(-1) @ emb.t() + bias
        return torch.log_softmax(logits, dim=-1), state


def _dropout(x: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """Inverted dropout with an explicit generator, so seeded training is bit-for-bit reproducible."""
    if p <= 0:
        return x
    mask = torch.empty_like(x).bernoulli_(1 - p, generator=generator)
    return x * mask / (1 - p)


def sampled_softmax_loss(
    h: Tensor,  # (N, d) LSTM outputs
    targets: Tensor,  # (N,)
    emb: Tensor,  # (V, d)
    bias: Tensor,  # (V,)
    log_q: Tensor,  # (V,) log of the proposal distribution
    num_sampled: int,
    generator: torch.Generator,
) -> Tensor:
    """Sampled softmax with shared negatives and logQ correction (Jean et al. 2015,
    "On Using Very Large Target Vocabulary for Neural Machine Translation").
    On 2 cores the full 10k-way softmax is ~75 % of a training step; this makes
    it ~10x cheaper.  Used for pretraining only; evaluation is always exact."""
    neg = torch.multinomial(log_q.exp(), num_sampled, replacement=True, generator=generator)  # (S,)
    correction = math.log(num_sampled)
    true = (h * emb[targets]).sum(-1) + bias[targets] - (log_q[targets] + correction)  # (N,)
    sampled = h @ emb[neg].t() + bias[neg] - (log_q[neg] + correction)  # (N, S)
    sampled = sampled.masked_fill(neg.unsqueeze(0) == targets.unsqueeze(1), float("-inf"))  # accidental hits
    logits = torch.cat([true.unsqueeze(1), sampled], dim=1)
    return F.cross_entropy(logits, targets.new_zeros(len(targets)))


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
