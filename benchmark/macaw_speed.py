"""MACAW meta-step speed at the paper's sizes: macaw.py's step against the official computation, and the compute floor.

    python benchmark/macaw_speed.py                  # both envs' dims, writes benchmark/macaw_speed.csv

One meta-step = 5 tasks x (inner value step, inner policy step, outer losses on 256 rows each), second-order
backward and the three Adam updates, at width 100 x 3 with weight-transform layers (config/alg/standard.json).

- ``macaw.py``: the vmapped step of ``macaw.meta_losses`` (closed-form inner step on the generated weights).
- ``official computation``: what the official code computes with ``higher``: a Python loop over the 5 tasks,
  each stepping every parameter tensor (including the 10,100 x 100 generator matrices) with
  ``torch.autograd.grad(create_graph=True)`` and running the networks on the stepped parameters. The same
  numbers as macaw.py's step (tests/test_macaw.py checks the equality); the official code itself needs
  mujoco-py and ``higher`` and does not run here.
- compute floor: macaw.py's step's matmul FLOPs (``torch.utils.flop_counter``) divided by the measured fp32 matmul rate.
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import macaw  # noqa: E402
from common.runs import machine_info  # noqa: E402


def random_batches(obs_dim, act_dim, tasks=5, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    def one():
        return {"obs": torch.randn(tasks, n, obs_dim, generator=g), "actions": torch.rand(tasks, n, act_dim, generator=g) * 2 - 1,
                "mc_return": torch.randn(tasks, n, generator=g) * 10, "term_obs": torch.randn(tasks, n, obs_dim, generator=g),
                "term_discount": torch.rand(tasks, n, generator=g)}
    return one(), one()


def step_macaw(policy, value, meta, opts, inner, outer, args):
    l_v, l_pi, _ = macaw.meta_losses(policy, value, meta, inner, outer, args)
    for o in opts.values():
        o.zero_grad(set_to_none=True)
    ((l_v.sum() + l_pi.sum()) / 35).backward()
    for o in opts.values():
        o.step()


def sgd_params(params, loss, raw_lrs):
    names = list(params)
    grads = torch.autograd.grad(loss, [params[k] for k in names], create_graph=True)
    lrs = F.softplus(raw_lrs)
    return {k: params[k] - lrs[i] * g for i, (k, g) in enumerate(zip(names, grads))}


def step_official(policy, value, meta, opts, inner, outer, args):
    """The official train_step's computation: per task, stepped parameters with create_graph (``higher``)."""
    for o in opts.values():
        o.zero_grad(set_to_none=True)
    pv, pp = dict(value.named_parameters()), dict(policy.named_parameters())
    for i in range(inner["obs"].shape[0]):
        coef = F.softplus(meta["adv_coef"])
        b_in = {k: v[i] for k, v in inner.items()}
        b_out = {k: v[i] for k, v in outer.items()}
        v = lambda p, x: functional_call(value, p, (x,)).squeeze(-1)
        pv1 = sgd_params(pv, (v(pv, b_in["obs"]) - b_in["mc_return"]).pow(2).mean(), meta["value_lrs"])
        target = {k: (0.9 * pv[k] + 0.1 * pv1[k]).detach() for k in pv}
        y = b_out["mc_return"] + b_out["term_discount"] * v(target, b_out["term_obs"]).detach()
        ((v(pv1, b_out["obs"]) - y).pow(2).mean() / 35).backward(retain_graph=True)
        with torch.no_grad():
            adv_in = b_in["mc_return"] + b_in["term_discount"] * v(pv1, b_in["term_obs"]) - v(pv1, b_in["obs"])
            adv_out = b_out["mc_return"] + b_out["term_discount"] * v(pv1, b_out["term_obs"]) - v(pv1, b_out["obs"])
        w_in = macaw.awr_weights(adv_in, 1.0, 20.0)
        w_out = macaw.awr_weights(adv_out, 1.0, 20.0)
        mean, adv_hat = functional_call(policy, pp, (b_in["obs"], b_in["actions"]))
        inner_loss = (-(w_in * macaw.gaussian_log_prob(b_in["actions"], mean, 0.2))
                      + coef * (adv_hat.squeeze(-1) - adv_in).pow(2)).mean()
        pp1 = sgd_params(pp, inner_loss, meta["policy_lrs"])
        mean = functional_call(policy, pp1, (b_out["obs"],))
        (-(w_out * macaw.gaussian_log_prob(b_out["actions"], mean, 0.2)).mean() / 35).backward()
    for o in opts.values():
        o.step()


def time_it(fn, n):
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def matmul_rate(n=1024, reps=20):
    a, b = torch.randn(n, n), torch.randn(n, n)
    dt = time_it(lambda: a @ b, reps)
    return 2 * n ** 3 / dt


def main():
    torch.manual_seed(0)
    rate = matmul_rate()
    rows = []
    for env, obs_dim, act_dim in (("PointRobot", 2, 2), ("HalfCheetahVel", 20, 6)):
        args = macaw.resolve_args(macaw.Args(env_id=env, cuda=False))
        policy, value, meta, opts = macaw.make_nets(obs_dim, act_dim, args, "cpu")
        inner, outer = random_batches(obs_dim, act_dim)
        with FlopCounterMode(display=False) as fc:  # (the counter cannot follow autograd.grad: macaw.py only)
            step_macaw(policy, value, meta, opts, inner, outer, args)
        flops = fc.get_total_flops()
        for name, fn, n in (("macaw.py", step_macaw, 30), ("official computation", step_official, 8)):
            dt = time_it(lambda: fn(policy, value, meta, opts, inner, outer, args), n)
            rows.append({"env_dims": env, "implementation": name, "ms_per_step": round(1000 * dt, 1),
                         "updates_per_s": round(1 / dt, 2),
                         "matmul_gflop_per_step": round(flops / 1e9, 3) if name == "macaw.py" else "",
                         "floor_ms": round(1000 * flops / rate, 1) if name == "macaw.py" else "",
                         "fp32_matmul_gflops": round(rate / 1e9, 1),
                         "threads": torch.get_num_threads(), "machine": machine_info("cpu")})
            print(rows[-1], flush=True)
    out = REPO / "benchmark" / "macaw_speed.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
