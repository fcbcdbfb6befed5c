"""Plots and studies of a simulation run (server-side numbers only; no user text).

`plot_run` draws per-round curves from metrics.jsonl (matplotlib, Agg backend).
`personalization_study` compares, for each user, three models on that user's future
(held-out) text: the base model the run started from, the run's final global model,
and the global model fine-tuned on the user's own history on the device
(`local_finetune`, as the keyboard's "Learn now" does) - Wang et al. 2019,
"Federated Evaluation of On-device Personalization".  Per-user numbers are kept
without ids; the text never leaves the device folders.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import torch

from federation import privacy
from federation.client import local_finetune
from federation.config import ClientConfig, SimulationConfig, personalization_config
from federation.device import Device
from federation.run import FINGERPRINTS, read_config, refuse_a_file, split_users, users_sha256
from federation.runfolder import METRICS, checkpoint_dir, latest_round, numbered_metrics
from federation.sampling import sampling_rate
from models import atomic
from models.checkpoint import load_checkpoint
from models.datasets import load_users
from models.errors import FedkbError
from models.evaluate import simulate_typing
from models.jsonvalues import is_int, is_number
from models.lm import WordLM, WordTable
from models.predictor import Predictor
from models.tokenizer import Tokenizer
from models.train import encode, evaluate_loss


# every PNG a report writes: one of these left from an earlier report and not written this time is removed
_PNGS = ("accuracy.png", "ksr.png", "loss.png", "epsilon.png", "personalization.png")
_NUMBERS = ("top1", "top3", "ksr", "loss", "eval_loss", "epsilon", "rejected", "clipped", "dropouts", "aggregated")


def _finite(v) -> bool:
    """A number a plot can draw and strict JSON can hold: not a bool, NaN, an infinity or an int beyond a float."""
    try:
        return is_number(v) and math.isfinite(v)
    except OverflowError:
        return False


def _metrics(run_dir: Path) -> list[dict]:
    """The run's metrics lines, in increasing rounds, each field the report reads a finite number (or
    absent): FedkbError naming the line that was edited or damaged (a NaN included, which would make
    report.json invalid JSON), instead of a plot of strings, a wrong sum or a traceback."""
    path = Path(run_dir) / METRICS
    ms, seen = [], {}
    for n, m in numbered_metrics(run_dir):
        r = m["round"]
        if r in seen:
            raise FedkbError(f"{path}: round {r} appears twice (lines {seen[r]} and {n}): the file was edited or "
                             f"written by two processes; keep one of the two lines")
        if ms and r < ms[-1]["round"]:
            raise FedkbError(f"{path}, line {n}: round {r} comes after round {ms[-1]['round']} (the file was edited)")
        bad = [k for k in _NUMBERS if m.get(k) is not None and not _finite(m[k])]
        t = m.get("timings", {})
        if r > 0 and not (isinstance(t, dict) and _finite(t.get("round_s"))):
            bad.append("timings.round_s")
        if bad:
            raise FedkbError(f"{path}, line {n}: the line of round {r} is malformed ({', '.join(bad)}: not a finite number)")
        seen[r] = n
        ms.append(m)
    if not ms:
        raise FedkbError(f"{run_dir}: no metrics (is it a `fedkb simulate` run folder?)")
    return ms


def _series(ms: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(m["round"], m[key]) for m in ms if m.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(ms: list[dict], out_dir: Path) -> list[Path]:
    """accuracy.png, ksr.png, loss.png and (with DP) epsilon.png of the metrics lines `ms`; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    panels = [
        ("accuracy.png", "next-word accuracy of the global model (held-out users)", "%", [("top1", "top-1"), ("top3", "top-3")]),
        ("ksr.png", "keystroke savings (3 suggestions)", "%", [("ksr", "KSR")]),
        ("loss.png", "loss", "nats / word", [("loss", "client training loss"), ("eval_loss", "held-out loss")]),
        ("epsilon.png", "privacy spent (RDP accountant)", "epsilon", [("epsilon", "epsilon")]),
    ]
    for name, title, ylabel, keys in panels:
        series = [(label, *_series(ms, k)) for k, label in keys]
        if not any(xs for _, xs, _ in series):
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        for label, xs, ys in series:
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=label)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / name)
        plt.close(fig)
        written.append(out_dir / name)
    return written


def summarize(ms: list[dict], dp: bool = False, rounds: int | None = None, epsilon: float | None = None) -> dict:
    """The run's figures from its committed metrics lines `ms`; `dp`: the run adds DP noise (its epsilon
    is then None only before its first round). `rounds`: the committed round (latest.json; default: the
    last line's), whose own line gives the epsilon, or `epsilon` where that line is lost (torn or edited
    away): never an earlier round's, which would understate it."""
    rounds = ms[-1]["round"] if rounds is None else rounds
    line = next((m for m in ms if m["round"] == rounds), None)
    first = next((m for m in ms if "top1" in m), {})
    last = next((m for m in reversed(ms) if "top1" in m), {})
    done = [m for m in ms if m["round"] > 0]
    lost = sorted(set(range(1, rounds + 1)) - {m["round"] for m in done})
    return {
        "rounds": rounds,
        "start": {k: first.get(k) for k in ("round", "top1", "top3", "ksr", "eval_loss")},
        "end": {k: last.get(k) for k in ("round", "top1", "top3", "ksr", "eval_loss")},
        "dp": dp,
        "epsilon": line.get("epsilon") if line is not None else epsilon,
        **({"lost_rounds": lost} if lost else {}),  # committed rounds whose metrics line is lost: not in the sums
        "rejected": sum(m.get("rejected", 0) for m in done),
        "clipped": sum(m.get("clipped", 0) for m in done),
        "dropouts": sum(m.get("dropouts", 0) for m in done),
        # updates that reached the model: an aborted round applied none (runs from before session 28
        # counted its masked updates as aggregated)
        "aggregated": sum(m.get("aggregated", 0) for m in done if not m.get("secagg_aborted")),
        "secagg_aborted_rounds": sum(1 for m in done if m.get("secagg_aborted")),
        "mean_round_s": round(statistics.mean(m["timings"]["round_s"] for m in done), 3) if done else None,
    }


def run_epsilon(cfg: dict, sim: SimulationConfig, rnd: int) -> float | None:
    """Epsilon after round `rnd`, as federation/rounds.py's metrics line states it, recomputed from the
    run's config.json (`cfg`, `sim`): for a round whose line is lost. None without DP noise, or where
    config.json names no population size (a run from before it was recorded)."""
    size = cfg.get("population") if is_int(cfg.get("population")) and cfg["population"] > 0 else sim.users
    if sim.privacy.noise_multiplier == 0 or not size:
        return None
    return privacy.epsilon(sim.privacy, sampling_rate(size, sim.clients_per_round, sim.over_selection), rnd)


def score_text(model: WordLM, ck_vocab, tokenizer: Tokenizer, future: list[str]) -> dict:
    """One model on one user's text: top-1 and KSR of the typing simulation, mean loss, words."""
    s = simulate_typing(Predictor(model, ck_vocab, tokenizer), future)
    table = WordTable.build(ck_vocab, tokenizer, model.cfg.base_vocab)
    return {"top1": s["top1"], "ksr": s["ksr"], "loss": evaluate_loss(model, table, encode(future, ck_vocab)), "words": s["words"]}


def relative_changes(before: list[float], after: list[float]) -> list[float]:
    """(after - before) / before for each user whose `before` is above 0: a change from 0 has no relative
    size, so such users count in the shares of users made better or worse but not in a relative median."""
    return [(b - a) / a for a, b in zip(before, after) if a > 0]


def study_user_ids(cfg: dict) -> list[str]:
    """The users a personalization study visits, in order: the run's held-out evaluation users
    first, then the real users of the run's training population (`cfg`: the run's config.json), split
    from its users file as federation/run.py's Simulation does; never other folders of a devices root
    (another run's users, or users a smaller --users population left out). FedkbError where the users
    file no longer holds the run's users."""
    sim = SimulationConfig.from_json(cfg["simulation"])
    users = load_users(cfg.get("users_file"))
    if cfg.get(FINGERPRINTS["users_file"]) not in (None, users_sha256(users)):
        raise FedkbError(f"the users file {cfg.get('users_file') or 'data/users.jsonl.gz (the default)'} no longer holds "
                         f"this run's users (it changed since the run): restore it, or --users 0 skips the personalization study")
    train, _ = split_users(users, sim)
    size = sim.users or len(train)  # user i of a resampled population (size > real users) is real user i % R
    ids = list(cfg.get("eval_users", []))
    return ids + sorted({u.id for u in train[:size]} - set(ids))


def personalization_study(run_dir: Path, cfg: dict, sim: SimulationConfig, rnd: int, users: int = 50,
                          client: ClientConfig | None = None, seed: int = 0, min_future_words: int = 20) -> dict:
    """Per user: base vs global vs personalized on the user's future text (held-out users first); the
    global model is round `rnd`'s, `cfg` and `sim` the run's config.json (`read_config`)."""
    client = client or personalization_config(sim.client)
    tok = Tokenizer(Path(cfg["tokenizer"]))
    base = load_checkpoint(Path(cfg["model"]), tok)
    glob = load_checkpoint(checkpoint_dir(run_dir, rnd), tok)
    root = Path(cfg["devices"])
    rows = []
    for uid in study_user_ids(cfg):
        if len(rows) >= users:
            break
        dev = Device(root, uid)
        hist, fut = dev.history(), dev.future()
        if sum(len(m.split()) for m in fut) < min_future_words or not hist:
            continue
        g = torch.Generator().manual_seed(seed + len(rows))
        personal = WordLM(glob.model.cfg)
        personal.load_state_dict(local_finetune(glob.model, glob.vocab, tok, hist, client, g))
        rows.append({
            "held_out": uid in cfg.get("eval_users", []),
            "base": score_text(base.model, base.vocab, tok, fut),
            "global": score_text(glob.model, glob.vocab, tok, fut),
            "personalized": score_text(personal, glob.vocab, tok, fut),
        })
    if not rows:
        raise FedkbError("no user with enough future text for the personalization study")

    def mean(key: str, model: str) -> float:
        return round(statistics.mean(r[model][key] for r in rows), 3)

    base_to_global = _gains(rows, "base", "global", "top1")
    out = {
        "round": rnd,
        "users": len(rows),
        "held_out_users": sum(r["held_out"] for r in rows),  # the rest took part in the federation (not on this text)
        "mean": {m: {k: mean(k, m) for k in ("top1", "ksr", "loss")} for m in ("base", "global", "personalized")},
        "personalized_vs_global": _personalized_vs_global(rows, with_points=True),
        # the same, for the held-out users and for the federation's clients (whose history, not this
        # future text, trained the global model) apart
        "by_group": {name: {"users": len(group), **_personalized_vs_global(group)}
                     for name, group in (("held_out", [r for r in rows if r["held_out"]]),
                                         ("clients", [r for r in rows if not r["held_out"]])) if group},
        "global_vs_base": {
            "median_top1_gain_points": statistics.median(base_to_global),
            "share_worse_top1": sum(g < 0 for g in base_to_global) / len(rows),
        },
    }
    return out


def _gains(rows: list[dict], a: str, b: str, key: str) -> list[float]:
    return [r[b][key] - r[a][key] for r in rows]


def _personalized_vs_global(rows: list[dict], with_points: bool = False) -> dict:
    """The personalized model against the global one over `rows` (a study's users): shares of users
    better and worse on top-1, KSR and loss, and the median relative changes; `with_points`: each
    user's top-1 gain first (`top1_gain_points`)."""

    def gains(key: str) -> list[float]:
        return _gains(rows, "global", "personalized", key)

    def rel(key: str) -> list[float]:
        return relative_changes([r["global"][key] for r in rows], [r["personalized"][key] for r in rows])

    def median_or_none(xs: list[float]) -> float | None:
        return statistics.median(xs) if xs else None

    def share(xs: list[float], better) -> float:
        return sum(map(better, xs)) / len(rows)

    top1, ksr, loss, rel_top1 = gains("top1"), gains("ksr"), gains("loss"), rel("top1")
    return {
        **({"top1_gain_points": top1} if with_points else {}),
        "median_top1_gain_points": statistics.median(top1),
        "median_relative_top1_gain": median_or_none(rel_top1),
        "users_with_relative_top1_gain": len(rel_top1),  # global top-1 above 0
        "share_better_top1": share(top1, lambda g: g > 0),
        "share_worse_top1": share(top1, lambda g: g < 0),
        "median_relative_ksr_gain": median_or_none(rel("ksr")),
        "share_better_ksr": share(ksr, lambda g: g > 0),
        "share_worse_ksr": share(ksr, lambda g: g < 0),
        # perplexity ratio personalized / global, per user: exp(loss difference)
        "median_relative_perplexity_change": statistics.median(math.expm1(g) for g in loss),
        "share_better_loss": share(loss, lambda g: g < 0),
        "share_worse_loss": share(loss, lambda g: g > 0),
    }


def plot_personalization(study: dict, out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = study["personalized_vs_global"]["top1_gain_points"]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.hist(g, bins=min(30, max(5, len(g) // 2)), color="tab:green", alpha=0.8)
    ax.axvline(0, color="black", linewidth=1)
    pv = study["personalized_vs_global"]
    ax.set_title(f"personalized - global, top-1 per user (n={study['users']}): "
                 f"{100 * pv['share_worse_top1']:.0f}% worse", fontsize=9)
    ax.set_xlabel("top-1 gain (points)")
    ax.set_ylabel("users")
    fig.tight_layout()
    path = out_dir / "personalization.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def _study_inputs(run_dir: Path, cfg: dict) -> None:
    """FedkbError naming what the personalization study reads and cannot find: the run's model,
    tokenizer, users file or device folders moved or gone (checked before anything is written)."""
    redo = f"`fedkb simulate --out {run_dir} --resume"
    for key, what, fix in (("model", "model folder", f"{redo} --model DIR` records its new place"),
                           ("tokenizer", "tokenizer", f"{redo} --tokenizer FILE` records its new place"),
                           ("users_file", "users file", f"{redo} --users-file FILE` records its new place"),
                           ("devices", "device folders", f"{redo}` makes them again from the run's users file")):
        if cfg.get(key) and not Path(cfg[key]).exists():  # users_file null: the default one
            raise FedkbError(f"the run's {what} {cfg[key]} {'are' if key == 'devices' else 'is'} gone (moved?): {fix}, "
                             f"or --users 0 skips the personalization study")


def write_report(run_dir: Path, out_dir: Path | None = None, users: int = 50, personalization: bool = True) -> dict:
    """The plots, the study and report.json (strict JSON) of a run; its files are checked, and the study
    (which can fail) is made, before anything is written."""
    run_dir = Path(run_dir)
    cfg, sim = read_config(run_dir)  # "not a simulation run folder" where it has none, a one-line error where it is damaged
    rnd = latest_round(run_dir)
    if rnd is None:
        raise FedkbError(f"{run_dir}: latest.json is missing or unreadable (`fedkb simulate --out {run_dir} --resume` repairs it)")
    # the rounds latest.json committed: a round's metrics line is written before latest.json names it,
    # so a run killed (or read) between the two has a line that `--resume` drops and runs again
    ms = [m for m in _metrics(run_dir) if m["round"] <= rnd]
    if not ms:
        raise FedkbError(f"{run_dir}: no metrics line of a committed round")
    out_dir = Path(out_dir or run_dir / "report")
    refuse_a_file(out_dir, "a report folder", "--out")
    eps = None if any(m["round"] == rnd for m in ms) else run_epsilon(cfg, sim, rnd)  # the committed round's line lost
    rep = {"summary": summarize(ms, dp=sim.privacy.noise_multiplier > 0, rounds=rnd, epsilon=eps)}
    if personalization and users > 0:
        _study_inputs(run_dir, cfg)
        rep["personalization"] = personalization_study(run_dir, cfg, sim, rnd, users)
    files = plot_run(ms, out_dir)
    if "personalization" in rep:
        files.append(plot_personalization(rep["personalization"], out_dir))
    rep["files"] = [str(f) for f in files]
    atomic.write_text(out_dir / "report.json", json.dumps(rep, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    for name in set(_PNGS) - {Path(f).name for f in files}:  # an earlier report's plot this one did not draw
        old = out_dir / name
        if old.is_file() or old.is_symlink():
            old.unlink()
    return rep
