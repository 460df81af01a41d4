"""Which part of the context does a trained PEARL encoder read? Mode-A test return of finished PointRobot runs
when the context (64 transitions per test task, z = posterior mean) comes from

    own data          the test task's offline data (protocol A)
    own random eps    the test task's first 10 episodes only (the collector's uniform-random episodes)
    own last 50 eps   the test task's last 50 episodes (near-expert: the states sit at the goal)
    other tasks       transitions of random *train* tasks relabelled with the test task's reward

An encoder that reads the task from the states (where the data end) does well on "own data" and fails on
"own random eps" and "other tasks"; one that reads rewards does well on "other tasks" and "own random eps".

    python benchmark/pearl_context_shift.py runs/benchmark/PointRobot__pearl__s1 runs/benchmark/PointRobot__pearl-relabel__s1
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import pearl  # noqa: E402
from common.data import load_dataset  # noqa: E402
from common.envs import make_family, relabel_rewards  # noqa: E402
from common.evaluation import run_episodes  # noqa: E402
from common.runs import args_from_saved  # noqa: E402

SOURCES = ("own data", "own random eps", "own last 50 eps", "other tasks")


def probe(run_dir: Path, n: int = 64, draws: int = 3) -> dict:
    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    args = pearl.resolve_args(args_from_saved(pearl.Args, state["args"]))
    fam = make_family(args.env_id, args.preset)
    ds = load_dataset(Path(json.loads((run_dir / "summary.json").read_text())["dataset"]), args.env_id, args.preset)
    nets, _ = pearl.make_nets(fam.obs_dim, fam.act_dim, args, "cpu")
    for k, net in nets.items():
        net.load_state_dict(state["nets"][k])
    a, test = ds.arrays, fam.test_idx
    rows_of = lambda t: np.arange(ds.task_slice(t).start, ds.task_slice(t).stop)  # noqa: E731
    train_rows = np.concatenate([rows_of(t) for t in fam.train_idx])
    pools = {"own data": lambda t: rows_of(t), "own random eps": lambda t: rows_of(t)[:10 * fam.horizon],
             "own last 50 eps": lambda t: rows_of(t)[-50 * fam.horizon:], "other tasks": lambda t: train_rows}
    out = {}
    for name in SOURCES:
        returns = []
        for d in range(draws):
            rng = np.random.RandomState(d)
            rows = np.stack([rng.choice(pools[name](t), n) for t in test])
            r = a["rewards"][rows]
            if name == "other tasks":
                r, _ = relabel_rewards(fam, test[:, None], a["obs"][rows], a["actions"][rows], a["next_obs"][rows])
            batch = {"obs": a["obs"][rows], "actions": a["actions"][rows], "rewards": r, "next_obs": a["next_obs"][rows]}
            ctx = pearl.context_tensor({k: torch.as_tensor(v, dtype=torch.float32) for k, v in batch.items()},
                                       "rewards", args.use_next_obs_in_context)
            with torch.no_grad():
                mu, _ = pearl.infer_posterior(nets["encoder"], ctx)
            ret, _ = run_episodes(fam.make_vec_env(test, 1, seed=d), lambda o, ep, t: pearl.policy_act(nets["policy"], o, mu), 1)
            returns.append(ret[:, 0].mean())
        out[name] = float(np.mean(returns))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="finished pearl.py run directories (checkpoint.pt + summary.json)")
    p.add_argument("--csv", type=Path, default=REPO / "benchmark" / "pearl_context_shift.csv")
    a = p.parse_args(argv)
    rows = []
    for run in a.runs:
        s = json.loads((run / "summary.json").read_text())
        res = probe(run)
        rows.append({"run": run.name, "method": s["method"], "seed": s["seed"], **{k: round(v, 3) for k, v in res.items()}})
        print(" | ".join(f"{k}: {v}" for k, v in rows[-1].items()), flush=True)
    tmp = a.csv.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tmp.replace(a.csv)
    print(f"wrote {a.csv}")


if __name__ == "__main__":
    main()
