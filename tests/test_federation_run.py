"""Run folders end to end (CLI on the tiny model): kill -9 + resume, engines equal, no user text on the server."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, REPO

USERS = FIXTURES / "users.jsonl.gz"


def _cli(tiny, out, *extra):
    model, tok = tiny
    return [sys.executable, "-m", "keyboard.cli", "simulate", "--quiet", "--out", str(out), "--model", str(model),
            "--tokenizer", str(tok), "--users-file", str(USERS), "-k", "4", "--eval-users", "3", "--seed", "3", *extra]


def _run(cmd):
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r


def _latest(run):
    try:
        return json.loads((run / "latest.json").read_text())["round"]
    except (OSError, ValueError, KeyError):
        return -1


@pytest.fixture(scope="module")
def reference_run(tiny, tmp_path_factory):
    """An uninterrupted 4-round run, made in-process with the same settings as the CLI calls below."""
    from keyboard.cli import main

    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(_cli(tiny, out, "--rounds", "4")[3:]) == 0
    return out


def test_kill_9_then_resume_equals_uninterrupted_run(tiny, tmp_path, reference_run):
    rounds = ["--rounds", "4"]
    killed = tmp_path / "killed"
    p = subprocess.Popen(_cli(tiny, killed, *rounds), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _latest(killed) < 1 and time.time() < deadline and p.poll() is None:
        time.sleep(0.005)
    assert p.poll() is None, "the run finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert 1 <= _latest(killed) < 4
    _run(_cli(tiny, killed, *rounds, "--resume"))
    final = "checkpoints/round-0004/model.safetensors"
    assert (killed / final).read_bytes() == (reference_run / final).read_bytes()
    a = [json.loads(l) for l in (killed / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (reference_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in a] == list(range(5))
    strip = lambda ms: [{k: v for k, v in m.items() if k != "timings"} for m in ms]
    assert strip(a) == strip(b)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_kill_or_a_closed_terminal_stops_a_run_cleanly(sig, tiny, tmp_path, reference_run):
    """SIGTERM (`kill`) and SIGHUP (a closed terminal) end `fedkb simulate` as ctrl-c does: `finally`
    blocks run (status 128 + the signal, not death by it), so no write is left half done, and the
    run resumes to the uninterrupted run's bits."""
    rounds = ["--rounds", "4"]
    run = tmp_path / "run"
    p = subprocess.Popen(_cli(tiny, run, *rounds), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while _latest(run) < 1 and time.time() < deadline and p.poll() is None:
        time.sleep(0.005)
    assert p.poll() is None, "the run finished before it could be stopped"
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + sig, err
    assert not list(run.rglob(".*.tmp")) and "Traceback" not in err
    _run(_cli(tiny, run, *rounds, "--resume"))
    final = "checkpoints/round-0004/model.safetensors"
    assert (run / final).read_bytes() == (reference_run / final).read_bytes()


def test_resume_removes_the_temporary_files_a_kill_left(reference_run, tiny, tmp_path):
    """A kill -9 during an atomic write leaves its `.NAME.RANDOM.tmp`; the next run of the folder, holding
    its lock, removes them (and nothing else)."""
    run = _copy_run(reference_run, tmp_path)
    left = [run / ".latest.json.k2j3.tmp", run / "checkpoints" / "round-0004" / ".model.safetensors.x9y8.tmp"]
    for f in left:
        f.write_bytes(b"half a write")
    (run / "notes.tmp").write_text("not one of ours")
    _run(_cli(tiny, run, "--rounds", "4", "--resume"))
    assert not any(f.exists() for f in left) and (run / "notes.tmp").exists()


def test_parallel_engine_equals_sequential(tiny, tmp_path, reference_run):
    from keyboard.cli import main

    par = tmp_path / "par"
    assert main(_cli(tiny, par, "--rounds", "2", "--engine", "parallel", "--workers", "2")[3:]) == 0
    # round 2 of the 4-round reference: same seed, same plan (the round count does not enter any draw)
    final = "checkpoints/round-0002/model.safetensors"
    assert (par / final).read_bytes() == (reference_run / final).read_bytes()  # bit for bit (secure aggregation sums integers)


def test_engines_agree_without_the_native_kernels_too(tiny, tmp_path):
    """FEDKB_NATIVE=0 (or a machine without a compiler): the PyTorch passes, in both engines."""
    env = {**os.environ, "FEDKB_NATIVE": "0"}
    runs = {}
    for engine in ("sequential", "parallel"):
        runs[engine] = tmp_path / engine
        r = subprocess.run(_cli(tiny, runs[engine], "--rounds", "1", "--engine", engine, "--workers", "2"), cwd=REPO,
                           capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        assert "compiling" not in r.stderr
    final = "checkpoints/round-0001/model.safetensors"
    assert (runs["parallel"] / final).read_bytes() == (runs["sequential"] / final).read_bytes()


def test_server_artifacts_hold_no_user_text(reference_run, fixture_users):
    run = reference_run
    messages = {m for u in fixture_users for m in (*u.history, *u.future) if len(m) >= 12}
    files = [f for f in run.rglob("*") if f.is_file()]
    assert {"metrics.jsonl", "config.json", "model.safetensors", "model.json"} <= {f.name for f in files}
    blobs = [f.read_bytes() for f in files]
    for m in messages:
        needle = m.encode("utf-8")
        needle_json = json.dumps(m, ensure_ascii=False)[1:-1].encode("utf-8")
        assert not any(needle in b or needle_json in b for b in blobs), f"user text leaked: {m[:30]!r}"
    # the device folders (outside the run folder) do hold it: the check above can fail
    dev = b"".join(f.read_bytes() for f in (run.parent / "run-devices").rglob("*.jsonl"))
    assert sum(json.dumps(m, ensure_ascii=False)[1:-1].encode() in dev for m in messages) == len(messages)


def test_resume_refuses_a_missing_run(tiny, tmp_path, capsys):
    from keyboard.cli import main

    assert main(_cli(tiny, tmp_path / "none", "--resume")[3:]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def _copy_run(reference_run, dest: Path) -> Path:
    """A copy of the reference run with its own device folders (config.json names them)."""
    run = dest / "run"
    shutil.copytree(reference_run, run)
    shutil.copytree(reference_run.parent / "run-devices", dest / "run-devices")
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "devices": str(dest / "run-devices")}))
    return run


def _strip(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(l).items() if k != "timings"} for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_damaged_checkpoint_costs_rounds_never_the_run(tiny, tmp_path, reference_run, capsys):
    """One bit flipped in the last round's weights: resume notices (the checksum), goes back one
    round and runs it again, to the same bits as the uninterrupted run."""
    from keyboard.cli import main

    run = _copy_run(reference_run, tmp_path)
    final = "checkpoints/round-0004/model.safetensors"
    blob = bytearray((run / final).read_bytes())
    blob[len(blob) // 2] ^= 0x10
    (run / final).write_bytes(bytes(blob))
    assert main(_cli(tiny, run, "--rounds", "4", "--resume")[3:]) == 0
    err = capsys.readouterr().err
    assert "skipped the checkpoint of round 4" in err and "damaged" in err and "round 4 runs again" in err
    assert (run / final).read_bytes() == (reference_run / final).read_bytes()
    assert _strip(run) == _strip(reference_run) and _latest(run) == 4


def test_an_unreadable_latest_json_is_repaired_never_overwritten(tiny, tmp_path, reference_run, capsys):
    from keyboard.cli import main

    run = _copy_run(reference_run, tmp_path)
    (run / "latest.json").write_text('{"round": 4, "checkp')  # torn by hand: the file is always written atomically
    assert main(_cli(tiny, run, "--rounds", "4")[3:]) == 2  # without --resume: refused, not started over
    assert "already holds a run" in capsys.readouterr().err
    assert main(_cli(tiny, run, "--rounds", "4", "--resume")[3:]) == 0
    assert "missing or unreadable" in capsys.readouterr().err
    assert _latest(run) == 4 and _strip(run) == _strip(reference_run)  # round 4 was whole: nothing lost, nothing rerun
    for d in (run / "checkpoints").iterdir():  # now nothing loads
        (d / "model.safetensors").unlink()
    assert main(_cli(tiny, run, "--rounds", "5", "--resume")[3:]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "round 4:" in err and "delete the folder" in err


def test_a_latest_json_naming_no_possible_round_is_repaired_like_an_unreadable_one(tiny, tmp_path, reference_run, capsys):
    from keyboard.cli import main

    run = _copy_run(reference_run, tmp_path)
    (run / "latest.json").write_text('{"round": -1}')  # gave up on a healthy run before
    assert main(_cli(tiny, run, "--rounds", "4", "--resume")[3:]) == 0
    assert "missing or unreadable" in capsys.readouterr().err
    assert _latest(run) == 4 and _strip(run) == _strip(reference_run)


def test_device_folders_never_mix_with_a_run_folder(tiny, tmp_path, reference_run, capsys):
    """--devices naming another run would write every user's text into it (server artifacts); a run
    inside the device folders would be listed as a user."""
    from keyboard.cli import main

    other = _copy_run(reference_run, tmp_path)
    out = tmp_path / "new"
    assert main(_cli(tiny, out, "--rounds", "1", "--devices", str(other))[3:]) == 2
    assert "holds a run, not device folders" in capsys.readouterr().err
    assert not any(p.name.startswith("u") for p in other.iterdir()) and not out.exists()
    devices = tmp_path / "devices"
    assert main(_cli(tiny, devices / "run", "--rounds", "1", "--devices", str(devices))[3:]) == 2
    assert "must not live inside the device folders" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("keep me")
    assert main(_cli(tiny, tmp_path / "a-file", "--rounds", "1")[3:]) == 2
    assert "is a file, not a run folder" in capsys.readouterr().err and (tmp_path / "a-file").read_text() == "keep me"


@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_a_file_where_a_folder_goes_is_one_line_naming_it(resume, tiny, tmp_path, capsys):
    """--out or --devices naming a file, or a path below one: the file and why, on one line (a bare
    "File exists", or "Not a directory" naming a device folder below the file, before)."""
    from keyboard.cli import main

    f = tmp_path / "a-file"
    f.write_text("keep me")
    for out, extra, said in ((f, [], f"{f} is a file, not a run folder: choose another --out"),
                             (f / "run", [], f"{f / 'run'} cannot be a run folder ({f} is a file): choose another --out"),
                             (tmp_path / "run", ["--devices", str(f)],
                              f"{f} is a file, not a folder of device folders: choose another --devices")):
        if resume and extra:  # a resumed run takes its device folders from its config.json
            continue
        assert main(_cli(tiny, out, "--rounds", "1", *extra, *resume)[3:]) == 2
        assert capsys.readouterr().err == f"fedkb simulate: error: {said}\n"
    (tmp_path / "b-devices").write_text("")  # the default device folders of --out b
    assert main(_cli(tiny, tmp_path / "b", "--rounds", "1", *resume)[3:]) == 2
    err = capsys.readouterr().err
    assert (f"{tmp_path / 'b-devices'} is a file, not a folder of device folders" in err if not resume
            else f"nothing to resume in {tmp_path / 'b'}" in err)
    assert f.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "b-devices"]


def test_report_tells_a_folder_that_is_no_run_from_a_run_to_repair(tmp_path, reference_run, capsys):
    from keyboard.cli import main

    assert main(["report", str(tmp_path), "--users", "0"]) == 2  # it said to repair it with --resume, which has nothing to resume
    assert f"{tmp_path} is not a simulation run folder (config.json missing)" in capsys.readouterr().err
    run = _copy_run(reference_run, tmp_path)
    (run / "latest.json").unlink()
    assert main(["report", str(run), "--users", "0"]) == 2
    assert f"latest.json is missing or unreadable (`fedkb simulate --out {run} --resume` repairs it)" in capsys.readouterr().err


def test_a_damaged_config_json_is_a_clear_error(tiny, tmp_path, reference_run, capsys):
    from federation.report import write_report
    from keyboard.cli import main
    from models.errors import FedkbError

    run = _copy_run(reference_run, tmp_path)
    cfg = json.loads((run / "config.json").read_text())
    wrong_type = {**cfg, "simulation": {**cfg["simulation"], "client": {**cfg["simulation"]["client"], "lr": "fast"}}}
    for body, why in (('{"simulation": ', "Expecting value"), (json.dumps(wrong_type), "client.lr = 'fast' is not of type float"),
                      ("[1]", "not a JSON object"), (json.dumps({k: v for k, v in cfg.items() if k != "model"}), "no 'model'"),
                      (json.dumps({**cfg, "simulation": []}), "simulation is not an object"),  # tracebacks before
                      (json.dumps({**cfg, "users_file": 5}), "users_file is not a path"),
                      (json.dumps({**cfg, "discovery_theta": "ten"}), "discovery_theta is not a threshold")):
        (run / "config.json").write_text(body)
        assert main(_cli(tiny, run, "--rounds", "5", "--resume")[3:]) == 2
        assert f"config.json is damaged ({why}" in capsys.readouterr().err
        with pytest.raises(FedkbError, match="config.json is damaged"):
            write_report(run, tmp_path / "rep", users=2)
    assert _latest(run) == 4 and _strip(run) == _strip(reference_run)  # nothing was touched


def test_report_writes_plots_and_personalization_study(reference_run, tmp_path):
    from federation.report import write_report

    rep = write_report(reference_run, tmp_path / "rep", users=4)
    names = {Path(f).name for f in rep["files"]}
    assert {"accuracy.png", "ksr.png", "loss.png", "personalization.png"} <= names
    assert all(Path(f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in rep["files"])
    p = rep["personalization"]
    assert p["users"] == 4 and len(p["personalized_vs_global"]["top1_gain_points"]) == 4
    pv = p["personalized_vs_global"]
    assert 0.0 <= pv["share_worse_top1"] <= 1.0 and 0.0 <= pv["share_better_ksr"] + pv["share_worse_ksr"] <= 1.0
    assert pv["median_relative_perplexity_change"] > -1.0  # a ratio of perplexities minus one
    assert rep["summary"]["rounds"] == 4 and rep["summary"]["aggregated"] > 0
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["summary"] == rep["summary"]
    cfg = json.loads((reference_run / "config.json").read_text())
    from federation.report import study_user_ids

    studied = study_user_ids(cfg)[:4]  # every fixture user has enough text: the first four are studied
    assert p["held_out_users"] == sum(u in cfg["eval_users"] for u in studied)
    assert pv["share_better_loss"] + pv["share_worse_loss"] <= 1.0
    assert pv["users_with_relative_top1_gain"] <= len(pv["top1_gain_points"])
    groups = p["by_group"]  # the held-out users and the clients apart, adding up to the whole
    assert sum(g["users"] for g in groups.values()) == 4 and groups.get("held_out", {"users": 0})["users"] == p["held_out_users"]
    assert sum(g["share_worse_top1"] * g["users"] for g in groups.values()) == pytest.approx(pv["share_worse_top1"] * 4)


def test_relative_changes_leave_out_users_who_start_at_zero():
    from federation.report import relative_changes

    assert relative_changes([0.0, 10.0, 20.0, 0.0], [5.0, 12.0, 10.0, 0.0]) == [0.2, -0.5]


def test_the_report_holds_only_committed_rounds(reference_run, tmp_path):
    """A metrics line past latest.json (a run killed, or read, between the two writes) is not reported:
    `--resume` drops it and runs that round again."""
    from federation.report import write_report

    run = _copy_run(reference_run, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    extra = {**json.loads(lines[-1]), "round": 5, "top1": 99.0}
    (run / "metrics.jsonl").write_text("\n".join(lines + [json.dumps(extra)]) + "\n")
    rep = write_report(run, tmp_path / "rep", users=0, personalization=False)
    assert rep["summary"]["rounds"] == 4 and rep["summary"]["end"]["top1"] == json.loads(lines[-1])["top1"]


def test_the_printed_summary_says_what_it_lacks():
    """No evaluated round, a last round left unevaluated, and a DP run before its first round are said as such."""
    from keyboard.commands.report import _epsilon, _scores

    none = {"round": None, "top1": None, "top3": None, "ksr": None}
    assert _scores({"rounds": 3, "start": none, "end": none}) == "no round was evaluated (--eval-users 0)"
    st, en = {"round": 0, "top1": 20.0, "top3": 30.0, "ksr": 50.0}, {"round": 2, "top1": 21.0, "top3": 31.0, "ksr": 51.0}
    assert _scores({"rounds": 3, "start": st, "end": en}).endswith("KSR 50.0% -> 51.0% (round 2, the last evaluated)")
    assert "last evaluated" not in _scores({"rounds": 2, "start": st, "end": en})
    assert _epsilon({"epsilon": None, "dp": True}) == "epsilon n/a (no round yet)"
    assert _epsilon({"epsilon": None, "dp": False}) == "epsilon n/a (no DP noise)"
    assert _epsilon({"epsilon": 1.5, "dp": True}) == "epsilon 1.5"


def test_the_printed_study_names_the_held_out_users_and_the_clients_apart(reference_run, tmp_path, capsys):
    from keyboard.cli import main

    assert main(["report", str(reference_run), "--out", str(tmp_path / "rep"), "--users", "3"]) == 0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())["personalization"]
    lines = capsys.readouterr().out.splitlines()
    for name, label in (("held_out", "held-out users"), ("clients", "the federation's clients")):
        said = [line for line in lines if line.startswith(f"  {label} (")]
        assert len(said) == (name in rep["by_group"])
        if said:
            g = rep["by_group"][name]
            assert said[0].startswith(f"  {label} ({g['users']}): top-1 {100 * g['share_better_top1']:.0f}% better")


def test_an_os_error_is_one_line_with_its_path(reference_run, tmp_path, capsys):
    from keyboard.cli import main

    (tmp_path / "f").write_text("a file where the report's folder would go")
    assert main(["report", str(reference_run), "--out", str(tmp_path / "f" / "rep"), "--users", "0"]) == 2
    err = capsys.readouterr().err  # "Not a directory: ..." before
    assert err == (f"fedkb report: error: {tmp_path / 'f' / 'rep'} cannot be a report folder ({tmp_path / 'f'} is a file): "
                   f"choose another --out\n")


def test_settings_larger_than_the_users_allow_are_said(tiny, tmp_path, capsys):
    """-k and --eval-users beyond what the 24 fixture users allow run with what there is, and say so
    (both were cut down silently)."""
    from keyboard.cli import main

    assert main(_cli(tiny, tmp_path / "run", "--rounds", "0")[3:] + ["-k", "30", "--eval-users", "40"]) == 0
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "12 users held out for evaluation, not 40: at most half of the 24 users are" in err
    assert "-k 30 with over-selection asks for 39 devices a round, more than the population's 12" in err


def test_resume_says_which_settings_it_did_not_take(reference_run, tiny, tmp_path, capsys):
    from keyboard.cli import main

    run = _copy_run(reference_run, tmp_path)
    other = tmp_path / "other-devices"
    assert main(_cli(tiny, run, "--rounds", "4", "--resume", "-k", "7", "--client-lr", "0.5", "--devices", str(other))[3:]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert ("--resume keeps the run's stored settings but --rounds; not taken: clients_per_round 7 (the run has 4), "
            "client.lr 0.5 (the run has 0.3), devices") in err
    assert "seed" not in err and not other.exists()  # the stored seed was asked for again: nothing to say; the devices unused
    assert _strip(run) == _strip(reference_run)


@pytest.mark.parametrize("flags", [["--users", "-3"], ["--threads", "0"]])
def test_report_refuses_bad_settings_before_writing(flags, reference_run, tmp_path, capsys):
    from keyboard.cli import main

    assert main(["report", str(reference_run), "--out", str(tmp_path / "rep"), *flags]) == 2  # -3 users ran as 0 before
    assert capsys.readouterr().err.startswith("fedkb report: error: --users must be >= 0")
    assert not (tmp_path / "rep").exists()


def test_one_process_at_a_time_runs_a_folders_rounds(reference_run, tmp_path, tiny, capsys):
    from federation.run import Simulation
    from keyboard.cli import main

    run = _copy_run(reference_run, tmp_path)
    first = Simulation(run, resume=True)  # holds the folder until it is closed (or its process dies)
    assert main(_cli(tiny, run, "--rounds", "5", "--resume")[3:]) == 2
    assert "is in use: another fedkb process" in capsys.readouterr().err
    assert _latest(run) == 4 and _strip(run) == _strip(reference_run)  # the second touched nothing
    first.close()
    assert main(_cli(tiny, run, "--rounds", "5", "--resume")[3:]) == 0 and _latest(run) == 5


def test_edited_metrics_lines_are_skipped_or_named(reference_run, tmp_path, tiny):
    """Lines without an integer round are skipped (by the report and by resume); a line whose
    figures are not numbers is an error naming its round, not a plot of strings or a traceback."""
    from federation.report import write_report
    from keyboard.cli import main
    from models.errors import FedkbError

    run = _copy_run(reference_run, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"round": "two"}\n[1, 2]\n{"no": "round"}\n')
    assert write_report(run, tmp_path / "rep", users=0)["summary"]["rounds"] == 4
    assert main(_cli(tiny, run, "--rounds", "5", "--resume")[3:]) == 0 and _latest(run) == 5
    lines = (run / "metrics.jsonl").read_text().splitlines()
    m = json.loads(lines[2])
    lines[2] = json.dumps({**m, "top1": "20 %"})
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(FedkbError, match=r"line of round 2 is malformed \(top1: not a finite number\)"):
        write_report(run, tmp_path / "rep2", users=0)


def _edit_line(run: Path, index: int, **fields) -> None:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    m = json.loads(lines[index])
    lines[index] = json.dumps({**m, **fields})
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_a_nan_in_the_metrics_is_named_and_report_json_is_strict(reference_run, tmp_path):
    """NaN and Infinity parse as floats in Python's json, and were copied into report.json, which
    strict JSON readers then refused: the line is named instead, before anything is written."""
    from federation.report import write_report
    from models.errors import FedkbError

    run = _copy_run(reference_run, tmp_path)
    good = (run / "metrics.jsonl").read_text()
    m2 = json.loads(good.splitlines()[2])
    for fields, bad in (({"top1": float("nan")}, "top1"), ({"epsilon": float("inf")}, "epsilon"),
                        ({"timings": {**m2["timings"], "round_s": float("-inf")}}, "timings.round_s")):
        (run / "metrics.jsonl").write_text(good)
        _edit_line(run, 2, **fields)
        with pytest.raises(FedkbError, match=rf"metrics.jsonl, line 3: the line of round 2 is malformed \({bad}: not a finite"):
            write_report(run, tmp_path / "rep", users=0)
        assert not (tmp_path / "rep").exists()
    (run / "metrics.jsonl").write_text(good)
    with open(run / "metrics.jsonl", "a") as f:  # a figure too large for a float parses as an infinity too
        f.write('{"round": 5, "loss": 1e999, "timings": {"round_s": 1.0}}\n')
    with pytest.raises(FedkbError, match=r"line 6: the line of round 5 is malformed \(loss: not a finite number\)"):
        write_report(run, tmp_path / "rep", users=0)
    (run / "metrics.jsonl").write_text(good)

    rep = write_report(run, tmp_path / "rep", users=0)
    text = (tmp_path / "rep" / "report.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"report.json holds {c}"))["summary"] == rep["summary"]


def test_a_round_written_twice_or_out_of_order_is_named(reference_run, tmp_path):
    """A round's line is written once (resume drops the lines it runs again), so two lines of one
    round mean an edited file or two writers: named with both line numbers (it was summed twice)."""
    from federation.report import write_report
    from models.errors import FedkbError

    run = _copy_run(reference_run, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines + [lines[2]]) + "\n")
    with pytest.raises(FedkbError, match=r"metrics.jsonl: round 2 appears twice \(lines 3 and 6\)"):
        write_report(run, tmp_path / "rep", users=0)
    (run / "metrics.jsonl").write_text("\n".join(lines[:2] + ["", lines[2], lines[2]] + lines[3:]) + "\n")
    with pytest.raises(FedkbError, match=r"round 2 appears twice \(lines 4 and 5\)"):  # blank lines count
        write_report(run, tmp_path / "rep", users=0)
    (run / "metrics.jsonl").write_text("\n".join([lines[0], lines[1], lines[3], lines[2], lines[4]]) + "\n")
    with pytest.raises(FedkbError, match=r"metrics.jsonl, line 4: round 2 comes after round 3"):
        write_report(run, tmp_path / "rep", users=0)
    assert not (tmp_path / "rep").exists()
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert write_report(run, tmp_path / "rep", users=0)["summary"]["aggregated"] == sum(
        json.loads(l).get("aggregated", 0) for l in lines)


def test_a_system_without_file_locks_runs_unlocked_and_says_so(tmp_path, monkeypatch):
    import errno

    from federation import run as run_mod
    from models import atomic

    fd, why = run_mod.lock_run(tmp_path / "a")
    assert fd is not None and why is None
    os.close(fd)

    class NoLocks:  # a network mount that refuses flock
        LOCK_EX = LOCK_NB = 0

        @staticmethod
        def flock(fd, op):
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(atomic, "fcntl", NoLocks)
    fd, why = run_mod.lock_run(tmp_path / "b")
    assert fd is None and "cannot lock" in why and "second process" in why
    monkeypatch.setattr(atomic, "fcntl", None)  # no fcntl at all (not POSIX)
    fd, why = run_mod.lock_run(tmp_path / "c")
    assert fd is None and "no file locks" in why


def test_the_shakespeare_roles_are_a_population_too(tiny, tmp_path):
    """`--users-file data/shakespeare.jsonl.gz`: roles are users, each a device folder named by its
    role id, trained on its first 80 % of lines; the held-out roles score each round."""
    from federation.device import Device
    from keyboard.cli import main
    from models.datasets import load_shakespeare

    roles = FIXTURES / "shakespeare.jsonl.gz"
    run = tmp_path / "run"
    cmd = _cli(tiny, run, "--rounds", "2", "--discover", "--theta", "2")[3:]
    cmd[cmd.index("--users-file") + 1] = str(roles)
    cmd[cmd.index("-k") + 1], cmd[cmd.index("--eval-users") + 1] = "2", "1"
    assert main(cmd) == 0
    users = {u.id: u for u in load_shakespeare(roles)}
    devices = sorted(p.name for p in (tmp_path / "run-devices").iterdir() if p.is_dir())  # and @population.json
    assert devices and set(devices) <= set(users)
    for name in devices:
        assert tuple(Device(tmp_path / "run-devices", name).history()) == users[name].history
    metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1, 2] and all(m["eval_words"] > 0 for m in metrics)


def test_secret_noise_is_stored_kept_on_resume_and_changes_the_model_not_the_sampling(tiny, tmp_path, capsys):
    """--secret-noise draws the DP noise from OS entropy, saved nowhere: config.json records the setting and
    --resume keeps it; two runs of one seed select the same devices each round but release different models."""
    from federation.config import SimulationConfig
    from federation.run import Simulation
    from keyboard.cli import main

    dp = ("--dp", "1.0", "--clip", "0.5", "--eval-users", "0")
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_cli(tiny, a, "--rounds", "1", *dp, "--secret-noise")[3:]) == 0
    assert main(_cli(tiny, a, "--rounds", "2", *dp, "--resume")[3:]) == 0  # the flag left off: the run keeps it
    assert "not taken" not in capsys.readouterr().err
    assert main(_cli(tiny, b, "--rounds", "2", *dp, "--secret-noise")[3:]) == 0
    assert json.loads((a / "config.json").read_text())["simulation"]["privacy"]["secret_noise"] is True
    s = Simulation(a, SimulationConfig(rounds=2), resume=True)
    s.close()
    assert s.sim.privacy.secret_noise
    counts = ("selected", "dropouts", "reporting")
    assert [[m[k] for k in counts] for m in _strip(a)[1:]] == [[m[k] for k in counts] for m in _strip(b)[1:]]
    for r in (1, 2):
        final = f"checkpoints/round-{r:04d}/model.safetensors"
        assert (a / final).read_bytes() != (b / final).read_bytes()
    assert main(_cli(tiny, tmp_path / "c", "--rounds", "1", "--secret-noise")[3:]) == 2  # nothing to keep secret
    assert "--secret-noise needs Gaussian noise (--dp)" in capsys.readouterr().err


def test_the_summary_leaves_aborted_rounds_out_of_the_aggregated_updates():
    """A round secure aggregation aborted applied none of its masked updates: report.json and the printed
    lines count it apart (runs from before session 28 counted its updates as aggregated)."""
    from federation.report import summarize
    from keyboard.commands.report import _aborted
    from keyboard.commands.simulate import _line

    t, why = {"round_s": 1.0}, "device 3: 0 live neighbours"
    ms = [{"round": 0}, {"round": 1, "aggregated": 4, "masked": 4, "selected": 6, "timings": t},
          {"round": 2, "aggregated": 0, "masked": 5, "selected": 6, "secagg_aborted": why, "timings": t},
          {"round": 3, "aggregated": 5, "selected": 6, "secagg_aborted": why, "timings": t}]  # a run from before session 28
    s = summarize(ms)
    assert s["aggregated"] == 4 and s["secagg_aborted_rounds"] == 2
    assert _aborted(s) == ", 2 rounds aborted by secure aggregation (model unchanged)"
    assert _aborted({**s, "dp": True}).endswith("(noise only)") and _aborted(summarize(ms[:2])) == ""
    assert "0/6 aggregated, secure aggregation aborted (device 3: 0 live neighbours)" in _line(ms[2])


# -- audit 4 ------------------------------------------------------------------------------------
def _config(run: Path, **changes) -> dict:
    """config.json of `run`, with `changes` written into it (a key set to None is removed)."""
    cfg = {**json.loads((run / "config.json").read_text()), **changes}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (run / "config.json").write_text(json.dumps(cfg))
    return cfg


def test_a_run_folder_never_is_holds_or_lies_inside_another_runs_folders(reference_run, tiny, tmp_path, capsys):
    """--out naming another run's device folders (or a folder inside them, or inside a run), or
    --devices inside a run, wrote users' text into a run folder; refused before anything is written."""
    from keyboard.cli import main

    run = _copy_run(reference_run, tmp_path)
    devices = tmp_path / "run-devices"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for out, extra, said in (
            (devices, [], f"{devices} holds device folders ("),
            (devices / "u0003", [], f"{devices / 'u0003'} lies inside device folders ({devices}, users' text): choose another --out"),
            (devices / "u0003" / "x", [], f"{devices / 'u0003' / 'x'} lies inside device folders ({devices / 'u0003'}"),
            (run / "inner", [], f"{run / 'inner'} lies inside the run folder {run}: choose another --out"),
            (tmp_path, [], f"{tmp_path} holds "),
            (tmp_path / "new", ["--devices", str(run / "devs")],
             f"the device folders {run / 'devs'} lie inside the run folder {run}: choose another --devices")):
        assert main(_cli(tiny, out, "--rounds", "1", *extra)[3:]) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.splitlines()) == 1, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    assert main(_cli(tiny, run, "--rounds", "4", "--resume")[3:]) == 0  # the run itself resumes


def test_resume_continues_to_the_stored_total_unless_rounds_is_given(reference_run, tiny, tmp_path, capsys):
    """`--resume` without --rounds took argparse's 10, not the run's total: a 30-round run stopped at round
    12 ran nothing and said it was done.  Now the stored total, and a --rounds given is the new one."""
    from keyboard.cli import main

    run = _copy_run(reference_run, tmp_path)
    cmd = _cli(tiny, run, "--resume")[3:]
    _config(run, simulation={**_config(run)["simulation"], "rounds": 5})  # started with --rounds 5, stopped at 4
    assert main(cmd) == 0 and _latest(run) == 5
    assert "resuming" in capsys.readouterr().err
    assert main(cmd) == 0 and _latest(run) == 5  # complete: said so, nothing run
    assert f"{run} already has 5 rounds; pass --rounds M (more than 5) to continue it" in " ".join(
        capsys.readouterr().err.split())
    assert main(cmd + ["--rounds", "6"]) == 0 and _latest(run) == 6
    assert json.loads((run / "config.json").read_text())["simulation"]["rounds"] == 6  # the new total, kept
    assert main(cmd + ["--rounds", "3"]) == 0 and _latest(run) == 6  # never below the rounds run
    assert json.loads((run / "config.json").read_text())["simulation"]["rounds"] == 6


def test_resume_names_a_flag_typed_with_its_default_value(reference_run, tiny, tmp_path, capsys):
    """`-k 20 --seed 0 --eval-users 20` typed on a run with 4, 3 and 3 are argparse's defaults: they were
    dropped without a word (so was `--dp 0` on a DP run, whose noise went on)."""
    import argparse

    from keyboard.cli import main
    from keyboard.commands.simulate import add_arguments, given_settings

    run = _copy_run(reference_run, tmp_path)
    model, tok = tiny
    assert main(["simulate", "--quiet", "--out", str(run), "--resume", "-k", "20", "--seed", "0", "--eval-users", "20",
                 "--dp", "0", "--engine", "sequential", "--model", str(model), "--tokenizer", str(tok)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert ("not taken: clients_per_round 20 (the run has 4), eval_users 20 (the run has 3), seed 0 (the run has 3)"
            in err), err
    assert "engine" not in err and "noise_multiplier" not in err  # typed, and what the run has: nothing to say
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert given_settings(p.parse_args([])) == set()
    assert given_settings(p.parse_args(["--dp", "0", "--rounds", "3", "--no-secagg"])) == {
        "privacy.noise_multiplier", "rounds", "aggregation.secure_aggregation"}


def _gz_users(path: Path, users: list[dict]) -> Path:
    import gzip

    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(u) + "\n" for u in users)
    return path


def test_resume_refuses_a_users_file_that_changed(reference_run, tiny, tmp_path, capsys):
    """A users file re-prepared, edited or replaced between a run and its resume changed the held-out
    users (some then trained) and the population without a word."""
    import gzip

    from keyboard.cli import main

    run = _copy_run(reference_run, tmp_path)
    users = [json.loads(line) for line in gzip.open(USERS, "rt")]
    same = _gz_users(tmp_path / "same.jsonl.gz", users)
    _config(run, users_file=str(same))
    assert main(_cli(tiny, run, "--rounds", "4", "--resume")[3:]) == 0  # the same users at another path: fine
    capsys.readouterr()
    edited = [{**users[0], "history": users[0]["history"][:-1]}] + users[1:]
    for changed, stored_key, why in ((users[5:], True, "its users or their text differ"),
                                     (edited, True, "its users or their text differ"),
                                     (users[5:], False, "the held-out users differ")):  # a run from before the fingerprint
        _gz_users(same, changed)
        if not stored_key:
            _config(run, users_sha256=None)
        assert main(_cli(tiny, run, "--rounds", "5", "--resume")[3:]) == 2
        assert f"the users file {same} does not hold this run's population ({why})" in capsys.readouterr().err
    assert _latest(run) == 4 and _strip(run) == _strip(reference_run)


def test_a_run_whose_model_and_tokenizer_moved_resumes_with_their_new_places(reference_run, tiny, tmp_path, capsys):
    """A moved checkout broke every run: the stored paths always won, --model/--tokenizer were "not taken",
    and the error said to run `fedkb prepare`.  A new place holding the same files is taken now."""
    import torch

    from keyboard.cli import main
    from models.checkpoint import load_model, save_checkpoint

    run = _copy_run(reference_run, tmp_path)
    model, tok = tiny
    gone_model, gone_tok = tmp_path / "gone" / "model", tmp_path / "gone" / "tokenizer.model"
    cfg = _config(run, model=str(gone_model), tokenizer=str(gone_tok))
    bare = ["simulate", "--quiet", "--out", str(run), "--resume"]
    assert main(bare) == 2
    assert capsys.readouterr().err == (f"fedkb simulate: error: the run's model {gone_model} is gone (moved?): pass "
                                       f"--model with its new place\n")
    assert main(["report", str(run), "--users", "2", "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert f"the run's model folder {gone_model} is gone (moved?): `fedkb simulate --out {run} --resume --model DIR`" in err
    assert "--users 0 skips" in err and not (tmp_path / "rep").exists()
    other = tmp_path / "other"  # another model (one weight changed) under the same tokenizer
    ck, tokenizer = load_model(model, tok)
    with torch.no_grad():
        next(iter(ck.model.parameters())).add_(0.01)
    save_checkpoint(other, ck.model, ck.vocab, tokenizer)
    assert main(bare + ["--model", str(other), "--tokenizer", str(tok)]) == 2
    assert f"--model {other} is not the model this run started from (its fingerprint differs)" in capsys.readouterr().err
    for fingerprints in (True, False):  # a run from before they were recorded: compared with its round-0 checkpoint
        if not fingerprints:
            _config(run, model=str(gone_model), tokenizer=str(gone_tok), model_sha256=None, tokenizer_sha256=None)
        assert main(bare + ["--model", str(model), "--tokenizer", str(tok)]) == 0
        err = " ".join(capsys.readouterr().err.split())
        assert f"the run's model {gone_model} is gone; {model.resolve()}, the same model, is the run's now" in err
        assert "not taken" not in err
        now = json.loads((run / "config.json").read_text())
        assert (now["model"], now["tokenizer"]) == (str(model.resolve()), str(tok.resolve()))
        dropped = () if fingerprints else ("model_sha256", "tokenizer_sha256")
        assert {k: v for k, v in now.items() if k not in ("model", "tokenizer")} == {
            k: v for k, v in cfg.items() if k not in ("model", "tokenizer", *dropped)}
    assert main(bare) == 0 and _latest(run) == 4 and _strip(run) == _strip(reference_run)


def test_a_diverged_round_is_not_committed_and_names_the_server_lr(tiny, tmp_path, capsys):
    """A finite --server-lr far too large keeps the weights finite (~1e36) but their losses are not: the
    round was committed, metrics.jsonl got Infinity/NaN (not JSON), and `fedkb report` called it edited."""
    from keyboard.cli import main

    run = tmp_path / "run"
    assert main(_cli(tiny, run, "--rounds", "2", "--server-lr", "1e20")[3:]) == 2
    err = capsys.readouterr().err
    assert "round 1: the held-out loss of the global model is not finite, it diverged (is --server-lr too large?)" in err
    assert "nothing of this round is committed, round 0 is the run's last" in err
    assert _latest(run) == 0 and not (run / "checkpoints" / "round-0001").exists()
    text = (run / "metrics.jsonl").read_text()
    assert [json.loads(line, parse_constant=pytest.fail)["round"] for line in text.splitlines()] == [0]


def test_the_closing_summary_survives_an_edited_metrics_line(reference_run, tiny, tmp_path, capsys):
    from keyboard.cli import main

    run = _copy_run(reference_run, tmp_path)
    _edit_line(run, 0, top1=None)  # a TypeError traceback (exit 1) after the rounds before
    assert main(_cli(tiny, run, "--rounds", "4", "--resume")[3:]) == 0
    assert capsys.readouterr().out.endswith(f"done: 4 rounds; run folder {run}\n")


def test_a_report_whose_study_cannot_run_writes_nothing(reference_run, tmp_path, capsys):
    """The PNGs were written before the personalization study failed, beside the last report.json."""
    from keyboard.cli import main

    run = _copy_run(reference_run, tmp_path)
    shutil.move(tmp_path / "run-devices", tmp_path / "moved")
    assert main(["report", str(run), "--users", "2"]) == 2
    err = capsys.readouterr().err
    assert (f"the run's device folders {tmp_path / 'run-devices'} are gone (moved?): `fedkb simulate --out {run} "
            f"--resume` makes them again from the run's users file, or --users 0 skips the personalization study") in err
    assert not (run / "report").exists()
    shutil.move(tmp_path / "moved", tmp_path / "run-devices")
    assert main(["report", str(run), "--users", "0"]) == 0
    pngs = {f: f.stat().st_mtime_ns for f in (run / "report").glob("*.png")}
    (run / "checkpoints" / "round-0004" / "model.json").unlink()  # the study's global model: the study fails
    assert main(["report", str(run), "--users", "2"]) == 2
    assert {f: f.stat().st_mtime_ns for f in (run / "report").glob("*.png")} == pngs  # the old report, untouched


@pytest.mark.parametrize("flags, said", [(["--theta", "5"], "--theta needs --discover (it is the threshold of word discovery on a new run)"),
                                         (["--theta", "0"], "--theta needs --discover (it is the threshold of word discovery on a new run)"),
                                         (["--threads", "0"], "--threads must be >= 1 (got 0)"),
                                         (["--threads", "-5"], "--threads must be >= 1 (got -5)")])
def test_simulate_refuses_flags_it_would_ignore(flags, said, tiny, tmp_path, capsys):
    """--theta without --discover ran without discovery, and --threads 0 ran with one thread, in silence."""
    from keyboard.cli import main

    assert main(_cli(tiny, tmp_path / "run", "--rounds", "1", *flags)[3:]) == 2
    assert capsys.readouterr().err == f"fedkb simulate: error: {said}\n" and not (tmp_path / "run").exists()


def test_resume_keeps_unreadable_metrics_lines_and_says_which_rounds_they_cost(reference_run, tiny, tmp_path, capsys):
    """A damaged line of a committed round, or a lost metrics.jsonl, was dropped for good without a word."""
    from keyboard.cli import main

    run = _copy_run(reference_run, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], lines[1][:50]] + lines[2:]) + "\n")
    assert main(_cli(tiny, run, "--rounds", "4", "--resume")[3:]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert ("1 unreadable line of metrics.jsonl kept in metrics.jsonl.damaged; metrics.jsonl has no readable line of "
            "round 1: its figures are lost, `fedkb report` leaves it out") in err
    assert (run / "metrics.jsonl.damaged").read_text() == lines[1][:50] + "\n"
    assert [m["round"] for m in _strip(run)] == [0, 2, 3, 4]
    (run / "metrics.jsonl").unlink()
    assert main(_cli(tiny, run, "--rounds", "4", "--resume")[3:]) == 0
    assert "has no readable line of rounds 0-4" in " ".join(capsys.readouterr().err.split())
    assert (run / "metrics.jsonl.damaged").read_text() == lines[1][:50] + "\n"  # kept, not overwritten


def test_the_printed_report_names_report_json_and_rounds_epsilon(reference_run, tmp_path, capsys):
    from keyboard.cli import main
    from keyboard.commands.report import _epsilon

    assert main(["report", str(reference_run), "--out", str(tmp_path / "rep"), "--users", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("4 rounds: ") and out.endswith(f"wrote {tmp_path / 'rep' / 'report.json'}\n")
    assert _epsilon({"epsilon": 14.252577498839509, "dp": True}) == "epsilon 14.3"


def test_report_on_a_file_or_into_a_file_is_one_line_naming_it(reference_run, tmp_path, capsys):
    from keyboard.cli import main

    (tmp_path / "f").write_text("a file")
    assert main(["report", str(tmp_path / "f"), "--users", "0"]) == 2
    assert capsys.readouterr().err == f"fedkb report: error: {tmp_path / 'f'} is a file, not a simulation run folder\n"
    assert main(["report", str(reference_run), "--out", str(tmp_path / "f"), "--users", "0"]) == 2
    assert capsys.readouterr().err == f"fedkb report: error: {tmp_path / 'f'} is a file, not a report folder: choose another --out\n"


# -- audit 31.2 ---------------------------------------------------------------------------------
def test_device_folders_made_from_other_users_are_refused_not_trained_on(tiny, tmp_path, capsys):
    """build_population wrote a device folder only where none was: a new run over a users file with other
    text for the same ids trained on the old text.  The devices root now records its users' fingerprint."""
    import gzip

    from federation.sampling import POPULATION_RECORD
    from keyboard.cli import main

    users = [json.loads(line) for line in gzip.open(USERS, "rt")]
    edited = _gz_users(tmp_path / "edited.jsonl.gz", [{**u, "history": [f"new text {i}" for i in range(3)]} for u in users])
    run, devices = tmp_path / "run", tmp_path / "run-devices"
    assert main(_cli(tiny, run, "--rounds", "0")[3:]) == 0
    record = json.loads((devices / POPULATION_RECORD).read_text())
    shutil.rmtree(run)  # "to start over"
    old = {p: p.read_bytes() for p in devices.rglob("*") if p.is_file()}
    cmd = _cli(tiny, run, "--rounds", "0")[3:]
    edited_cmd = cmd[:cmd.index("--users-file") + 1] + [str(edited)] + cmd[cmd.index("--users-file") + 2:]
    assert main(edited_cmd) == 2
    assert capsys.readouterr().err == (f"fedkb simulate: error: the device folders {devices} were made from another users "
                                       f"file (other users or text): delete that folder, or choose another --devices\n")
    assert {p: p.read_bytes() for p in devices.rglob("*") if p.is_file()} == old and not run.exists()  # nothing touched
    assert main(edited_cmd + ["--devices", str(tmp_path / "fresh")]) == 0  # another --devices: the new text
    assert json.loads((tmp_path / "fresh" / users[0]["id"] / "history.jsonl").read_text().splitlines()[0]) == "new text 0"
    shutil.rmtree(run)
    (devices / POPULATION_RECORD).unlink()  # device folders from before the record: taken, and recorded
    assert main(cmd) == 0
    assert json.loads((devices / POPULATION_RECORD).read_text()) == record


def test_resume_takes_a_devices_folder_given_for_one_that_is_gone(reference_run, tiny, tmp_path, capsys):
    """A moved run could not be pointed at its device folders: --devices was "not taken", and every user's
    text was written again under the old path."""
    from federation.sampling import POPULATION_RECORD
    from keyboard.cli import main

    run = _copy_run(reference_run, tmp_path)
    gone, moved = tmp_path / "run-devices", tmp_path / "moved-devices"
    shutil.move(gone, moved)
    assert main(_cli(tiny, run, "--rounds", "4", "--resume", "--devices", str(moved))[3:]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"the run's device folders {gone} are gone; {moved} are the run's now (config.json names them)" in err
    assert "not taken" not in err and not gone.exists()
    assert json.loads((run / "config.json").read_text())["devices"] == str(moved)
    other = _copy_run(reference_run, tmp_path / "b")  # device folders of other users: refused
    shutil.rmtree(tmp_path / "b" / "run-devices")
    (moved / POPULATION_RECORD).write_text('{"users_sha256": "another"}')
    assert main(_cli(tiny, other, "--rounds", "4", "--resume", "--devices", str(moved))[3:]) == 2
    assert f"the device folders {moved} were made from another users file" in capsys.readouterr().err


def test_resume_checks_the_flags_with_the_runs_stored_settings(tiny, tmp_path, capsys):
    """`--resume --secret-noise` on a DP run said "needs Gaussian noise (--dp)", `--resume --dp 1.0` "needs a clip
    norm": the flags typed were checked alone, before the stored settings were merged."""
    from keyboard.cli import main

    run = tmp_path / "run"
    assert main(_cli(tiny, run, "--rounds", "1", "--dp", "1.0", "--clip", "0.5", "--secret-noise", "--eval-users", "0")[3:]) == 0
    capsys.readouterr()
    for flags in (["--secret-noise"], ["--dp", "1.0"], ["--clip", "0.5", "--delta", "1e-5"]):  # what the run has
        assert main(_cli(tiny, run, "--resume", "--eval-users", "0", *flags)[3:]) == 0, capsys.readouterr().err
        assert "not taken" not in capsys.readouterr().err
    assert main(_cli(tiny, run, "--resume", "--eval-users", "0", "--dp", "0")[3:]) == 0  # not what the run has: named
    assert "not taken: privacy.noise_multiplier 0.0 (the run has 1.0)" in " ".join(capsys.readouterr().err.split())
    assert main(_cli(tiny, tmp_path / "new", "--rounds", "1", "--dp", "1.0")[3:]) == 2  # a new run: checked as before
    assert "Gaussian noise needs a clip norm (--clip)" in capsys.readouterr().err


def test_a_run_without_config_json_is_not_sent_to_resume(reference_run, tiny, tmp_path, capsys):
    """"already holds a run: pass --resume", then --resume: "nothing to resume (config.json missing)"."""
    from keyboard.cli import main

    run = _copy_run(reference_run, tmp_path)
    (run / "config.json").unlink()
    assert main(_cli(tiny, run, "--rounds", "4")[3:]) == 2
    assert capsys.readouterr().err == (f"fedkb simulate: error: {run} already holds a run whose config.json is missing, so "
                                       f"it cannot be resumed: choose another --out\n")


def test_a_server_state_key_naming_no_parameter_is_checkpoint_damage(reference_run, tiny, tmp_path, capsys):
    """A key without "." in server.safetensors (whole, its checksum right) ended resume in a ValueError traceback."""
    import torch

    from keyboard.cli import main
    from models.checkpoint import save_tensors

    run = _copy_run(reference_run, tmp_path)
    save_tensors(run / "checkpoints" / "round-0004" / "server.safetensors", {"nodot": torch.zeros(1)})
    assert main(_cli(tiny, run, "--rounds", "4", "--resume")[3:]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "skipped the checkpoint of round 4" in err and "its tensor 'nodot' names no parameter" in err
    final = "checkpoints/round-0004/model.safetensors"
    assert (run / final).read_bytes() == (reference_run / final).read_bytes() and _strip(run) == _strip(reference_run)


def test_resume_keeps_a_damaged_metrics_line_byte_for_byte(reference_run, tiny, tmp_path):
    """metrics.jsonl.damaged was read and written with errors="replace": \\xff\\xfe became EF BF BD EF BF BD."""
    from keyboard.cli import main

    run = _copy_run(reference_run, tmp_path)
    lines = (run / "metrics.jsonl").read_bytes().splitlines()
    bad = b'\xff\xfe{"round": 1, "lo\xc3'
    (run / "metrics.jsonl").write_bytes(b"\n".join([lines[0], bad] + lines[2:]) + b"\n")
    (run / "metrics.jsonl.damaged").write_bytes(b"kept \xfe before\n")
    assert main(_cli(tiny, run, "--rounds", "4", "--resume")[3:]) == 0
    assert (run / "metrics.jsonl.damaged").read_bytes() == b"kept \xfe before\n" + bad + b"\n"


def test_the_closing_summary_names_the_committed_round(reference_run, tiny, tmp_path, capsys):
    """Round 4's line torn: the summary said "after 3 rounds" (the last readable line) of a 4-round run."""
    from keyboard.cli import main

    run = _copy_run(reference_run, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:4] + [lines[4][:30]]))
    assert main(_cli(tiny, run, "--rounds", "4", "--resume")[3:]) == 0
    out = capsys.readouterr().out
    assert out.endswith(f"done: 4 rounds; round 4's metrics line is lost, so its figures are unknown; run folder {run}\n"), out
    assert main(_cli(tiny, run, "--rounds", "5", "--resume")[3:]) == 0  # a round run: its figures
    assert "after 5 rounds; run folder" in capsys.readouterr().out
