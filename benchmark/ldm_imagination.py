"""What LDM's imaginary tasks look like on GridNavi/ldm, from the frozen VAE of finished runs.

    python benchmark/ldm_imagination.py runs/benchmark/GridNavi__ldm__s1 [more run dirs]

Per run: 2000 imaginary rollouts (n = workers - n_mix mixed training tasks, hosts = real training rollouts) with the
decoder's dropout on, then off; their mean reward, the share of steps above 0.45, and the mean reward on cells of the
held-out gap region (max(x, y) in {3, 4, 5}) against elsewhere; the real rollouts' reward on gap cells; and the
decoder's calibration: mean p(r = 1) at the steps where r = +1, from the final belief, with dropout on and off.
Rows are appended to benchmark/ldm_imagination.csv.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ldm  # noqa: E402
from common.data import ensure_dataset  # noqa: E402
from common.envs import make_family  # noqa: E402
from common.runs import append_csv_rows, args_from_saved  # noqa: E402


@torch.no_grad()
def probe(run_dir: str) -> dict:
    state = torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu", weights_only=False)
    args = ldm.resolve_args(args_from_saved(ldm.Args, state["args"]))
    fam = make_family(args.env_id, args.preset)
    if fam.env_id != "GridNavi" or not args.n_mix:
        raise SystemExit(f"{run_dir}: this probe is for GridNavi runs with imaginary tasks (n_mix > 0), not "
                         f"{fam.env_id} with n_mix {args.n_mix}")
    ds = ensure_dataset(args.env_id, args.preset, path=args.dataset, family=fam)
    k = fam.episodes_per_task
    roll = ldm.to_tensors(ldm.build_rollouts(ds, fam, fam.train_idx, k), True, "cpu")
    vae = ldm.LatentDynamics(fam, args, done_bit=k > 1)
    vae.load_state_dict(state["vae"])
    mu, logvar = ldm.posteriors(vae, roll, ldm.done_bits(fam.horizon, k, "cpu"))
    gap_of = lambda nobs: torch.isin(nobs.max(-1).values, torch.tensor([3.0, 4.0, 5.0]))  # noqa: E731
    row = {"run": str(run_dir), "seed": args.seed, "n_mix": args.n_mix}
    torch.manual_seed(0)
    for drop in (True, False):
        mixer = ldm.Mixer(vae, roll, mu, logvar, args.workers - args.n_mix, args.mix_beta, drop)
        b = mixer.sample(2000, torch.Generator().manual_seed(0))
        r, gap = b["rewards"], gap_of(b["next_obs"])
        tag = "dropout" if drop else "no_dropout"
        row |= {f"{tag}_mean_r": float(r.mean()), f"{tag}_share_above_0.45": float((r > 0.45).float().mean()),
                f"{tag}_mean_r_gap": float(r[gap].mean()), f"{tag}_mean_r_elsewhere": float(r[~gap].mean())}
    row["real_mean_r_gap"] = float(roll["rewards"][gap_of(roll["next_obs"])].mean())
    pos = roll["rewards"] == 1.0  # (R, T)
    for drop in (True, False):
        vae.train(drop)
        p = torch.sigmoid(vae.decode(mu[:, -1, None], None, None, roll["next_obs"], expand=pos.shape))
        row[f"p_at_goal_steps_{'dropout' if drop else 'no_dropout'}"] = float(p[pos].mean())
    return row


def main(run_dirs):
    rows = [probe(d) for d in run_dirs]
    for r in rows:
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    append_csv_rows(Path(__file__).with_name("ldm_imagination.csv"), rows)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
