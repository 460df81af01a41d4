"""benchmark/run.py with a fake method script; benchmark/report.py on hand-made runs."""

import csv
import importlib.util
import json
import sys

import numpy as np
import pytest
import torch

from benchmark import report, run
from common import runs

# ---------------------------------------------------------------------------------------------
# report.py
# ---------------------------------------------------------------------------------------------

README = "# omrl\n\nintro text\n\n<!-- results:start -->\nold table\n<!-- results:end -->\n\n## Tail\nkept\n"


def fake_run(run_dir, method, seed, test, train, curve):
    """A finished run: metrics.csv with a test curve for mode A (2 tasks) and summary.json."""
    log = runs.Logger(run_dir, {"seed": seed}, tensorboard=False)
    for step, r in curve:
        log.log_eval(step, "A", "test", [8, 9], [r - 1.0, r + 1.0])  # mean over tasks = r
    log.close()
    runs.write_summary(run_dir, method=method, env_id="PointRobot", preset="default", seed=seed, total_steps=200,
                       wall_time_s=60.0 * seed, updates_per_s=10.0 * seed, machine="test-box", dataset="d.npz",
                       eval={"A": {"test": test, "train": train, "test_per_task": [test - 1, test + 1]}})


@pytest.fixture
def bench(tmp_path):
    root = tmp_path / "runs"
    fake_run(root / "a1", "alpha", 1, -5.0, -2.0, [(100, -9.0), (200, -5.0)])
    fake_run(root / "a2", "alpha", 2, -7.0, -4.0, [(100, -11.0), (200, -7.0)])
    fake_run(root / "b1", "beta", 1, 1.0, None, [(100, 0.0), (200, 1.0)])
    fake_run(root / "b2", "beta", 2, 4.0, None, [(100, 2.0), (200, 4.0)])
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "PointRobot__default.json").write_text(json.dumps(
        {"env_id": "PointRobot", "preset": "default", "test": {"random": -20.5, "oracle": -3.25, "behaviour": None},
         "train": {"random": -21.0}}))
    readme = tmp_path / "README.md"
    readme.write_text(README)
    return dict(root=root, refs=refs, readme=readme, out=tmp_path / "out")


def test_report_table_csv_and_plot(bench):
    argv = ["--run-root", str(bench["root"]), "--readme", str(bench["readme"]), "--out", str(bench["out"]),
            "--references", str(bench["refs"])]
    assert report.main(argv) == 0
    text = bench["readme"].read_text()
    head, rest = text.split("<!-- results:start -->")
    table, tail = rest.split("<!-- results:end -->")
    assert head == README.split("<!-- results:start -->")[0] and tail == README.split("<!-- results:end -->")[1]
    rows = [line for line in table.splitlines() if line.startswith("| PointRobot")]
    assert rows == [
        "| PointRobot | default | alpha | A | -6.00 ± 1.00 | -3.00 | 2 | 200 | 0:01:30 | 15.0 | test-box |",
        "| PointRobot | default | beta | A | 2.50 ± 1.50 |  | 2 | 200 | 0:01:30 | 15.0 | test-box |",
        "| PointRobot | default | random |  | -20.50 | -21.00 |  |  |  |  |  |",
        "| PointRobot | default | oracle |  | -3.25 |  |  |  |  |  |  |",
    ]
    assert "old table" not in text
    with open(bench["out"] / "results.csv") as f:
        got = {(r["method"], r["mode"]): r for r in csv.DictReader(f)}
    assert float(got["alpha", "A"]["test_mean"]) == -6.0 and float(got["alpha", "A"]["test_std"]) == 1.0
    assert float(got["random", ""]["test_mean"]) == -20.5
    assert report.return_curve(bench["root"] / "b2" / "metrics.csv", "A") == {100: 2.0, 200: 4.0}
    png = bench["out"] / "plots" / "PointRobot__default.png"
    if importlib.util.find_spec("matplotlib"):  # optional extra: plots when installed, skipped cleanly when not
        assert png.stat().st_size > 1000
    else:
        assert not png.exists()

    # A second report replaces the table instead of adding one.
    assert report.main(argv) == 0
    assert bench["readme"].read_text() == text


def test_report_keeps_rows_of_runs_measured_elsewhere(bench, tmp_path):
    argv = ["--readme", str(bench["readme"]), "--out", str(bench["out"]), "--references", str(bench["refs"])]
    assert report.main(["--run-root", str(bench["root"]), *argv]) == 0
    # a later session holds only a new run of alpha: beta's rows stay, alpha's are replaced
    other = tmp_path / "other"
    fake_run(other / "a3", "alpha", 3, -1.0, -1.0, [(100, -1.0)])
    assert report.main(["--run-root", str(other), *argv]) == 0
    rows = [line for line in bench["readme"].read_text().splitlines() if line.startswith("| PointRobot")]
    assert rows[0] == "| PointRobot | default | alpha | A | -1.00 ± 0.00 | -1.00 | 1 | 200 | 0:03:00 | 30.0 | test-box |"
    assert rows[1] == "| PointRobot | default | beta | A | 2.50 ± 1.50 |  | 2 | 200 | 0:01:30 | 15.0 | test-box |"
    assert [r.split(" | ")[2] for r in rows[2:]] == ["random", "oracle"]  # references rebuilt once, not kept twice


def test_report_needs_markers(bench):
    bench["readme"].write_text("# no markers\n")
    with pytest.raises(SystemExit, match="results:start"):
        report.main(["--run-root", str(bench["root"]), "--readme", str(bench["readme"]), "--out", str(bench["out"]),
                     "--references", str(bench["refs"])])
    assert bench["readme"].read_text() == "# no markers\n"


# ---------------------------------------------------------------------------------------------
# run.py
# ---------------------------------------------------------------------------------------------

FAKE_METHOD = """
import json, sys
from pathlib import Path
argv = sys.argv[1:]
run_dir = Path(argv[argv.index("--run-dir") + 1])
run_dir.mkdir(parents=True, exist_ok=True)
with open(run_dir.parent / "calls.txt", "a") as f:
    f.write(json.dumps(argv) + "\\n")
print("fake training", argv[argv.index("--seed") + 1])
if "--fail" in argv:
    sys.exit(3)
(run_dir / "summary.json").write_text("{}")
"""


@pytest.fixture
def fake(tmp_path):
    (tmp_path / "fakemethod.py").write_text(FAKE_METHOD)
    return tmp_path


def calls(root):
    path = root / "calls.txt"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_run_each_seed_once_with_flags_then_skip(fake, capsys):
    root = fake / "bench"
    argv = ["--method", "fakemethod", "--env", "PointRobot", "--seeds", "1", "2", "--run-root", str(root),
            "--script-dir", str(fake), "--preset", "default", "--args", "--total-steps 5 --eval-every 2",
            "--extra", "--bf16"]
    assert run.main(argv) == 0
    assert calls(root) == [
        ["--env-id", "PointRobot", "--preset", "default", "--seed", str(s), "--run-dir", str(root / f"PointRobot__fakemethod__s{s}"),
         "--total-steps", "5", "--eval-every", "2", "--bf16"] for s in (1, 2)]
    assert "fake training 2" in (root / "PointRobot__fakemethod__s2.log").read_text()
    assert "fake training 1" in capsys.readouterr().out

    assert run.main(argv) == 0  # both finished: nothing runs again
    assert len(calls(root)) == 2
    assert capsys.readouterr().out.count("summary.json exists, skipped") == 2


def test_run_uses_settings_resumes_and_fails(fake, monkeypatch):
    root = fake / "bench"
    monkeypatch.setattr(run, "SETTINGS", {("fakemethod", "GridNavi"): {
        "preset": "borel", "args": ["--fail"], "steps": 300, "note": "test"}})
    base = ["--method", "fakemethod", "--seeds", "4", "--run-root", str(root), "--script-dir", str(fake)]
    with pytest.raises(SystemExit, match="available: fakemethod/GridNavi"):
        run.main(base + ["--env", "PointRobot"])
    (root / "GridNavi__fakemethod__s4").mkdir(parents=True)
    (root / "GridNavi__fakemethod__s4" / "checkpoint.pt").write_bytes(b"x")  # an interrupted run
    assert run.main(base + ["--env", "GridNavi", "--seeds", "4", "5"]) == 3  # stops at the first failure
    assert calls(root) == [["--env-id", "GridNavi", "--preset", "borel", "--seed", "4", "--run-dir",
                            str(root / "GridNavi__fakemethod__s4"), "--total-steps", "300", "--fail", "--resume"]]


def test_run_variant_calls_its_script_and_gets_its_own_run_dirs(fake, monkeypatch):
    root = fake / "bench"
    monkeypatch.setattr(run, "SETTINGS", {("fakemethod-x", "PointRobot"): {
        "script": "fakemethod", "preset": "default", "args": ["--x"], "steps": 7, "note": "test"}})
    assert run.main(["--method", "fakemethod-x", "--env", "PointRobot", "--seeds", "2", "--run-root", str(root),
                     "--script-dir", str(fake)]) == 0
    assert calls(root) == [["--env-id", "PointRobot", "--preset", "default", "--seed", "2", "--run-dir",
                            str(root / "PointRobot__fakemethod-x__s2"), "--total-steps", "7", "--x"]]


def test_every_setting_parses_with_its_script_and_names_its_variant():
    """Each SETTINGS entry's flags are valid for its script, and a variant key's run carries its own method name
    (so report.py puts it in a row of its own), e.g. pearl-online -> summary method "pearl-online"."""
    import importlib
    import tyro

    from benchmark.settings import SETTINGS
    for (method, env), cfg in SETTINGS.items():
        mod = importlib.import_module(cfg.get("script", method))
        flags = ["--env-id", env, "--preset", cfg["preset"], "--total-steps", str(cfg["steps"]), *cfg["args"]]
        args = tyro.cli(mod.Args, args=flags)
        assert args.total_steps == cfg["steps"], (method, env)
        if hasattr(mod, "variant_name"):
            assert mod.variant_name(mod.resolve_args(args)) == method, (method, env)


# ---------------------------------------------------------------------------------------------
# per_task.py
# ---------------------------------------------------------------------------------------------


def test_per_task_reads_the_last_or_chosen_evaluation_by_task_and_episode(tmp_path, capsys):
    from benchmark import per_task

    run_dir = tmp_path / "r"
    log = runs.Logger(run_dir, {"env_id": "HalfCheetahVel", "preset": "ldm-cpu"}, tensorboard=False)
    log.log_eval(0, "B", "test", [20, 21], [[-50.0, -51.0], [-150.0, -149.0]])
    log.log_eval(100, "B", "test", [20, 21], [[-10.0, -12.0], [-40.0, -20.0]])
    log.log_eval(100, "B", "train", [0], [[-1.0, -2.0]])
    log.close()
    assert per_task.per_task(run_dir, None, "B", "test") == (100, {20: [-10.0, -12.0], 21: [-40.0, -20.0]})
    assert per_task.per_task(run_dir, 0, "B", "test")[1][21] == [-150.0, -149.0]
    with pytest.raises(SystemExit, match="no evaluation at step 50"):
        per_task.per_task(run_dir, 50, "B", "test")
    with pytest.raises(SystemExit, match="no evaluation rows"):
        per_task.per_task(run_dir, None, "A", "test")
    per_task.main([str(run_dir)])
    out = capsys.readouterr().out
    assert "task  21 [0.75]" in out and "sum    -41.00" in out  # task 21 is the 0.75 m/s test velocity; mean of sums


def test_goal_readability_exact_fit_recovers_the_goal_from_one_random_episode():
    from benchmark import corro_goal_readability as cgr
    from common.envs import make_family
    import corro
    fam = make_family("PointRobot")
    rng = np.random.RandomState(0)
    act = lambda obs: rng.uniform(-1, 1, (len(obs), 2)).astype(np.float32)
    batch, mask = corro.collect_context(fam, fam.test_idx, 2, act, "cpu", 0)
    goals = torch.as_tensor(fam.tasks[fam.test_idx], dtype=torch.float32).repeat_interleave(2, 0)
    fit = cgr.exact_fit(batch, mask, cgr.goal_arc())
    assert (fit - goals).norm(dim=-1).max() < 0.005
    batch["rewards"] = batch["rewards"].flip(0)  # another task's rewards point to another goal
    assert (cgr.exact_fit(batch, mask, cgr.goal_arc()) - goals).norm(dim=-1).max() > 0.5
