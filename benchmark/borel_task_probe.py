"""Does a BOReL belief carry the task? A linear probe from the frozen encoder's belief mean mu_t to the task parameter
(goal, velocity, ...), fit by least squares on the training tasks' offline rollouts and scored (R^2, averaged over the
parameter's dimensions) on the test tasks' offline rollouts, after t steps of each rollout.

    python benchmark/borel_task_probe.py RUN_DIR [RUN_DIR ...]    (any borel.py run past its VAE stage; not GridNavi)

Printed and appended to benchmark/borel_task_probe.csv: the test R^2 and the mean log-variance of the belief after t
steps, for t in STEPS (those within the rollout)."""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import borel
from borel_belief_probe import load_vae  # same folder
from common.data import load_dataset
from common.runs import append_csv_rows

torch.set_num_threads(1)
STEPS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 400)


def load_run(run):
    vae, fam, args, vae_step = load_vae(run)
    if fam.discrete:
        raise SystemExit(f"{run}: {args.env_id} is a grid; use benchmark/borel_belief_probe.py")
    return vae, fam, args, vae_step


def main():
    rows = []
    for run in sys.argv[1:]:
        vae, fam, args, vae_step = load_run(run)
        k = fam.episodes_per_task
        ds = load_dataset(args.dataset or f"datasets/{args.env_id}__{args.preset}__s0.npz", args.env_id, args.preset)
        bits = borel.done_bits(fam.horizon, k, "cpu")
        split = {}
        for name, ids in (("train", fam.train_idx), ("test", fam.test_idx)):
            roll = borel.to_tensors(borel.build_rollouts(ds, fam, ids, k), False, "cpu")
            b = borel.beliefs(vae, roll, bits).numpy()  # (R, H+ + 1, 2m)
            y = np.asarray(fam.tasks, np.float64)[roll["task"].numpy()].reshape(len(b), -1)
            split[name] = (b, y)
        m = args.latent_dim
        print(f"{run} ({args.env_id}/{args.preset}, VAE step {vae_step})")
        for t in STEPS:
            if t > split["train"][0].shape[1] - 1:
                break
            (btr, ytr), (bte, yte) = split["train"], split["test"]
            X = lambda b: np.concatenate([b[:, t, :m], np.ones((len(b), 1))], 1)
            w = np.linalg.lstsq(X(btr), ytr, rcond=None)[0]
            resid = ((X(bte) @ w - yte) ** 2).mean(0)
            var = yte.var(0)
            r2 = float(np.mean(1 - resid / np.maximum(var, 1e-12)))
            logvar = float(bte[:, t, m:].mean())
            print(f"  t={t:4d}: test R^2 {r2:6.3f}   mean log sigma^2 {logvar:6.2f}")
            rows.append({"run": run, "env": args.env_id, "preset": args.preset, "vae_step": vae_step, "t": t,
                         "test_r2": round(r2, 4), "mean_logvar": round(logvar, 3)})
    append_csv_rows(Path(__file__).with_suffix(".csv"), rows)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main()
