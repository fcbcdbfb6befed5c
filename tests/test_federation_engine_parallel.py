"""federation.engine_parallel: a worker that dies is an error, never a hang."""

import os
import subprocess
import sys
import textwrap

from tests.conftest import FIXTURES, REPO

SETUP = textwrap.dedent('''
    import os, signal, sys, time
    from pathlib import Path

    from federation.config import ClientConfig
    from federation.engine_parallel import ParallelEngine
    from federation.engine_sequential import ClientTask
    from federation.sampling import build_population
    from models.checkpoint import load_model
    from models.datasets import load_users
    from models.errors import FedkbError

    if __name__ == "__main__":
        model, tokenizer, users, root = map(Path, sys.argv[1:5])
        ck, tok = load_model(model, tokenizer)
        pop = build_population(root, load_users(users), 6)
        tasks = [ClientTask(i, i, pop.real_id(i), 100 + i) for i in range(4)]
        engine = ParallelEngine(ck.model.cfg, tok.path, pop.root, ClientConfig(), workers=2)
        engine.run(ck.model.state_dict(), ck.vocab, tasks, lambda t, r: None)  # the workers now wait for a round
''')

SCRIPT = SETUP + textwrap.indent(textwrap.dedent('''
    os.kill(engine.procs[0].pid, signal.SIGKILL)  # the OOM killer, between two rounds
    engine.procs[0].join()
    bigger = ck.vocab.add([f"zorble{i}" for i in range(6000)])  # a new vocabulary: a message larger than a pipe holds
    try:
        engine.run(ck.model.state_dict(), bigger, tasks, lambda t, r: None)
    except FedkbError as e:
        print("error:", e)
'''), "    ")


def _args(script: str, tiny, tmp_path) -> list[str]:
    """The command line that runs `script` (SETUP and more) on the tiny model and the fixture users."""
    path = tmp_path / "script.py"
    path.write_text(script)
    model, tok = tiny
    return [sys.executable, str(path), str(model), str(tok), str(FIXTURES / "users.jsonl.gz"), str(tmp_path / "devices")]


ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _run(script: str, tiny, tmp_path) -> subprocess.CompletedProcess:
    r = subprocess.run(_args(script, tiny, tmp_path), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    return r


def test_a_worker_killed_between_rounds_is_an_error_and_the_process_exits(tiny, tmp_path):
    """The next round raises at once, saying how the worker ended (the other worker would
    otherwise run it alone, silently at half speed), and the process exits: no queue's feeder
    thread is left waiting at exit to write the new vocabulary into the dead worker's full pipe
    (the process used to hang there)."""
    r = _run(SCRIPT, tiny, tmp_path)
    assert "error: parallel engine: worker(s) [0] died (0: killed by SIGKILL, the out-of-memory killer's signal)" in r.stdout


def test_how_a_worker_ended_is_said_in_words():
    from federation.engine_parallel import _ending

    assert _ending(-9) == "killed by SIGKILL, the out-of-memory killer's signal"
    assert _ending(-15) == "killed by SIGTERM"
    assert _ending(1) == "exit code 1; its error, if any, is on stderr"


CLOSE_SCRIPT = SETUP + textwrap.indent(textwrap.dedent('''
    import threading
    engine.close()
    print("feeders after close:", sum(t.name == "QueueFeederThread" for t in threading.enumerate() if t.is_alive()))
'''), "    ")


def test_closing_the_engine_ends_its_queue_threads(tiny, tmp_path):
    """After a clean close no queue feeder thread is left: one left running finalized the queue's
    named semaphores itself when the queue was freed, and a process exiting then cut it off
    half-way, so multiprocessing's resource tracker warned of a leaked semaphore (about one
    parallel `fedkb simulate` in five)."""
    r = _run(CLOSE_SCRIPT, tiny, tmp_path)
    assert "feeders after close: 0" in r.stdout, r.stdout
    assert "leaked" not in r.stderr


ORPHAN_SCRIPT = SETUP + textwrap.indent(textwrap.dedent('''
    print(" ".join(str(p.pid) for p in engine.procs), flush=True)
    time.sleep(600)  # killed here
'''), "    ")


def test_workers_exit_when_the_main_process_is_killed(tiny, tmp_path):
    """kill -9 of the main process (between rounds: the workers wait on their queues) leaves no
    worker behind; each held its model and users' streams (~350 MB on the real data) forever."""
    import signal
    import time

    p = subprocess.Popen(_args(ORPHAN_SCRIPT, tiny, tmp_path), cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True,
                         stderr=subprocess.DEVNULL)  # its resource tracker, outliving it, warns of the semaphores a kill -9 leaves
    try:
        workers = [int(x) for x in p.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(w) for w in workers)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    deadline = time.time() + 30
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, exited but not yet reaped by init, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
