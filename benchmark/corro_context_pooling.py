"""How much of CORRO's IID gap is one context episode's noise? From a finished corro.py run, z is computed from K
offline episodes of each task pooled by the run's aggregator E2 as one context (K = 1 is the IID protocol), and the
run's policy acts with it for one deterministic episode. Rows (mean return over tasks and draws) are appended to
benchmark/corro_context_pooling.csv.

    python benchmark/corro_context_pooling.py RUN_DIR [--ks 1 3 10 30] [--draws 10]
"""
import sys
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import corro
from common.data import ensure_dataset
from common.envs import make_family
from common.runs import append_csv_rows, args_from_saved


def main(run: str, /, ks: tuple[int, ...] = (1, 3, 10, 30), draws: int = 10, n_train_tasks: int = 10, seed: int = 7,
         csv: str = "benchmark/corro_context_pooling.csv"):
    """run: a finished corro.py run directory; ks: episodes pooled per context; draws: contexts per task;
    n_train_tasks: first train tasks evaluated beside the test tasks."""
    state = torch.load(Path(run) / "checkpoint.pt", weights_only=False)
    args = corro.resolve_args(args_from_saved(corro.Args, state["args"]))
    fam = make_family(args.env_id, args.preset)
    ds = ensure_dataset(args.env_id, args.preset, family=fam)
    nets, _ = corro.make_nets(fam.obs_dim, fam.act_dim, args, "cpu")
    for k, n in nets.items():
        n.load_state_dict(state["nets"][k])
    rows = []
    for split, ids in (("test", fam.test_idx), ("train", fam.train_idx[:n_train_tasks])):
        data = corro.TaskData(ds, ids, "cpu")
        for K in ks:
            batch, mask = data.episodes(torch.arange(len(ids)).repeat_interleave(draws * K), torch.Generator().manual_seed(seed))
            # the K episodes of one (task, draw) laid end to end as one context
            batch = {f: v.reshape(len(ids) * draws, -1, *v.shape[2:]) for f, v in batch.items()}
            with torch.no_grad():
                z = corro.context_z(nets["e1"], nets["e2"], batch, mask.reshape(len(ids) * draws, -1))
            ret, _ = corro.rollout_with_z(nets["pi"], fam, ids, z, draws, "cpu", seed)
            row = {"env": args.env_id, "preset": args.preset, "run": run, "sac_step": state["step"], "split": split,
                   "episodes_pooled": K, "draws": draws, "return": round(float(ret.mean()), 3)}
            print(row, flush=True)
            rows.append(row)
    append_csv_rows(csv, rows)


if __name__ == "__main__":
    tyro.cli(main)
