"""SMAC's z-shift on the test tasks of a run: the posterior from offline context against the posterior from the
agent's own prior-z exploration episodes (the two contexts of modes A and B).

    python benchmark/smac_zshift.py runs/benchmark/PointRobot__smac__s1 [--out benchmark/smac_zshift.csv]

Per test task: 64 offline transitions of its data (mode A's context) and the 2 exploration episodes of mode B
(z ~ prior resampled every step, deterministic actions). Printed and appended to the CSV: the mean posterior
variance of each (1 = the prior: the context told the encoder nothing), the distance between the two posterior
means against the mean distance between tasks' offline posteriors, how often the exploration posterior is
nearest to its own task's offline posterior, and the return of one episode with z fixed at each posterior mean.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import smac  # noqa: E402
from common.data import ensure_dataset, sample_context  # noqa: E402
from common.envs import make_family  # noqa: E402
from common.evaluation import run_episodes  # noqa: E402
from common.runs import append_csv_rows, args_from_saved  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--out", default=str(REPO / "benchmark" / "smac_zshift.csv"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    state = torch.load(Path(a.run_dir) / "checkpoint.pt", map_location="cpu", weights_only=False)
    args = smac.resolve_args(args_from_saved(smac.Args, state["args"]))
    fam = make_family(args.env_id, args.preset)
    ds = ensure_dataset(args.env_id, args.preset, path=args.dataset, family=fam)
    nets, _ = smac.make_nets(fam.obs_dim, fam.act_dim, args, "cpu")
    for k, n in nets.items():
        n.load_state_dict(state["nets"][k])
    ids = fam.test_idx
    c = sample_context(ds, ids, kind="transitions", n=args.context_size, seed=a.seed)
    ctx_a = smac.context_tensor({k: torch.as_tensor(c[k], dtype=torch.float32) for k in ("obs", "actions", "rewards")})
    gen = torch.Generator().manual_seed(a.seed)
    feats = []
    run_episodes(fam.make_vec_env(ids, 1, seed=a.seed),
                 lambda o, ep, t: smac.act_with(nets["policy"], o, torch.randn(len(ids), args.latent_dim, generator=gen)),
                 args.num_exp_traj_eval, observe=lambda o, act, r, *rest: feats.append(smac.step_features(o, act, r, "cpu")))
    with torch.no_grad():
        mu_a, var_a = smac.infer_posterior(nets["encoder"], ctx_a)
        mu_b, var_b = smac.infer_posterior(nets["encoder"], torch.stack(feats, 1))
    rets = {}
    for name, z in (("offline", mu_a), ("exploration", mu_b)):
        ret, _ = run_episodes(fam.make_vec_env(ids, 1, seed=a.seed + 1), lambda o, ep, t: smac.act_with(nets["policy"], o, z), 1)
        rets[name] = float(ret.mean())
    row = {"run": a.run_dir, "step": state["step"], "online_iterations": state["iteration"],
           "var_offline": float(var_a.mean()), "var_exploration": float(var_b.mean()),
           "dist_mu": float((mu_b - mu_a).norm(dim=1).mean()), "dist_between_tasks": float(torch.pdist(mu_a).mean()),
           "nearest_is_own": float((torch.cdist(mu_b, mu_a).argmin(1) == torch.arange(len(ids))).float().mean()),
           "return_offline_mu": rets["offline"], "return_exploration_mu": rets["exploration"]}
    for k, v in row.items():
        print(f"{k:24s} {v:.4g}" if isinstance(v, float) else f"{k:24s} {v}")
    append_csv_rows(a.out, [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}])


if __name__ == "__main__":
    main()
