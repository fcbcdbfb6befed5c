"""The population and who takes part in a round.

Population: N simulated users over R real ones.  User i is real user `i % R`'s device
folder ("resampled" when N > R; like every client, each copy trains with its own seed,
drawn by the server), so memory stays flat in N: only R ids are held, and a user's text
is read from its device folder when it is selected.

A round (Bonawitz et al. 2019, "Towards Federated Learning at Scale"): the server
selects ceil(over_selection * K) devices uniformly without replacement; each drops
out with probability r ~ U[dropout_min, dropout_max]; the survivors report in a random
order and the first K are aggregated, the rest are told they are not needed.

With DP noise the round samples as DP-FedAvg's Algorithm 1 does (McMahan et al. 2018):
each device is selected independently with probability q = ceil(over_selection * K) / N
(Poisson sampling, what the privacy accountant assumes), drops out as above, and every
survivor is aggregated: no cap, since keeping only the first K would make one user's
presence decide whether another is counted.  (Secure aggregation can still abort a round
whose cohort leaves a device too few live neighbours, which then depends on who else was
sampled; such a round releases noise only. README, Known limits.)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from federation.device import Device
from models import atomic
from models.datasets import UserData
from models.errors import FedkbError

# at the top of a simulation's device folders: the fingerprint of the users they were made from
# ('@' is no user id's character, federation/device.py, so no device folder can take this name)
POPULATION_RECORD = "@population.json"


@dataclass(frozen=True)
class Population:
    root: Path  # device folders live here (never inside a run folder)
    real_ids: tuple[str, ...]  # R real users, in a fixed order
    size: int  # N simulated users

    def real_id(self, user: int) -> str:
        return self.real_ids[user % len(self.real_ids)]

    def device(self, user: int) -> Device:
        return Device(self.root, self.real_id(user))


def build_population(root: Path, users: list[UserData], size: int | None = None,
                     fingerprint: str | None = None) -> Population:
    """Write each real user's device folder (history + held-out future) once; return the population.

    `fingerprint` (the users' SHA-256, federation/run.py's `users_sha256`): the folders already there
    must have been made from those users, so a run never trains on another users file's text left
    behind: `claim_devices`."""
    root = Path(root)
    if fingerprint is not None:
        claim_devices(root, fingerprint)
    for u in users:
        dev = Device(root, u.id)
        if not (dev.history_file.exists() and dev.future_file.exists()):
            dev.write_simulated(u.history, u.future)
    ids = tuple(u.id for u in users)
    return Population(root, ids, size or len(ids))


def claim_devices(root: Path, fingerprint: str) -> None:
    """Record at the top of `root` (POPULATION_RECORD, written atomically) that its device folders hold
    the users of `fingerprint`; FedkbError, deleting nothing, where it records other users (a folder
    from before the record is taken as it is, and recorded)."""
    record = Path(root) / POPULATION_RECORD
    try:
        stored = json.loads(record.read_text(encoding="utf-8"))
        if not isinstance(stored, dict) or not isinstance(stored.get("users_sha256"), str):
            raise ValueError("no users_sha256")
    except FileNotFoundError:
        stored = None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FedkbError(f"{record} is damaged ({e}): delete the device folders {root}, or choose another --devices") from None
    if stored is not None:
        if stored["users_sha256"] != fingerprint:
            raise FedkbError(f"the device folders {root} were made from another users file (other users or text): "
                             f"delete that folder, or choose another --devices")
        return
    Path(root).mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic.write_json(record, {"users_sha256": fingerprint})


@dataclass(frozen=True)
class RoundPlan:
    selected: tuple[int, ...]  # population indices selected (over-selection included)
    dropped: tuple[int, ...]  # selected devices that dropped out
    reporting: tuple[int, ...]  # aggregated, in report order (at most K)
    surplus: tuple[int, ...]  # survived but not needed
    dropout_rate: float


def devices_to_select(k: int, over_selection: float) -> int:
    """ceil(over_selection * K), at least K: how many devices a round asks for."""
    return max(k, math.ceil(over_selection * k - 1e-9))


def sampling_rate(population_size: int, k: int, over_selection: float) -> float:
    """q: the probability that a given device is selected in a round (either way of sampling)."""
    return min(1.0, devices_to_select(k, over_selection) / population_size)


def plan_round(population_size: int, k: int, over_selection: float, dropout_min: float, dropout_max: float,
               generator: torch.Generator, poisson: bool = False) -> RoundPlan:
    """Who is selected, who drops out, who reports; `poisson`: DP-FedAvg's sampling (module docstring)."""
    if poisson:
        q = sampling_rate(population_size, k, over_selection)
        perm = torch.nonzero(torch.rand(population_size, generator=generator, dtype=torch.float64) < q).flatten().tolist()
        k = population_size  # every survivor reports
    else:
        n_sel = min(population_size, devices_to_select(k, over_selection))
        perm = torch.randperm(population_size, generator=generator)[:n_sel].tolist()
    n_sel = len(perm)
    rate = dropout_min + (dropout_max - dropout_min) * float(torch.rand((), generator=generator, dtype=torch.float64))
    drops = (torch.rand(n_sel, generator=generator, dtype=torch.float64) < rate).tolist()
    survivors = [u for u, d in zip(perm, drops) if not d]
    order = torch.randperm(len(survivors), generator=generator).tolist()
    survivors = [survivors[i] for i in order]
    return RoundPlan(tuple(perm), tuple(u for u, d in zip(perm, drops) if d), tuple(survivors[:k]), tuple(survivors[k:]), rate)


def eval_users(population: Population, count: int, seed: int) -> list[int]:
    """A fixed seeded subset of the real users whose future text scores the global model."""
    g = torch.Generator().manual_seed(seed + 7919)
    r = len(population.real_ids)
    return sorted(torch.randperm(r, generator=g)[: min(count, r)].tolist())
