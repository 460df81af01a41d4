"""How much of the task does CORRO's transition encoder E1 keep? Trains E1 alone with InfoNCE (corro.py's stage 2,
any corro.py flags as ``--args.*``), then pools each context episode's z_x by a plain mean (no aggregator, no RL) and
predicts the task parameter of the test tasks' episodes by the mean of its 10 nearest training episodes in z.

    python benchmark/corro_encoder_probe.py --args.negatives relabel --args.relabel-queries [--args.encoder-hidden 256]

Printed and appended to benchmark/corro_encoder_probe.csv, at each step of ``--steps``: the InfoNCE loss (mean of the
last 1000 updates), the nearest-neighbour task error (Euclidean; on PointRobot the goal error) for IID contexts (offline
episodes of the test tasks) and for OOD contexts (one uniform-random-policy episode in each test task), and
corro.py's linear-probe R^2 on the IID contexts."""
import sys
import time
from pathlib import Path

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import corro
from common.data import ensure_dataset
from common.envs import make_family
from common.runs import append_csv_rows


def pooled_z(e1, batch, mask):
    with torch.no_grad():
        z_i = e1(corro.transition_features(batch["obs"], batch["actions"], batch["rewards"], batch["next_obs"]))
    return (z_i * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def main(args: corro.Args, steps: tuple[int, ...] = (2000, 5000, 20000), episodes: int = 20, k: int = 10,
         csv: str = "benchmark/corro_encoder_probe.csv"):
    """steps: InfoNCE updates at which to measure; episodes: context episodes per task; k: neighbours."""
    args = corro.resolve_args(args)
    torch.manual_seed(args.seed)
    fam = make_family(args.env_id, args.preset)
    ds = ensure_dataset(args.env_id, args.preset, family=fam)
    train, test = corro.TaskData(ds, fam.train_idx, "cpu"), corro.TaskData(ds, fam.test_idx, "cpu")
    nets, opts = corro.make_nets(fam.obs_dim, fam.act_dim, args, "cpu")
    if args.negatives == "cvae":
        raise SystemExit("corro_encoder_probe.py does not fit the CVAE; use --args.negatives relabel, reward_noise or random")
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.RandomState(0)
    random_policy = corro.behaviour_policies(ds.path, fam)["random"]
    ood = corro.collect_context(fam, fam.test_idx, episodes, lambda o: random_policy(o, rng), "cpu", 5)
    iid = {name: d.episodes(torch.arange(len(d.task_ids)).repeat_interleave(episodes), torch.Generator().manual_seed(1))
           for name, d in (("train", train), ("test", test))}
    y_train, y_test = (torch.as_tensor(fam.tasks[d.task_ids]).repeat_interleave(episodes, 0) for d in (train, test))
    losses, t0 = [], time.time()
    for step in range(1, max(steps) + 1):
        losses.append(corro.encoder_update(nets["e1"], opts["e1"], train, None, args, gen, fam))
        if step not in steps:
            continue
        z_train, z_test, z_ood = (pooled_z(nets["e1"], *b) for b in (iid["train"], iid["test"], ood))
        knn_err = lambda z: float((y_train[torch.cdist(z, z_train).topk(k, largest=False).indices].mean(1) - y_test)
                                  .norm(dim=-1).mean())
        row = {"env": args.env_id, "preset": args.preset, "seed": args.seed, "negatives": args.negatives,
               "relabel_queries": args.relabel_queries, "encoder_hidden": args.encoder_hidden, "latent_dim": args.latent_dim,
               "n_negatives": args.n_negatives, "temperature": args.temperature, "step": step,
               "infonce": round(float(np.mean(losses[-1000:])), 4), "knn_err_iid": round(knn_err(z_test), 4),
               "knn_err_ood_random": round(knn_err(z_ood), 4),
               "probe_r2_iid": round(corro.linear_probe_r2(z_train, y_train, z_test, y_test), 4),
               "updates_per_s": round(step / (time.time() - t0), 1)}
        print(row, flush=True)
        append_csv_rows(csv, [row])


if __name__ == "__main__":
    tyro.cli(main)
