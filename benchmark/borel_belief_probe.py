"""How close is a BOReL GridNavi belief to the exact Bayes posterior? Feeds fixed histories to a run's frozen VAE and
compares the decoder's goal distribution (its per-cell Bernoulli probabilities of the belief mean, normalised over
the cells) with the exact posterior: uniform over the goal cells not yet visited without reward.

    python benchmark/borel_belief_probe.py RUN_DIR [RUN_DIR ...]    (a run stopped after the VAE: --total-steps 0)

Histories (start (0, 0) in each of the 4 episodes of 15 steps, as at test; every goal off the path, so no reward):
- border: the route the trained DQNs take in episode 1 (up to (0,4), along the top row, down the far side, back to
  (2,0)), in all four episodes; 14 distinct cells;
- snake: up column 0, down column 1, up column 2, in all four episodes; 15 distinct cells;
- border-2ep: the border route split over episodes 1 and 2 (up and half the top row, then along the bottom row and
  up the far side), then standing at (0,0);
- random: 32 uniform random walks per goal (all 21 goals; a goal found once is the exact posterior from then on).
Printed and appended to benchmark/borel_belief_probe.csv: the decoder's mass on ruled-out cells (exact: 0) after t
steps; also the share of the dataset's episodes that visit at least 10 / 12 distinct cells."""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import borel
from common.data import load_dataset
from common.envs import make_family
from common.runs import append_csv_rows, args_from_saved

torch.set_num_threads(1)
MOVES = np.array([[0, 0], [0, 1], [1, 0], [0, -1], [-1, 0]])  # stay, up, right, down, left (common/envs.py)
STEPS = (5, 10, 15, 20, 30, 45, 60)
ROUTES = {  # 15 actions per episode; None: the route of every episode
    "border": [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 0] * 4,
    "snake": [1, 1, 1, 1, 2, 3, 3, 3, 3, 2, 1, 1, 1, 1, 0] * 4,
    "border-2ep": [1, 1, 1, 1, 2, 2] + [0] * 9 + [2, 2, 2, 2, 1, 1, 1, 1] + [0] * 7 + [0] * 30,
}


def load_vae(run):
    """The frozen VAE of a borel.py run whose VAE stage has finished: (vae, family, args, VAE step)."""
    st = torch.load(f"{run}/checkpoint.pt", map_location="cpu", weights_only=False)
    if st["stage"] != "rl":
        raise SystemExit(f"{run}: its VAE stage has not finished (VAE step {st['vae_step']})")
    args = borel.resolve_args(args_from_saved(borel.Args, st["args"]))
    fam = make_family(args.env_id, args.preset)
    vae, _, _ = borel.make_nets(fam, args, fam.episodes_per_task, "cpu")
    vae.load_state_dict(st["vae"])
    return vae, fam, args, st.get("vae_step")


def walk(actions, n, H=15):
    """Cells after each action from (0, 0), back at (0, 0) at the start of every episode: (T, 2)."""
    pos, out = np.zeros(2, int), []
    for t, a in enumerate(actions):
        if t % H == 0:
            pos = np.zeros(2, int)
        pos = np.clip(pos + MOVES[a], 0, n - 1)
        out.append(pos.copy())
    return np.array(out)


def ruled_out_mass(vae, fam, paths, goals):
    """paths (B, T, 2), goals (B, 2): the decoder's normalised mass on cells the exact posterior rules out, (T + 1, B)."""
    n, H = fam.config["size"], fam.horizon
    B, T, _ = paths.shape
    rew = np.where(np.all(paths == goals[:, None], -1), 1.0, -0.1)
    bits = ((torch.arange(T) % H) == H - 1).float()[:, None, None].expand(-1, B, 1)
    with torch.no_grad():
        mu, _, _ = vae.encode(torch.zeros(T, B, dtype=torch.long), torch.as_tensor(paths, dtype=torch.float32).transpose(0, 1),
                              torch.as_tensor(rew, dtype=torch.float32).T, bits)
        p = torch.sigmoid(vae.dec(mu)).numpy()  # (T + 1, B, cells)
    q = p / p.sum(-1, keepdims=True)
    goal_cells = np.zeros(n * n, bool)
    goal_cells[[int(g[0]) * n + int(g[1]) for g in fam.tasks]] = True
    out = np.zeros((T + 1, B))
    for b in range(B):
        cand = goal_cells.copy()
        for t in range(T + 1):
            if t > 0:
                c = paths[b, t - 1, 0] * n + paths[b, t - 1, 1]
                cand = np.eye(n * n, dtype=bool)[c] if rew[b, t - 1] == 1.0 else cand & (np.arange(n * n) != c)
            out[t, b] = q[t, b][~cand].sum()
    return out


def main():
    rows = []
    for run in sys.argv[1:]:
        rng = np.random.RandomState(0)
        vae, fam, args, vae_step = load_vae(run)
        n, H = fam.config["size"], fam.horizon
        goals = fam.tasks.astype(int)
        ds = load_dataset(args.dataset or f"datasets/{args.env_id}__{args.preset}__s0.npz", args.env_id, args.preset)
        eps = ds["next_obs"][: len(ds["next_obs"]) // H * H].reshape(-1, H, 2)
        distinct = np.array([len({tuple(c) for c in e}) for e in eps])
        print(f"{run} (VAE step {vae_step}); dataset episodes with >= 10 / 12 distinct cells: "
              f"{(distinct >= 10).mean():.2%} / {(distinct >= 12).mean():.2%}")
        hist = {}
        for name, acts in ROUTES.items():
            path = walk(acts, n, H)
            off = np.array([g for g in goals if not np.all(path == g, -1).any()])
            hist[name] = (np.repeat(path[None], len(off), 0), off)
        acts = rng.randint(0, 5, size=(32 * len(goals), 4 * H))
        hist["random"] = (np.stack([walk(a, n, H) for a in acts]), np.repeat(goals, 32, 0))
        for name, (paths, g) in hist.items():
            m = ruled_out_mass(vae, fam, paths, g).mean(1)
            print(f"  {name:10s} ruled-out mass " + " ".join(f"t{t}:{m[t]:.2f}" for t in STEPS))
            rows.append({"run": run, "vae_lr": args.vae_lr, "vae_step": vae_step, "history": name}
                        | {f"t{t}": round(float(m[t]), 3) for t in STEPS})
    append_csv_rows(Path(__file__).with_suffix(".csv"), rows)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main()
