"""Updates/s of mql.py's TD3 step against a straightforward re-creation of the official update, and its FLOP floor.

    OMP_NUM_THREADS=1 python benchmark/mql_speed.py            # PointRobot sizes (obs 2, act 2, H 10, ctx 15)
    python benchmark/mql_speed.py --obs 20 --act 6 --history 20 --steps 100   # HalfCheetahVel sizes

The reference follows the official code's structure (meta-q-learning ``models/networks.py`` / ``algs/MQL/mql.py``):
``nn.GRU`` contexts, Q1 and Q2 as two separate MLPs each running the shared critic GRU, the actor loss
back-propagated through the critic too (its gradients cleared before the next critic step). Same sizes, same
batch, same data; only the structure differs.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mql  # noqa: E402


class RefActor(nn.Module):
    def __init__(self, S, A, ctx, hid):
        super().__init__()
        self.gru = nn.GRU(A + 1 + S, ctx, batch_first=True)
        self.net = nn.Sequential(nn.Linear(S + ctx, hid), nn.ReLU(), nn.Linear(hid, hid), nn.ReLU(), nn.Linear(hid, A))

    def forward(self, s, h):
        return torch.tanh(self.net(torch.cat([s, self.gru(h)[1][0]], -1)))


class RefCritic(nn.Module):
    def __init__(self, S, A, ctx, hid):
        super().__init__()
        self.gru = nn.GRU(A + 1 + S, ctx, batch_first=True)
        mlp = lambda: nn.Sequential(nn.Linear(S + A + ctx, hid), nn.ReLU(), nn.Linear(hid, hid), nn.ReLU(),  # noqa: E731
                                    nn.Linear(hid, 1))
        self.q1, self.q2 = mlp(), mlp()

    def forward(self, s, a, h):
        x = torch.cat([s, a, self.gru(h)[1][0]], -1)
        return self.q1(x), self.q2(x)

    def Q1(self, s, a, h):
        return self.q1(torch.cat([s, a, self.gru(h)[1][0]], -1))


def ref_update(nets, opts, b, it, gamma=0.99, tau=0.005, noise=0.3, clip=0.5, freq=2):
    actor, critic, actor_t, critic_t = nets
    with torch.no_grad():
        n = (torch.randn_like(b["a"]) * noise).clamp(-clip, clip)
        a2 = (actor_t(b["s2"], b["h2"]) + n).clamp(-1, 1)
        q1t, q2t = critic_t(b["s2"], a2, b["h2"])
        y = b["r"] + gamma * (1 - b["d"]) * torch.min(q1t, q2t)
    q1, q2 = critic(b["s"], b["a"], b["h"])
    loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
    opts[1].zero_grad()
    loss.backward()
    opts[1].step()
    if it % freq == 0:
        loss_pi = -critic.Q1(b["s"], actor(b["s"], b["h"]), b["h"]).mean()
        opts[0].zero_grad()
        loss_pi.backward()
        opts[0].step()
        with torch.no_grad():
            for net, targ in ((actor, actor_t), (critic, critic_t)):
                for p, tp in zip(net.parameters(), targ.parameters()):
                    tp.mul_(1 - tau).add_(tau * p)


def timed(fn, steps):
    for i in range(10):  # warm-up
        fn(i)
    t = time.perf_counter()
    for i in range(steps):
        fn(i)
    return steps / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--obs", type=int, default=2)
    p.add_argument("--act", type=int, default=2)
    p.add_argument("--history", type=int, default=10)
    p.add_argument("--ctx", type=int, default=15)
    p.add_argument("--hidden", type=int, default=300)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=300)
    a = p.parse_args()
    torch.manual_seed(0)
    S, A, H, B = a.obs, a.act, a.history, a.batch
    D = A + 1 + S
    data = {"obs": torch.randn(1, B, S), "actions": torch.rand(1, B, A) * 2 - 1, "rewards": torch.randn(1, B),
            "next_obs": torch.randn(1, B, S), "terminals": torch.zeros(1, B), "hist": torch.randn(1, B, H, D),
            "next_hist": torch.randn(1, B, H, D)}
    res = {}
    for bf16 in (False, True):
        args = SimpleNamespace(ctx_dim=a.ctx, net_size=a.hidden, policy_noise=0.3, noise_clip=0.5, gamma=0.99, tau=0.005,
                               policy_freq=2, bc_alpha=0.0, bf16=bf16)
        nets = mql.make_nets(S, A, args, "cpu")
        opts = mql.make_opts(nets, 1e-3)
        res["mql.py" + (" --bf16" if bf16 else "")] = timed(lambda i: mql.td3_update(nets, opts, data, args, i), a.steps)
    actor, critic = RefActor(S, A, a.ctx, a.hidden), RefCritic(S, A, a.ctx, a.hidden)
    nets = (actor, critic, copy.deepcopy(actor), copy.deepcopy(critic))
    opts = (torch.optim.Adam(actor.parameters(), 1e-3), torch.optim.Adam(critic.parameters(), 1e-3))
    b = {"s": data["obs"][0], "a": data["actions"][0], "r": data["rewards"][0, :, None], "d": data["terminals"][0, :, None],
         "s2": data["next_obs"][0], "h": data["hist"][0], "h2": data["next_hist"][0]}
    res["official structure (nn.GRU, two Q nets)"] = timed(lambda i: ref_update(nets, opts, b, i), a.steps)
    # multiply-adds of one update: critic fwd+bwd (3x), target actor + target critic fwd, actor step every 2nd
    # update (actor fwd+bwd, critic fwd+bwd through its input): GRU and MLP layers
    gru = lambda n: n * H * 3 * a.ctx * (D + a.ctx)  # noqa: E731
    mlp = lambda n, i, o: n * (i * a.hidden + a.hidden * a.hidden + a.hidden * o)  # noqa: E731
    q = gru(B) + 2 * mlp(B, S + A + a.ctx, 1)
    pi = gru(B) + mlp(B, S + a.ctx, A)
    macs = 3 * q + (pi + q) + 0.5 * 3 * (pi + q)
    t = torch.randn(1024, 1024)
    rate = timed(lambda i: t @ t, 50) * 2 * 1024**3
    print(f"sizes: obs {S}, act {A}, H {H}, ctx {a.ctx}, hidden {a.hidden}, batch {B}; threads {torch.get_num_threads()}")
    for k, v in res.items():
        print(f"{k:42s} {v:7.1f} updates/s")
    print(f"floor: {2 * macs / 1e9:.2f} GFLOP per update at {rate / 1e9:.0f} GFLOP/s fp32 matmul = "
          f"{rate / (2 * macs):.0f} updates/s")


if __name__ == "__main__":
    main()
