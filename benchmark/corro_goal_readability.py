"""How well can ONE context episode give the goal away on PointRobot (default preset), and which encoder shapes can read it?

CORRO encodes each transition alone (E1, a unit vector) and pools the codes (E2). This script asks whether that shape,
rather than the InfoNCE loss, limits what the pooled z can know, by comparing goal readers that are *trained with the
true goals* (upper bounds on any unsupervised encoder of the same shape) on the same contexts:

- ``exact``: the least-squares fit of g on the family's goal arc to the episode's rewards, r_t = -||s'_t - g||
  (no learning: what the episode contains);
- ``per_transition``: an MLP (s, a, r, s') -> g, averaged over the episode (E1 + mean pooling);
- ``set_raw``: a DeepSets reader rho(mean_t phi(s, a, r, s')) -> g (a set-level encoder);
- ``set_on_e1`` (with ``--run``): the same reader on a trained CORRO run's frozen E1 codes z_t, i.e. what survives E1.

Readers train on a random train task's offline episode relabelled with a random train goal's rewards, so its states
say nothing of the goal. Tested on the test tasks: IID contexts (offline episodes of the task) and OOD contexts (one
uniform-random-policy episode in the task). Rows (mean Euclidean goal error) are appended to
benchmark/corro_goal_readability.csv.

    python benchmark/corro_goal_readability.py --run runs/PointRobot__corro__s1__...
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import corro
from common.data import ensure_dataset
from common.envs import make_family
from common.runs import append_csv_rows, args_from_saved


def mlp(i, o, hidden):
    return nn.Sequential(nn.Linear(i, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, o))


def goal_arc(n: int = 1441):
    """Candidate goals for ``exact_fit``: n points on the default preset's goal arc, the unit upper semicircle."""
    angle = torch.linspace(0, np.pi, n)
    return torch.stack([angle.cos(), angle.sin()], 1)


def exact_fit(batch, mask, goals):
    """argmin over candidate goals of the squared error between r_t and -||s'_t - g|| over the episode."""
    d = (batch["next_obs"][:, :, None] - goals[None, None]).norm(dim=-1)  # (episodes, K, candidates)
    return goals[((batch["rewards"][..., None] + d) ** 2 * mask[..., None]).sum(1).argmin(1)]


def main(run: str | None = None, updates: int = 15_000, episodes: int = 20,
         hidden: int = 128, seed: int = 0, csv: str = "benchmark/corro_goal_readability.csv"):
    """run: a finished corro.py run directory (adds ``set_on_e1``); updates: Adam steps per reader (batch 128
    episodes, lr 1e-3 cosine-decayed to 0); episodes: context episodes per test task and protocol."""
    torch.manual_seed(seed)
    fam = make_family("PointRobot")
    ds = ensure_dataset(fam.env_id, fam.preset, family=fam)
    train, test = corro.TaskData(ds, fam.train_idx, "cpu"), corro.TaskData(ds, fam.test_idx, "cpu")
    rng = np.random.RandomState(seed)
    random_policy = corro.behaviour_policies(ds.path, fam)["random"]
    contexts = {"iid": test.episodes(torch.arange(len(fam.test_idx)).repeat_interleave(episodes),
                                     torch.Generator().manual_seed(seed + 1)),
                "ood_random": corro.collect_context(fam, fam.test_idx, episodes, lambda o: random_policy(o, rng), "cpu", seed + 5)}
    g_test = torch.as_tensor(fam.tasks[fam.test_idx], dtype=torch.float32).repeat_interleave(episodes, 0)
    g_train = torch.as_tensor(fam.tasks[fam.train_idx], dtype=torch.float32)
    err = lambda pred: round(float((pred - g_test).norm(dim=-1).mean()), 4)
    raw = lambda b: corro.transition_features(b["obs"], b["actions"], b["rewards"], b["next_obs"])
    arc = goal_arc()
    rows = [{"env": fam.env_id, "reader": "exact", "run": "", "updates": 0,
             **{f"goal_err_{k}": err(exact_fit(b, m, arc)) for k, (b, m) in contexts.items()},
             "train_mse": 0.0, "seconds": 0.0}]
    print(rows[0], flush=True)

    readers = {"per_transition": (raw, 7, "mean_out"), "set_raw": (raw, 7, "set")}
    if run is not None:
        state = torch.load(Path(run) / "checkpoint.pt", weights_only=False)
        args = corro.resolve_args(args_from_saved(corro.Args, state["args"]))
        nets, _ = corro.make_nets(fam.obs_dim, fam.act_dim, args, "cpu")
        nets["e1"].load_state_dict(state["nets"]["e1"])
        readers["set_on_e1"] = (lambda b: nets["e1"](raw(b)).detach(), args.latent_dim, "set")
    for name, (feat, in_dim, kind) in readers.items():
        torch.manual_seed(seed)
        phi = mlp(in_dim, 2 if kind == "mean_out" else 64, hidden)
        rho = nn.Identity() if kind == "mean_out" else mlp(64, 2, hidden)
        opt = torch.optim.Adam([*phi.parameters(), *rho.parameters()], lr=1e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, updates)  # a settled final reader, not a noisy one
        read = lambda b, m: rho((phi(feat(b)) * m[..., None]).sum(1) / m.sum(1, keepdim=True))
        gen, t0 = torch.Generator().manual_seed(seed), time.time()
        for _ in range(updates):
            b, m = train.episodes(torch.randint(len(fam.train_idx), (128,), generator=gen), gen)
            goal = torch.randint(len(fam.train_idx), (128,), generator=gen)
            ids = np.broadcast_to(fam.train_idx[goal.numpy()][:, None], b["rewards"].shape)
            b["rewards"] = corro.rewards_in(fam, ids, b["obs"], b["actions"], b["next_obs"])
            loss = (read(b, m) - g_train[goal]).pow(2).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            row = {"env": fam.env_id, "reader": name, "run": run or "", "updates": updates,
                   **{f"goal_err_{k}": err(read(b, m)) for k, (b, m) in contexts.items()},
                   "train_mse": round(loss.item(), 4), "seconds": round(time.time() - t0, 1)}
        print(row, flush=True)
        rows.append(row)
    append_csv_rows(csv, rows)


if __name__ == "__main__":
    tyro.cli(main)
