"""Evaluate a finished MACAW run again with more adaptation draws, for a final figure with a smaller error.

    python benchmark/macaw_reeval.py RUN_DIR [RUN_DIR ...] [--draws 30] [--chunk 5] [--seed 0]
                                     [--out benchmark/macaw_reeval.csv]

A run's own evaluations use ``--eval-draws`` (3) adaptation batches per test task, 30 episodes on the 10 cheetah
velocities, and swing by about +-10 from one evaluation to the next. This loads the run's checkpoint and
repeats the native protocol (one inner step on ``eval_batch_size`` random offline rows of the test task, then one
deterministic episode) ``--draws`` times per test task, in chunks of ``--chunk`` draws with their own seeds.
Printed and appended to the CSV: the adapted and unadapted test return (mean over tasks and draws), the standard
error of the adapted one (from the chunk means), and the adapted return per task.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import macaw  # noqa: E402
from common.envs import make_family  # noqa: E402
from common.runs import append_csv_rows, args_from_saved, load_checkpoint  # noqa: E402


def reevaluate(run_dir, draws: int, chunk: int, seed: int, first_seed: int | None = None) -> dict:
    """``first_seed``: the evaluation seed of the first chunk (default: far from the run's own seeds,
    10_000 * seed + step); chunk k uses ``first_seed + 2 k``."""
    state = load_checkpoint(Path(run_dir) / "checkpoint.pt", expect={"method": "macaw"})
    args = macaw.resolve_args(args_from_saved(macaw.Args, state["args"]))
    if draws % chunk:
        raise SystemExit(f"--draws {draws} is not a multiple of --chunk {chunk}")
    fam = make_family(args.env_id, args.preset)
    _, samplers = macaw.load_buffers(args, fam, "cpu")
    policy, value, meta, _ = macaw.make_nets(fam.obs_dim, fam.act_dim, args, "cpu")
    for net, key in ((policy, "policy"), (value, "value"), (meta, "meta")):
        net.load_state_dict(state["nets"][key])
    args = dataclasses.replace(args, eval_draws=chunk)
    adapted, unadapted = [], []
    first_seed = 1_000_000 + 1_000 * seed if first_seed is None else first_seed
    for k in range(draws // chunk):
        out = macaw.evaluate_split(policy, value, meta, samplers["test"], fam, fam.test_idx, args, "cpu",
                                   seed=first_seed + 2 * k)
        adapted.append(np.asarray(out["A"][0]))
        unadapted.append(np.asarray(out["pre"][0]))
    adapted, unadapted = np.stack(adapted), np.stack(unadapted)  # (chunks, tasks)
    chunk_means = adapted.mean(1)
    return {"run": str(run_dir), "method": macaw.variant_name(args), "seed": args.seed, "step": state["step"],
            "draws": draws, "adapted_test": float(chunk_means.mean()),
            "adapted_se": float(chunk_means.std(ddof=1) / np.sqrt(len(chunk_means))) if len(chunk_means) > 1 else float("nan"),
            "unadapted_test": float(unadapted.mean()),
            "per_task": " ".join(f"{x:.1f}" for x in adapted.mean(0))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--draws", type=int, default=30, help="adaptation batches (one episode each) per test task")
    p.add_argument("--chunk", type=int, default=5, help="draws evaluated together (memory); the error uses chunk means")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "benchmark" / "macaw_reeval.csv"))
    a = p.parse_args(argv)
    rows = []
    for run_dir in a.run_dirs:
        row = reevaluate(run_dir, a.draws, a.chunk, a.seed)
        print(f"{row['method']} s{row['seed']} step {row['step']}: adapted {row['adapted_test']:.2f} "
              f"+- {row['adapted_se']:.2f} (SE, {row['draws']} draws per task), unadapted {row['unadapted_test']:.2f}; "
              f"per task {row['per_task']}", flush=True)
        rows.append(row)
    append_csv_rows(a.out, rows)
    return rows


if __name__ == "__main__":
    main()
