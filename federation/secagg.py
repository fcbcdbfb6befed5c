"""Simulated secure aggregation: the server only ever learns the sum of the reports.

Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", with the neighbour graph of Bell et al. 2020 ("Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead") so the cost per client is O(k), not O(n):

1. Every device in the cohort (all selected devices) makes a Diffie-Hellman key pair
   and a self-mask seed b_i, and Shamir-shares sk_i and b_i among its k neighbours.
2. A reporting device encodes its (weighted) update in fixed point in Z_{2^64} and adds
       PRG(b_i) + sum_{j neighbour, j>i} PRG(s_ij) - sum_{j neighbour, j<i} PRG(s_ij),
   with s_ij = KA(sk_i, pk_j) = KA(sk_j, pk_i): the pairwise masks cancel in the sum.
3. The server sums the masked vectors (`MaskedSum`).  For every device whose input is
   NOT in the sum (dropped out, or not needed) it collects >= t shares of sk_d from
   live neighbours, reconstructs sk_d and removes the masks s_dj it left in the live
   devices' inputs; for every device whose input IS in the sum, it reconstructs b_i and
   removes PRG(b_i).  It never asks for both secrets of one device.

Simulation: all parties run in one process, the group is Z_p* with p = 2^127 - 1 (fine
for a simulation, not for deployment), and seeds are drawn from the round's generator.
The fixed-point encoding (resolution 2^-scale_bits) is the one place the sum differs
from a float sum; with secure aggregation off the float path is exact.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

P127 = 2**127 - 1  # Mersenne prime: the DH group modulus and the Shamir field
G = 3


class SecAggAborted(RuntimeError):
    """Too few live neighbours to reconstruct a secret: the round is abandoned (no update)."""


def _rand_int(generator: torch.Generator, bound: int) -> int:
    """A uniform-ish integer in [1, bound) from four 32-bit draws of the generator."""
    parts = torch.randint(0, 2**32, (4,), generator=generator, dtype=torch.int64).tolist()
    v = 0
    for p in parts:
        v = (v << 32) | p
    return 1 + v % (bound - 1)


# -- Shamir secret sharing over GF(P127) ----------------------------------------------------
def shamir_share(secret: int, xs: list[int], t: int, generator: torch.Generator) -> dict[int, int]:
    """Shares of `secret` at points xs (non-zero, distinct); any t of them reconstruct it."""
    coeffs = [secret] + [_rand_int(generator, P127) for _ in range(t - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % P127
        out[x] = y
    return out


def shamir_reconstruct(shares: dict[int, int]) -> int:
    """Lagrange interpolation at 0."""
    secret = 0
    items = list(shares.items())
    for i, (xi, yi) in enumerate(items):
        num, den = 1, 1
        for j, (xj, _) in enumerate(items):
            if i != j:
                num = num * (-xj) % P127
                den = den * (xi - xj) % P127
        secret = (secret + yi * num * pow(den, P127 - 2, P127)) % P127
    return secret


# -- masks ----------------------------------------------------------------------------------
def prg(seed: int, n: int) -> Tensor:
    """n pseudo-random elements of Z_{2^64} (as int64, wrapping) expanded from `seed`."""
    return torch.from_numpy(np.random.PCG64(seed % 2**128).random_raw(n).view(np.int64))


def agree(sk: int, pk_other: int) -> int:
    """Diffie-Hellman key agreement, hashed to a PRG seed."""
    shared = pow(pk_other, sk, P127)
    return int.from_bytes(hashlib.sha256(shared.to_bytes(16, "big")).digest()[:16], "big")


def encode(x: Tensor, scale_bits: int) -> Tensor:
    """float -> fixed point int64 (|x| < 2^(62 - scale_bits) required)."""
    return torch.round(x.double() * 2.0**scale_bits).to(torch.int64)


def decode(v: Tensor, scale_bits: int) -> Tensor:
    return v.double() / 2.0**scale_bits


@dataclass
class _Party:
    sk: int
    pk: int
    b: int  # self-mask seed
    neighbours: tuple[int, ...]
    sk_shares: dict[int, int] = field(default_factory=dict)  # held by neighbour x (share point = x + 1)
    b_shares: dict[int, int] = field(default_factory=dict)


class SecAggRound:
    """One round of the protocol over a cohort (device ids), vectors of length `n`."""

    def __init__(self, cohort: list[int], n: int, neighbours: int, threshold: float, scale_bits: int,
                 generator: torch.Generator):
        self.n, self.scale_bits = n, scale_bits
        order = [cohort[i] for i in torch.randperm(len(cohort), generator=generator).tolist()]
        m = len(order)
        half = (min(neighbours, m - 1) + 1) // 2  # symmetric: k/2 neighbours on each side of the ring
        complete = 2 * half >= m - 1
        pos = {u: i for i, u in enumerate(order)}
        self.parties: dict[int, _Party] = {}
        for u in order:  # step 1: keys, seeds, neighbourhoods (a ring with k/2 each side; complete if k = m-1)
            if complete:
                nb = tuple(v for v in order if v != u)
            else:
                nb = tuple(order[(pos[u] + d) % m] for d in range(-half, half + 1) if d != 0)
            sk = _rand_int(generator, P127 - 1)
            self.parties[u] = _Party(sk, pow(G, sk, P127), _rand_int(generator, P127), nb)
        self.threshold = {u: max(1, math.ceil(threshold * len(p.neighbours))) for u, p in self.parties.items()}
        for u, p in self.parties.items():  # share sk and b with the neighbours
            xs = [pos[v] + 1 for v in p.neighbours]
            sk_sh = shamir_share(p.sk, xs, self.threshold[u], generator)
            b_sh = shamir_share(p.b, xs, self.threshold[u], generator)
            for v in p.neighbours:
                p.sk_shares[v] = sk_sh[pos[v] + 1]
                p.b_shares[v] = b_sh[pos[v] + 1]
        self._pos = pos
        self.masked_sum = torch.zeros(n, dtype=torch.int64)
        self.included: list[int] = []

    # -- client side ------------------------------------------------------------------------
    def out_of_range(self, x: Tensor) -> str | None:
        """Why x cannot be encoded safely, or None.  Each report's entries stay below
        2^(62 - scale_bits) / cohort size, so no report wraps around in Z_2^64 and neither does
        the sum of the whole cohort's (which decodes to the wrong number, silently, past 2^63)."""
        bound = 2.0 ** (62 - self.scale_bits) / len(self.parties)
        biggest = float(x.abs().max()) if x.numel() else 0.0
        if biggest >= bound:
            return (f"too large for secure aggregation's fixed point ({biggest:.3g} >= {bound:.3g} with "
                    f"{self.scale_bits} fraction bits and {len(self.parties)} devices)")
        return None

    def mask(self, u: int, x: Tensor) -> Tensor:
        """Device u's masked report of the float vector x (only u's own secrets are used)."""
        p = self.parties[u]
        y = encode(x, self.scale_bits) + prg(p.b, self.n)
        for v in p.neighbours:
            m = prg(agree(p.sk, self.parties[v].pk), self.n)
            y = y + m if self._pos[u] < self._pos[v] else y - m
        return y

    # -- server side ------------------------------------------------------------------------
    def add(self, u: int, masked: Tensor) -> None:
        """The server adds one masked report to the running sum (it cannot read it)."""
        self.masked_sum += masked
        self.included.append(u)

    def unmask(self, alive: set[int]) -> Tensor:
        """Remove the masks left in the sum, with shares from live devices; the float sum."""
        total = self.masked_sum.clone()
        included = set(self.included)
        for u, p in self.parties.items():
            have = {self._pos[v] + 1: (p.b_shares if u in included else p.sk_shares)[v] for v in p.neighbours if v in alive}
            if len(have) < self.threshold[u] and (u in included or any(v in included for v in p.neighbours)):
                raise SecAggAborted(f"device {u}: {len(have)} live neighbours < threshold {self.threshold[u]}")
            if u in included:
                total -= prg(shamir_reconstruct(dict(list(have.items())[: self.threshold[u]])), self.n)
                continue
            live_nb = [v for v in p.neighbours if v in included]
            if not live_nb:
                continue
            sk = shamir_reconstruct(dict(list(have.items())[: self.threshold[u]]))
            for v in live_nb:  # v added -/+ PRG(s_uv): undo it
                m = prg(agree(sk, self.parties[v].pk), self.n)
                total = total - m if self._pos[v] < self._pos[u] else total + m
        return decode(total, self.scale_bits)
