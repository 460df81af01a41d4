"""Per-task returns of a run's evaluation, read back from its metrics.csv.

    python benchmark/per_task.py RUN_DIR [RUN_DIR ...] [--step S] [--mode B] [--split test]

For each run: one row per task (its parameter from the run's env/preset, e.g. a target velocity) with the return
of every episode of the chosen evaluation (default: the last one), then the mean over tasks. Used for the
HalfCheetahVel/ldm-cpu rows of the README, where the paper reports the extrapolation velocities apart.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.envs import make_family  # noqa: E402


def per_task(run_dir: Path, step: int | None, mode: str, split: str):
    """Returns (step, {task_id: [return of episode 0, 1, ...]}) of one evaluation of the run."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        raise SystemExit(f"{path}: no metrics.csv (not a run directory?)")
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["mode"] == mode and r["split"] == split]
    if not rows:
        raise SystemExit(f"{path}: no evaluation rows with mode {mode!r} and split {split!r}")
    steps = sorted({int(r["global_step"]) for r in rows})
    step = steps[-1] if step is None else step
    if step not in steps:
        raise SystemExit(f"{path}: no evaluation at step {step} (evaluated at {steps})")
    out = defaultdict(dict)
    for r in rows:
        if int(r["global_step"]) == step:
            out[int(r["task_id"])][int(r["episode"])] = float(r["return"])
    return step, {t: [eps[e] for e in sorted(eps)] for t, eps in sorted(out.items())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--step", type=int, default=None, help="evaluation step (default: the last)")
    p.add_argument("--mode", default="B", help="evaluation mode column of metrics.csv")
    p.add_argument("--split", default="test", help="test or train")
    a = p.parse_args(argv)
    for run_dir in a.run_dirs:
        cfg = json.loads((run_dir / "args.json").read_text())
        fam = make_family(cfg["env_id"], cfg["preset"])
        step, res = per_task(run_dir, a.step, a.mode, a.split)
        print(f"{run_dir} ({cfg['env_id']}/{cfg['preset']}, mode {a.mode}, {a.split}, step {step})")
        for t, rets in res.items():
            param = ", ".join(f"{x:.3g}" for x in np.asarray(fam.tasks[t]).reshape(-1)[:4])
            print(f"  task {t:3d} [{param}]: " + " ".join(f"{x:9.2f}" for x in rets) + f"   sum {sum(rets):9.2f}")
        m = np.array(list(res.values()))
        print("  mean: " + " ".join(f"{x:9.2f}" for x in m.mean(0)) + f"   sum {m.sum(1).mean():9.2f}")


if __name__ == "__main__":
    main()
