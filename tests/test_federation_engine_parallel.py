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


ORDER_SCRIPT = SETUP.replace("    engine = ParallelEngine", """    import threading
    import multiprocessing.synchronize as mps
    made = []
    init = mps.SemLock.__init__
    mps.SemLock.__init__ = lambda self, *a, **k: (made.append(1), init(self, *a, **k))[1]
    engine = ParallelEngine""") + textwrap.indent(textwrap.dedent('''
    import torch
    from federation.engine_sequential import SequentialEngine

    def keep(into):
        return lambda t, r: into.__setitem__(t.slot, {k: v.clone() for k, v in r.delta.items()})

    grown = ck.vocab.add(["zorble", "lol", "ok"])
    with SequentialEngine(ck.model.cfg, tok.path, pop.root, ClientConfig()) as seq:
        ref = {}
        seq.run(ck.model.state_dict(), grown, tasks, keep(ref))
    differ = 0
    for _ in range(3):
        engine.run(ck.model.state_dict(), ck.vocab, [], lambda t, r: None)  # a round without clients
        got = {}
        engine.run(ck.model.state_dict(), grown, tasks, keep(got))
        differ += any(not torch.equal(ref[s][k], got[s][k]) for s in ref for k in ref[s])
        engine.run(ck.model.state_dict(), ck.vocab, tasks, lambda t, r: None)
    engine.close()
    print("rounds unlike the sequential engine's:", differ)
    print("named semaphores made:", len(made))
    print("threads after close:", threading.active_count())
'''), "    ")


def test_each_round_is_trained_with_its_own_vocabulary_and_no_semaphore_is_made(tiny, tmp_path):
    """A round right after one without clients (which waits for no worker) is trained with its own
    vocabulary by both workers: with one shared task queue, a worker could take the next round's
    client before reading that round's vocabulary (3 rounds in 4 unlike the sequential engine's).
    And the engine makes no named semaphore (a multiprocessing.Queue makes three, left in /dev/shm
    when the process group is killed, as closing a terminal does) and leaves no thread behind."""
    r = _run(ORDER_SCRIPT, tiny, tmp_path)
    assert "rounds unlike the sequential engine's: 0" in r.stdout, r.stdout
    assert "named semaphores made: 0" in r.stdout and "threads after close: 1" in r.stdout, r.stdout
    assert "leaked" not in r.stderr


FAIL_SCRIPT = SETUP.replace("    engine = ParallelEngine", """    import shutil
    h = pop.root / pop.real_id(2) / "history.jsonl"
    h.unlink()
    h.mkdir()  # a device whose history cannot be read
    engine = ParallelEngine""").replace(
    "    engine.run(ck.model.state_dict(), ck.vocab, tasks, lambda t, r: None)  # the workers now wait for a round", "") + textwrap.indent(textwrap.dedent('''
    from federation.engine_sequential import SequentialEngine

    for eng in (SequentialEngine(ck.model.cfg, tok.path, pop.root, ClientConfig()), engine):
        try:
            eng.run(ck.model.state_dict(), ck.vocab, tasks, lambda t, r: None)
        except (OSError, FedkbError) as e:  # FedkbError: atomic.read_jsonl names the file it cannot read
            print(type(eng).__name__, "RAISED", type(e).__name__, e)
        eng.close()
    print("alive after the error:", sum(p.is_alive() for p in engine.procs))
'''), "    ")


def test_a_clients_error_in_a_worker_is_the_sequential_engines_error(tiny, tmp_path):
    """A device the client cannot read raises in the main process what the sequential engine raises
    (the CLI prints it as one line), not a RuntimeError with the worker's traceback, and the engine
    is closed."""
    r = _run(FAIL_SCRIPT, tiny, tmp_path)
    lines = [l.split(" ", 1)[1] for l in r.stdout.splitlines() if "RAISED" in l]
    assert len(lines) == 2 and lines[0] == lines[1] and "Is a directory" in lines[0], r.stdout
    assert "alive after the error: 0" in r.stdout


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
                         stderr=subprocess.DEVNULL)
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


def _sets_sigint(pid: int) -> bool:
    """Whether process `pid` has set what SIGINT does, a handler or ignore (a worker's Python is up)."""
    import signal

    with open(f"/proc/{pid}/status") as f:
        masks = [int(l.split(":")[1], 16) for l in f if l.startswith(("SigIgn:", "SigCgt:"))]
    return any(m >> (signal.SIGINT - 1) & 1 for m in masks)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, exited but not yet reaped by init, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


START_SCRIPT = textwrap.dedent('''
    import sys
    from pathlib import Path

    import federation.engine_parallel as ep
    from federation.config import ClientConfig
    from federation.engine_sequential import ClientRunner, ClientTask, SequentialEngine
    from federation.sampling import build_population
    from models.checkpoint import load_model
    from models.datasets import load_users
    from models.errors import FedkbError


    def runner(model_cfg, tokenizer_path, *args):  # this module is the workers' __mp_main__ too
        if tokenizer_path.name == "oom.model":
            raise MemoryError("out of memory (a test)")
        return ClientRunner(model_cfg, tokenizer_path, *args)


    ep.ClientRunner = runner

    if __name__ == "__main__":
        model, tokenizer, users, root = map(Path, sys.argv[1:5])
        ck, tok = load_model(model, tokenizer)
        pop = build_population(root, load_users(users), 6)
        tasks = [ClientTask(i, i, pop.real_id(i), 100 + i) for i in range(4)]
        gone = root.parent / "gone.model"  # no tokenizer there: each worker fails as it starts
        try:
            SequentialEngine(ck.model.cfg, gone, pop.root, ClientConfig())
        except FedkbError as e:
            print("sequential:", e)
        for tokenizer, workers, wait in ((gone, 1, False), (gone, 2, True), (root.parent / "oom.model", 1, True)):
            engine = ep.ParallelEngine(ck.model.cfg, tokenizer, pop.root, ClientConfig(), workers=workers)
            if wait:  # the round starts after the workers have ended: their reports wait in their pipes
                for p in engine.procs:
                    p.join()
                print("exit codes:", [p.exitcode for p in engine.procs])
            try:
                engine.run(ck.model.state_dict(), ck.vocab, tasks, lambda t, r: None)
            except (FedkbError, RuntimeError) as e:
                print("parallel" + (", after the workers ended" if wait else "") + ":", type(e).__name__, e)
''')


def test_a_workers_error_as_it_starts_is_raised_as_a_clients_error_is(tiny, tmp_path):
    """An error in a worker outside a client's training (here its start-up: no tokenizer) reaches
    the main process as a client's does: a FedkbError is the sequential engine's one line (it was a
    RuntimeError with the worker's traceback), anything else a RuntimeError naming the worker and
    the error.  A worker that has ended by the time the round starts is no exception: its report
    is read from its pipe (it was lost: "died (exit code 0 ...)"), and its exit code is 1."""
    r = _run(START_SCRIPT, tiny, tmp_path)
    seq = r.stdout.split("sequential: ", 1)[1].splitlines()[0]
    assert seq.startswith("cannot read tokenizer ") and seq.endswith("gone.model: No such file or directory; run `fedkb prepare`")
    assert f"parallel: FedkbError {seq}\n" in r.stdout, r.stdout
    assert f"exit codes: [1, 1]\nparallel, after the workers ended: FedkbError {seq}\n" in r.stdout, r.stdout
    crash = r.stdout.split("exit codes: [1]\nparallel, after the workers ended: RuntimeError ", 1)[1]
    assert crash.startswith("parallel engine worker 0 failed:\nTraceback") and "MemoryError: out of memory (a test)" in crash


INTERRUPT_SCRIPT = SETUP.replace(
    "    engine.run(ck.model.state_dict(), ck.vocab, tasks, lambda t, r: None)  # the workers now wait for a round",
    "") + textwrap.indent(textwrap.dedent('''
    try:  # entered before the line goes out: the test's ctrl-c may come while print returns
        print(" ".join(str(p.pid) for p in engine.procs), flush=True)  # the test's ctrl-c comes now: the workers import torch
        engine.run(ck.model.state_dict(), ck.vocab, tasks, lambda t, r: None)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    finally:
        engine.close()
'''), "    ")


def test_ctrl_c_while_the_workers_start_is_one_line(tiny, tmp_path):
    """A terminal's ctrl-c goes to the whole process group.  While the workers start (seconds of
    importing torch), each printed a KeyboardInterrupt traceback, ~80 lines in all; they are born
    ignoring it now, and the main process, which handles it, ends them."""
    import signal
    import time

    p = subprocess.Popen(_args(INTERRUPT_SCRIPT, tiny, tmp_path), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        workers = [int(x) for x in p.stdout.readline().split()]
        while not all(_sets_sigint(w) for w in workers):  # before, ctrl-c ends a worker in silence
            time.sleep(0.01)
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert out == "interrupted\n" and "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert len(workers) == 2 and not any(_alive(w) for w in workers)


STOPPED_SCRIPT = SETUP + textwrap.indent(textwrap.dedent('''
    import threading
    pids = [p.pid for p in engine.procs]
    os.kill(pids[0], signal.SIGSTOP)  # alive, and silent from now on
    threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGINT)).start()  # the user's ctrl-c on the waiting round
    t0 = time.time()
    try:
        engine.run(ck.model.state_dict(), ck.vocab, tasks, lambda t, r: None)
    except KeyboardInterrupt:
        print(f"closed {time.time() - t0 - 2:.1f} s after ctrl-c")
    left = [p for p in pids if os.path.exists(f"/proc/{p}")]
    for p in left:
        os.kill(p, signal.SIGKILL)
    print("workers left:", left)
'''), "    ")


def test_ctrl_c_with_a_stopped_worker_ends_it_at_once(tiny, tmp_path):
    """A worker that is alive but silent (here stopped, SIGSTOP) holds up its round, and only ctrl-c
    ends the wait (a time limit could fire on a slow machine).  An interrupted round kills the
    workers at once: closing waited 5 s for each to read its stop, 5 more after a SIGTERM, which a
    stopped process does not heed, and then left it behind."""
    r = _run(STOPPED_SCRIPT, tiny, tmp_path)
    assert "workers left: []" in r.stdout, r.stdout
    assert float(r.stdout.split("closed ", 1)[1].split()[0]) < 4, r.stdout
