"""Offline dataset collector: one learner per task, all tasks trained at once.

    python -m common.collect --env-id PointRobot                      # -> datasets/PointRobot__default__s0.npz
    python -m common.collect --env-id HalfCheetahVel --preset cpu     # CPU-sized MuJoCo recipe (~20 min, 2 cores)

Continuous families use SAC (twin Q, tanh-Gaussian actor, entropy weight alpha fixed as in the papers' data
scripts, or tuned per task toward entropy -act_dim where a recipe says ``alpha="auto"``), discrete ones
(GridNavi) use DQN. Each task has its own networks, but they are stored as one batched network whose
weights are ``[T, in, out]`` and run with ``torch.baddbmm``; the loss is the *sum* over tasks of each
task's mean loss, so one Adam over the stacked weights is exactly T independent learners. Train and
test tasks are collected alike (test tasks need offline context for evaluation mode A).

Loop (BOReL/CORRO style): ``init_episodes`` episodes with uniform random actions, then ``iterations``
times: ``episodes_per_iter`` episodes with the current stochastic policy in every task, followed by
``updates_per_iter`` updates. The whole replay buffer is kept ("mixed" quality), with the collector
progress (``collect_step``) and the episode return of every transition so quality slices can be cut
at load time. Sparse families learn from the dense reward (BOReL) and store both; BOReL's preset
starts data episodes off the goal band so the data identifies the task.

Resumable: a ``{out}.partial.pt`` checkpoint is written every ``checkpoint_every_s`` seconds and picked
up automatically by the same command; ``--stop-after-s`` ends a chunk early (e.g. a 10-minute GPU
slot). The final policies go to ``{out stem}.policies.pt`` (used by ``common.baselines``) and the
learning curve to ``{out stem}.curve.csv``.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

from common.data import default_dataset_path, library_versions, save_dataset
from common.envs import SPARSE_FAMILIES, canonical_env_id, default_preset, make_family
from common.runs import atomic_write, machine_info


@dataclasses.dataclass
class Args:
    env_id: str = "PointRobot"
    """task family (PointRobot, SparsePointRobot, PointRobotWind, GridNavi, HalfCheetahVel, AntDir, ...)"""
    preset: str | None = None
    """task preset (default: the family's default preset)"""
    seed: int = 0
    """collector seed (networks, exploration, env noise); the task list is fixed by the preset"""
    out: str | None = None
    """output path (default datasets/{env}__{preset}__s{seed}.npz)"""
    overwrite: bool = False
    """replace an existing dataset at the output path"""
    cuda: bool = False
    """train the learners on the GPU"""
    iterations: int | None = None
    """override the recipe's number of collection iterations"""
    updates_per_iter: int | None = None
    """override the recipe's gradient updates per iteration"""
    checkpoint_every_s: float = 120.0
    """seconds between resumable partial checkpoints"""
    stop_after_s: float | None = None
    """save a partial checkpoint and exit after this many seconds (resume by running the same command)"""
    threads: int = 0
    """torch CPU threads (0: torch default)"""


# Collector recipes. Keys: (family, preset) or family. Point/grid sizes follow BOReL/CORRO's data scripts
# (nets 32x2, alpha 0.01, gamma 0.9 for the point robot); the MuJoCo ``cpu`` recipe is sized to finish in
# well under 45 minutes on 2 CPU cores; the paper recipe (CORRO: 50 + 500x2 rollouts, 200 updates each, the
# default for the other MuJoCo families) needs a GPU: ``python -m common.collect --env-id ... --cuda``.
_POINT = dict(algo="sac", hidden=32, layers=2, lr=3e-4, batch=128, tau=0.005, gamma=0.9, alpha=0.01,
              init_episodes=10, iterations=100, episodes_per_iter=2, updates_per_iter=100, cpu_sized=True)
_GRID = dict(algo="dqn", hidden=32, layers=2, lr=1e-3, batch=128, tau=0.01, gamma=0.9, eps_start=1.0, eps_end=0.05,
             init_episodes=10, iterations=100, episodes_per_iter=5, updates_per_iter=20, cpu_sized=True)
_MUJOCO = dict(algo="sac", hidden=128, layers=2, lr=3e-4, batch=256, tau=0.005, gamma=0.99, alpha=0.2,
               init_episodes=50, iterations=500, episodes_per_iter=2, updates_per_iter=200)
RECIPES = {
    "PointRobot": _POINT,
    "SparsePointRobot": _POINT,
    ("SparsePointRobot", "borel"): dict(_POINT, iterations=150, updates_per_iter=60),
    "PointRobotWind": _POINT,
    "GridNavi": _GRID,
    # BOReL's grid data, 10 random + 100 x 5 rollouts of 4 episodes per task, counted in single episodes
    ("GridNavi", "borel"): dict(_GRID, init_episodes=40, episodes_per_iter=20),
    # CPU-sized cheetah-vel: smaller nets, lr 1e-3 and a tuned per-task alpha learn in ~30k updates where the
    # BOReL/CORRO recipe (128x2, lr 3e-4, alpha 0.2) is still standing still after 12k; the learner does not
    # see the unbounded torso x (obs entry 17), which the dataset keeps.
    ("HalfCheetahVel", "cpu"): dict(_MUJOCO, hidden=64, lr=1e-3, alpha="auto", drop_obs=[17], init_episodes=10,
                                    iterations=150, episodes_per_iter=1, updates_per_iter=200, cpu_sized=True),
}
RECIPES[("HalfCheetahVel", "ldm-cpu")] = RECIPES[("HalfCheetahVel", "cpu")]  # the ldm split (20 / 7 tasks) at CPU size


def recipe_for(env_id: str, preset: str) -> dict:
    r = RECIPES.get((env_id, preset)) or RECIPES.get(env_id) or _MUJOCO
    return dict(r)


# ---------------------------------------------------------------------------------------------
# Batched networks: one independent MLP per ensemble member (task, or task x twin critic)
# ---------------------------------------------------------------------------------------------


class BatchedLinear(nn.Module):
    def __init__(self, members, n_in, n_out):
        super().__init__()
        bound = 1.0 / math.sqrt(n_in)  # nn.Linear's default init, per member
        self.weight = nn.Parameter(torch.empty(members, n_in, n_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(members, 1, n_out).uniform_(-bound, bound))

    def forward(self, x):  # (members, batch, n_in) -> (members, batch, n_out)
        return torch.baddbmm(self.bias, x, self.weight)


def batched_mlp(members, n_in, n_out, hidden, layers):
    dims = [n_in] + [hidden] * layers
    mods = []
    for a, b in zip(dims[:-1], dims[1:]):
        mods += [BatchedLinear(members, a, b), nn.ReLU()]
    return nn.Sequential(*mods, BatchedLinear(members, dims[-1], n_out))


class TanhGaussianActor(nn.Module):
    def __init__(self, T, obs_dim, act_dim, hidden, layers):
        super().__init__()
        self.net = batched_mlp(T, obs_dim, 2 * act_dim, hidden, layers)

    def forward(self, obs, deterministic=False):  # obs (T, B, obs_dim)
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        if deterministic:
            return torch.tanh(mean), None
        std = log_std.clamp(-20.0, 2.0).exp()
        u = mean + std * torch.randn_like(mean)
        a = torch.tanh(u)
        # log-prob of the tanh-squashed Gaussian, with the numerically stable log(1 - tanh(u)^2)
        logp = (-0.5 * ((u - mean) / std) ** 2 - std.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
        logp = logp - (2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(-1)
        return a, logp


class TwinQ(nn.Module):
    """Both critics of all T tasks in one batched network of 2T members: rows [0, T) are Q1, [T, 2T) Q2."""

    def __init__(self, T, obs_dim, act_dim, hidden, layers):
        super().__init__()
        self.net = batched_mlp(2 * T, obs_dim + act_dim, 1, hidden, layers)

    def forward(self, obs, act):  # -> (2, T, B)
        x = torch.cat([obs, act], -1).repeat(2, 1, 1)
        return self.net(x).squeeze(-1).unflatten(0, (2, -1))


def sac_update(actor, critic, critic_targ, opt_q, opt_pi, batch, alpha, gamma, tau, log_alpha=None, opt_alpha=None):
    """One SAC update of every task's learner. batch: dict of (T, B, dim) tensors. ``alpha``: a float, or with
    ``log_alpha`` ((T, 1) parameter) and its optimiser, tuned per task."""
    if log_alpha is not None:
        alpha = log_alpha.detach().exp()  # (T, 1), broadcasts over the batch
    obs, act, rew, nobs, term = batch["obs"], batch["actions"], batch["rewards"], batch["next_obs"], batch["terminals"]
    with torch.no_grad():
        na, nlogp = actor(nobs)
        q_next = critic_targ(nobs, na).min(0).values - alpha * nlogp
        y = rew + gamma * (1.0 - term) * q_next  # timeouts bootstrap: only true terminals stop the target
    q = critic(obs, act)
    q_loss = ((q - y) ** 2).mean(-1).sum()  # sum over (twin, task) of each member's mean loss
    opt_q.zero_grad(set_to_none=True)
    q_loss.backward()
    opt_q.step()

    a, logp = actor(obs)
    q_pi = critic(obs, a).min(0).values
    pi_loss = (alpha * logp - q_pi).mean(-1).sum()
    opt_pi.zero_grad(set_to_none=True)
    pi_loss.backward()
    opt_pi.step()
    if log_alpha is not None:  # SAC v2 temperature tuning, one alpha per task toward entropy -act_dim
        alpha_loss = -(log_alpha * (logp.detach() - act.shape[-1]).mean(-1, keepdim=True)).sum()
        opt_alpha.zero_grad(set_to_none=True)
        alpha_loss.backward()
        opt_alpha.step()
    with torch.no_grad():
        for p, pt in zip(critic.parameters(), critic_targ.parameters()):
            pt.lerp_(p, tau)
    return q_loss.item() / q.shape[1], pi_loss.item() / q.shape[1]


def dqn_update(qnet, qnet_targ, opt, batch, gamma, tau):
    obs, act, rew, nobs, term = batch["obs"], batch["actions"], batch["rewards"], batch["next_obs"], batch["terminals"]
    with torch.no_grad():
        # Double DQN target: online net picks the action, target net scores it.
        a_star = qnet(nobs).argmax(-1, keepdim=True)
        y = rew + gamma * (1.0 - term) * qnet_targ(nobs).gather(-1, a_star).squeeze(-1)
    q = qnet(obs).gather(-1, act.long().unsqueeze(-1)).squeeze(-1)
    loss = F.smooth_l1_loss(q, y, reduction="none").mean(-1).sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        for p, pt in zip(qnet.parameters(), qnet_targ.parameters()):
            pt.lerp_(p, tau)
    return loss.item() / q.shape[0]


def learner_features(fam, R, device="cpu"):
    """What the collector's networks see: one-hot cells for GridNavi; for MuJoCo recipes with ``drop_obs``
    the observation without those entries (e.g. the cheetah's unbounded torso x). Datasets keep the full obs."""
    if fam.discrete:
        return (lambda o: grid_features(o, fam.config["size"])), fam.config["size"] ** 2
    if R.get("drop_obs"):
        keep = torch.as_tensor([i for i in range(fam.obs_dim) if i not in R["drop_obs"]], device=device)
        return (lambda o: o.index_select(-1, keep)), len(keep)
    return (lambda o: o), fam.obs_dim


def grid_features(obs, size):
    """One-hot cell features for the DQN collector (the obs are integer cell coordinates)."""
    idx = (obs[..., 0] * size + obs[..., 1]).long()
    return F.one_hot(idx, size * size).float()


# ---------------------------------------------------------------------------------------------
# Collection
# ---------------------------------------------------------------------------------------------


def main(args: Args):
    if args.threads:
        torch.set_num_threads(args.threads)
    env_id = canonical_env_id(args.env_id)
    preset = args.preset or default_preset(env_id)
    fam = make_family(env_id, preset)
    out = Path(args.out) if args.out else default_dataset_path(env_id, preset, args.seed)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial.pt")
    R = recipe_for(env_id, preset)
    for k in ("iterations", "updates_per_iter"):
        if getattr(args, k) is not None:
            R[k] = getattr(args, k)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    T, H = len(fam.tasks), fam.horizon
    all_tasks = np.arange(T)
    venv = fam.make_vec_env(all_tasks, 1, seed=args.seed)
    n_episodes = R["init_episodes"] + R["iterations"] * R["episodes_per_iter"]
    cap = n_episodes * H
    discrete = fam.discrete
    feat, obs_in = learner_features(fam, R, device)
    sparse = env_id in SPARSE_FAMILIES

    # ALGO LOGIC: per-task learners as batched networks
    if R["algo"] == "sac":
        actor = TanhGaussianActor(T, obs_in, fam.act_dim, R["hidden"], R["layers"]).to(device)
        critic = TwinQ(T, obs_in, fam.act_dim, R["hidden"], R["layers"]).to(device)
        critic_targ = TwinQ(T, obs_in, fam.act_dim, R["hidden"], R["layers"]).to(device)
        critic_targ.load_state_dict(critic.state_dict())
        opt_q = torch.optim.Adam(critic.parameters(), lr=R["lr"])
        opt_pi = torch.optim.Adam(actor.parameters(), lr=R["lr"])
        modules = dict(actor=actor, critic=critic, critic_targ=critic_targ, opt_q=opt_q, opt_pi=opt_pi)
        temp, opt_alpha = None, None
        if R["alpha"] == "auto":
            temp = nn.ParameterDict({"log_alpha": nn.Parameter(torch.zeros(T, 1, device=device))})
            opt_alpha = torch.optim.Adam(temp.parameters(), lr=R["lr"])
            modules.update(temp=temp, opt_alpha=opt_alpha)
    else:
        qnet = batched_mlp(T, obs_in, fam.n_actions, R["hidden"], R["layers"]).to(device)
        qnet_targ = batched_mlp(T, obs_in, fam.n_actions, R["hidden"], R["layers"]).to(device)
        qnet_targ.load_state_dict(qnet.state_dict())
        opt = torch.optim.Adam(qnet.parameters(), lr=R["lr"])
        modules = dict(qnet=qnet, qnet_targ=qnet_targ, opt=opt)

    # Replay storage for every task, (T, cap, dim), kept on the learner's device; rows fill per task.
    act_shape = () if discrete else (fam.act_dim,)
    buf = {
        "obs": torch.zeros(T, cap, fam.obs_dim), "next_obs": torch.zeros(T, cap, fam.obs_dim),
        "actions": torch.zeros(T, cap, *act_shape, dtype=torch.int64 if discrete else torch.float32),
        "rewards": torch.zeros(T, cap), "rewards_dense": torch.zeros(T, cap),
        "terminals": torch.zeros(T, cap), "timeouts": torch.zeros(T, cap, dtype=torch.bool),
        "episode": torch.zeros(T, cap, dtype=torch.int32), "step": torch.zeros(T, cap, dtype=torch.int32),
        "collect_step": torch.zeros(T, cap, dtype=torch.int64), "policy_return": torch.zeros(T, cap),
    }
    buf = {k: v.to(device) for k, v in buf.items()}
    fill = torch.zeros(T, dtype=torch.int64, device=device)
    state = dict(episodes=0, updates=0, iteration=0, curve=[], elapsed=0.0)
    gen = torch.Generator(device=device).manual_seed(args.seed)

    if partial.exists():
        ck = torch.load(partial, map_location=device, weights_only=False)
        if ck["key"] != dict(env_id=env_id, preset=preset, seed=args.seed, recipe=R):
            raise ValueError(f"{partial} was written by another collector configuration ({ck['key']}); "
                             f"delete it or use the same flags")
        for k, m in modules.items():
            m.load_state_dict(ck["modules"][k])
        fill, state = ck["fill"], ck["state"]
        for k, v in ck["buf"].items():  # the partial holds only the rows filled so far
            buf[k][:, : v.shape[1]] = v
        gen.set_state(ck["gen"].cpu())  # RNG states must be CPU byte tensors whatever map_location did
        torch.set_rng_state(ck["torch_rng"].cpu())
        if ck.get("cuda_rng") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(ck["cuda_rng"].cpu())
        venv.rng.set_state(ck["env_rng"])
        np.random.set_state(ck["np_rng"])
        print(f"resuming {partial}: iteration {state['iteration']}/{R['iterations']}, {state['updates']} updates")

    def save_partial():
        ck = dict(key=dict(env_id=env_id, preset=preset, seed=args.seed, recipe=R),
                  modules={k: m.state_dict() for k, m in modules.items()},
                  buf={k: v[:, : int(fill.max())] for k, v in buf.items()}, fill=fill, state=state,
                  gen=gen.get_state(), torch_rng=torch.get_rng_state(), env_rng=venv.rng.get_state(),
                  cuda_rng=torch.cuda.get_rng_state() if device.type == "cuda" else None,
                  np_rng=np.random.get_state())
        atomic_write(partial, lambda f: torch.save(ck, f))

    @torch.no_grad()
    def policy(obs, explore, random=False, eps=0.0):
        if random:
            if discrete:
                return np.random.randint(fam.n_actions, size=T)
            return np.random.uniform(-1.0, 1.0, size=(T, fam.act_dim)).astype(np.float32)
        o = feat(torch.as_tensor(obs, device=device).unsqueeze(1))  # (T, 1, obs)
        if discrete:
            a = qnet(o).argmax(-1).squeeze(1).cpu().numpy()
            flip = np.random.rand(T) < eps
            return np.where(flip, np.random.randint(fam.n_actions, size=T), a)
        return actor(o, deterministic=not explore)[0].squeeze(1).cpu().numpy()

    def run_episode(random=False, eps=0.0, store=True):
        """One episode in every task; returns the per-task episode returns (numpy [T])."""
        obs = venv.reset(collect=True)
        alive = np.ones(T, bool)
        ret = np.zeros(T)
        rows = []
        for t in range(H):
            a = policy(obs, explore=True, random=random, eps=eps)
            nobs, r, term, trunc, info = venv.step(a)
            ret += r * alive
            rows.append((obs, a, r, info.get("rewards_dense", r), nobs, term, trunc, alive.copy()))
            alive &= ~(term | trunc)
            obs = nobs
            if not alive.any():
                break
        if store:
            _store(rows, ret)
        return ret

    def _store(rows, ret):
        # rows: list over steps of per-task arrays; keep only steps where the task's episode was alive.
        stack = [np.stack(x) for x in zip(*rows)]  # each (steps, T, ...)
        obs, a, r, rd, nobs, term, trunc, alive = stack
        for i in range(T):  # a few dozen tasks: one vectorised copy each
            n = int(alive[:, i].sum())
            f = int(fill[i])
            sl = slice(f, f + n)
            buf["obs"][i, sl] = torch.as_tensor(obs[:n, i], device=device)
            buf["next_obs"][i, sl] = torch.as_tensor(nobs[:n, i], device=device)
            buf["actions"][i, sl] = torch.as_tensor(a[:n, i], device=device)
            buf["rewards"][i, sl] = torch.as_tensor(r[:n, i], device=device)
            buf["rewards_dense"][i, sl] = torch.as_tensor(rd[:n, i], device=device)
            buf["terminals"][i, sl] = torch.as_tensor(term[:n, i], dtype=torch.float32, device=device)
            timeout = trunc[:n, i] & ~term[:n, i]
            buf["timeouts"][i, sl] = torch.as_tensor(timeout, device=device)
            buf["episode"][i, sl] = state["episodes"]
            buf["step"][i, sl] = torch.arange(n, dtype=torch.int32, device=device)
            buf["collect_step"][i, sl] = state["updates"]
            buf["policy_return"][i, sl] = float(ret[i])
            fill[i] = f + n
        state["episodes"] += 1

    def sample_batch(bs):
        # float64: a float32 uniform has 24 bits, too few to index large buffers evenly
        idx = (torch.rand(T, bs, device=device, generator=gen, dtype=torch.float64) * fill[:, None]).long()
        g = lambda x: torch.gather(x, 1, idx if x.dim() == 2 else idx[..., None].expand(-1, -1, x.shape[-1]))
        b = {"obs": feat(g(buf["obs"])), "next_obs": feat(g(buf["next_obs"])), "actions": g(buf["actions"]),
             "rewards": g(buf["rewards_dense"] if sparse else buf["rewards"]), "terminals": g(buf["terminals"])}
        return b

    start = time.time() - state["elapsed"]  # wall time over all chunks
    chunk_start = last_ckpt = time.time()
    if state["episodes"] == 0:
        for _ in range(R["init_episodes"]):
            run_episode(random=True)
    print(f"collecting {env_id}/{preset}: {T} tasks, {R['iterations']} iterations x "
          f"({R['episodes_per_iter']} episodes + {R['updates_per_iter']} updates), device {device}")
    while state["iteration"] < R["iterations"]:
        it = state["iteration"]
        eps = R.get("eps_start", 0) + (R.get("eps_end", 0) - R.get("eps_start", 0)) * min(1.0, it / (0.5 * R["iterations"]))
        rets = [run_episode(eps=eps) for _ in range(R["episodes_per_iter"])]
        for _ in range(R["updates_per_iter"]):
            b = sample_batch(R["batch"])
            if R["algo"] == "sac":
                sac_update(actor, critic, critic_targ, opt_q, opt_pi, b, R["alpha"], R["gamma"], R["tau"],
                           temp["log_alpha"] if temp is not None else None, opt_alpha)
            else:
                dqn_update(qnet, qnet_targ, opt, b, R["gamma"], R["tau"])
        state["updates"] += R["updates_per_iter"]
        state["iteration"] = it + 1
        state["elapsed"] = time.time() - start
        mean_ret = np.mean(rets, axis=0)  # per task
        state["curve"].append((it + 1, state["updates"], int(fill.sum()), float(mean_ret.mean()),
                               float(mean_ret.min()), float(mean_ret.max()), state["elapsed"]))
        if (it + 1) % max(1, R["iterations"] // 20) == 0 or it + 1 == R["iterations"]:
            sps = int(fill.sum()) / max(state["elapsed"], 1e-9)
            eta = state["elapsed"] / (it + 1) * (R["iterations"] - it - 1)
            print(f"iter {it + 1}/{R['iterations']}  updates {state['updates']}  transitions {int(fill.sum())}  "
                  f"return mean {mean_ret.mean():.2f} [min {mean_ret.min():.2f}, max {mean_ret.max():.2f}]  "
                  f"env-steps/s {sps:.0f}  ETA {datetime.timedelta(seconds=int(eta))}", flush=True)
        if time.time() - last_ckpt > args.checkpoint_every_s:
            save_partial()
            last_ckpt = time.time()
        if args.stop_after_s is not None and time.time() - chunk_start > args.stop_after_s \
                and state["iteration"] < R["iterations"]:
            save_partial()
            print(f"stopped after {args.stop_after_s}s; run the same command again to resume")
            return None

    # Deterministic evaluation of the final per-task policies in their own task (the "expert" reference).
    final = _final_returns(venv, policy, T, H)
    wall = time.time() - start
    print(f"final deterministic per-task return: mean {final.mean():.2f} [min {final.min():.2f}, max {final.max():.2f}]"
          f"  wall {wall:.0f}s")

    # Write the dataset: rows sorted by (task, episode, step), task_ptr as CSR offsets.
    fill_np = fill.cpu().numpy()
    cat = lambda k: np.concatenate([buf[k][i, : fill_np[i]].cpu().numpy() for i in range(T)])
    arrays = {
        "obs": cat("obs").astype(np.float32), "next_obs": cat("next_obs").astype(np.float32),
        "actions": cat("actions").astype(np.int64 if discrete else np.float32),
        "rewards": cat("rewards").astype(np.float32),
        "terminals": cat("terminals").astype(bool), "timeouts": cat("timeouts").astype(bool),
        "task_id": np.repeat(np.arange(T, dtype=np.int32), fill_np),
        "episode_id": cat("episode").astype(np.int32), "step": cat("step").astype(np.int32),
        "collect_step": cat("collect_step").astype(np.int64), "policy_return": cat("policy_return").astype(np.float32),
        "tasks": fam.tasks.astype(np.float32), "train_tasks": fam.train_idx.astype(np.int32),
        "test_tasks": fam.test_idx.astype(np.int32),
        "task_ptr": np.concatenate([[0], np.cumsum(fill_np)]).astype(np.int64),
    }
    if sparse:
        arrays["rewards_dense"] = cat("rewards_dense").astype(np.float32)
    meta = dict(env_id=env_id, preset=preset, obs_dim=fam.obs_dim, act_dim=fam.act_dim, n_actions=fam.n_actions,
                action_space="discrete" if discrete else "box", horizon=H, episodes_per_task=fam.episodes_per_task,
                allow_overlap=fam.allow_overlap, seed=args.seed, task_defaults=fam.task_defaults,
                collector=dict(R, steps_per_task=int(fill_np.mean()), updates=state["updates"], wall_time_s=wall,
                               device=str(device), machine=machine_info(device), final_returns=final.tolist()),
                versions=library_versions(), created=datetime.datetime.now().isoformat(timespec="seconds"))
    save_dataset(out, arrays, meta, overwrite=args.overwrite)
    torch.save(dict(recipe=R, env_id=env_id, preset=preset, obs_in=obs_in,
                    modules={k: v.state_dict() for k, v in modules.items() if k in ("actor", "qnet")}),
               out.with_name(out.stem + ".policies.pt"))
    with open(out.with_name(out.stem + ".curve.csv"), "w") as f:
        f.write("iteration,updates,transitions,mean_return,min_return,max_return,seconds\n")
        f.writelines(",".join(str(x) for x in row) + "\n" for row in state["curve"])
    if partial.exists():
        partial.unlink()
    print(f"wrote {out}: {len(arrays['rewards'])} transitions, {T} tasks ({len(fam.train_idx)} train / "
          f"{len(fam.test_idx)} test), {wall:.0f}s")
    return out


def _final_returns(venv, policy, T, H, episodes=3):
    """Mean return of the deterministic (greedy) final policies, each in its own task."""
    total = np.zeros(T)
    for _ in range(episodes):
        obs = venv.reset()
        alive = np.ones(T, bool)
        for _ in range(H):
            nobs, r, term, trunc, _ = venv.step(policy(obs, explore=False))
            total += r * alive
            alive &= ~(term | trunc)
            obs = nobs
            if not alive.any():
                break
    return total / episodes


if __name__ == "__main__":
    main(tyro.cli(Args))
