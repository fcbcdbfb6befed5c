"""`fedkb report` on a small DP run of the tiny model: who the personalization study visits, the
committed round's figures, and the report folder's own PNGs."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import FIXTURES
from tests.test_federation_run import _copy_run  # a run copied with its own device folders

USERS = FIXTURES / "users.jsonl.gz"


def _cli(tiny, out, *extra):
    model, tok = tiny
    return [sys.executable, "-m", "keyboard.cli", "simulate", "--quiet", "--out", str(out), "--model", str(model),
            "--tokenizer", str(tok), "--users-file", str(USERS), "-k", "2", "--eval-users", "3", "--seed", "3", *extra]


@pytest.fixture(scope="module")
def small_run(tiny, tmp_path_factory):
    """A 2-round DP run of a population of 3 (of the fixture's 21 training users), made in-process."""
    from keyboard.cli import main

    out = tmp_path_factory.mktemp("small") / "run"
    assert main(_cli(tiny, out, "--rounds", "2", "--users", "3", "--dp", "0.5", "--clip", "0.5")[3:]) == 0
    return out




def test_the_study_visits_only_the_runs_own_users(small_run, tmp_path):
    """A population of 3 was studied as every folder of the devices root (21 clients), and a devices
    root shared with another run added that run's users: now the held-out users and the 3 trained."""
    from federation.report import study_user_ids, write_report
    from federation.run import split_users
    from federation.config import SimulationConfig
    from models.datasets import load_users

    run = _copy_run(small_run, tmp_path)
    cfg = json.loads((run / "config.json").read_text())
    devices = Path(cfg["devices"])
    shutil.copytree(devices / "u0000", devices / "another-runs-user")  # a run sharing --devices
    train, _ = split_users(load_users(USERS), SimulationConfig.from_json(cfg["simulation"]))
    assert study_user_ids(cfg) == cfg["eval_users"] + sorted(u.id for u in train[:3])
    p = write_report(run, tmp_path / "rep", users=50)["personalization"]
    assert p["by_group"]["clients"]["users"] <= 3 and p["users"] <= 3 + len(cfg["eval_users"])


def test_a_resampled_population_studies_each_real_user_once(small_run):
    from federation.report import study_user_ids

    cfg = json.loads((small_run / "config.json").read_text())
    cfg["simulation"] = {**cfg["simulation"], "users": 50}  # 50 simulated users over the 21 real training users
    ids = study_user_ids(cfg)
    assert len(ids) == len(set(ids)) == 24 and ids[:3] == cfg["eval_users"]


def test_a_changed_users_file_is_named_not_studied(small_run, tmp_path):
    from federation.report import study_user_ids
    from models.errors import FedkbError

    cfg = json.loads((small_run / "config.json").read_text())
    with pytest.raises(FedkbError, match="no longer holds this run's users"):
        study_user_ids({**cfg, "users_sha256": "0" * 64})


def test_rounds_and_epsilon_are_the_committed_rounds_when_its_line_is_torn(small_run, tmp_path):
    """A torn last metrics line said "1 round ... epsilon of round 1" while latest.json committed round 2,
    whose model the study scores: the round count is latest.json's, epsilon is recomputed for it."""
    from federation.report import write_report

    run = _copy_run(small_run, tmp_path)
    text = (run / "metrics.jsonl").read_text()
    lines = text.splitlines()
    last = json.loads(lines[-1])
    assert last["round"] == 2 and last["epsilon"] > json.loads(lines[-2])["epsilon"] > 0
    (run / "metrics.jsonl").write_text(text[:-20])  # the last line torn
    s = write_report(run, tmp_path / "rep", users=0)["summary"]
    assert s["rounds"] == 2 and s["epsilon"] == pytest.approx(last["epsilon"]) and s["lost_rounds"] == [2]
    cfg = json.loads((run / "config.json").read_text())
    cfg.pop("population")  # a run from before config.json named it: unknown, not an older round's
    cfg["simulation"]["users"] = 0
    (run / "config.json").write_text(json.dumps(cfg))
    s = write_report(run, tmp_path / "rep", users=0)["summary"]
    assert s["rounds"] == 2 and s["epsilon"] is None and s["lost_rounds"] == [2]


def test_a_later_report_removes_the_plots_it_did_not_draw(small_run, tmp_path):
    from federation.report import write_report

    out = tmp_path / "rep"
    rep = write_report(small_run, out, users=2)
    assert (out / "personalization.png").exists() and (out / "epsilon.png").exists()
    (out / "mine.png").write_bytes(b"not the report's")
    rep = write_report(small_run, out, users=0)
    assert not (out / "personalization.png").exists() and (out / "mine.png").exists()
    assert sorted(p.name for p in out.glob("*.png")) == sorted([Path(f).name for f in rep["files"]] + ["mine.png"])


def test_the_printed_epsilon_says_unknown_where_the_committed_rounds_line_is_lost():
    """A DP run whose epsilon could not be recomputed printed "n/a (no round yet)" after rounds."""
    from keyboard.commands.report import _epsilon

    assert _epsilon({"epsilon": None, "dp": True, "rounds": 3, "lost_rounds": [3]}) == "epsilon unknown (the metrics of round 3 are lost)"
    assert _epsilon({"epsilon": None, "dp": True, "rounds": 0}) == "epsilon n/a (no round yet)"
    assert _epsilon({"epsilon": 1.5, "dp": True, "rounds": 3}) == "epsilon 1.5"
