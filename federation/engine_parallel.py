"""The parallel engine: persistent worker processes, one torch thread each.

    main                                    worker w (started once, spawn)
    ----                                    --------
    params -> shared flat buffer  ------->  reads the global model from it (no copy, no pickle)
    control[w] <- (round, vocab if new)     loads model, tokenizer, user streams once, keeps them
    tasks <- ClientTask x K, then W stops   takes tasks until a stop: trains, writes its delta
    results -> consume(task, delta) <-----  straight into one of ITS two shared delta buffers,
    ack[w].release() once consume returns   reports, and goes on; waits only to reuse a buffer
                                            whose delta is not yet consumed

Clients are handed out dynamically (a shared queue), so a slow client does not hold up
a whole worker's share, longest first (by the size of the device's history, read with a
`stat`, never opened): the last clients to start are then short ones, so the workers finish
together instead of one idling while the other trains a long history (Graham 1969, "Bounds
on Multiprocessing Timing Anomalies": longest-processing-time-first scheduling).  Each
client's generator is seeded from its task, so results do not depend on which worker ran
it or when: each client's delta is the same bits, and with secure aggregation (an integer
sum) the engines agree bit for bit (tests/test_federation_run.py).  `consume` sees the deltas
in the order the workers finish, so a plain float64 sum (--no-secagg) may differ in a last bit.
"""

from __future__ import annotations

import os
import queue as queue_mod
import signal
import traceback
from collections.abc import Sequence
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


ORPHAN_CHECK_S = 2.0  # how often an idle worker checks that the main process is still there


def _wait(get):
    """`get(timeout)` until it answers; exit if the main process has died (kill -9, the OOM killer),
    checked while waiting and before what it answered is used: with nobody to report to, the
    worker would otherwise wait forever, holding its model and users' streams (~350 MB),
    or first train the round's queued clients for no one."""
    parent = mp.parent_process()
    while True:
        try:
            got = get(ORPHAN_CHECK_S)
        except queue_mod.Empty:
            got = queue_mod.Empty
        if parent is not None and not parent.is_alive():
            os._exit(0)
        if got is not queue_mod.Empty:
            return got


def _acquire(sem):
    def get(timeout):
        if not sem.acquire(timeout=timeout):
            raise queue_mod.Empty
    return _wait(get)


def _worker(wid, model_cfg, tokenizer_path, devices_root, cfg, params_buf, delta_bufs, control, tasks, results, ack, use_native):
    torch.set_num_threads(1)
    if not use_native:
        native.disable()  # the kernels the main process has, so the engines agree bit for bit
    try:
        runner = ClientRunner(model_cfg, tokenizer_path, devices_root, cfg)
        like = runner.model.state_dict()
        global_params = _views(params_buf, like)
        outs = [_views(buf, like) for buf in delta_bufs]
        while True:
            msg = _wait(lambda t: control.get(timeout=t))
            if msg is _STOP:
                return
            _round, vocab_json = msg
            if vocab_json is not None:
                runner.set_vocab(Vocabulary.from_json(vocab_json))
            done = 0
            while True:
                task = _wait(lambda t: tasks.get(timeout=t))
                if task is _STOP:
                    release_free_memory()
                    break
                slot = done % len(outs)  # double buffering: the main process reads one while this trains
                _acquire(ack)  # a free buffer (released in the order they were filled, so this one)
                res = runner.run(global_params, task, out=outs[slot])  # the delta, written straight into it
                del res.delta
                done += 1
                if done % TRIM_EVERY == 0:
                    release_free_memory()  # memory flat within and across rounds (federation/memory.py)
                results.put((wid, slot, task, res.num_words, res.loss, res.steps, res.seconds, None))
    except BaseException:  # report, don't hang the main process
        results.put((wid, 0, None, 0, 0.0, 0, 0.0, traceback.format_exc()))


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
        self.tasks = ctx.Queue()
        self.results = ctx.Queue()
        self.controls = [ctx.Queue() for _ in range(workers)]
        self.acks = [ctx.Semaphore(2) for _ in range(workers)]  # free delta buffers per worker
        self.procs = [ctx.Process(target=_worker, daemon=True,
                                  args=(w, model_cfg, Path(tokenizer_path), Path(devices_root), cfg, self.params_buf,
                                        self.delta_bufs[w], self.controls[w], self.tasks, self.results, self.acks[w], use_native))
                      for w in range(workers)]
        for p in self.procs:
            p.start()
        self.root = Path(devices_root)
        self._vocab_key = None
        self._round = 0

    def run(self, global_params: dict[str, Tensor], vocab: Vocabulary, tasks: Sequence[ClientTask], consume: Consume) -> None:
        self._check_workers()  # one killed between rounds (the OOM killer) would leave the other to run them alone
        self.params_buf.copy_(P.flatten(global_params))  # the broadcast: workers read this buffer
        key = (vocab.version, len(vocab))
        vocab_json = vocab.to_json() if key != self._vocab_key else None
        self._vocab_key = key
        self._round += 1
        for c in self.controls:
            c.put((self._round, vocab_json))
        for t in longest_first(tasks, self.root):
            self.tasks.put(t)
        for _ in self.procs:
            self.tasks.put(_STOP)
        for _ in range(len(tasks)):
            wid, slot, task, num_words, loss, steps, seconds, err = self._get()
            if err is not None:
                self.close()
                raise RuntimeError(f"parallel engine worker {wid} failed:\n{err}")
            delta = _views(self.delta_bufs[wid][slot], self.like)  # no copy: valid until consume returns
            try:
                consume(task, ClientResult(delta, num_words, loss, steps, seconds, task.slot))
            finally:
                self.acks[wid].release()  # the worker may reuse the buffer now

    def _get(self):
        while True:
            try:
                return self.results.get(timeout=5.0)
            except queue_mod.Empty:
                self._check_workers()

    def _check_workers(self) -> None:
        dead = [(i, p.exitcode) for i, p in enumerate(self.procs) if not p.is_alive()]
        if dead:
            self.close()
            how = ", ".join(f"{i}: {_ending(code)}" for i, code in dead)
            raise FedkbError(f"parallel engine: worker(s) {[i for i, _ in dead]} died ({how})")

    def close(self) -> None:
        for q in (*self.controls, self.tasks, self.results):
            q.cancel_join_thread()  # at exit, never wait to flush a message into a dead worker's full pipe
        for c, p in zip(self.controls, self.procs):
            if p.is_alive():
                c.put(_STOP)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
        if self.procs and all(p.exitcode == 0 for p in self.procs):
            self._end_feeders()
        self.procs = []

    def _end_feeders(self) -> None:
        """End each queue's feeder thread now, once every worker has read its last message.

        A feeder thread holds the queue's write lock and semaphore; left running, it drops them
        when the queue is garbage collected, and their finalizer (unlink the named semaphore, then
        tell multiprocessing's resource tracker) then runs in that daemon thread. A process
        exiting at that moment stopped it between the two, and the tracker warned of a "leaked
        semaphore" it could not find (about one `fedkb simulate --engine parallel` in five). Joined
        here, the locks outlive their thread and are finalized in the main thread.  Not after a
        worker died: a feeder may be blocked on its full pipe, and the exit must not wait on it."""
        for q in (*self.controls, self.tasks, self.results):
            q.close()  # hands the feeder thread its sentinel
            feeder = getattr(q, "_thread", None)  # CPython's Queue keeps it here; None if nothing was ever put
            if feeder is not None:
                feeder.join(timeout=5)

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
