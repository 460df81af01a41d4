"""Run plumbing: CSV logs, progress lines, summary.json, atomic writes, checkpoint errors, seeding."""

import csv
import json
import os
import random
import re
import sys
import time

import numpy as np
import pytest
import torch

from common import runs


@pytest.fixture
def no_tensorboard(monkeypatch):
    # A None entry in sys.modules makes the import raise ImportError, as when tensorboard is missing.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)


def test_log_eval_and_scalars_write_exact_csv_rows(tmp_path, no_tensorboard):
    log = runs.Logger(tmp_path, {"seed": 3, "run_dir": tmp_path})
    assert log.writer is None
    log.log_eval(100, "A", "test", [40, 41], np.array([-5.5, 2.0]), np.array([False, True]))
    log.log_eval(200, "B", "train", np.array([3, 4]), np.array([[1.0, 2.0], [3.0, 4.5]]))  # [tasks, episodes]
    log.log_scalars(100, {"loss/critic": 0.25, "alpha": np.float32(0.5)})
    log.close()
    assert (tmp_path / "metrics.csv").read_text().splitlines() == [
        "global_step,mode,split,task_id,episode,return,success",
        "100,A,test,40,0,-5.5,0",
        "100,A,test,41,0,2.0,1",
        "200,B,train,3,0,1.0,",
        "200,B,train,3,1,2.0,",
        "200,B,train,4,0,3.0,",
        "200,B,train,4,1,4.5,",
    ]
    assert (tmp_path / "train.csv").read_text().splitlines() == [
        "global_step,name,value", "100,loss/critic,0.25", "100,alpha,0.5"]
    assert json.loads((tmp_path / "args.json").read_text()) == {"seed": 3, "run_dir": str(tmp_path)}

    # A resumed run appends to the same files without a second header.
    log = runs.Logger(tmp_path, {"seed": 3})
    log.log_eval(300, "A", "test", [40], [1.0], [True])
    log.close()
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines.count(lines[0]) == 1 and lines[-1] == "300,A,test,40,0,1.0,1"


def test_log_eval_rejects_mismatched_task_ids(tmp_path, no_tensorboard):
    log = runs.Logger(tmp_path, {})
    with pytest.raises(ValueError, match="3 task ids for 2 rows"):
        log.log_eval(0, "A", "test", [0, 1, 2], [1.0, 2.0])
    log.close()


def test_progress_line_sps_eta_and_extra():
    line = runs.progress_line(100, 1100, time.time() - 10.0, {"test_return": -5.123, "phase": "pretrain"})
    assert line == "step 100/1100 | SPS 10.0 | ETA 0:01:40 | test_return=-5.123 | phase=pretrain"
    resumed = runs.progress_line(100, 1100, time.time() - 10.0, start_step=50)  # 50 steps in 10 s since resume
    assert resumed.startswith("step 100/1100 | SPS 5.0 | ETA 0:03:20")


def test_make_run_dir_default_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = runs.make_run_dir("PointRobot", "pearl", 2)
    assert d.is_dir() and re.fullmatch(r"runs/PointRobot__pearl__s2__\d{8}-\d{6}", d.as_posix())
    assert runs.make_run_dir("X", "m", 0, tmp_path / "given") == tmp_path / "given"


def test_summary_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pearl.py", "--seed", "1"])
    entry = runs.eval_entry(np.array([1.0, 2.0, 6.0]), np.array([4.0, 5.0]))
    assert entry == {"test": 3.0, "train": 4.5, "test_per_task": [1.0, 2.0, 6.0]}
    machine = runs.machine_info("cpu")
    runs.write_summary(tmp_path, method="pearl", env_id="PointRobot", preset="default", seed=1, total_steps=500,
                       wall_time_s=12.5, updates_per_s=40.0, machine=machine, dataset="datasets/x.npz",
                       eval={"A": entry, "B": runs.eval_entry([0.5])}, extra={"bf16": True})
    s = json.loads((tmp_path / "summary.json").read_text())
    assert {k: s[k] for k in ("method", "env_id", "preset", "seed", "total_steps", "wall_time_s", "updates_per_s",
                              "command", "dataset", "extra")} == dict(
        method="pearl", env_id="PointRobot", preset="default", seed=1, total_steps=500, wall_time_s=12.5,
        updates_per_s=40.0, command="pearl.py --seed 1", dataset="datasets/x.npz", extra={"bf16": True})
    assert s["eval"] == {"A": entry, "B": {"test": 0.5, "train": None, "test_per_task": [0.5]}}
    assert s["machine"] == machine and f"{len(os.sched_getaffinity(0))} CPUs" in machine and machine.endswith(", cpu")
    with pytest.raises(ValueError, match="eval_entry"):
        runs.write_summary(tmp_path, method="m", env_id="e", preset="p", seed=0, total_steps=1, wall_time_s=1,
                           updates_per_s=1, machine="", dataset="", eval={"A": {"test": 1.0}})


def test_atomic_write_keeps_old_content_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    runs.atomic_write_text(path, "old")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["summary.json"]

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        runs.atomic_write_bytes(path, b"new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["summary.json"]  # no .tmp left behind


META = {"method": "pearl", "env_id": "PointRobot", "preset": "default", "seed": 0, "obs_dim": 2, "args": {}}


def test_checkpoint_round_trip_and_named_errors(tmp_path):
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(FileNotFoundError, match="checkpoint.pt"):
        runs.load_checkpoint(path)
    with pytest.raises(ValueError, match="meta"):
        runs.save_checkpoint(path, {"model": {}})
    runs.save_checkpoint(path, {"meta": META, "w": torch.arange(3.0), "step": 7})
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    state = runs.load_checkpoint(path, {"method": "pearl", "env_id": "PointRobot", "obs_dim": 2})
    assert state["step"] == 7 and torch.equal(state["w"], torch.arange(3.0))

    with pytest.raises(ValueError) as e:
        runs.load_checkpoint(path, {"method": "pearl", "env_id": "GridNavi", "preset": "borel"})
    msg = str(e.value)
    assert "incompatible checkpoint" in msg and "method" not in msg
    assert "built for env_id='PointRobot', this run has env_id='GridNavi'" in msg
    assert "built for preset='default', this run has preset='borel'" in msg
    # a meta key added after the checkpoint was written is checked against the value it then ran with
    assert runs.load_checkpoint(path, {"env_id": "PointRobot", "new_flag": "off"}, predates={"new_flag": "off"})["step"] == 7
    with pytest.raises(ValueError, match="built for new_flag='off', this run has new_flag='on'"):
        runs.load_checkpoint(path, {"new_flag": "on"}, predates={"new_flag": "off"})
    with pytest.raises(ValueError, match="built for new_flag=None"):  # without predates: refused, as before
        runs.load_checkpoint(path, {"new_flag": "off"})

    bad = tmp_path / "truncated.pt"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt or truncated checkpoint"):
        runs.load_checkpoint(bad)


def test_check_fresh_run_dir(tmp_path):
    runs.check_fresh_run_dir(tmp_path, resume=False)  # empty dir: fine
    runs.save_checkpoint(tmp_path / "checkpoint.pt", {"meta": META})
    with pytest.raises(FileExistsError, match="--resume.*--run-dir"):
        runs.check_fresh_run_dir(tmp_path, resume=False)
    runs.check_fresh_run_dir(tmp_path, resume=True)


def test_seed_everything_repeats_all_generators():
    def draw():
        return random.random(), np.random.rand(), torch.rand(2).tolist()

    runs.seed_everything(5)
    a = draw()
    runs.seed_everything(5)
    assert draw() == a and torch.backends.cudnn.deterministic
    runs.seed_everything(6)
    assert draw() != a


def test_pick_device_falls_back_to_cpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="CUDA is not available"):
        assert runs.pick_device(True) == torch.device("cpu")
    assert runs.pick_device(False) == torch.device("cpu")
    assert "device: cpu" in capsys.readouterr().out


def test_append_csv_rows_appends_under_its_header_and_refuses_other_columns(tmp_path):
    path = tmp_path / "rows.csv"
    runs.append_csv_rows(path, [{"seed": 1, "ret": -5.0}])
    runs.append_csv_rows(path, [{"seed": 2, "ret": -4.0}])
    with open(path, newline="") as f:
        assert list(csv.DictReader(f)) == [{"seed": "1", "ret": "-5.0"}, {"seed": "2", "ret": "-4.0"}]
    before = path.read_text()
    with pytest.raises(ValueError, match="columns"):
        runs.append_csv_rows(path, [{"seed": 3, "ret": -3.0, "extra": 1}])
    with pytest.raises(ValueError, match="columns"):
        runs.append_csv_rows(path, [{"ret": -3.0, "seed": 3}])
    assert path.read_text() == before


def test_args_from_saved_drops_retired_keys_and_keeps_defaults_of_unsaved_ones():
    import dataclasses

    @dataclasses.dataclass
    class Args:
        seed: int = 1
        lr: float = 3e-4
        depth: int = 2

    got = runs.args_from_saved(Args, {"seed": 7, "lr": 1e-3, "retired_flag": True})
    assert got == Args(seed=7, lr=1e-3, depth=2)
