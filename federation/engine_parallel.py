"""The parallel engine: persistent worker processes, one torch thread each.

    main                                      worker w (started once, spawn)
    ----                                      --------
    params -> shared flat buffer  --------->  reads the global model from it (no copy, no pickle)
    pipe[w] <- ("round", r, vocab if new)     loads model, tokenizer, user streams once, keeps them
    pipe[w] <- ("task", client, slot) x 2     trains, writes the delta straight into ITS shared
    pipe[w] -> ("done", slot, ...)            delta buffer `slot` (of two), reports, and goes on
    consume(task, delta) reads `slot`;        with its other client, into the other buffer
    then w's next client, into `slot`

Each worker has one pipe (a socket pair) of its own: a round's messages reach it in the order
they were sent, so a worker always reads a round's vocabulary before that round's clients.
There are no shared queues, and so no named semaphores (a `multiprocessing.Queue` holds three,
which only a finalizer or the resource tracker unlinks: killing the process group, as closing a
terminal does, left 14 in /dev/shm each time) and no feeder threads.  A dead peer is seen at
once: a worker's `recv` ends when the main process dies (kill -9, the OOM killer), and the main
process's when a worker does.

Clients are handed out dynamically, one ahead: a worker holds two, and gets its next as soon
as the delta it reported is consumed (aggregation with secure aggregation takes ~0.2 s a
client, which the worker spends on its other client), so a slow client does not hold up a
whole worker's share; longest first (by the size of the device's history, read with a `stat`, never
opened): the last clients to start are then short ones, so the workers finish together instead
of one idling while the other trains a long history (Graham 1969, "Bounds on Multiprocessing
Timing Anomalies": longest-processing-time-first scheduling).  Each client's generator is
seeded from its task, so results do not depend on which worker ran it or when: each client's
delta is the same bits, and with secure aggregation (an integer sum) the engines agree bit for
bit (tests/test_federation_run.py).  `consume` sees the deltas in the order the workers finish,
so a plain float64 sum (--no-secagg) may differ in a last bit.
"""

from __future__ import annotations

import os
import signal
import threading
import traceback
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import wait
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import Tensor

from federation.client import ClientResult
from federation.config import ClientConfig
from federation.device import Device
from federation.engine_sequential import ClientRunner, ClientTask, Consume
from federation.memory import TRIM_EVERY, release_free_memory
from models import native
from models import params as P
from models.errors import FedkbError
from models.lm import LMConfig, WordLM
from models.vocab import Vocabulary

_STOP = None
WAIT_S = 5.0  # how often the main process, waiting for a report, checks that every worker is alive


def _views(flat: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """Parameter-shaped views into one flat buffer (sorted key order, as params.flatten)."""
    out, i = {}, 0
    for k in sorted(like):
        n = like[k].numel()
        out[k] = flat[i : i + n].view_as(like[k])
        i += n
    return out


def longest_first(tasks: Sequence[ClientTask], devices_root: Path) -> list[ClientTask]:
    """The round's clients in the order the workers take them: the largest history first (its
    size in bytes, a `stat`; a missing device counts 0 and fails in its worker, with its error)."""

    def size(task: ClientTask) -> int:
        try:
            return Device(devices_root, task.real_id).history_file.stat().st_size
        except OSError:
            return 0

    return sorted(tasks, key=size, reverse=True)  # stable: equal sizes keep the round's order


def _ending(exitcode: int) -> str:
    """How a worker process ended, in words: a SIGKILL is what the kernel's OOM killer sends."""
    if exitcode == -signal.SIGKILL:
        return "killed by SIGKILL, the out-of-memory killer's signal"
    if exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}" if -exitcode in signal.valid_signals() else f"signal {-exitcode}"
    return f"exit code {exitcode}; its error, if any, is on stderr"


def _worker(wid, model_cfg, tokenizer_path, devices_root, cfg, params_buf, delta_bufs, conn, use_native):
    """Serve `conn` until the stop (None) or the main process's end (EOF: the worker exits, rather
    than hold its model and users' streams, ~350 MB, for no one).  An error, here as in a client's
    training, is reported on `conn` and ends the worker with exit code 1."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the main process's; ignored from birth too (ParallelEngine)
    try:
        torch.set_num_threads(1)
        if not use_native:
            native.disable()  # the kernels the main process has, so the engines agree bit for bit
        runner = ClientRunner(model_cfg, tokenizer_path, devices_root, cfg)
        like = runner.model.state_dict()
        global_params = _views(params_buf, like)
        outs = [_views(buf, like) for buf in delta_bufs]
        done = 0
        while (msg := conn.recv()) is not _STOP:
            if msg[0] == "round":
                if msg[2] is not None:
                    runner.set_vocab(Vocabulary.from_json(msg[2]))
                release_free_memory()
                continue
            _, task, slot = msg
            res = runner.run(global_params, task, out=outs[slot])  # the delta, written straight into the buffer
            del res.delta
            done += 1
            if done % TRIM_EVERY == 0:
                release_free_memory()  # memory flat within and across rounds (federation/memory.py)
            conn.send(("done", slot, task, res.num_words, res.loss, res.steps, res.seconds))
        return  # the stop
    except (EOFError, BrokenPipeError):  # the main process has gone
        os._exit(0)
    except (FedkbError, OSError) as e:  # the user's device, the tokenizer: the sequential engine's error, word for word
        why = (e.errno, e.strerror, e.filename) if isinstance(e, OSError) and e.strerror else (str(e),)
        report = ("failed", why, isinstance(e, OSError))
    except BaseException:  # report, don't hang the main process
        report = ("crashed", traceback.format_exc())
    try:
        conn.send(report)
    except OSError:
        pass
    os._exit(1)


def _error(w: int, report) -> BaseException:
    """What the main process raises for worker `w`'s ("failed" | "crashed", ...) report."""
    if report[0] == "failed":
        _, why, is_os = report
        return OSError(*why) if is_os else FedkbError(why[0])
    return RuntimeError(f"parallel engine worker {w} failed:\n{report[1]}")


class ParallelEngine:
    name = "parallel"

    def __init__(self, model_cfg: LMConfig, tokenizer_path: Path, devices_root: Path, cfg: ClientConfig, workers: int = 2):
        if workers < 1:
            raise FedkbError(f"the parallel engine needs >= 1 worker (got {workers})")  # with none, a round would wait forever
        ctx = mp.get_context("spawn")
        use_native = native.load() is not None  # compiled here, once, before the workers load the cached build
        like = WordLM(model_cfg).state_dict()
        self.like = {k: v.detach() for k, v in like.items()}
        n = sum(v.numel() for v in like.values())
        self.params_buf = torch.zeros(n).share_memory_()
        self.delta_bufs = [[torch.zeros(n).share_memory_() for _ in range(2)] for _ in range(workers)]
        self.conns, self.procs = [], []
        # A terminal's Ctrl+C reaches the whole process group: the workers, which would each print a
        # KeyboardInterrupt traceback (they import torch for seconds), are born ignoring it (an ignored
        # signal stays ignored across exec; a mask would not do: the resource tracker that the first
        # start spawns unblocks SIGINT), and this process handles it: `run` ends them.
        own = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not None
        sigint = signal.signal(signal.SIGINT, signal.SIG_IGN) if own else None  # only the main thread may set it
        try:
            for w in range(workers):
                mine, theirs = ctx.Pipe()
                p = ctx.Process(target=_worker, daemon=True, args=(w, model_cfg, Path(tokenizer_path), Path(devices_root), cfg,
                                                                   self.params_buf, self.delta_bufs[w], theirs, use_native))
                p.start()
                theirs.close()  # the worker's end lives in the worker only: its death is then an EOF here
                self.conns.append(mine)
                self.procs.append(p)
        finally:
            if own:
                signal.signal(signal.SIGINT, sigint)
        self.root = Path(devices_root)
        self._vocab_key = None
        self._round = 0

    def run(self, global_params: dict[str, Tensor], vocab: Vocabulary, tasks: Sequence[ClientTask], consume: Consume) -> None:
        """Train `tasks`, calling `consume` for each as its worker reports.  Anything raised here (a
        worker's error, a dead worker, an error in `consume`) closes the engine: clients of this round
        may still be training, and no later round could tell their reports from its own."""
        if not self.procs:
            raise FedkbError("the parallel engine is closed")
        try:
            self._run(global_params, vocab, tasks, consume)
        except BaseException:
            self.close(at_once=True)
            raise

    def _run(self, global_params, vocab, tasks, consume) -> None:
        self._check_workers()  # one killed between rounds (the OOM killer) would leave the other to run them alone
        self.params_buf.copy_(P.flatten(global_params))  # the broadcast: workers read this buffer
        key = (vocab.version, len(vocab))
        vocab_json = vocab.to_json() if key != self._vocab_key else None
        self._vocab_key = key
        self._round += 1
        for w in range(len(self.procs)):
            self._send(w, ("round", self._round, vocab_json))
        order = deque(longest_first(tasks, self.root))
        for slot in (0, 1):  # a client for each buffer: one to train now, one to go on with while the first is read
            for w in range(len(self.procs)):
                if order:
                    self._send(w, ("task", order.popleft(), slot))
        for _ in range(len(tasks)):
            w, msg = self._recv()
            if msg[0] != "done":
                raise _error(w, msg)
            _, slot, task, num_words, loss, steps, seconds = msg
            delta = _views(self.delta_bufs[w][slot], self.like)  # no copy: valid until consume returns
            consume(task, ClientResult(delta, num_words, loss, steps, seconds, task.slot))
            if order:  # that buffer is free again: the worker's client after the one it trains now
                self._send(w, ("task", order.popleft(), slot))

    def _send(self, w: int, msg) -> None:
        try:
            self.conns[w].send(msg)
        except OSError:  # BrokenPipeError: the worker has died
            self._check_workers(ending=w)
            raise

    def _recv(self):
        """(worker, its next report); FedkbError where a worker died."""
        while True:
            ready = wait(self.conns, timeout=WAIT_S)
            if not ready:
                self._check_workers()
                continue
            c = ready[0]
            try:
                return self.conns.index(c), c.recv()
            except (EOFError, OSError):  # its end closed: the worker has died
                w = self.conns.index(c)
                self._check_workers(ending=w)
                raise FedkbError(f"parallel engine: worker {w} closed its pipe") from None

    def _check_workers(self, ending: int | None = None) -> None:
        """Where a worker has died: the error it reported before it ended, else a FedkbError saying
        how it ended (`ending`: one whose pipe just closed, given a few seconds to finish dying so
        that its exit code is known)."""
        if ending is not None:
            self.procs[ending].join(timeout=5.0)
        dead = [(i, p.exitcode) for i, p in enumerate(self.procs) if not p.is_alive()]
        for i, _ in dead:
            last = None
            try:
                while self.conns[i].poll(0):  # what it sent before it ended, unread: an error report comes last
                    last = self.conns[i].recv()
            except (EOFError, OSError):  # read to its end
                pass
            if last is not None and last[0] != "done":
                raise _error(i, last)
        if dead:
            how = ", ".join(f"{i}: {_ending(code)}" for i, code in dead)
            raise FedkbError(f"parallel engine: worker(s) {[i for i, _ in dead]} died ({how})")

    def close(self, at_once: bool = False) -> None:
        """End the workers: each exits at the stop, once it has done the clients it was sent (between
        rounds, none; one still at it 5 s on is killed); `at_once` (a round that failed or was
        interrupted: their work is not wanted, and they ignore Ctrl+C) kills them without waiting."""
        for c, p in zip(self.conns, self.procs):
            if p.is_alive() and not at_once:
                try:
                    c.send(_STOP)
                except OSError:
                    pass
        for p in self.procs:
            if not at_once:
                p.join(timeout=5)
            if p.is_alive():
                p.kill()  # SIGKILL: a worker writes no file, and a stopped one (SIGSTOP) would not heed SIGTERM
                p.join(timeout=5)
        for c in self.conns:
            c.close()
        self.conns, self.procs = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_engine(name: str, model_cfg: LMConfig, tokenizer_path: Path, devices_root: Path, cfg: ClientConfig, workers: int = 2):
    from federation.engine_sequential import SequentialEngine

    if name == "sequential":
        return SequentialEngine(model_cfg, tokenizer_path, devices_root, cfg)
    if name == "parallel":
        return ParallelEngine(model_cfg, tokenizer_path, devices_root, cfg, workers)
    raise FedkbError(f"unknown engine {name!r} (sequential or parallel)")
