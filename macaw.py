"""MACAW: Meta-Actor-Critic with Advantage Weighting, offline meta-RL by MAML on AWR regressions.

Paper: Eric Mitchell, Rafael Rafailov, Xue Bin Peng, Sergey Levine, Chelsea Finn, "Offline Meta-Reinforcement
Learning with Advantage Weighting", ICML 2021, arXiv:2008.06043. Official code: github.com/eric-mitchell/macaw
(``src/macaw.py``, ``src/nn.py``, ``config/alg/standard.json``).

Method. MAML on an offline actor-critic whose two losses are plain regressions, so that ONE gradient step on
256 offline transitions of a new task adapts it. Meta-learned: the initialisations of a value net V_phi and a
Gaussian policy pi_theta (tanh mean, fixed sigma = 0.2) with an advantage head, one inner learning rate per
parameter tensor, and the advantage-loss weight c. Every linear layer is a weight-transform layer: its weights
are generated, theta_layer = F z + b, from a 100-d latent z, so one SGD step on (F, b, z) is a preconditioned,
more expressive update than one step on the weights themselves.

Equations (one task, batch D; R = discounted Monte-Carlo return-to-go of the stored episode, s_T its last next
state, k the steps to the episode's end, gamma = 0.99):
    L_V(phi, D)     = mean_D (V_phi(s) - y)^2,   inner: y = R,   outer: y = R + gamma^k V_targ(s_T)
    A(s, a; phi)    = R + gamma^k V_phi(s_T) - V_phi(s)                          (no gradient)
    w(s, a)         = exp(min((A - mean_D A) / (std_D A * T), log 20)),  T = 1    (AWR weights)
    L_AWR(theta, D) = mean_D [-w(s, a) log N(a | mu_theta(s), 0.2^2 I)]
    L_ADV(theta, D) = mean_D (Ahat_theta(s, a) - A(s, a; phi))^2
    inner:  phi'   = phi   - softplus(alpha_V)  * grad_phi L_V(phi, D_tr)
            theta' = theta - softplus(alpha_pi) * grad_theta [L_AWR(theta, phi', D_tr) + softplus(c) L_ADV]
    outer:  V_targ = 0.9 phi + 0.1 phi' (no gradient);  minimise Σ_i L_V(phi'_i, D_ts,i) and Σ_i L_AWR(theta'_i,
            phi'_i, D_ts,i) over (phi, theta, alpha, c), second order through the inner step, / N_train_tasks.
D_tr: 256 contiguous rows of the task's buffer (one behaviour policy); D_ts: 256 random rows of the same buffer.
Meta-test: one value step and one policy step on 256 random rows of the test task's offline data, then roll out
the adapted policy's mean action (the native protocol; reported as mode "A" beside the unadapted policy "pre").

Deviations:
- gymnasium 1.x task families of ``common/envs.py`` and the project's offline datasets (per-task SAC replay
  buffers, much smaller than the paper's) instead of the released hdf5 buffers; rows are stored forward in time
  and the Monte-Carlo fields (return-to-go, terminal obs, terminal discount) are computed here from the episode
  boundaries. ``buffer_skip`` (official 7, a memory saving) defaults to 1 on the small numpy families.
- Fixed, not copied (spec §8): an episode that ended in a true termination has no bootstrap tail
  (gamma^k -> 0; the official code bootstraps through terminations); the advantage std gets an eps of 1e-8 (an
  all-equal batch would give NaN weights). The families benchmarked here never terminate, so neither fix changes
  a number.
- Kept for fidelity: the pure-MC inner value target against the bootstrapped outer one, the ReLU on the
  advantage head's (pre-activation, action) input (negative actions are zeroed), the contiguous inner batch in
  training against the random adaptation batch at test, losses divided by the number of all train tasks, no
  observation or return normalisation, grad clipping off (official clip 1e9).
- Offered, off by default: ``--no-contiguous`` draws the inner batch at random, as the adaptation batch at test
  (the official train/test mismatch, spec §8.7, removed). On the CPU-sized cheetah dataset it and ``--buffer-skip 1``
  (all 32k rows per task instead of every 7th) carry the benchmark setting ``macaw-randinner-skip1`` (README).
- Vectorised: the meta-batch's inner loops run as one ``torch.func.vmap`` over tasks of ``torch.func.grad`` of
  ``functional_call`` (the official code loops over tasks with ``higher``); evaluation adapts all test tasks (and
  all adaptation draws) in one vmapped call and steps them in one batched env. The three lr/coefficient Adam
  optimisers of the official code (same lr 1e-3) are one Adam (elementwise, so identical).
- Evaluation: ``eval_draws`` independent adaptation batches per task, one deterministic episode each (the
  official code: one draw and one episode per evaluation; the spec asks for more to cut the noise).
- Dropped (unused in the paper's configs): the Q-function, the CVAE exploration policy, multitask / imitation
  modes, huber / log targets, online fine-tuning. ``--no-wlinear`` uses the official BiasLinear layers,
  ``--no-advantage-head`` is the paper's no-head ablation, ``--first-order`` drops the second-order terms.
- Continuous actions only (GridNavi is refused).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.func import grad, vmap

from common.data import TaskBatchSampler, ensure_dataset
from common.envs import canonical_env_id, default_preset, make_family
from common.evaluation import per_task_mean, run_episodes
from common.runs import (Logger, check_fresh_run_dir, eval_entry, load_checkpoint, machine_info, make_run_dir,
                         pick_device, print_progress, save_checkpoint, seed_everything, write_summary)


@dataclass
class Args:
    env_id: str = "PointRobot"
    """task family (common/envs.py), e.g. PointRobot, HalfCheetahVel"""
    preset: str | None = None
    """task preset of the family (default: the family's default preset)"""
    dataset: str | None = None
    """offline dataset path (default: datasets/{env}__{preset}__s0.npz, built if missing)"""
    seed: int = 1
    """random seed (same seed on CPU -> same curve)"""
    total_steps: int = 1_000_000
    """meta-training steps (official train_steps; the paper's checkpoints sit at 130k-940k)"""
    eval_every: int = 250
    """meta-steps between evaluations and checkpoints (official vis_interval)"""
    cuda: bool = True
    """use cuda:0 when available"""
    resume: bool = False
    """continue the run in --run-dir from its checkpoint"""
    run_dir: str | None = None
    """run directory (default runs/{env}__macaw__s{seed}__{time})"""

    # networks (src/nn.py, config/alg/standard.json)
    net_width: int = 100
    """width of the hidden layers of the policy and the value net"""
    net_depth: int = 3
    """number of hidden layers"""
    wlinear: bool = True
    """weight-transform layers (theta = F z + b from a 100-d latent); off: the official BiasLinear ablation"""
    advantage_head: bool = True
    """advantage head on the policy and L_ADV in the inner loss (off: the paper's no-head ablation)"""
    action_sigma: float = 0.2
    """fixed std of the Gaussian policy"""

    # meta-learning (standard.json)
    outer_value_lr: float = 1e-5
    """Adam lr of the value net's initialisation"""
    outer_policy_lr: float = 1e-4
    """Adam lr of the policy's initialisation"""
    inner_value_lr: float = 1e-3
    """initial inner lr of the value step (learned, one per parameter tensor, as softplus(raw))"""
    inner_policy_lr: float = 1e-3
    """initial inner lr of the policy step (learned, one per parameter tensor)"""
    lrlr: float = 1e-3
    """Adam lr of the learned inner lrs and of the advantage-loss coefficient"""
    advantage_head_coef: float = 0.01
    """initial weight c of L_ADV in the inner policy loss (learned as softplus(raw))"""
    first_order: bool = False
    """ablation: first-order meta-gradient (the inner gradient is treated as a constant)"""
    task_batch_size: int = 5
    """train tasks per meta-step (all if fewer)"""
    batch_size: int = 256
    """outer batch: random rows per task"""
    inner_batch_size: int = 256
    """inner batch: contiguous rows per task"""
    eval_batch_size: int = 256
    """adaptation batch at test time: random rows of the test task's data"""
    contiguous: bool = True
    """inner batch = a window of consecutive rows (official); off: random rows"""
    adaptation_temp: float = 1.0
    """AWR temperature T"""
    exp_advantage_clip: float = 20.0
    """largest AWR weight"""
    gamma: float = 0.99
    """discount of the Monte-Carlo returns"""
    target_vf_alpha: float = 0.9
    """V_targ = alpha * phi + (1 - alpha) * phi' for the outer value target"""
    buffer_skip: int | None = None
    """keep every k-th row of each task's data (default: 7 as the paper for MuJoCo, 1 for the numpy families)"""

    # evaluation and logging
    eval_draws: int = 3
    """independent adaptation batches per task at evaluation, one deterministic episode each"""
    n_train_eval_tasks: int = 10
    """train tasks evaluated (first n of the split), for comparison"""
    log_every: int = 50
    """meta-steps between train.csv scalars"""
    print_every: int = 250
    """meta-steps between progress lines"""


# The small numpy families' buffers are ~4k rows per task: the paper's skip of 7 (a memory saving for its
# ~1M-row buffers) would leave too little data; spec §9 uses skip 1 there.
ENV_OVERRIDES = {"PointRobot": dict(buffer_skip=1), "SparsePointRobot": dict(buffer_skip=1),
                 "PointRobotWind": dict(buffer_skip=1)}


def env_defaults(env_id: str) -> dict:
    """The settings that differ by env: the paper's MuJoCo value, then the env's override."""
    return {"buffer_skip": 7, **ENV_OVERRIDES.get(canonical_env_id(env_id), {})}


def resolve_args(args: Args) -> Args:
    env = canonical_env_id(args.env_id)
    table = env_defaults(env)
    filled = {k: v for k, v in table.items() if getattr(args, k) is None}
    return dataclasses.replace(args, env_id=env, preset=args.preset or default_preset(env), **filled)


# ---------------------------------------------------------------------------------------------
# Networks (src/nn.py). Every layer exposes its *generated* weights (W, b) and, in closed form, the weights
# it would generate after one SGD step on its own parameters -- the inner step without a per-task copy of F.
# ---------------------------------------------------------------------------------------------


class WLinear(nn.Module):
    """Weight-transform layer: theta = F z + f (F: (P, 100), P = d_in*d_out + d_out), y = x W + b with (W, b) read
    from theta. z ~ N(0, 1/d_out^2), F and f with PyTorch's default nn.Linear init (official)."""

    def __init__(self, d_in: int, d_out: int, latent_dim: int = 100):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.z = nn.Parameter(torch.randn(latent_dim) / d_out)
        self.fc = nn.Linear(latent_dim, d_in * d_out + d_out)

    def split(self, theta):
        n = self.d_in * self.d_out
        return theta[..., :n].unflatten(-1, (self.d_in, self.d_out)), theta[..., n:]

    def weights(self):
        return self.split(self.fc(self.z))

    def adapted_weights(self, g_w, g_b, lrs):
        """(W', b') generated by one SGD step on (z, F, f) (``parameters()`` order) with lrs (a_z, a_F, a_f), given g_theta = dL/d(W, b):
        g_F = g_theta z^T, g_f = g_theta, g_z = F^T g_theta, so with z' = z - a_z F^T g_theta
        theta' = (F - a_F g_theta z^T) z' + f - a_f g_theta = F z' + f - (a_F z.z' + a_f) g_theta.
        The same numbers as stepping F itself, without materialising a (P, 100) F' per task."""
        a_z, a_F, a_f = lrs
        g = torch.cat([g_w.flatten(-2), g_b], -1)  # (..., P)
        z1 = self.z - a_z * (g @ self.fc.weight)
        theta = F.linear(z1, self.fc.weight, self.fc.bias) - (a_F * (z1 @ self.z) + a_f)[..., None] * g
        return self.split(theta)


class BiasLinear(nn.Module):
    """The official non-WT layer (``--no-wlinear``): nn.Linear plus a learned bias transform u @ M,
    u ~ N(0, 1/d_out^2), M Xavier-normal (d_out x d_out)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.u = nn.Parameter(torch.randn(d_out) / d_out)
        self.m = nn.Parameter(nn.init.xavier_normal_(torch.empty(d_out, d_out)))

    def weights(self):
        return self.linear.weight.t(), self.linear.bias + self.u @ self.m

    def adapted_weights(self, g_w, g_b, lrs):
        """One SGD step on (u, M, weight, bias) (``parameters()`` order: own tensors, then the nn.Linear's) in
        closed form: g_u = M g_b, g_M = u g_b^T."""
        a_u, a_m, a_w, a_bias = lrs
        u1 = self.u - a_u * (g_b @ self.m.t())
        b1 = self.linear.bias - a_bias * g_b + u1 @ self.m - (a_m * (u1 @ self.u))[..., None] * g_b
        return self.linear.weight.t() - a_w * g_w, b1


class MacawMLP(nn.Module):
    """ReLU MLP of WLinear/BiasLinear layers, run on a list of generated (W, b). With ``head`` (the policy): the
    last hidden layer's pre-activation h and the action a feed the advantage head ReLU([h, a]) -> 32 -> ReLU -> 1."""

    def __init__(self, dims: list[int], wlinear: bool, head: bool = False, tanh: bool = False):
        super().__init__()
        layer = WLinear if wlinear else BiasLinear
        self.layers = nn.ModuleList(layer(i, o) for i, o in zip(dims[:-1], dims[1:]))
        if head:
            self.layers.extend([layer(dims[-2] + dims[-1], 32), layer(32, 1)])
        self.n_trunk, self.tanh = len(dims) - 1, tanh

    def weights(self) -> list:
        return [layer.weights() for layer in self.layers]

    def adapted_weights(self, grads: list, lrs) -> list:
        """The generated weights after one SGD step of every parameter tensor k with lr lrs[k] (lrs in
        ``self.parameters()`` order)."""
        out, k = [], 0
        for layer, (g_w, g_b) in zip(self.layers, grads):
            n = len(list(layer.parameters()))
            out.append(layer.adapted_weights(g_w, g_b, lrs[k: k + n]))
            k += n
        return out

    def run(self, weights: list, x, actions=None):
        """Forward with given weights; x (..., in) with weights (in, out) or, under vmap, per task."""
        for w, b in weights[: self.n_trunk - 2]:
            x = F.relu(x @ w + b)
        h = x @ weights[self.n_trunk - 2][0] + weights[self.n_trunk - 2][1]  # pre-activation (official ``pre_seq``)
        w, b = weights[self.n_trunk - 1]
        out = F.relu(h) @ w + b
        out = torch.tanh(out) if self.tanh else out
        if actions is None:
            return out
        # Official quirk kept: the ReLU acts on the whole concat, so negative action components are zeroed.
        (w1, b1), (w2, b2) = weights[self.n_trunk:]
        return out, F.relu(F.relu(torch.cat([h, actions], -1)) @ w1 + b1) @ w2 + b2

    def forward(self, x, actions=None):
        return self.run(self.weights(), x, actions)


def make_nets(obs_dim, act_dim, args, device):
    w, d = args.net_width, args.net_depth
    policy = MacawMLP([obs_dim] + [w] * d + [act_dim], args.wlinear, head=args.advantage_head, tanh=True).to(device)
    value = MacawMLP([obs_dim] + [w] * d + [1], args.wlinear).to(device)
    # Learned inner lrs, one per parameter tensor, softplus(raw) with raw = log(lr); c = softplus(raw_c).
    meta = nn.ParameterDict({
        "value_lrs": nn.Parameter(torch.full((len(list(value.parameters())),), math.log(args.inner_value_lr), device=device)),
        "policy_lrs": nn.Parameter(torch.full((len(list(policy.parameters())),), math.log(args.inner_policy_lr), device=device)),
        "adv_coef": nn.Parameter(torch.tensor(math.log(args.advantage_head_coef), device=device)),
    })
    opts = {"value": torch.optim.Adam(value.parameters(), lr=args.outer_value_lr, fused=True),
            "policy": torch.optim.Adam(policy.parameters(), lr=args.outer_policy_lr, fused=True),
            "meta": torch.optim.Adam(meta.parameters(), lr=args.lrlr)}
    return policy, value, meta, opts


# ---------------------------------------------------------------------------------------------
# Losses of one task, as functions of the generated weights (batch tensors without a task axis; vmapped over
# the tasks of the meta-batch by the callers)
# ---------------------------------------------------------------------------------------------


def value_loss(value, weights, batch, target=None):
    """L_V: inner (no target) regresses on the truncated MC return R; outer on R + gamma^k V_targ(s_T)."""
    y = batch["mc_return"]
    if target is not None:
        y = y + batch["term_discount"] * value.run(target, batch["term_obs"]).squeeze(-1)
    return (value.run(weights, batch["obs"]).squeeze(-1) - y.detach()).pow(2).mean()


def advantages(value, weights, batch):
    """A = R + gamma^k V(s_T) - V(s) with the (adapted) value net; never carries gradient."""
    with torch.no_grad():
        a = (batch["mc_return"] + batch["term_discount"] * value.run(weights, batch["term_obs"]).squeeze(-1)
             - value.run(weights, batch["obs"]).squeeze(-1))
    return a.detach()


def awr_weights(adv, temp: float, max_weight: float):
    """w = exp(min((A - mean A) / (std A * T), log max_weight)), per-task batch statistics (unbiased std)."""
    norm = (adv - adv.mean()) / ((adv.std() + 1e-8) * temp)
    return norm.clamp(max=math.log(max_weight)).exp()


def gaussian_log_prob(actions, mean, sigma: float):
    """log N(a | mean, sigma^2 I), summed over action dims."""
    return (-0.5 * ((actions - mean) / sigma).pow(2) - math.log(sigma) - 0.5 * math.log(2 * math.pi)).sum(-1)


def awr_loss(policy, weights, batch, w, sigma):
    """L_AWR = mean [-w log pi(a|s)] (paper eq. 5; the outer policy loss)."""
    return -(w * gaussian_log_prob(batch["actions"], policy.run(weights, batch["obs"]), sigma)).mean()


def inner_policy_loss(policy, weights, batch, adv, w, coef, sigma):
    """L_pi = L_AWR + c L_ADV (paper eq. 6): the head regresses the unnormalised advantage."""
    if len(weights) == policy.n_trunk:  # --no-advantage-head
        return awr_loss(policy, weights, batch, w, sigma)
    mean, adv_hat = policy.run(weights, batch["obs"], batch["actions"])
    return (-(w * gaussian_log_prob(batch["actions"], mean, sigma)) + coef * (adv_hat.squeeze(-1) - adv).pow(2)).mean()


def adapt(policy, value, weights_v, weights_pi, meta, batch, args, first_order=False):
    """The inner loop of one task: one value step on the MC regression, then one policy step on L_AWR + c L_ADV
    with the adapted value's advantages, each with the learned per-tensor lrs (softplus). ``weights_*`` are the
    meta-parameters' generated weights. Returns the adapted value weights, the value target's weights (one step
    with lrs scaled by 1 - alpha: exactly V_targ = alpha phi + (1 - alpha) phi'), the adapted policy weights and
    the inner advantages and AWR weights."""
    g_v = grad(lambda w: value_loss(value, w, batch))(weights_v)
    if first_order:
        g_v = [(gw.detach(), gb.detach()) for gw, gb in g_v]
    lrs_v = F.softplus(meta["value_lrs"])
    weights_v1 = value.adapted_weights(g_v, lrs_v)
    target_v = value.adapted_weights(g_v, (1 - args.target_vf_alpha) * lrs_v)
    adv = advantages(value, weights_v1, batch)
    w = awr_weights(adv, args.adaptation_temp, args.exp_advantage_clip)
    coef = F.softplus(meta["adv_coef"])
    g_pi = grad(lambda wt: inner_policy_loss(policy, wt, batch, adv, w, coef, args.action_sigma))(weights_pi)
    if first_order:
        g_pi = [(gw.detach(), gb.detach()) for gw, gb in g_pi]
    weights_pi1 = policy.adapted_weights(g_pi, F.softplus(meta["policy_lrs"]))
    return weights_v1, target_v, weights_pi1, adv, w


def meta_losses(policy, value, meta, inner, outer, args):
    """The outer losses of every task in the meta-batch at once: inner/outer batches (tasks, batch, dim) ->
    L_V(phi'_i, D_ts,i) and L_AWR(theta'_i, D_ts,i), each (tasks,), plus per-task diagnostics (tasks, 5)."""
    weights_v, weights_pi = value.weights(), policy.weights()  # generated once, shared by all tasks

    def one_task(inner, outer):
        weights_v1, target_v, weights_pi1, adv_in, w_in = adapt(policy, value, weights_v, weights_pi, meta, inner,
                                                                args, args.first_order)
        # Outer value target: phi soft-updated once toward phi' (official ``soft_update``), no gradient.
        target_v = [(w.detach(), b.detach()) for w, b in target_v]
        l_v = value_loss(value, weights_v1, outer, target_v)
        adv_out = advantages(value, weights_v1, outer)
        w_out = awr_weights(adv_out, args.adaptation_temp, args.exp_advantage_clip)
        l_pi = awr_loss(policy, weights_pi1, outer, w_out, args.action_sigma)
        stats = torch.stack([adv_in.mean(), w_in.mean(), adv_out.mean(), w_out.mean(), w_out.max()])
        return l_v, l_pi, stats

    return vmap(one_task)(inner, outer)


# ---------------------------------------------------------------------------------------------
# Data: Monte-Carlo fields from the episode boundaries, per-task (skipped) buffers, batch sampling
# ---------------------------------------------------------------------------------------------


def monte_carlo_fields(ds, gamma: float) -> dict:
    """Per row t of an episode ending at row E: return-to-go R_t = Σ_{j=t}^{E} gamma^(j-t) r_j, s_T = next_obs[E]
    and the tail discount gamma^(E-t+1) (0 when the episode ended in a true termination: nothing to bootstrap).
    Rows are sorted by (task, episode, step); an episode ends where the next row starts another episode."""
    r = ds["rewards"].astype(np.float64)
    n = len(r)
    end = np.ones(n, bool)
    end[:-1] = (ds["episode_id"][1:] != ds["episode_id"][:-1]) | (ds["task_id"][1:] != ds["task_id"][:-1])
    ret, last = r.copy(), np.arange(n)
    step = ds["step"].astype(np.int64)
    order = np.argsort(-step, kind="stable")  # backward in time: row t + 1 is done before row t
    bounds = np.flatnonzero(np.diff(step[order])) + 1
    for rows in np.split(order, bounds):
        rows = rows[~end[rows]]
        ret[rows] += gamma * ret[rows + 1]
        last[rows] = last[rows + 1]
    tail = gamma ** (last - np.arange(n) + 1.0) * ~ds["terminals"][last]
    return {"mc_return": ret.astype(np.float32), "term_obs": ds["next_obs"][last],
            "term_discount": tail.astype(np.float32)}


def skip_rows(ds, skip: int):
    """The dataset with every ``skip``-th row of each task kept (official ``buffer_skip``)."""
    if skip == 1:
        return ds
    keep = np.zeros(ds.num_transitions, bool)
    for t in range(len(ds.tasks)):
        keep[ds.task_slice(t)][::skip] = True
    arrays = {key: v[keep] for key, v in ds.arrays.items()}
    ptr = np.concatenate([[0], np.cumsum(np.bincount(arrays["task_id"], minlength=len(ds.tasks)))]).astype(np.int64)
    return dataclasses.replace(ds, arrays=arrays, task_ptr=ptr)


BATCH_KEYS = ("obs", "actions", "mc_return", "term_obs", "term_discount")


def task_sampler(ds, task_ids, device):
    return TaskBatchSampler(ds, task_ids, device, keys=BATCH_KEYS)


def gather(sampler, rows, idx) -> dict:
    """Rows ``idx`` (k, n) of the sampler's tasks ``rows`` (k,) -> dict of (k, n, ...) tensors."""
    return {key: v[rows[:, None], idx] for key, v in sampler.data.items()}


def random_rows(sampler, rows, n: int, generator=None):
    """n distinct random rows of each listed task (official ``random.sample``): the n smallest of per-row
    uniforms, padding rows pushed past every real row."""
    counts = sampler.counts[rows]
    u = torch.rand(len(rows), sampler.data["obs"].shape[1], device=counts.device, generator=generator)
    u = u.masked_fill(torch.arange(u.shape[1], device=u.device)[None] >= counts[:, None], 2.0)
    return torch.topk(u, n, dim=1, largest=False).indices


def contiguous_rows(sampler, rows, n: int, generator=None):
    """A window of n consecutive rows starting uniformly in [0, count - n) (official ``contiguous=True``)."""
    counts = sampler.counts[rows]
    start = (torch.rand(len(rows), device=counts.device, generator=generator) * (counts - n)).long()
    return start[:, None] + torch.arange(n, device=counts.device)[None]


# ---------------------------------------------------------------------------------------------
# Evaluation: adapt every (task, draw) in one vmapped call, roll the adapted policies out together
# ---------------------------------------------------------------------------------------------


def evaluate_split(policy, value, meta, sampler, family, task_ids, args, device, seed):
    """Native protocol on ``task_ids``: ``eval_draws`` adaptation batches of ``eval_batch_size`` random rows
    per task, one step each, one deterministic episode per adapted policy; plus the unadapted policy.
    Returns per-task adapted returns, unadapted returns and success rates."""
    n, D = len(task_ids), args.eval_draws
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = torch.arange(n, device=device).repeat_interleave(D)  # task-major, as make_vec_env lays envs out
    batch = gather(sampler, rows, random_rows(sampler, rows, args.eval_batch_size, gen))
    with torch.no_grad():  # torch.func.grad still differentiates inside; nothing here needs a meta-gradient
        weights_v, weights_pi = value.weights(), policy.weights()
        weights_pi1 = vmap(lambda b: adapt(policy, value, weights_v, weights_pi, meta, b, args)[2])(batch)
    policy_mean = vmap(policy.run)  # env b runs adapted policy b

    def act_adapted(obs, ep, t):
        with torch.no_grad():
            return policy_mean(weights_pi1, torch.as_tensor(obs, dtype=torch.float32, device=device)[:, None])[:, 0].cpu().numpy()

    def act_unadapted(obs, ep, t):
        with torch.no_grad():
            return policy(torch.as_tensor(obs, dtype=torch.float32, device=device)).cpu().numpy()

    out = {}
    for k, (mode, act) in enumerate((("A", act_adapted), ("pre", act_unadapted))):
        ret, succ = run_episodes(family.make_vec_env(task_ids, D, seed=seed + k), act, 1)
        out[mode] = (per_task_mean(ret[:, 0], D), per_task_mean(succ[:, 0].astype(float), D))
    return out


def evaluate(step, nets, samplers, family, args, device, logger):
    policy, value, meta = nets
    seed = 10_000 * args.seed + step % 9973
    res = {}
    for split, ids in (("test", family.test_idx), ("train", family.train_idx[: args.n_train_eval_tasks])):
        out = evaluate_split(policy, value, meta, samplers[split], family, ids, args, device, seed)
        for mode, (ret, succ) in out.items():
            logger.log_eval(step, mode, split, ids, ret, succ > 0.5)
        res[split] = out
    logger.log_scalars(step, {"eval/A_test": res["test"]["A"][0].mean(), "eval/pre_test": res["test"]["pre"][0].mean(),
                              "eval/A_train": res["train"]["A"][0].mean(), "eval/pre_train": res["train"]["pre"][0].mean()})
    return res


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def variant_name(args: Args) -> str:
    """The method label of summary.json: macaw plus the ablation flags that change what is learned."""
    skip = args.buffer_skip not in (None, env_defaults(args.env_id)["buffer_skip"])
    return "macaw" + "".join(tag for on, tag in ((not args.wlinear, "-nowt"), (not args.advantage_head, "-nohead"),
                                                 (args.first_order, "-fo"), (not args.contiguous, "-randinner"),
                                                 (skip, f"-skip{args.buffer_skip}"),
                                                 (args.outer_value_lr != Args.outer_value_lr,
                                                  f"-vlr{args.outer_value_lr:g}"),
                                                 (args.adaptation_temp != Args.adaptation_temp,
                                                  f"-T{args.adaptation_temp:g}")) if on)


def load_buffers(args, family, device):
    """The offline dataset with its MC fields, skipped per task; samplers for the train and test tasks."""
    ds = ensure_dataset(args.env_id, args.preset, path=args.dataset, family=family)
    mc = monte_carlo_fields(ds, args.gamma)
    full = dataclasses.replace(ds, arrays=ds.arrays | mc)
    buf = skip_rows(full, args.buffer_skip)
    samplers = {"train": task_sampler(buf, family.train_idx, device),
                "test": task_sampler(buf, family.test_idx, device)}
    smallest = int(min(s.counts.min() for s in samplers.values()))
    need = max(args.inner_batch_size + 1, args.batch_size, args.eval_batch_size)
    if smallest < need:
        raise SystemExit(f"{ds.path}: a task has only {smallest} rows after --buffer-skip {args.buffer_skip}; "
                         f"the batches need {need} (lower --buffer-skip or the batch sizes)")
    return ds, samplers


def main(args: Args):
    args = resolve_args(args)
    family = make_family(args.env_id, args.preset)
    if family.discrete:
        raise SystemExit(f"macaw.py supports continuous actions only; {args.env_id} is discrete")
    run_dir = make_run_dir(args.env_id, "macaw", args.seed, args.run_dir)
    check_fresh_run_dir(run_dir, args.resume)
    seed_everything(args.seed)
    device = pick_device(args.cuda)
    gen = torch.Generator(device=device).manual_seed(args.seed)

    # Test tasks' data serve only as adaptation batches at evaluation; training reads the train tasks only.
    ds, samplers = load_buffers(args, family, device)
    train = samplers["train"]
    n_train = len(family.train_idx)
    policy, value, meta, opts = make_nets(family.obs_dim, family.act_dim, args, device)
    nets = (policy, value, meta)
    step, train_time, wall_before, history = 0, 0.0, 0.0, []
    ckpt_path = Path(run_dir) / "checkpoint.pt"
    ckpt_meta = {"method": "macaw", "env_id": args.env_id, "preset": args.preset, "seed": args.seed,
                 "obs_dim": family.obs_dim, "act_dim": family.act_dim, "net_width": args.net_width,
                 "net_depth": args.net_depth, "wlinear": args.wlinear, "advantage_head": args.advantage_head,
                 # the flags that name a variant (inner batches, skip, outer value lr, T, ablations): it resumes only as itself
                 "variant": variant_name(args)}
    if args.resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, expect=ckpt_meta, map_location=device)
        for net, key in ((policy, "policy"), (value, "value"), (meta, "meta")):
            net.load_state_dict(state["nets"][key])
        for k, o in opts.items():
            o.load_state_dict(state["opts"][k])
        step, train_time, history, wall_before = state["step"], state["train_time"], state["history"], state["wall_time"]
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed {ckpt_path} at step {step}", flush=True)
    logger = Logger(run_dir, {**vars(args), "run_dir": str(run_dir)})
    n_params = sum(p.numel() for p in policy.parameters()), sum(p.numel() for p in value.parameters())
    print(f"MACAW on {args.env_id}/{args.preset}: {n_train} train / {len(family.test_idx)} test tasks, "
          f"{int(train.counts.float().mean())} rows per task (skip {args.buffer_skip}), width {args.net_width}x"
          f"{args.net_depth}, {'WLinear' if args.wlinear else 'BiasLinear'}, policy {n_params[0]:,} / value "
          f"{n_params[1]:,} parameters, steps={args.total_steps}", flush=True)

    def checkpoint():
        save_checkpoint(ckpt_path, {
            "meta": ckpt_meta, "args": vars(args), "step": step, "train_time": train_time, "history": history,
            "wall_time": wall_before + time.time() - t_start,
            "nets": {"policy": policy.state_dict(), "value": value.state_dict(), "meta": meta.state_dict()},
            "opts": {k: o.state_dict() for k, o in opts.items()}, "gen": gen.get_state(), "torch_rng": torch.get_rng_state()})

    def do_eval():
        res = evaluate(step, nets, samplers, family, args, device, logger)
        history.append({"step": step, "A": float(res["test"]["A"][0].mean()), "pre": float(res["test"]["pre"][0].mean())})
        print(f"eval step {step}: test adapted {res['test']['A'][0].mean():.3f} | unadapted "
              f"{res['test']['pre'][0].mean():.3f} | train adapted {res['train']['A'][0].mean():.3f} unadapted "
              f"{res['train']['pre'][0].mean():.3f}", flush=True)
        return res

    t_start = time.time()
    start_step = step
    res = do_eval() if step == 0 else None
    k = min(args.task_batch_size, n_train)
    last = {}
    while step < args.total_steps:
        t0 = time.time()
        n_block = min(args.eval_every - step % args.eval_every, args.total_steps - step)
        for _ in range(n_block):
            # ALGO LOGIC: 5 train tasks without replacement; a contiguous inner and a random outer batch each
            rows = torch.randperm(n_train, device=device, generator=gen)[:k]
            inner_idx = (contiguous_rows if args.contiguous else random_rows)(train, rows, args.inner_batch_size, gen)
            inner = gather(train, rows, inner_idx)
            outer = gather(train, rows, random_rows(train, rows, args.batch_size, gen))
            l_v, l_pi, stats = meta_losses(policy, value, meta, inner, outer, args)
            # Official: each task's outer losses divided by the number of ALL train tasks, summed, one Adam step.
            for o in opts.values():
                o.zero_grad(set_to_none=True)
            ((l_v.sum() + l_pi.sum()) / n_train).backward()
            for o in opts.values():
                o.step()
            step += 1
            if step % args.log_every == 0:
                s = stats.mean(0)
                last = {"loss/value_outer": l_v.mean().item(), "loss/policy_outer": l_pi.mean().item(),
                        "adv/inner_mean": s[0].item(), "adv/inner_weight_mean": s[1].item(),
                        "adv/outer_mean": s[2].item(), "adv/outer_weight_mean": s[3].item(),
                        "adv/outer_weight_max": s[4].item(),
                        "meta/value_lr_mean": F.softplus(meta["value_lrs"]).mean().item(),
                        "meta/policy_lr_mean": F.softplus(meta["policy_lrs"]).mean().item(),
                        "meta/adv_coef": F.softplus(meta["adv_coef"]).item()}
                logger.log_scalars(step, last | {"perf/updates_per_s": (step - start_step) / max(train_time + time.time() - t0, 1e-9)})
            if step % args.print_every == 0:
                extra = {"L_V": last.get("loss/value_outer", float("nan")), "L_pi": last.get("loss/policy_outer", float("nan")),
                         "c": last.get("meta/adv_coef", float("nan"))}
                if history:
                    extra |= {"test_A": history[-1]["A"], "test_pre": history[-1]["pre"]}
                print_progress(step, args.total_steps, t_start, extra, start_step)
        train_time += time.time() - t0
        if step % args.eval_every == 0 or step == args.total_steps:
            res = do_eval()
            checkpoint()

    if res is None:  # resumed a finished run: evaluate once more for the summary
        res = do_eval()
    ups = step / max(train_time, 1e-9)  # train_time accumulates over resumes
    write_summary(run_dir, method=variant_name(args), env_id=args.env_id, preset=args.preset, seed=args.seed,
                  total_steps=step, wall_time_s=wall_before + time.time() - t_start, updates_per_s=ups,
                  machine=machine_info(device), dataset=str(ds.path),
                  eval={mode: eval_entry(res["test"][mode][0], res["train"][mode][0]) for mode in ("A", "pre")},
                  extra={"train_time_s": train_time, "final": last,
                         "success": {mode: float(res["test"][mode][1].mean()) for mode in ("A", "pre")},
                         "inner_value_lrs": F.softplus(meta["value_lrs"]).tolist(),
                         "inner_policy_lrs": F.softplus(meta["policy_lrs"]).tolist(),
                         "settings": {k: getattr(args, k) for k in ("net_width", "net_depth", "wlinear", "advantage_head",
                                                                     "first_order", "buffer_skip", "task_batch_size",
                                                                     "eval_draws")}})
    logger.close()
    print(f"done: {step} steps, {ups:.2f} updates/s, summary in {run_dir}/summary.json", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
