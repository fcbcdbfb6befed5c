"""The CLI dispatcher: TOML config defaults, clear errors."""

import argparse
from pathlib import Path

import pytest

from keyboard.cli import main, toml_defaults
from models.errors import FedkbError


def _parser():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--server-opt", default="fedavg")
    return p


def test_toml_defaults_top_level_and_command_table(tmp_path):
    f = tmp_path / "sim.toml"
    f.write_text('rounds = 3\n[simulate]\nserver-opt = "fedadam"\n')
    assert toml_defaults(f, "simulate", _parser()) == {"rounds": 3, "server_opt": "fedadam"}
    p = _parser()
    p.set_defaults(**toml_defaults(f, "simulate", p))
    assert p.parse_args(["--rounds", "7"]).rounds == 7  # the command line wins
    assert p.parse_args([]).server_opt == "fedadam"


def test_toml_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3")
    with pytest.raises(FedkbError, match="not valid TOML"):
        toml_defaults(bad, "simulate", _parser())
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("roundz = 3")
    with pytest.raises(FedkbError, match="unknown option 'roundz'"):
        toml_defaults(unknown, "simulate", _parser())


def test_config_flag_reaches_a_command(tmp_path, capsys, tiny):
    f = tmp_path / "p.toml"
    f.write_text(f'model = "{tiny[0]}"\ntokenizer = "{tiny[1]}"\njson = true\n')
    assert main(["predict", "how are ", "--config", str(f)]) == 0
    assert '"suggestions"' in capsys.readouterr().out
    assert main(["predict", "x", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_simulate_client_flags_reach_the_config():
    from federation.config import ClientConfig
    from keyboard.commands.simulate import add_arguments, build_config

    p = argparse.ArgumentParser()
    add_arguments(p)
    sim = build_config(p.parse_args(["--client-batch", "8", "--client-lr", "0.3", "--client-epochs", "2"]))
    assert (sim.client.batch_size, sim.client.lr, sim.client.epochs) == (8, 0.3, 2.0)
    assert build_config(p.parse_args([])).client == ClientConfig()
    assert not ClientConfig().dropout and build_config(p.parse_args(["--client-dropout"])).client.dropout
    for bad in (["--client-batch", "0"], ["--client-lr", "-1"], ["--client-epochs", "0"]):
        with pytest.raises(FedkbError, match="client"):
            build_config(p.parse_args(bad))


@pytest.mark.parametrize("flags, message", [
    (["--workers", "0", "--engine", "parallel"], "--workers"),  # hung forever before: no worker to answer
    (["--eval-every", "0"], "--eval-every"),  # a ZeroDivisionError before
    (["--eval-users", "-1"], "--eval-users"),
    (["-k", "0"], "--clients-per-round"),
    (["--rounds", "-1"], "--rounds"),
    (["--server-lr", "0"], "server learning rate"),
    (["--server-lr", "nan"], "server learning rate"),
    (["--dp", "1"], "needs a clip"),
    (["--dp", "1", "--clip", "1", "--delta", "2"], "delta"),
    (["--clip", "-1"], "clip"),
    (["--discover", "--theta", "0"], "--theta"),  # any word anyone typed, before
    # non-finite numbers pass every `> 0` check: before, each ran a round into a model of NaNs
    # (or a traceback), and config.json kept the value, so no --resume could get past it
    (["--server-lr", "inf"], "server learning rate must be a finite number"),
    (["--dp", "nan", "--clip", "1"], "noise multiplier"),
    (["--dp", "nan"], "noise multiplier"),  # a TypeError in the noise before
    (["--dp", "inf", "--clip", "1"], "noise multiplier"),
    (["--dp", "1", "--clip", "inf"], "clip must be a finite number"),
    (["--client-epochs", "inf"], "client epochs"),  # an OverflowError before
    (["--client-epochs", "1e308"], "client epochs must be at most"),  # finite; the step count overflowed
    (["--seed", str(10**23)], "--seed"),  # an OverflowError before
    (["--users", str(10**12)], "--users"),  # tried to allocate 8 TB before
    (["--workers", "100000", "--engine", "parallel"], "--workers must be at most"),
    (["-k", "1" + "0" * 400], "--clients-per-round must be at most"),  # an OverflowError in sampling before
    # the accountant's arithmetic: epsilon 0.0 reported for 1e-155, a ZeroDivisionError after round 0 below 1e-162
    (["--dp", "1e-155", "--clip", "1"], "noise multiplier (--dp) must be 0 or in [1e-100, 1e+06]"),
    (["--dp", "1e-300", "--clip", "1"], "noise multiplier (--dp) must be 0 or in"),
    (["--dp", "1e200", "--clip", "1e-200"], "noise multiplier (--dp) must be 0 or in"),  # an OverflowError before
    (["--dp", "1", "--clip", "1e30"], "clip must be > 0 and at most 1e+06"),
    (["--delta", "1e-7"], "--delta needs Gaussian noise (--dp)"),  # silently ignored before
    (["--users", "1"], "cannot use secure aggregation"),  # every round aborted, under a note promising 1 update
])
def test_simulate_refuses_bad_settings_before_touching_anything(flags, message, tmp_path, capsys, tiny):
    out = tmp_path / "run"
    args = ["simulate", "--out", str(out), "--model", str(tiny[0]), "--tokenizer", str(tiny[1]), *flags]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err and "Traceback" not in err
    assert not out.exists()


def test_a_stored_config_is_checked_like_flags():
    from federation.config import SimulationConfig

    c = SimulationConfig()
    assert SimulationConfig.from_json(c.to_json()) == c
    assert SimulationConfig.from_json({"privacy": {"clip": 2}, "client": {"lr": 1}}).privacy.clip == 2  # int for float
    for obj, message in (({"rounds": "x"}, "rounds = 'x' is not of type int"), ({"client": {"dropout": 1}}, "dropout"),
                         ({"privacy": {"clip": True}}, "clip"), ({"client": [1]}, "client is not an object")):
        with pytest.raises(TypeError, match=message):
            SimulationConfig.from_json(obj)
    for obj, message in (([], "simulation is not an object"),):
        with pytest.raises(TypeError, match=message):
            SimulationConfig.from_json(obj)
    with pytest.raises(ValueError, match="--workers"):
        SimulationConfig.from_json({"workers": 0})


@pytest.mark.parametrize("flags", [["--epochs", "0"], ["--lr", "-1"], ["--lr", "nan"], ["--batch-size", "0"],
                                   ["--vocab-size", "0"]])  # a model of the specials only, before
def test_pretrain_refuses_bad_settings_in_one_line(flags, tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["pretrain", "--out", str(out), "--work", str(tmp_path / "work"), *flags]) == 2  # a torch traceback before
    err = capsys.readouterr().err
    assert err.startswith("fedkb pretrain: error: ") and "must be" in err and not out.exists()


@pytest.mark.parametrize("line, message", [
    ("k = 3.5", "k = 3.5: expected a whole number"),  # each a TypeError deep in the command before
    ("k = true", "k = true: expected a whole number"),
    ("k = [1]", "k = [1]: expected a whole number"),
    ("limit = 1.5", "limit = 1.5: expected a whole number"),
    ("model = true", "model = true: expected a path"),
    ("json = \"no\"", 'json = "no": expected true or false'),  # counted as true before
    ("json = 1", "json = 1: expected true or false"),
    ("[eval]\nk = \"many\"", 'k = "many": expected a whole number'),
])
def test_config_values_are_checked_like_flags(line, message, tmp_path, capsys):
    f = tmp_path / "c.toml"
    f.write_text(line + "\n")
    assert main(["eval", "--text", str(tmp_path / "t.txt"), "--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert err == f"fedkb eval: error: {f}: {message}\n"


def test_config_values_are_converted_and_choices_checked(tmp_path):
    from keyboard.commands import pretrain

    p = argparse.ArgumentParser()
    pretrain.add_arguments(p)
    f = tmp_path / "c.toml"
    f.write_text('lr = 1\nepochs = "2.5"\nbatch-size = "8"\nout = "runs/x"\ndevice = "cuda"\n')
    got = toml_defaults(f, "pretrain", p)
    assert got == {"lr": 1.0, "epochs": 2.5, "batch_size": 8, "out": Path("runs/x"), "device": "cuda"}
    assert type(got["lr"]) is float
    f.write_text('device = "tpu"\n')
    with pytest.raises(FedkbError, match=r'device = "tpu": expected one of cpu, cuda'):
        toml_defaults(f, "pretrain", p)


def test_a_broken_pipe_that_is_not_stdout_is_still_an_error(monkeypatch, capsys):
    """Only a closed stdout (`| head -1`) ends a command silently; another pipe's end is reported."""
    from keyboard.commands import predict

    def run(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(predict, "run", run)
    assert main(["predict", "hi"]) == 2
    assert capsys.readouterr().err == "fedkb predict: error: Broken pipe\n"


@pytest.fixture()
def installed(tmp_path, monkeypatch):
    """A non-editable install's layout: the code in site-packages (no pyproject.toml beside it), no data/ there,
    no $FEDKB_DATA; $XDG_CACHE_HOME in tmp_path."""
    from models import datasets

    code = tmp_path / "site-packages"
    code.mkdir()
    monkeypatch.setattr(datasets, "CODE_DIR", code)
    monkeypatch.setattr(datasets, "DATA_DIR", code / "data")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return code


@pytest.mark.parametrize("command", [["simulate", "--rounds", "1"], ["pretrain"], ["prepare"], ["eval", "--users"],
                                     ["predict", "hi"], ["start-state"], ["type"]])
def test_an_install_without_data_says_how_to_get_it(command, installed, tmp_path, monkeypatch, capsys):
    """Each said "cannot read tokenizer SITE-PACKAGES/data/tokenizer.model; run `fedkb prepare`", and
    `fedkb prepare` then wrote into site-packages."""
    from models import prepare

    monkeypatch.setattr(prepare, "build", lambda *a, **k: pytest.fail("prepare wrote into site-packages"))
    monkeypatch.chdir(tmp_path)
    assert main([*command, *(["--out", "run"] if command[0] == "simulate" else [])]) == 2
    err = capsys.readouterr().err
    assert err == (f"fedkb {command[0]}: error: fedkb's data folder {installed / 'data'} is missing: install fedkb from "
                   "a checkout with `pip install -e .`, or set FEDKB_DATA to a data folder\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site-packages"] and not any(installed.iterdir())


def test_an_install_without_data_runs_with_a_model_and_tokenizer_given(installed, tiny, capsys):
    """Only a default looks for data/: given both paths, predict and the keyboard's session need none."""
    from keyboard.session import KeyboardSession

    assert main(["predict", "--model", str(tiny[0]), "--tokenizer", str(tiny[1]), "--json", "how are"]) == 0
    assert capsys.readouterr().out.startswith("{")
    assert KeyboardSession(tiny[0], tiny[1], installed / "devices").model_dir == tiny[0]


def test_cache_defaults_lie_in_the_checkout_or_the_users_cache(installed, tmp_path, monkeypatch):
    """prepare's --cache and pretrain's --work: the checkout's .cache/ as before; an install's were in site-packages."""
    from models import datasets
    from keyboard.commands import prepare, pretrain

    def defaults():
        got = {}
        for module, dest in ((prepare, "cache"), (pretrain, "work")):
            p = argparse.ArgumentParser()
            module.add_arguments(p)
            got[dest] = getattr(p.parse_args([]), dest)
        return got

    assert defaults() == {"cache": tmp_path / "xdg" / "fedkb" / "wheels", "work": tmp_path / "xdg" / "fedkb" / "pretrain"}
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert defaults()["cache"] == Path.home() / ".cache" / "fedkb" / "wheels"
    repo = Path(__file__).resolve().parent.parent
    monkeypatch.setattr(datasets, "CODE_DIR", repo)  # a checkout: unchanged
    assert defaults() == {"cache": repo / ".cache" / "wheels", "work": repo / ".cache" / "pretrain"}


def test_a_resumed_run_with_no_round_to_run_draws_no_progress_bar(tmp_path, monkeypatch, capsys):
    """`--resume --rounds 1` on a run of 2 rounds: "already has 2 rounds", then a full bar that read 2/1."""
    from types import SimpleNamespace

    import federation.run

    class Done:  # a run of 2 rounds, resumed with a total of 1
        notes, round, done, sim = [], 2, True, SimpleNamespace(rounds=1)

        def __init__(self, *args, **kwargs):
            pass

        def run(self, on_round=None):
            pass

    monkeypatch.setattr(federation.run, "Simulation", Done)
    monkeypatch.setattr(federation.run, "read_metrics", lambda run_dir: [])
    monkeypatch.setenv("TTY_INTERACTIVE", "1")  # rich draws the bar as on a terminal
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["simulate", "--out", str(tmp_path / "run"), "--resume", "--rounds", "1"]) == 0
    err = capsys.readouterr().err
    assert "already has 2 rounds; pass --rounds M (more than 2)" in err and "federated rounds" not in err
