"""Does a trained MQL actor read the task from the rewards of its history, or from its states and actions?

    python benchmark/mql_context_probe.py RUN_DIR [RUN_DIR ...]     # PointRobot runs of mql.py

For every test task, 20 offline episodes of the task's data; at every step t >= 3 the actor acts on the true history
(a, r, s) and on the same history with its rewards recomputed for another test task (the states and actions stay,
only the rewards say "another goal"). Reported: the cosine between the action and the direction to a goal,
for the true history (toward its own goal), and for the swapped history toward the goal its rewards belong to
("rewards' goal") and toward the goal its states and actions belong to ("states' goal"). An actor that infers the
task from rewards turns toward the rewards' goal; one that reads it from the states and actions keeps heading to
the states' goal. Rows go to benchmark/mql_context_probe.csv.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mql  # noqa: E402
from common.data import default_dataset_path, load_dataset  # noqa: E402
from common.envs import make_family, relabel_rewards  # noqa: E402
from common.runs import args_from_saved  # noqa: E402


def cosine(a, d):
    return (a * d).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(d, axis=-1) + 1e-8)


def probe(run_dir: Path, episodes: int = 20, seed: int = 0) -> dict:
    args_d = json.loads((run_dir / "args.json").read_text())
    args = mql.resolve_args(args_from_saved(mql.Args, args_d))
    family = make_family(args.env_id, args.preset)
    ds = load_dataset(args_d.get("dataset") or default_dataset_path(args.env_id, args.preset), args.env_id, args.preset)
    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    nets = mql.make_nets(family.obs_dim, family.act_dim, args, "cpu")
    nets["actor"].load_state_dict(state["nets"]["actor"])
    rng = np.random.RandomState(seed)
    rows, true_task, swap_task = [], [], []
    T = len(family.test_idx)
    for k, t in enumerate(family.test_idx):
        sl = ds.task_slice(int(t))
        eps = rng.choice(np.unique(ds["episode_id"][sl]), episodes, replace=False)
        r = sl.start + np.flatnonzero(np.isin(ds["episode_id"][sl], eps) & (ds["step"][sl] >= 3))
        rows.append(r)
        true_task += [k] * len(r)
        swap_task += [(k + 1 + rng.randint(T - 1)) % T for _ in r]  # another test task
    rows = np.concatenate(rows)
    true_task, swap_task = np.array(true_task), np.array(swap_task)
    keys = ("obs", "actions", "rewards", "next_obs", "terminals", "step")
    tr = mql.transitions_from_arrays({k: ds[k] for k in keys}, np.zeros(ds.num_transitions, np.int64), "cpu")
    # rewards of every dataset row under every test task, for the swapped histories
    table, _ = relabel_rewards(family, family.test_idx[:, None], ds["obs"][None], ds["actions"][None], ds["next_obs"][None])
    table = torch.as_tensor(table)
    idx = torch.as_tensor(rows)[None]
    H = args.history_length
    with torch.no_grad():
        h_true, _ = tr.histories(idx, H)
        h_swap, _ = tr.histories(idx, H, torch.as_tensor(swap_task)[None], table)
        obs = tr.obs[idx]
        a_true = nets["actor"](obs, h_true)[0].numpy()
        a_swap = nets["actor"](obs, h_swap)[0].numpy()
    s = ds["obs"][rows]
    goals = family.tasks[family.test_idx]
    d_true, d_swap = goals[true_task] - s, goals[swap_task] - s
    return {"run": str(run_dir), "rows": len(rows),
            "cos_true_history_to_own_goal": float(cosine(a_true, d_true).mean()),
            "cos_swapped_to_rewards_goal": float(cosine(a_swap, d_swap).mean()),
            "cos_swapped_to_states_goal": float(cosine(a_swap, d_true).mean()),
            "action_change": float(np.linalg.norm(a_true - a_swap, axis=-1).mean())}


def main():
    out = Path(__file__).resolve().parent / "mql_context_probe.csv"
    res = [probe(Path(p)) for p in sys.argv[1:]]
    for r in res:
        print(" | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(res[0]))
        w.writeheader()
        w.writerows(res)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
