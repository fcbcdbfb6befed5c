"""One round of federated learning, phase by phase.

    sample    plan_round: select ceil(1.3 K), some drop out, the first K survivors report
              (with DP noise: each device selected with probability q, every survivor reports)
    train     engine.run: each reporting device runs client_update from the global model
    clip/sum  Aggregator.add: validate, clip, weight, securely-aggregated running sum
    unmask    SecAggRound.unmask: masks of dropped / surplus devices removed via their shares
    noise     privacy.add_noise on the sum, once, then a fixed denominator (DP-FedAvg); with DP every
              round releases noise, an empty or aborted one too (noise / q W)
    server    server_update(state, mean delta) with FedAvg / FedAvgM / FedAdam
    discover  optional hook (issue 5): discover(state, reporting_devices, round, generator)
              (one device per real person: copies in a resampled population report once)
              -> (new_vocab, info), run after the server step; the new vocabulary is kept in
              ServerState and recorded by the next checkpoint
    evaluate  the global model on the held-out evaluation users' future text

All randomness comes from the server generator passed in (client seeds are drawn from
it), so a round is a pure function of (state, generator state, config, data); with
`privacy.secret_noise` the DP noise alone comes from OS entropy (privacy.noise_generator).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from federation import privacy
from federation.aggregate import Aggregator
from federation.config import SimulationConfig
from federation.device import Device
from federation.memory import TRIM_EVERY, release_free_memory
from federation.engine_sequential import ClientTask
from federation.sampling import Population, plan_round, sampling_rate
from federation.secagg import SecAggAborted, SecAggRound
from federation.server import ServerState, server_update
from models import params as P
from models.errors import FedkbError
from models.lm import WordLM
from models.tokenizer import Tokenizer
from models.train import encode, evaluate_loss
from models.vocab import Vocabulary

Discover = Callable[[ServerState, list[Device], int, torch.Generator], tuple[Vocabulary, dict]]


@dataclass
class Evaluator:
    """Scores a global model on fixed held-out users' future text (a server-side aggregate only)."""

    model: WordLM  # workspace for the global parameters
    tokenizer: Tokenizer
    messages: list[str]  # the evaluation users' future messages (kept in memory, never written)
    _cache: tuple = field(default=(None, None, None), init=False, repr=False)  # (vocab, table, encoded messages)

    def _inputs(self, vocab: Vocabulary):
        from models.lm import WordTable

        if self._cache[0] != vocab:  # vocabularies are immutable (frozen), so equal ones share the inputs
            table = WordTable.build(vocab, self.tokenizer, self.model.cfg.base_vocab)
            self._cache = (vocab, table, encode(self.messages, vocab))
        return self._cache[1], self._cache[2]

    def __call__(self, params: dict[str, Tensor], vocab: Vocabulary) -> dict:
        from models.evaluate import simulate_typing
        from models.predictor import Predictor

        self.model.load_state_dict(params)
        pred = Predictor(self.model, vocab, self.tokenizer)
        s = simulate_typing(pred, self.messages)
        table, stream = self._inputs(vocab)
        loss = evaluate_loss(self.model, table, stream)
        return {"top1": s["top1"], "top3": s["top3"], "ksr": s["ksr"], "eval_loss": round(loss, 5), "eval_words": s["words"]}


def client_seeds(n: int, generator: torch.Generator) -> list[int]:
    return torch.randint(0, 2**62, (n,), generator=generator, dtype=torch.int64).tolist()


def run_round(
    state: ServerState,
    population: Population,
    sim: SimulationConfig,
    engine,
    generator: torch.Generator,
    evaluator: Evaluator | None = None,
    discover: Discover | None = None,
    tamper: Callable[[ClientTask, dict[str, Tensor]], dict[str, Tensor]] | None = None,
) -> tuple[ServerState, dict]:
    """Run round `state.round + 1`; returns the new state and the round's metrics (JSON-ready).

    `tamper(task, delta) -> delta` lets tests play a faulty or malicious client.
    """
    t0 = time.perf_counter()
    release_free_memory()  # the previous round's buffers: memory flat across rounds (federation/memory.py)
    rnd = state.round + 1
    k = sim.clients_per_round
    dp = sim.privacy.noise_multiplier > 0  # DP-FedAvg: Poisson sampling, a fixed denominator, no word count released
    q = sampling_rate(population.size, k, sim.over_selection)
    plan = plan_round(population.size, k, sim.over_selection, sim.dropout_min, sim.dropout_max, generator, poisson=dp)
    seeds = client_seeds(len(plan.reporting), generator)
    tasks = [ClientTask(i, u, population.real_id(u), s) for i, (u, s) in enumerate(zip(plan.reporting, seeds))]
    n_params = sum(v.numel() for v in state.params.values()) + 1
    agg_cfg = sim.aggregation
    secagg = (SecAggRound(list(plan.selected), n_params, agg_cfg.secagg_neighbors, agg_cfg.secagg_threshold,
                          agg_cfg.secagg_scale_bits, generator)
              if agg_cfg.secure_aggregation and plan.reporting else None)
    agg = Aggregator(state.params, agg_cfg, sim.privacy, secagg)
    losses: list[tuple[float, int]] = []
    client_s = []

    def consume(task: ClientTask, res) -> None:
        delta = tamper(task, res.delta) if tamper else res.delta
        if agg.add(task.device, delta, res.num_words) and res.steps:
            losses.append((res.loss, res.num_words))
        client_s.append(res.seconds)
        if len(client_s) % TRIM_EVERY == 0:
            release_free_memory()  # memory flat within and across rounds (federation/memory.py)

    t_train = time.perf_counter()
    engine.run(state.params, state.vocab, tasks, consume)
    t_agg = time.perf_counter()
    aborted = None
    denominator = privacy.fixed_denominator(population.size, q, sim.dropout_min, sim.dropout_max) if dp else None
    noise_gen = privacy.noise_generator(sim.privacy, generator)
    try:
        mean, weight = agg.result(set(plan.reporting) | set(plan.surplus), noise_gen, denominator)
    except SecAggAborted as e:  # nothing of the sum reaches the model; with DP the round still releases noise
        mean, weight = agg.empty_result(noise_gen, denominator)
        aborted = str(e)
    new_state = server_update(state, mean)
    if not (P.all_finite(new_state.params) and all(P.all_finite(m) for m in new_state.opt_state.values())):
        # every update was finite: the server step overflowed (or FedAdam's moments did, which would freeze the model)
        blame = "--dp x --clip (the noise) or --server-lr" if dp else "--server-lr"
        raise FedkbError(f"round {rnd}: the server step made the global model or its optimizer state non-finite "
                         f"(is {blame} too large?); nothing of this round is committed, round {state.round} is the run's last")
    t_server = time.perf_counter()

    discovery = None
    if discover is not None:
        # one vote per person: the copies of a real user in a resampled population share one device folder
        # (one history), so they report to discovery once, as the first copy in report order
        people: dict[str, int] = {}
        for u in plan.reporting:
            people.setdefault(population.real_id(u), u)
        vocab, discovery = discover(new_state, [population.device(u) for u in people.values()], rnd, generator)
        new_state = replace(new_state, vocab=vocab)

    m = {
        "round": rnd,
        "loss": round(sum(l * w for l, w in losses) / sum(w for _, w in losses), 5) if losses else None,
        "selected": len(plan.selected),
        "dropouts": len(plan.dropped),
        "dropout_rate": round(plan.dropout_rate, 4),
        "reporting": len(plan.reporting),
        "surplus": len(plan.surplus),
        "aggregated": 0 if aborted else agg.count,  # updates that reached the model
        "masked": agg.count if secagg is not None else None,  # updates in the masked sum, an aborted one's too
        "rejected": agg.rejected,
        "clipped": agg.clipped,
        "robust_clipped": agg.robust_clipped,
        "dp_clipped": agg.dp_clipped,
        "update_norm_mean": round(sum(agg.norms) / len(agg.norms), 6) if agg.norms else None,
        "update_norm_max": round(max(agg.norms), 6) if agg.norms else None,
        "train_words": int(round(weight)) if not dp else None,
        "epsilon": privacy.epsilon(sim.privacy, q, rnd),
        "delta": sim.privacy.delta if dp else None,
        "secagg_aborted": aborted,
        "vocab_version": new_state.vocab.version,
        "vocab_size": len(new_state.vocab),
    }
    if discovery is not None:
        m["discovery"] = discovery
    t_eval = time.perf_counter()
    if evaluator is not None and (rnd % sim.eval_every == 0 or rnd == sim.rounds):
        m.update(evaluator(new_state.params, new_state.vocab))
    # finite weights can still score an infinite or NaN loss (a server step far too large, the weights ~1e36):
    # such a model is diverged too, and its figures are not JSON
    diverged = [k for k in ("loss", "eval_loss") if m.get(k) is not None and not math.isfinite(m[k])]
    if diverged:
        what = " and ".join({"loss": "the clients' training loss", "eval_loss": "the held-out loss"}[k] for k in diverged)
        raise FedkbError(f"round {rnd}: {what} of the global model is not finite, it diverged (is --server-lr too "
                         f"large?); nothing of this round is committed, round {state.round} is the run's last")
    t_end = time.perf_counter()
    m["timings"] = {
        "round_s": round(t_end - t0, 3),
        "train_s": round(t_agg - t_train, 3),
        "client_s_sum": round(sum(client_s), 3),
        "aggregate_s": round(t_server - t_agg, 3),
        "eval_s": round(t_end - t_eval, 3),
    }
    return new_state, m
