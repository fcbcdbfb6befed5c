"""The live federation screen, driven through Textual's pilot on the tiny model."""

import asyncio
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from textual.app import App

from keyboard.screens.federation import FederationScreen
from tests.conftest import FIXTURES, REPO


def sync(fn):
    """Run an async test with asyncio (no pytest-asyncio here); fixtures pass through."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return wrapper


def host(screen, finished: list, new_globals: list | None = None) -> App:
    """An app that shows `screen` and records its Finished (rounds, error) and NewGlobal (round, checkpoint)."""

    class Host(App):
        def on_mount(self):
            self.push_screen(screen)

        def on_federation_screen_new_global(self, msg):
            if new_globals is not None:
                new_globals.append((msg.round, msg.checkpoint_dir))

        def on_federation_screen_finished(self, msg):
            finished.append((msg.rounds, msg.error))

    return Host()


async def until(cond, seconds: float = 60.0) -> None:
    for _ in range(int(seconds / 0.1)):
        if cond():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("timed out")


def log_text(screen) -> str:
    """The log's words, one space apart (its lines are wrapped to the screen)."""
    return " ".join(" ".join(line.text for line in screen.query_one("#fed-log").lines).split())


@sync
async def test_federation_screen_runs_rounds_and_announces_globals(tiny, tmp_path):
    """Each round's global model is offered to the keyboard; the run's last line says which round's
    model the keyboard types with: being made ready until it answers, then the one it could use."""
    from federation.config import SimulationConfig

    seen, answers, finished, new_globals = [], [], [], []

    def keyboard(ckpt, done):  # takes round 1's model at once; answers for round 2 when the test says
        seen.append(ckpt)
        done(None) if ckpt.name == "round-0001" else answers.append(done)

    sim = SimulationConfig(rounds=2, clients_per_round=3, eval_users=3)
    screen = FederationScreen(tiny[0], tiny[1], FIXTURES / "users.jsonl.gz", tmp_path / "run", sim=sim,
                              on_new_global=keyboard)
    async with host(screen, finished, new_globals).run_test() as pilot:
        await until(lambda: finished)
        await pilot.pause()
        assert finished == [(2, None)]
        assert [r for r, _ in new_globals] == [1, 2]
        assert seen == [tmp_path / "run" / "checkpoints" / "round-0001", tmp_path / "run" / "checkpoints" / "round-0002"]
        assert all((d / "model.safetensors").exists() for d in seen[-1:])
        assert len(screen.top1) == 2 and screen.query_one("#fed-top1").data == screen.top1
        assert "finished 2 rounds; round 2's global model is being made ready for typing" in log_text(screen)
        assert "in use" not in log_text(screen) and screen.model_round == 1
        answers[-1]("the device's words file is corrupt")  # the keyboard could not swap it in
        await pilot.pause()
        assert log_text(screen).endswith("finished 2 rounds; round 2's global model is being made ready for typing "
                                         "round 2's global model cannot be used (the device's words file is corrupt); "
                                         "the keyboard types with round 1's global model")


@sync
async def test_a_run_with_no_new_round_says_no_model_came(tiny, tmp_path):
    """Resuming a run that has all its rounds sends no model: the last line says so rather than that
    the latest global model is in use."""
    from federation.config import SimulationConfig
    from federation.run import Simulation

    sim = SimulationConfig(rounds=1, clients_per_round=3, eval_users=3)
    Simulation(tmp_path / "run", sim, tiny[0], tiny[1], FIXTURES / "users.jsonl.gz").run()
    seen, finished = [], []
    screen = FederationScreen(tiny[0], tiny[1], FIXTURES / "users.jsonl.gz", tmp_path / "run", sim=sim, resume=True,
                              on_new_global=lambda ckpt, done: seen.append(ckpt))
    async with host(screen, finished).run_test() as pilot:
        await until(lambda: finished)
        await pilot.pause()
        assert finished == [(1, None)] and seen == []
        assert ("finished 1 rounds; no new global model came: the keyboard types with the model it had"
                in log_text(screen))


@sync
async def test_the_app_says_whether_it_types_with_a_new_global_model(tiny, tmp_path):
    """`FedkbApp.use_global`'s `done`: None once the model is typed with, why where it cannot be used."""
    from keyboard.app import FedkbApp

    answers = []
    app = FedkbApp(tiny[0], tiny[1], devices_root=tmp_path / "devices", users_file=FIXTURES / "users.jsonl.gz",
                   cursor_blink=False, extra_screens=False)
    async with app.run_test() as pilot:
        app.use_global(tmp_path / "gone", answers.append)
        await app.workers.wait_for_complete()
        await pilot.pause()
        app.use_global(tiny[0], answers.append)
        await app.workers.wait_for_complete()
        await pilot.pause()
    assert len(answers) == 2 and "gone" in answers[0] and answers[1] is None


@sync
async def test_federation_screen_says_what_resuming_skipped(tiny, tmp_path):
    """A damaged last checkpoint: the screen resumes from the one before and says so in its log."""
    from textual.widgets import RichLog

    from federation.config import SimulationConfig
    from federation.run import Simulation

    sim = SimulationConfig(rounds=2, clients_per_round=3, eval_users=3)
    Simulation(tmp_path / "run", sim, tiny[0], tiny[1], FIXTURES / "users.jsonl.gz").run()
    weights = tmp_path / "run" / "checkpoints" / "round-0002" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-3] ^= 0x01
    weights.write_bytes(bytes(blob))
    finished = []
    screen = FederationScreen(tiny[0], tiny[1], FIXTURES / "users.jsonl.gz", tmp_path / "run",
                              sim=SimulationConfig(rounds=3, clients_per_round=3, eval_users=3), resume=True)
    async with host(screen, finished).run_test() as pilot:
        await until(lambda: finished)
        await pilot.pause()
        assert finished == [(3, None)]
        log = "\n".join(line.text for line in screen.query_one(RichLog).lines)
        assert "skipped the checkpoint of round 2" in log and "damaged" in log
        assert "resuming from round 1; round 2 runs again" in log


@sync
async def test_stop_ends_the_rounds_process_and_the_run_resumes(tiny, tmp_path):
    """`s` ends the rounds' process at once: the screen says so, the run folder is unlocked,
    and every round it finished is committed, so `--resume` goes on from the last one."""
    from federation.config import SimulationConfig
    from federation.run import Simulation, holds_run, latest_round, lock_run

    finished = []
    sim = SimulationConfig(rounds=200, clients_per_round=3, eval_users=3)
    screen = FederationScreen(tiny[0], tiny[1], FIXTURES / "users.jsonl.gz", tmp_path / "run", sim=sim)
    async with host(screen, finished).run_test() as pilot:
        await until(lambda: screen.rounds_done >= 2)
        await pilot.press("s")
        await until(lambda: finished)
        await pilot.pause()
        assert finished and finished[0][1] == "federation stopped" and not screen.running
        assert screen._job._proc.poll() == 128 + 15  # SIGTERM became SystemExit: the engine closed, the lock dropped
        assert "stopping: the round under way is dropped" in "\n".join(line.text for line in screen.query_one("#fed-log").lines)
    done = latest_round(tmp_path / "run")
    assert 2 <= done < 200 and holds_run(tmp_path / "run") and finished[0][0] == screen.rounds_done == done
    assert not list((tmp_path / "run").rglob("*.tmp"))  # the dropped round left no temporary file
    fd, why = lock_run(tmp_path / "run")
    assert fd is not None and why is None
    os.close(fd)
    s = Simulation(tmp_path / "run", SimulationConfig(rounds=done + 1, clients_per_round=3, eval_users=3),
                   resume=True)
    s.run()
    assert s.round == done + 1


@sync
async def test_rounds_committed_before_a_stop_are_still_shown(tiny, tmp_path):
    """A round the process committed while the screen was still busy with the one before (its line in
    the pipe) is shown after `s` too, its model offered, and the run stops at the round the folder holds."""
    import time

    from federation.config import SimulationConfig
    from federation.run import checkpoint_dir, latest_round

    finished, new_globals, seen = [], [], []

    def keyboard(ckpt, done):  # busy with round 1's model until round 2 is committed, then stops the rounds
        seen.append(ckpt)
        if len(seen) == 1:
            for _ in range(600):
                if (latest_round(tmp_path / "run") or 0) >= 2:
                    break
                time.sleep(0.1)
            screen.action_stop()
        done(None)

    sim = SimulationConfig(rounds=200, clients_per_round=3, eval_users=3)
    screen = FederationScreen(tiny[0], tiny[1], FIXTURES / "users.jsonl.gz", tmp_path / "run", sim=sim,
                              on_new_global=keyboard)
    async with host(screen, finished, new_globals).run_test() as pilot:
        await until(lambda: finished)
        await pilot.pause()
        done = latest_round(tmp_path / "run")
        assert done >= 2 and finished == [(done, "federation stopped")] and screen.rounds_done == done
        assert [r for r, _ in new_globals] == list(range(1, done + 1)) and len(screen.top1) == done
        assert seen == [checkpoint_dir(tmp_path / "run", r) for r in range(1, done + 1)]
        assert f"stopped after {done} rounds" in str(screen.query_one("#fed-status").render())
        assert log_text(screen).endswith(f"stopped: federation stopped; the keyboard types with round {done}'s global model")


def test_a_bad_spec_is_one_json_error_line(capsys):
    from keyboard import federator

    assert federator.main(["[]"]) == 2
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert json.loads(line)["error"].startswith("usage: python -m keyboard.federator SPEC_JSON")


def test_the_processs_error_comes_back_as_one_line(tiny, tmp_path):
    """A user error in the rounds' process (here: its users file is gone) is the job's error, no traceback."""
    from federation.config import SimulationConfig
    from keyboard.federator import FederatorProcess, spec
    from models.errors import FedkbError

    p = FederatorProcess(spec(tmp_path / "run", SimulationConfig(rounds=1, clients_per_round=2), tiny[0], tiny[1],
                              tmp_path / "gone.jsonl.gz", False))
    with pytest.raises(FedkbError, match="gone.jsonl.gz") as e:
        p.run(on_note=print, on_round=lambda m, c: None)
    assert "Traceback" not in str(e.value)


def test_the_forms_settings_are_fedkb_simulates():
    """The live run's form takes `fedkb simulate`'s flags: the same config as the command builds from them
    (but EVAL_USERS held-out users), and a setting it refuses is one clear error."""
    import argparse

    from keyboard.commands.simulate import add_arguments, build_config
    from keyboard.screens.federation import EVAL_USERS, MAX_ROUNDS, live_config
    from models.errors import FedkbError

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = ["--rounds", "3", "-k", "4", "--server-opt", "fedadam", "--dp", "1.5", "--clip", "0.5", "--engine", "parallel",
             "--eval-users", str(EVAL_USERS)]
    assert live_config(" 3", "4 ", "fedadam", "1.5", "0.5", "parallel") == (build_config(parser.parse_args(flags)), None)
    assert live_config("3", "4", noise="", clip="")[0].privacy.clip is None
    assert live_config(str(MAX_ROUNDS), "4")[0].rounds == MAX_ROUNDS == 10_000
    assert live_config("3", "4", discover=True, theta="5")[1] == 5 and live_config("3", "4", theta="0")[1] is None
    for form, message in [(("0", "4"), "--rounds must be >= 1"), (("three", "4"), "--rounds: 'three' is not a whole number"),
                          (("10001", "4"), "--rounds must be at most 10,000 here"),
                          (("9" * 30, "4"), "--rounds must be at most 10,000 here"),
                          (("3", "0"), "clients-per-round >= 1"), (("3", "4", "fedavg", "1", ""), "needs a clip norm"),
                          (("3", "4", "fedavg", "nan", "1"), "--dp: 'nan' is not a finite number"),
                          (("3", "4", "fedavg", "0", "-1"), "clip must be > 0"),
                          (("3", "4", "fedavg", "0", "", "sequential", True, "0"), "--theta .* must be >= 1")]:
        with pytest.raises(FedkbError, match=message):
            live_config(*form)


@sync
async def test_the_form_starts_the_run_it_describes(tiny, tmp_path):
    """Without settings the screen asks for them first: a setting that cannot be used is said under the
    form and starts nothing; enter starts the run the form describes."""
    from textual.widgets import Input, Select

    finished = []
    screen = FederationScreen(tiny[0], tiny[1], FIXTURES / "users.jsonl.gz", tmp_path / "run")
    async with host(screen, finished).run_test() as pilot:
        await pilot.pause()
        assert screen._job is None and not screen.running and isinstance(screen.focused, Input)
        screen.query_one("#fed-rounds", Input).value = "2"
        screen.query_one("#fed-clients", Input).value = "3"
        screen.query_one("#fed-server-opt", Select).value = "fedavgm"
        screen.query_one("#fed-dp", Input).value = "0.5"
        await pilot.press("enter")
        await pilot.pause()
        assert "needs a clip norm" in str(screen.query_one("#fed-setup-error").render()) and screen._job is None
        screen.query_one("#fed-clip", Input).value = "2"
        await pilot.press("enter")
        await until(lambda: finished)
        await pilot.pause()
        assert finished == [(2, None)] and screen.ended and not screen.query("#fed-setup")
        status = str(screen.query_one("#fed-status").render())
        assert "2 rounds x 3 clients, fedavgm, DP noise 0.5, clip 2" in status
    config = json.loads((tmp_path / "run" / "config.json").read_text())["simulation"]
    assert (config["rounds"], config["clients_per_round"], config["server"]["optimizer"]) == (2, 3, "fedavgm")
    assert (config["privacy"]["noise_multiplier"], config["privacy"]["clip"]) == (0.5, 2.0)
    assert not (tmp_path / "run" / "vocab.jsonl").exists()  # no discovery unless asked for


@sync
async def test_the_live_run_discovers_words_when_asked(tiny, tmp_path):
    """With discovery on, the rounds' process runs TrieHH each round at the form's threshold and writes
    the run's vocabulary history (what f7 shows); the global models it announces carry the grown
    vocabulary, and the log names the words each round added."""
    from textual.widgets import Checkbox, Input

    from federation import vocab_history
    from models.modelfile import read_model
    from models.tokenizer import Tokenizer

    import gzip

    # 30 users (10 held out) whose most typed new word is "yeet", one the tiny model's 800 words lack
    fixture = [json.loads(line) for line in gzip.open(FIXTURES / "users.jsonl.gz", "rt")]
    with gzip.open(tmp_path / "users.jsonl.gz", "wt") as f:
        for i in range(30):
            u = fixture[i % len(fixture)]
            f.write(json.dumps({"id": f"y{i:03d}", "history": u["history"] + ["yeet it"] * 40, "future": u["future"]}) + "\n")
    finished, new_globals = [], []
    screen = FederationScreen(tiny[0], tiny[1], tmp_path / "users.jsonl.gz", tmp_path / "run")
    async with host(screen, finished, new_globals).run_test() as pilot:
        await pilot.pause()
        screen.query_one("#fed-rounds", Input).value = "6"  # a word of n letters takes n + 1 rounds
        screen.query_one("#fed-clients", Input).value = "8"
        screen.query_one("#fed-discover", Checkbox).value = True
        screen.query_one("#fed-theta", Input).value = "2"
        screen.action_start()
        await until(lambda: finished)
        await pilot.pause()
        assert finished == [(6, None)] and "new words at 2 votes" in str(screen.query_one("#fed-status").render())
        log = "".join(line.text for line in screen.query_one("#fed-log").lines)  # lines as wrapped to the screen
    history = vocab_history.read(tmp_path / "run")
    assert [r["round"] for r in history] == list(range(7)) and {r.get("theta") for r in history[1:]} == {2}
    added = [a["word"] for r in history for a in r["added"]]
    assert "yeet" in added and "yeet" not in read_model(tiny[0], Tokenizer(tiny[1])).vocab
    last = read_model(new_globals[-1][1], Tokenizer(tiny[1]))
    assert all(w in last.vocab for w in added) and len(last.vocab) == history[-1]["vocab_size"]
    assert "+1word(yeet)" in "".join(log.split())  # the log's line for the round that added it


@sync
async def test_a_process_that_cannot_start_is_a_stopped_run(tiny, tmp_path, monkeypatch):
    """Where the rounds' process cannot be started at all (no memory, no such interpreter), the screen
    says so and the app goes on."""
    import subprocess

    from federation.config import SimulationConfig

    def no_process(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    finished = []
    screen = FederationScreen(tiny[0], tiny[1], FIXTURES / "users.jsonl.gz", tmp_path / "run",
                              sim=SimulationConfig(rounds=2, clients_per_round=3, eval_users=3))
    app = host(screen, finished)
    async with app.run_test() as pilot:
        await until(lambda: finished)
        await pilot.pause()
        assert app.is_running and finished == [(0, "[Errno 12] Cannot allocate memory")] and screen.ended
        assert "stopped: [Errno 12] Cannot allocate memory" in "\n".join(line.text for line in screen.query_one("#fed-log").lines)


@sync
async def test_a_round_the_screen_cannot_draw_ends_the_run_not_the_app(tiny, tmp_path, monkeypatch):
    """A round message that passes the checks but that the screen still cannot draw (here a round number
    past a float's range, which the progress bar divides by) ends the run with that error, and its
    process; it took the whole keyboard down (WorkerFailed)."""
    from federation.config import SimulationConfig
    from keyboard.federator import FederatorProcess

    def follow(self, on_message):  # the rounds' process, as it would report such a round
        on_message({"round": {"round": 10**400}, "checkpoint": str(tmp_path / "round")})
        on_message({"done": 1})

    monkeypatch.setattr(FederatorProcess, "follow", follow)
    finished = []
    screen = FederationScreen(tiny[0], tiny[1], FIXTURES / "users.jsonl.gz", tmp_path / "run",
                              sim=SimulationConfig(rounds=2, clients_per_round=3, eval_users=3))
    app = host(screen, finished)
    async with app.run_test() as pilot:
        await until(lambda: finished)
        await pilot.pause()
        assert app.is_running and screen.ended and screen._job.stopped
        assert finished[0][1].startswith("unexpected error: OverflowError(")
        assert "stopped: unexpected error: OverflowError(" in log_text(screen)


def test_live_runs_go_to_the_checkout_or_the_working_folder(tmp_path):
    """f6's runs went to the folder above the code: for a non-editable install, site-packages/runs."""
    code = ("import sys; from pathlib import Path; import models.datasets as d; d.CODE_DIR = Path(sys.argv[1]); "
            "import keyboard.screens.federation as f; print(f.RUNS_DIR)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def runs_dir(code_dir: Path) -> str:
        return subprocess.run([sys.executable, "-c", code, str(code_dir)], cwd=tmp_path, env=env, capture_output=True,
                              text=True, check=True).stdout.strip()

    (tmp_path / "site-packages").mkdir()
    assert runs_dir(tmp_path / "site-packages") == "runs"  # ./runs, where `fedkb simulate` puts its runs too
    assert runs_dir(REPO) == str(REPO / "runs")  # a checkout: unchanged
