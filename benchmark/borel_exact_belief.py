"""GridNavi: borel.py's offline DQN on the EXACT posterior over goal cells instead of the VAE's belief.

The exact posterior after a history is uniform over the training goals not yet ruled out (a goal is ruled out by
standing on its cell without the +1), and one-hot on the goal once the +1 is seen. The DQN, its data (the unmixed
training rollouts), its hyperparameters and the online BAMDP evaluation are borel.py's with ``--belief-input cells``;
only the belief differs. This separates what the learned belief costs from what the offline DQN can learn from this
data at all.

    OMP_NUM_THREADS=1 python benchmark/borel_exact_belief.py --seed 1 --total-steps 50000

Rows (one per evaluation: seed, double_q, lr, step, summed 4-episode test return, per episode, success) are appended to
benchmark/borel_exact_belief.csv."""
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import borel
from common.data import ensure_dataset
from common.envs import make_family
from common.evaluation import run_episodes
from common.runs import append_csv_rows, seed_everything


@dataclass
class Args:
    seed: int = 1
    """seed of the DQN and its batches"""
    total_steps: int = 50_000
    """DQN updates"""
    eval_every: int = 2_500
    """updates between evaluations"""
    double_q: bool = False
    """double DQN targets (borel.py --double-q)"""
    lr: float = 3e-4
    """DQN learning rate (borel.py --lr; official 3e-4)"""
    out: str = "benchmark/borel_exact_belief.csv"
    """CSV the evaluation rows are appended to"""


def posterior(alive, found):
    """Uniform over the goal cells still alive, or one-hot on the goal once found; alive / found (..., cells)."""
    p = torch.where(found.sum(-1, keepdim=True) > 0, found, alive)
    return p / p.sum(-1, keepdim=True).clamp_min(1e-9)


def exact_posterior(next_obs, rewards, prior, size):
    """Posterior over cells before each step and after the last one: (R, T + 1, cells) from (R, T, 2) positions and
    (R, T) rewards; prior: 1 on the cells that can hold the goal (the training goals), else 0."""
    R, T = rewards.shape
    cell = (next_obs[..., 0] * size + next_obs[..., 1]).long()
    seen = torch.zeros(R, T + 1, size * size)
    seen[:, 1:].scatter_(2, cell[..., None], 1.0)
    hit = torch.zeros(R, T + 1, size * size)
    hit[:, 1:].scatter_(2, cell[..., None], (rewards == 1.0).float()[..., None])
    # cells stood on so far rule their goal out; a +1 pins it
    return posterior(prior * (1 - seen.cummax(1).values), hit.cummax(1).values)


def main(a: Args):
    torch.set_num_threads(1)
    seed_everything(a.seed)
    args = borel.resolve_args(borel.Args(seed=a.seed, belief_input="cells", cuda=False, double_q=a.double_q, lr=a.lr))
    fam = make_family("GridNavi", "borel")
    k, size = fam.episodes_per_task, fam.config["size"]
    prior = torch.zeros(size * size)
    prior[[int(g[0]) * size + int(g[1]) for g in fam.tasks[fam.train_idx]]] = 1.0
    ds = ensure_dataset("GridNavi", "borel", family=fam)
    roll = borel.to_tensors(borel.build_rollouts(ds, fam, fam.train_idx, k), True, "cpu")
    data = borel.HyperData(roll, exact_posterior(roll["next_obs"], roll["rewards"], prior, size), True)
    _, nets, opts = borel.make_nets(fam, args, k, "cpu")
    gen = torch.Generator().manual_seed(a.seed)

    def evaluate():
        venv = fam.make_vec_env(fam.test_idx, 1, seed=a.seed)
        B = venv.num_envs
        st = {"alive": prior.repeat(B, 1), "found": torch.zeros(B, size * size)}

        def act(obs, ep, t):
            x = torch.cat([torch.as_tensor(obs, dtype=torch.float32), posterior(st["alive"], st["found"])], -1)
            return borel.act_on(nets, x, True).numpy()

        def observe(o, act_, r, no, term, trunc, info, alive):
            cell = torch.as_tensor(no[:, 0] * size + no[:, 1]).long()
            st["alive"].scatter_(1, cell[:, None], 0.0)
            st["found"].scatter_(1, cell[:, None], torch.as_tensor(r == 1.0, dtype=torch.float32)[:, None])

        return run_episodes(venv, act, k, observe=observe)

    step, rows, t0 = 0, [], time.time()
    tasks = None
    while step < a.total_steps:
        if tasks is None or step % args.updates_per_iter == 0:
            tasks = torch.randint(len(data.task_ids), (args.meta_batch,), generator=gen)
        borel.dqn_update(nets, opts, data.sample(tasks, args.batch_size, gen), args)
        step += 1
        if step % a.eval_every == 0:
            ret, succ = evaluate()
            per_ep = ret.mean(0)
            rows.append({"seed": a.seed, "double_q": a.double_q, "lr": a.lr, "step": step, "B_test_sum": round(float(ret.sum(1).mean()), 3),
                         **{f"B_test_ep{e + 1}": round(float(v), 3) for e, v in enumerate(per_ep)},
                         "success": round(float(succ.any(1).mean()), 3)})
            print(f"step {step}: sum {rows[-1]['B_test_sum']:.2f} per episode {np.round(per_ep, 2)} success "
                  f"{rows[-1]['success']:.2f} ({step / (time.time() - t0):.0f} updates/s)", flush=True)
    append_csv_rows(a.out, rows)


if __name__ == "__main__":
    main(tyro.cli(Args))
