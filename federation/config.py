"""Configuration of a federated simulation: frozen dataclasses with commented defaults.

Defaults follow Gboard's production setup where it is published (Hard et al. 2018,
"Federated Learning for Mobile Keyboard Prediction"; Bonawitz et al. 2019, "Towards
Federated Learning at Scale: System Design"): SGD on the device, 130 % over-selection,
6-10 % of selected devices dropping out; Gboard used FedAvgM on the server (momentum 0.9,
lr 1.0), available as `fedavgm`; the default here is plain FedAvg, which did better in short runs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING

from models.jsonvalues import is_int, is_number

if TYPE_CHECKING:  # configs are plain data, read without torch (the keyboard's start); the trainer's is imported when made
    from models.train import TrainConfig

MAX_USERS = 1_000_000  # a round draws over the whole population (a permutation of N): 8 MB at this size
MAX_WORKERS = 64
MAX_EPOCHS = 1_000_000  # models/train.py's TrainConfig limit (not imported: that module imports torch)
# DP noise multipliers outside this range are refused: below it the RDP accountant's arithmetic underflows (z = 1e-155
# reported epsilon 0.0, z <= 1e-162 divided by zero); above it epsilon is 0 to the accountant's precision
NOISE_RANGE = (1e-100, 1e6)
MAX_CLIP = 1e6  # a larger clip never clips (robustness clips at 100 by default), and z C must stay finite
TAU_RANGE = (1e-15, 1e15)  # FedAdam's v starts at tau^2: finite and nonzero in float32


def _require_finite(**values: float | None) -> None:
    """ValueError naming the first value that is NaN or infinite (None is allowed): such a setting
    passes every `> 0` check and would only show as a model of NaNs after a round."""
    for name, v in values.items():
        if v is not None and not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, not {v}")


@dataclass(frozen=True)
class ClientConfig:
    """Local fine-tuning on one device (also the keyboard's on-device "Learn now")."""

    epochs: float = 1.0  # passes over the user's history
    batch_size: int = 8  # parallel columns of the user's word stream (32: ~1.25x the words/s, same quality; see README)
    bptt: int = 20  # words per truncated-backprop step
    lr: float = 0.3  # SGD learning rate, tuned on the base model: 0.2-0.5 helps 11/12 users, 1.0 only 6/12
    optimizer: str = "sgd"  # "sgd" (Gboard) or "adam"
    clip_grad: float = 1.0  # per-step gradient-norm clip: keeps LSTM steps sane
    dropout: bool = False  # dropout (the model's rate, masks from the client's generator); off: see below
    max_words: int = 5000  # train on at most the last N words of history (bounds client cost)

    # Why a federated client trains without dropout (measured on held-out users' *history*,
    # never the future text the targets are scored on): the mean delta of one round of 50
    # clients from the base model lowered the validation top-1 with dropout (20.68 -> 20.57 %)
    # and raised it without (-> 20.76 %, lower loss too). Dropout regularizes a model trained
    # for many epochs; a client takes ~8 steps from the global model, and the average over
    # the cohort is the regularizer. 50 rounds x 50 clients: README, Results.

    def __post_init__(self):
        _require_finite(**{"client epochs": self.epochs, "client learning rate": self.lr, "the client's gradient clip": self.clip_grad})
        if self.batch_size < 1 or self.bptt < 1 or self.max_words < 2:
            raise ValueError("client batch size and bptt must be >= 1, max_words >= 2")
        if not self.epochs > 0 or not self.lr > 0:
            raise ValueError("client epochs and learning rate must be > 0")
        if self.epochs > MAX_EPOCHS:  # TrainConfig's limit, checked before the first round
            raise ValueError(f"client epochs must be at most {MAX_EPOCHS:,}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"unknown client optimizer {self.optimizer!r} (sgd or adam)")
        if not self.clip_grad > 0:
            raise ValueError("the client's gradient clip must be > 0")

    def train_config(self) -> TrainConfig:
        from models.train import TrainConfig

        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, bptt=self.bptt, lr=self.lr,
                           optimizer=self.optimizer, clip_grad=self.clip_grad, dropout=self.dropout)


def personalization_config(client: ClientConfig | None = None) -> ClientConfig:
    """Fine-tuning one user's own model (the keyboard's "Learn now", the report's personalization
    study): a federated client's step (without dropout too: with it tied on held-out history,
    README's Results), gentler and longer (lr 0.1, 3 epochs instead of 0.3, 1),
    in batches of at most 8 columns, whatever batch the federation's clients use (a batch of 32
    makes 4x fewer steps: one user's model needs the steps, the federation's average the throughput).

    A federated client's update is averaged with many others; a personal model is used as it is,
    so it should fit its user more closely without overshooting. Chosen on a validation split
    (the last 20 % of each of 100 users' history, their future text untouched; see
    bench/bench_personalization.py): against the global model it made top-1 better for 43 % and
    worse for 29 % of users, where lr 0.3 x 1 epoch gave 39 % / 38 % (the first base model; with
    the current one the settings tie within noise, see the README)."""
    client = client or ClientConfig()
    return replace(client, lr=0.1, epochs=3.0, batch_size=min(client.batch_size, 8))


@dataclass(frozen=True)
class ServerConfig:
    """The server optimizer applied to the averaged delta (Reddi et al. 2021, "Adaptive Federated Optimization")."""

    optimizer: str = "fedavg"  # "fedavg" | "fedavgm" | "fedadam" (fedavgm overshot in 10-round runs here)
    lr: float = 1.0  # server learning rate (fedadam: use ~0.01)
    momentum: float = 0.9  # fedavgm (Gboard: 0.9)
    beta1: float = 0.9  # fedadam first moment
    beta2: float = 0.99  # fedadam second moment
    tau: float = 1e-3  # fedadam adaptivity (epsilon)

    def __post_init__(self):
        _require_finite(**{"server learning rate": self.lr, "tau": self.tau})
        if self.optimizer not in ("fedavg", "fedavgm", "fedadam"):
            raise ValueError(f"unknown server optimizer {self.optimizer!r}")
        if not self.lr > 0 or not self.tau >= 0:  # `not >` also refuses NaN
            raise ValueError("server learning rate must be > 0, tau >= 0")
        if self.tau and not TAU_RANGE[0] <= self.tau <= TAU_RANGE[1]:
            raise ValueError(f"tau must be 0 or in [{TAU_RANGE[0]:g}, {TAU_RANGE[1]:g}] (got {self.tau})")
        if self.optimizer == "fedadam" and not self.tau > 0:  # v starts at tau^2: with 0, an entry no client moved is 0/0
            raise ValueError(f"fedadam needs tau > 0 (got {self.tau}): its step m / (sqrt(v) + tau) is 0/0 where no client moved")
        if not all(0 <= b < 1 for b in (self.momentum, self.beta1, self.beta2)):
            raise ValueError("server momentum and betas must be in [0, 1)")


@dataclass(frozen=True)
class PrivacyConfig:
    """DP-FedAvg (McMahan et al. 2018): clip each update, Gaussian noise on the sum, once."""

    clip: float | None = None  # L2 bound per client update; None = no clipping
    noise_multiplier: float = 0.0  # noise std = noise_multiplier * clip on the sum; 0 = no noise
    delta: float = 1e-5  # epsilon is reported at this delta
    weight_cap_words: int = 500  # with noise: client weight = min(words / cap, 1) so sensitivity is `clip`
    # draw the noise from a generator seeded from OS entropy each round, saved nowhere (--secret-noise);
    # False: from the run's seeded generator, so the noise can be replayed from the seed and checkpoints
    secret_noise: bool = False

    def __post_init__(self):
        _require_finite(**{"noise multiplier (--dp)": self.noise_multiplier, "clip": self.clip})
        if self.noise_multiplier < 0:
            raise ValueError("noise multiplier must be >= 0")
        if self.noise_multiplier and not NOISE_RANGE[0] <= self.noise_multiplier <= NOISE_RANGE[1]:
            raise ValueError(f"noise multiplier (--dp) must be 0 or in [{NOISE_RANGE[0]:g}, {NOISE_RANGE[1]:g}], "
                             f"not {self.noise_multiplier:g}: the privacy accountant cannot account for it")
        if self.noise_multiplier > 0 and self.clip is None:
            raise ValueError("Gaussian noise needs a clip norm (--clip)")
        if self.secret_noise and self.noise_multiplier == 0:
            raise ValueError("--secret-noise needs Gaussian noise (--dp)")
        if self.clip is not None and not 0 < self.clip <= MAX_CLIP:
            raise ValueError(f"clip must be > 0 and at most {MAX_CLIP:g}")
        if not 0 < self.delta < 1:
            raise ValueError("delta must be in (0, 1)")
        if self.weight_cap_words < 1:
            raise ValueError("weight_cap_words must be >= 1")


@dataclass(frozen=True)
class AggregationConfig:
    """Robustness and secure aggregation around the weighted mean."""

    max_update_norm: float | None = 100.0  # robustness: larger updates are clipped to this (never hit by honest ones)
    secure_aggregation: bool = True  # pairwise-masked sums (Bonawitz et al. 2017), in fixed point
    secagg_neighbors: int = 8  # masks with k neighbours (Bell et al. 2020); >= cohort-1 = complete graph
    secagg_threshold: float = 0.5  # Shamir threshold as a share of each device's neighbours
    secagg_scale_bits: int = 32  # fixed-point resolution 2^-bits for the masked sum

    def __post_init__(self):
        _require_finite(max_update_norm=self.max_update_norm)
        if self.max_update_norm is not None and not self.max_update_norm > 0:
            raise ValueError("max_update_norm must be > 0 (or None)")
        if self.secagg_neighbors < 1 or not 0 < self.secagg_threshold <= 1:
            raise ValueError("secure aggregation needs >= 1 neighbour and a threshold in (0, 1]")
        if not 1 <= self.secagg_scale_bits <= 48:
            raise ValueError("secagg_scale_bits must be in 1..48")


@dataclass(frozen=True)
class SimulationConfig:
    users: int = 0  # population size; 0 = every training user; > R real users => resampled (user i = real user i % R)
    rounds: int = 10
    clients_per_round: int = 20  # K: reports aggregated per round
    over_selection: float = 1.3  # select ceil(1.3 K) devices (Gboard)
    dropout_min: float = 0.06  # per-round dropout rate drawn uniformly in [min, max]
    dropout_max: float = 0.10
    eval_users: int = 20  # fixed seeded subset of users whose future text scores the global model
    eval_messages: int = 20  # at most this many future messages per evaluation user
    eval_every: int = 1  # evaluate every N rounds (and the last)
    engine: str = "sequential"  # "sequential" | "parallel"
    workers: int = 2  # parallel engine processes
    keep_checkpoints: int = 3  # round checkpoints kept besides round 0
    seed: int = 0
    client: ClientConfig = field(default_factory=ClientConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)

    def __post_init__(self):
        for f in fields(self):  # a value from a TOML file or a caller, of the wrong type, would only fail on resume
            if not _fits(getattr(self, f.name), f.type):
                raise ValueError(f"{f.name} = {getattr(self, f.name)!r} is not of type {f.type}")
        _require_finite(over_selection=self.over_selection)
        if self.users < 0 or self.clients_per_round < 1 or self.rounds < 0:
            raise ValueError("--users must be >= 0, --clients-per-round >= 1, --rounds >= 0")
        if self.workers < 1 or self.eval_every < 1 or self.eval_users < 0 or self.eval_messages < 1:
            raise ValueError("--workers and --eval-every must be >= 1, --eval-users >= 0")
        if self.workers > MAX_WORKERS:  # each is a process with the model and two 8 MB delta buffers
            raise ValueError(f"--workers must be at most {MAX_WORKERS}")
        if self.engine not in ("sequential", "parallel"):
            raise ValueError(f"unknown engine {self.engine!r} (sequential or parallel)")
        if not self.over_selection >= 1 or not 0 <= self.dropout_min <= self.dropout_max < 1:
            raise ValueError("over_selection must be >= 1 and 0 <= dropout_min <= dropout_max < 1")
        if self.keep_checkpoints < 1:
            raise ValueError("keep_checkpoints must be >= 1")
        if self.users > MAX_USERS or self.clients_per_round > MAX_USERS:
            raise ValueError(f"--users and --clients-per-round must be at most {MAX_USERS:,}")
        if not 0 <= self.seed < 2**63:
            raise ValueError("--seed must be in [0, 2^63)")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> "SimulationConfig":
        """The config `to_json` wrote (keys it lacks take their defaults); TypeError if a value has the wrong type."""
        if not isinstance(obj, dict):
            raise TypeError("simulation is not an object")
        nested = {"client": ClientConfig, "server": ServerConfig, "privacy": PrivacyConfig, "aggregation": AggregationConfig}
        kw = {k: _checked(nested[k], v, k) for k, v in obj.items() if k in nested}
        return _checked(cls, {k: v for k, v in obj.items() if k not in nested}, "simulation", **kw)


_TYPES = {"int": is_int, "float": is_number, "str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool),
          "None": lambda v: v is None}


def _fits(value, annotation: str) -> bool:
    """Whether a JSON value fits a field annotated e.g. `int`, `float` (an int fits) or `float | None`."""
    names = [t.strip() for t in str(annotation).split("|")]
    if any(n not in _TYPES for n in names):
        return True  # a type this check does not know: left to the dataclass
    return any(_TYPES[n](value) for n in names)


def _checked(cls, obj: dict, where: str, **extra):
    """`cls(**obj, **extra)` for the keys of `obj` that are fields; TypeError naming a value of the wrong type."""
    if not isinstance(obj, dict):
        raise TypeError(f"{where} is not an object")
    kw = {f.name: obj[f.name] for f in fields(cls) if f.name in obj}
    for f in fields(cls):
        if f.name in kw and not _fits(kw[f.name], f.type):
            raise TypeError(f"{where}.{f.name} = {kw[f.name]!r} is not of type {f.type}")
    return cls(**kw, **extra)
