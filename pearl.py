"""PEARL: probabilistic embeddings for actor-critic meta-RL, offline by default, online with ``--online``.

Paper: Kate Rakelly, Aurick Zhou, Deirdre Quillen, Chelsea Finn, Sergey Levine, "Efficient Off-Policy
Meta-Reinforcement Learning via Probabilistic Context Variables", ICML 2019, arXiv:1903.08254.
Official code: github.com/katerakelly/oyster (rlkit-based).

Method. An amortised inference network q_phi(z|c) maps a *set* of transitions c = {(s, a, r[, s'])} of one
task to a Gaussian over a latent task variable z (5-dim). Each transition gives a Gaussian factor, the
posterior is their product (permutation invariant). A soft actor-critic (twin Q, V with a target, tanh-Gaussian
policy, fixed entropy weight 1) is conditioned on z. The encoder is trained only through the critic's Bellman
loss plus a KL information bottleneck toward the prior N(0, I). At test time the agent infers z from a context
(protocol A: offline transitions of the test task; protocol B: the paper's posterior sampling -- explore with
z ~ prior, then re-infer the posterior from everything collected after every trajectory).

Equations (tasks i = 1..T of the meta-batch, RL batch b_i, context c_i drawn independently of b_i):
    q(z|c) ∝ Π_n N(mu_n, sigma_n^2),  (mu_n, sigma_n^2) = f_phi(c_n), sigma_n^2 = softplus(.) >= 1e-7
        => sigma^2 = 1 / Σ_n sigma_n^-2,   mu = sigma^2 Σ_n mu_n / sigma_n^2            (product of Gaussians)
    z_i = mu_i + sigma_i * eps                                                           (reparameterised)
    L_KL = beta Σ_i Σ_d KL(N(mu_id, sigma_id^2) || N(0, 1))                              (SUM over tasks and dims)
    y    = rs * r + (1 - d) * gamma * Vbar(s', z_i)                                       (no gradient)
    L_Q  = mean (Q1(s, a, z_i) - y)^2 + mean (Q2(s, a, z_i) - y)^2       -> Q1, Q2 and the encoder
    a~   ~ pi(.|s, zbar_i) (rsample),  m = min(Q1, Q2)(s, a~, zbar_i)    with the Qs already updated this step
    L_V  = mean (V(s, zbar_i) - [m - log pi(a~|s, zbar_i)]_sg)^2;   Vbar <- (1 - tau) Vbar + tau V
    L_pi = mean (log pi(a~|s, zbar_i) - m) + 1e-3 mean(mu_pi^2) + 1e-3 mean((log sigma_pi)^2)
    zbar = stop_gradient(z): the encoder gets gradients from L_Q + L_KL only.
Step order as in oyster's ``_take_step``: (encoder + Q) step, then V step (+ Polyak), then policy step.

Offline variant (default; spec §5): every loss, network and hyperparameter as above, only the data source
changes: RL batches are 256 transitions drawn uniformly from each task's offline dataset, contexts are
``context_size`` transitions drawn independently from the task's context pool (all of its data, or with
``--context-pool tail`` its last ``--context-tail`` transitions, the analogue of PEARL's encoder buffer).
``--online`` runs the paper's meta-training (Algorithm 1): prior-z collection for every train task, then per
iteration prior / posterior / extra-posterior collection into separate RL and encoder buffers.

Deviations:
- gymnasium 1.x task families of ``common/envs.py`` (numpy point robots, gymnasium v5 MuJoCo) instead of the
  rlkit/mujoco-py envs; tasks and splits come from the chosen preset (PointRobot default: 40/10 semicircle goals).
- Offline by default (no paper counterpart; spec §5). Datasets are the project's per-task SAC replay buffers.
- Vectorised: all tasks of the meta-batch in one (T, B, .) tensor; Q1/Q2 as one 2-member batched network
  (Adam is elementwise, so one optimiser over the stacked weights equals two optimisers). The min-Q on new
  actions is computed with detached Q weights: the official code lets L_pi write gradients into the Q nets
  and discards them at the next zero_grad, so the updates are identical and the backward is cheaper.
  The V and policy losses are back-propagated in one call (disjoint parameters; same gradients).
- Online mode collects the ``num_tasks_sample`` tasks of an iteration in lockstep (one batched env, one env per
  task) and draws them without replacement (oyster draws them one after another, with replacement).
- Speed-only changes with identical maths: in-place ReLU; under ``--bf16`` the hidden layers run in bfloat16
  while output layers (Q/V values, policy heads, encoder factors), the posterior and the KL stay fp32.
- Evaluation: protocol A = ``eval_context_draws`` offline contexts of ``context_size`` transitions per test task
  (one deterministic episode each, z sampled from the posterior; z = mu is logged too); protocol B = the paper's
  posterior sampling (``num_evals`` runs x ``eval_episodes`` episodes, the last reported). Both also on the first
  ``n_train_eval_tasks`` train tasks (offline data / online rollouts) instead of oyster's encoder-buffer train eval.
- Not implemented: the recurrent encoder (the official README says it is incorrect), rlkit's logging stack,
  |Q - MC return| monitoring (mean Q and the Bellman target are logged instead). Discrete action spaces
  (GridNavi) are not supported (PEARL is continuous-control).
- ``--context-relabel F`` (offline only, off by default; numpy families, whose reward is a function of
  (s, a, s')): a share F of the training contexts of task i is drawn from a random train task j's data with the
  rewards recomputed for task i (``common.envs.relabel_rewards``; BOReL's relabelling applied to PEARL's
  context). Why: the offline data of task i are its own learner's trajectories, which end at task i's goal, so
  an encoder trained on them can read the task from the states alone; at test time (protocol B) the exploration
  trajectories come from z ~ prior and head to some other goal, and such an encoder then infers that other
  goal -- offline PEARL's collapse with self-collected contexts (spec §5, pitfall 10). With relabelled contexts
  the states never identify the task, so the encoder must read the rewards; and a trajectory of task j's
  behaviour with task i's rewards is what a prior-z exploration episode looks like at test time.
  ``--relabel-mode`` picks where a relabelled context's transitions come from: one random train task (task),
  each from a random train task (pool), or a mixture (mix). Measured in the README: relabelling lifts protocol B
  and costs protocol A; none of the three modes matches the default's protocol A.
- ``--rl-relabel F`` (offline only, off by default, same families): a share F of each RL batch of task i is
  drawn from all train tasks' data with task i's rewards (terminal 0: the point robots only time out). Why:
  task i's own rows cover the path to its goal only, so Q(s, a, z_i) and pi(a | s, z_i) are untrained on the
  states a test-time episode reaches after a wrong first guess; relabelled rows train them everywhere the data
  go, as BOReL trains its policy on relabelled data.
- ``--deterministic-z``: the paper's ablation (z = mean of the encoder outputs, no KL), off by default.
- ``--bf16``: optional autocast for the update's matmuls (fp32 weights, optimiser and posterior/KL).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

from common.data import TaskBatchSampler, ensure_dataset, sample_context
from common.envs import canonical_env_id, default_preset, make_family, relabel_rewards
from common.evaluation import per_task_mean, run_episodes
from common.runs import (Logger, check_fresh_run_dir, load_checkpoint, machine_info, make_run_dir, pick_device,
                         print_progress, save_checkpoint, seed_everything, write_summary)


@dataclass
class Args:
    env_id: str = "PointRobot"
    """task family (common/envs.py), e.g. PointRobot, SparsePointRobot, HalfCheetahVel"""
    preset: str | None = None
    """task preset of the family (default: the family's default preset)"""
    dataset: str | None = None
    """offline dataset path (default: datasets/{env}__{preset}__s0.npz, built if missing)"""
    seed: int = 1
    """random seed (same seed on CPU -> same curve)"""
    total_steps: int | None = None
    """gradient steps (default: num_iterations * train_steps_per_itr, the paper's schedule)"""
    eval_every: int | None = None
    """gradient steps between evaluations/checkpoints (default: train_steps_per_itr, one paper iteration)"""
    cuda: bool = True
    """use cuda:0 when available"""
    resume: bool = False
    """continue the run in --run-dir from its checkpoint"""
    run_dir: str | None = None
    """run directory (default runs/{env}__pearl__s{seed}__{time})"""
    bf16: bool = False
    """autocast the update's forward/backward to bfloat16 (weights and optimiser stay fp32)"""
    online: bool = False
    """the paper's online meta-training (Algorithm 1) instead of offline PEARL on the dataset"""

    # networks (oyster launch_experiment.py / configs/default.py)
    latent_dim: int = 5
    """dimension of z"""
    net_size: int = 300
    """width of the 3 hidden layers of Q1, Q2, V and the policy"""
    encoder_size: int = 200
    """width of the context encoder's hidden layers"""
    encoder_layers: int = 3
    """number of hidden layers of the context encoder"""
    deterministic_z: bool = False
    """ablation: z = mean of the encoder outputs, no KL (use_information_bottleneck=False)"""
    use_next_obs_in_context: bool | None = None
    """add s' to the context transitions (default: per-env table; walker/hopper yes)"""

    # SAC / PEARL (None = per-env table ENV_OVERRIDES, else PAPER_DEFAULTS)
    lr: float = 3e-4
    """Adam learning rate of policy, Q, V and encoder"""
    tau: float = 0.005
    """Polyak rate of the target V"""
    batch_size: int = 256
    """RL batch per task"""
    gamma: float | None = None
    """discount (default: per-env table, 0.99; sparse point robot 0.9)"""
    reward_scale: float | None = None
    """reward scale rs (default: 5 MuJoCo, 100 point robots); sets the entropy trade-off (alpha fixed at 1)"""
    kl_lambda: float | None = None
    """beta, weight of the KL summed over tasks and latent dims (default: per-env table)"""
    meta_batch: int | None = None
    """tasks per gradient step, drawn with replacement (default: per-env table)"""
    context_size: int | None = None
    """transitions per context, embedding_batch_size (default: per-env table; point robot 64)"""
    policy_mean_reg: float = 1e-3
    """weight of mean(mu_pi^2)"""
    policy_std_reg: float = 1e-3
    """weight of mean((log sigma_pi)^2)"""
    context_pool: Literal["all", "tail"] = "all"
    """offline: draw training contexts from all of a task's data or from its last --context-tail transitions"""
    context_tail: int = 1000
    """offline, --context-pool tail: size of the per-task context pool"""
    context_relabel: float = 0.0
    """offline, a deviation: share of training contexts drawn from a random train task's data with the rewards
    recomputed for the context's task, so that only rewards identify the task (numpy families; 0 = off)"""
    relabel_mode: Literal["task", "pool", "mix"] = "task"
    """--context-relabel: a context's transitions come from one random train task (task), each from a random
    train task (pool), or a random share p ~ U(0, 1) from one task and the rest from random ones (mix)"""
    rl_relabel: float = 0.0
    """offline, a deviation: share of each RL batch's transitions drawn from every train task's data (pool mode)
    with the rewards recomputed for the batch's task, as BOReL relabels its RL data; widens the states on which
    each task's Q and policy are trained (point robots only; 0 = off)"""
    relabel_pool_size: int = 50000
    """offline, --context-relabel or --rl-relabel > 0: transitions kept (split evenly over train tasks) to relabel
    for every task"""

    # schedule / online collection (oyster configs; None = per-env table)
    num_iterations: int = 500
    """paper iterations (total steps = num_iterations * train_steps_per_itr unless --total-steps)"""
    train_steps_per_itr: int | None = None
    """gradient steps per iteration (num_train_steps_per_itr)"""
    num_initial_steps: int | None = None
    """online: prior-z steps collected for every train task before training"""
    num_tasks_sample: int | None = None
    """online: tasks collected per iteration"""
    num_steps_prior: int | None = None
    """online: steps per sampled task with z ~ prior (RL and encoder buffers)"""
    num_steps_posterior: int | None = None
    """online: steps per sampled task with z ~ posterior (RL and encoder buffers)"""
    num_extra_rl_steps_posterior: int | None = None
    """online: steps per sampled task with z ~ posterior (RL buffer only)"""

    # evaluation
    eval_context_draws: int = 3
    """mode A: offline context draws per task (one deterministic episode each)"""
    num_evals: int | None = None
    """mode B: independent runs per task (default: per-env table)"""
    eval_episodes: int | None = None
    """mode B: episodes per run, the last one is reported (default: num_steps_per_eval / H)"""
    num_exp_traj_eval: int | None = None
    """mode B: leading episodes with a fresh z ~ prior (default: per-env table)"""
    n_train_eval_tasks: int = 10
    """train tasks evaluated (first n of the split), for comparison"""
    log_every: int = 100
    """gradient steps between train.csv scalars"""
    print_every: int = 500
    """gradient steps between progress lines"""


# Shared oyster defaults (configs/default.py) and the per-env columns of its configs/*.json (spec §3).
PAPER_DEFAULTS = dict(gamma=0.99, reward_scale=5.0, kl_lambda=0.1, meta_batch=16, context_size=100,
                      use_next_obs_in_context=False, train_steps_per_itr=2000, num_initial_steps=2000,
                      num_tasks_sample=5, num_steps_prior=400, num_steps_posterior=0,
                      num_extra_rl_steps_posterior=600, num_evals=1, eval_episodes=3, num_exp_traj_eval=2)
ENV_OVERRIDES = {
    "PointRobot": dict(reward_scale=100.0, meta_batch=16, context_size=64, gamma=0.99, kl_lambda=0.1,
                       train_steps_per_itr=1000, num_initial_steps=200, num_steps_prior=200,
                       num_extra_rl_steps_posterior=200, num_evals=2, eval_episodes=3, num_exp_traj_eval=1),
    "SparsePointRobot": dict(reward_scale=100.0, meta_batch=16, context_size=1024, gamma=0.9, kl_lambda=1.0,
                             train_steps_per_itr=1000, num_initial_steps=200, num_tasks_sample=10,
                             num_steps_prior=100, num_steps_posterior=900, num_extra_rl_steps_posterior=0,
                             num_evals=2, eval_episodes=20, num_exp_traj_eval=5),
    "HalfCheetahVel": dict(meta_batch=16, context_size=100),
    "HalfCheetahDir": dict(meta_batch=4, context_size=256, num_steps_prior=1000, num_extra_rl_steps_posterior=1000,
                           num_evals=4),
    "AntDir": dict(meta_batch=4, context_size=256, train_steps_per_itr=4000, num_evals=4),
    "AntGoal": dict(meta_batch=10, context_size=256, train_steps_per_itr=4000, kl_lambda=1.0),
    "HumanoidDir": dict(meta_batch=16, context_size=256, train_steps_per_itr=4000),
    "WalkerRandParams": dict(meta_batch=10, context_size=100, train_steps_per_itr=4000,
                             use_next_obs_in_context=True, num_evals=2),
    "HopperRandParams": dict(meta_batch=10, context_size=100, train_steps_per_itr=4000,
                             use_next_obs_in_context=True, num_evals=2),
}


def resolve_args(args: Args) -> Args:
    """Fill every None hyperparameter from the env's column of the oyster configs."""
    env = canonical_env_id(args.env_id)
    table = {**PAPER_DEFAULTS, **ENV_OVERRIDES.get(env, {})}
    filled = {k: table[k] for k in table if getattr(args, k) is None}
    args = dataclasses.replace(args, env_id=env, preset=args.preset or default_preset(env), **filled)
    if args.total_steps is None:
        args.total_steps = args.num_iterations * args.train_steps_per_itr
    if args.eval_every is None:
        args.eval_every = args.train_steps_per_itr
    return args


# ---------------------------------------------------------------------------------------------
# Networks (rlkit Mlp / FlattenMlp / TanhGaussianPolicy), batched over tasks via leading dims
# ---------------------------------------------------------------------------------------------


def rlkit_init_(weight, bias, hidden: bool, init_w: float = 3e-3):
    """rlkit init: hidden weights U(+-1/sqrt(out_features)) (the ``fanin_init`` quirk: size[0] of an nn.Linear
    weight is its *output* width), hidden biases 0.1; last layer U(+-init_w)."""
    with torch.no_grad():
        if hidden:
            out_features = weight.shape[0] if weight.dim() == 2 else weight.shape[-1]
            bound = 1.0 / math.sqrt(out_features)
            weight.uniform_(-bound, bound)
            bias.fill_(0.1)
        else:
            weight.uniform_(-init_w, init_w)
            bias.uniform_(-init_w, init_w)


def at_least_fp32(x):
    return x.to(torch.promote_types(x.dtype, torch.float32))


class Mlp(nn.Module):
    """ReLU MLP on (..., in_dim) inputs; any leading dims (tasks, batch) pass through."""

    def __init__(self, in_dim, hidden, out_dim, n_layers=3, init_w=3e-3):
        super().__init__()
        dims = [in_dim] + [hidden] * n_layers
        self.hidden = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims[:-1], dims[1:]))
        self.last = nn.Linear(dims[-1], out_dim)
        for fc in self.hidden:
            rlkit_init_(fc.weight, fc.bias, hidden=True)
        rlkit_init_(self.last.weight, self.last.bias, hidden=False, init_w=init_w)

    def forward(self, x):
        for fc in self.hidden:
            x = F.relu(fc(x), inplace=True)  # in place is safe: linear's backward does not need its output
        with torch.autocast(x.device.type, enabled=False):  # --bf16: outputs (Q values ~1e3 at rs=100) in fp32
            return self.last(at_least_fp32(x))


class TwinQ(nn.Module):
    """Q1 and Q2 as one 2-member batched MLP: weights (2, in, out), one ``baddbmm`` per layer for both."""

    def __init__(self, in_dim, hidden, n_layers=3, n_members=2, init_w=3e-3):
        super().__init__()
        dims = [in_dim] + [hidden] * n_layers + [1]
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(n_members, i, o)) for i, o in zip(dims[:-1], dims[1:]))
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(n_members, 1, o)) for o in dims[1:])
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            rlkit_init_(w, b, hidden=k < n_layers, init_w=init_w)

    def forward(self, x, frozen: bool = False):
        """x: (..., in_dim) -> (2, ..., 1). ``frozen``: weights detached (gradients reach x only)."""
        lead = x.shape[:-1]
        h = x.reshape(1, -1, x.shape[-1]).expand(len(self.weights[0]), -1, -1)
        n = len(self.weights)
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            if frozen:
                w, b = w.detach(), b.detach()
            if k < n - 1:
                h = F.relu(torch.baddbmm(b, h, w), inplace=True)
            else:
                with torch.autocast(h.device.type, enabled=False):  # --bf16: the Q values themselves in fp32
                    h = torch.baddbmm(b, at_least_fp32(h), w)
        return h.reshape(h.shape[0], *lead, 1)


class ContextEncoder(nn.Module):
    """f_phi: one transition (s, a, r[, s']) -> a Gaussian factor (mu_n, sigma_n^2), or L raw features when z is
    deterministic."""

    def __init__(self, in_dim, hidden, latent_dim, n_layers=3, deterministic=False):
        super().__init__()
        self.latent_dim, self.deterministic = latent_dim, deterministic
        self.mlp = Mlp(in_dim, hidden, latent_dim if deterministic else 2 * latent_dim, n_layers)

    def forward(self, context):
        """context (T, N, in) -> per-transition mu (T, N, L), sigma^2 (T, N, L) (None if deterministic)."""
        out = self.mlp(context)  # fp32 under --bf16 too (Mlp's last layer): the posterior and KL need it
        if self.deterministic:
            return out, None
        return out[..., : self.latent_dim], F.softplus(out[..., self.latent_dim:])


class TanhGaussianPolicy(nn.Module):
    """pi(a|s, z): mean and log sigma heads (U(+-1e-3) init), log sigma clamped to [-20, 2], a = tanh(u)."""

    def __init__(self, in_dim, hidden, act_dim, n_layers=3):
        super().__init__()
        self.mlp = Mlp(in_dim, hidden, 2 * act_dim, n_layers, init_w=1e-3)  # both heads in one linear layer

    def forward(self, x):
        mean, log_std = self.mlp(x).chunk(2, dim=-1)
        return mean, log_std.clamp(-20.0, 2.0)

    def sample(self, x, generator=None):
        """Reparameterised a = tanh(mean + sigma * eps) and log pi(a|x) with the tanh correction."""
        mean, log_std = self(x)
        eps = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype, generator=generator)
        u = mean + log_std.exp() * eps
        a = torch.tanh(u)
        # log N(u; mean, sigma) = -eps^2/2 - log sigma - log(2 pi)/2; rlkit's epsilon 1e-6 in the tanh term
        log_pi = (-0.5 * eps.pow(2) - log_std - 0.5 * math.log(2 * math.pi) - torch.log(1 - a.pow(2) + 1e-6))
        return a, log_pi.sum(-1, keepdim=True), mean, log_std

    def act_deterministic(self, x):
        return torch.tanh(self(x)[0])


# ---------------------------------------------------------------------------------------------
# Posterior and losses
# ---------------------------------------------------------------------------------------------


def product_of_gaussians(mu, var, mask=None):
    """q(z|c) ∝ Π_n N(mu_n, var_n) (paper Sec. 4.1; oyster ``_product_of_gaussians``).
    mu, var: (T, N, L); mask (T, N) of 0/1 marks valid transitions. Returns mu, var of shape (T, L)."""
    precision = 1.0 / var.clamp(min=1e-7)
    if mask is not None:
        precision = precision * mask[..., None]
    post_var = 1.0 / precision.sum(dim=1)
    post_mu = post_var * (mu * precision).sum(dim=1)
    return post_mu, post_var


def infer_posterior(encoder, context, mask=None):
    """Context (T, N, in) -> posterior mu, var (T, L); deterministic z: the masked mean and var = None."""
    mu_n, var_n = encoder(context)
    if var_n is None:
        if mask is None:
            return mu_n.mean(dim=1), None
        return (mu_n * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1), None
    return product_of_gaussians(mu_n, var_n, mask)


def sample_z(mu, var, generator=None):
    """Reparameterised z = mu + sigma * eps (z = mu when deterministic)."""
    if var is None:
        return mu
    eps = torch.randn(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
    return mu + var.sqrt() * eps


def kl_to_prior(mu, var):
    """Σ_tasks Σ_dims KL(N(mu, var) || N(0, 1)) -- a SUM, as oyster's ``compute_kl_div`` (the information bottleneck, paper Sec. 4.1)."""
    return 0.5 * (var + mu.pow(2) - 1.0 - torch.log(var)).sum()


def q_loss(q_pred, y):
    """L_Q = mean (Q1 - y)^2 + mean (Q2 - y)^2 (critic loss, paper Sec. 4.3). q_pred (2, ..., 1), y (..., 1)."""
    return (q_pred - y).pow(2).flatten(1).mean(dim=1).sum()


def v_loss(v_pred, min_q_new, log_pi):
    """L_V = mean (V(s, zbar) - [min Q(s, a~, zbar) - log pi(a~|s, zbar)]_sg)^2 (SAC V-function loss, oyster ``vf_loss``)."""
    return F.mse_loss(v_pred, (min_q_new - log_pi).detach())


def policy_loss(log_pi, min_q_new, mean, log_std, mean_reg, std_reg):
    """L_pi = mean (log pi - min Q) + rlkit's regularisers on the pre-tanh Gaussian (actor loss, paper Sec. 4.3)."""
    return (log_pi - min_q_new).mean() + mean_reg * mean.pow(2).mean() + std_reg * log_std.pow(2).mean()


# ---------------------------------------------------------------------------------------------
# Data: per-task tensors (tasks, rows, dim) + counts, for the offline dataset and the online buffers
# ---------------------------------------------------------------------------------------------


def sample_rows(data: dict, counts, task_rows, n: int, generator=None) -> dict:
    """n transitions uniformly (with replacement) from each listed task's rows: (len(task_rows), n, dim)."""
    u = torch.rand(len(task_rows), n, device=counts.device, generator=generator)
    idx = (u * counts[task_rows][:, None]).long()
    return {k: v[task_rows[:, None], idx] for k, v in data.items()}


def context_tensor(batch: dict, reward_key: str, use_next_obs: bool):
    """(s, a, r[, s']) per transition, as oyster concatenates its context (rewards unscaled)."""
    parts = [batch["obs"], batch["actions"], batch[reward_key][..., None]]
    if use_next_obs:
        parts.append(batch["next_obs"])
    return torch.cat(parts, dim=-1)


def tail_dataset(ds, k: int):
    """The dataset restricted to each task's last k transitions (the encoder-buffer-like context pool)."""
    keep = np.zeros(ds.num_transitions, bool)
    for t in range(len(ds.tasks)):
        sl = ds.task_slice(t)
        keep[max(sl.start, sl.stop - k): sl.stop] = True
    arrays = {key: v[keep] for key, v in ds.arrays.items()}
    ptr = np.concatenate([[0], np.cumsum(np.bincount(arrays["task_id"], minlength=len(ds.tasks)))]).astype(np.int64)
    return dataclasses.replace(ds, arrays=arrays, task_ptr=ptr)


class RelabelPool:
    """--context-relabel: a context for train task i is drawn from the data of a *random* train task j (j = i by
    chance only), with the rewards recomputed for task i. Its states then look like some task's behaviour data
    -- like a test-time trajectory explored with a z for the wrong task -- and only its rewards identify i.
    Kept per source task: M transitions (s, a, s') and their rewards under every train task, R (n_i, n_j, M)."""

    def __init__(self, ds, family, size: int, device, seed: int, mode: str = "task"):
        self.mode = mode
        rng = np.random.RandomState(seed)
        m = max(1, min(size // len(family.train_idx), min(ds.task_slice(t).stop - ds.task_slice(t).start
                                                          for t in family.train_idx)))
        rows = np.stack([rng.choice(np.arange(ds.task_slice(t).start, ds.task_slice(t).stop), m, replace=False)
                         for t in family.train_idx])  # (n_j, M)
        obs, act, nobs = (ds.arrays[k][rows] for k in ("obs", "actions", "next_obs"))
        rewards, dense = relabel_rewards(family, family.train_idx[:, None, None], obs[None], act[None], nobs[None])
        self.data = {k: torch.as_tensor(v, device=device) for k, v in (("obs", obs), ("actions", act), ("next_obs", nobs))}
        # the point robots never terminate (time limit only), so relabelled rows carry terminal 0
        self.data["terminals"] = torch.zeros(obs.shape[:2], device=device)
        self.rewards = torch.as_tensor(rewards, device=device)  # (n_i, n_j, M): the "rewards" column (sparse if sparse)
        self.rewards_dense = None if dense is None else torch.as_tensor(dense, device=device)

    def sample(self, task_rows, n: int, generator=None, mode: str | None = None) -> dict:
        n_j, m = self.rewards.shape[1:]
        dev = self.rewards.device
        mode = mode or self.mode
        src = torch.randint(n_j, (len(task_rows), 1), device=dev, generator=generator)
        if mode != "task":  # pool: each transition from a random train task; mix: a share p ~ U(0, 1) of
            # the context from the one source task, the rest from random ones (concentrated to spread states)
            p = torch.rand(len(task_rows), 1, device=dev, generator=generator) if mode == "mix" else 0.0
            other = torch.randint(n_j, (len(task_rows), n), device=dev, generator=generator)
            src = torch.where(torch.rand(len(task_rows), n, device=dev, generator=generator) < p, src, other)
        idx = torch.randint(m, (len(task_rows), n), device=dev, generator=generator)
        out = {k: v[src, idx] for k, v in self.data.items()} | {"rewards": self.rewards[task_rows[:, None], src, idx]}
        if self.rewards_dense is not None:
            out["rewards_dense"] = self.rewards_dense[task_rows[:, None], src, idx]
        return out


def overlay(pick, new: dict, old: dict) -> dict:
    """Rows of ``new`` where pick (T, N or 1, 1) is set, else those of ``old``; keys of ``new`` only."""
    return {k: torch.where(pick if v.dim() == 3 else pick[..., 0], v, old[k]) for k, v in new.items()}


class TaskBuffers:
    """Online per-task buffers with the same (tasks, rows, dim) + counts layout as TaskBatchSampler; grows by
    doubling; ``clear`` empties a task's buffer (oyster's encoder buffer is cleared per collection)."""

    def __init__(self, n_tasks, dims: dict, device, capacity=1024):
        self.data = {k: torch.zeros(n_tasks, capacity, *d, device=device) for k, d in dims.items()}
        self.counts = torch.zeros(n_tasks, dtype=torch.int64, device=device)
        self.capacity = capacity

    def clear(self, task_rows):
        self.counts[task_rows] = 0

    def add(self, task_row: int, fields: dict):
        n = len(next(iter(fields.values())))
        c = int(self.counts[task_row])
        while c + n > self.capacity:
            self.data = {k: torch.cat([v, torch.zeros_like(v)], dim=1) for k, v in self.data.items()}
            self.capacity *= 2
        for k, v in fields.items():
            self.data[k][task_row, c:c + n] = v
        self.counts[task_row] = c + n

    def state_dict(self):
        return {"data": self.data, "counts": self.counts, "capacity": self.capacity}

    def load_state_dict(self, s):
        self.data, self.counts, self.capacity = s["data"], s["counts"], s["capacity"]


# ---------------------------------------------------------------------------------------------
# One PEARL gradient step (oyster PEARLSoftActorCritic._take_step), all tasks of the meta-batch at once
# ---------------------------------------------------------------------------------------------


def pearl_update(nets, opts, batch, context, args, rl_reward_key, generator=None):
    """batch: dict of (T, B, .) tensors; context: (T, N, C). Three optimiser steps: encoder+Q, V, policy."""
    encoder, qf, vf, target_vf, policy = (nets[k] for k in ("encoder", "qf", "vf", "target_vf", "policy"))
    obs, act, nobs = batch["obs"], batch["actions"], batch["next_obs"]
    rew, done = batch[rl_reward_key][..., None], batch["terminals"][..., None]
    T, B = obs.shape[:2]
    autocast = torch.autocast(obs.device.type, dtype=torch.bfloat16, enabled=args.bf16)

    # ALGO LOGIC: encoder + Q step (the encoder sees only L_Q and the KL)
    with autocast:
        mu, var = infer_posterior(encoder, context)
    z = sample_z(mu, var, generator)  # (T, L)
    z_b = z[:, None].expand(T, B, z.shape[-1])
    with autocast:
        q_pred = qf(torch.cat([obs, act, z_b], -1))  # (2, T, B, 1), fp32 even under --bf16
        with torch.no_grad():
            v_next = target_vf(torch.cat([nobs, z_b], -1))
    y = args.reward_scale * rew + (1.0 - done) * args.gamma * v_next
    loss_q = q_loss(q_pred, y)
    kl = kl_to_prior(mu, var) if var is not None else torch.zeros((), device=obs.device)
    opts["encoder"].zero_grad(set_to_none=True)
    opts["qf"].zero_grad(set_to_none=True)
    (loss_q + args.kl_lambda * kl).backward()
    opts["qf"].step()
    opts["encoder"].step()

    # ALGO LOGIC: V and policy steps on zbar = stop_gradient(z), min-Q from the just-updated critics
    s_z = torch.cat([obs, z_b.detach()], -1)
    with autocast:
        a_new, log_pi, mean, log_std = policy.sample(s_z, generator)
        min_q = qf(torch.cat([obs, a_new, z_b.detach()], -1), frozen=True).min(dim=0).values
        v_pred = vf(s_z)
    loss_v = v_loss(v_pred, min_q, log_pi)
    loss_pi = policy_loss(log_pi, min_q, mean, log_std, args.policy_mean_reg, args.policy_std_reg)
    opts["vf"].zero_grad(set_to_none=True)
    opts["policy"].zero_grad(set_to_none=True)
    (loss_v + loss_pi).backward()  # disjoint parameters: same gradients as two backward calls
    opts["vf"].step()
    with torch.no_grad():
        for p, tp in zip(vf.parameters(), target_vf.parameters()):
            tp.lerp_(p, args.tau)
    opts["policy"].step()

    return {"loss/q": loss_q.detach(), "loss/v": loss_v.detach(), "loss/policy": loss_pi.detach(),
            "loss/kl": kl.detach(), "q/mean": q_pred.detach().mean(), "q/target_mean": y.mean(),
            "v/mean": v_pred.detach().mean(), "policy/log_pi": log_pi.detach().mean(),
            "z/posterior_var": var.detach().mean() if var is not None else torch.zeros(()),
            "z/mu_abs": mu.detach().abs().mean()}


def make_nets(obs_dim, act_dim, args, device):
    ctx_dim = obs_dim + act_dim + 1 + (obs_dim if args.use_next_obs_in_context else 0)
    L = args.latent_dim
    vf = Mlp(obs_dim + L, args.net_size, 1)
    target_vf = Mlp(obs_dim + L, args.net_size, 1)
    target_vf.load_state_dict(vf.state_dict())
    nets = {"encoder": ContextEncoder(ctx_dim, args.encoder_size, L, args.encoder_layers, args.deterministic_z),
            "qf": TwinQ(obs_dim + act_dim + L, args.net_size), "vf": vf, "target_vf": target_vf,
            "policy": TanhGaussianPolicy(obs_dim + L, args.net_size, act_dim)}
    for n in nets.values():
        n.to(device)
    for p in nets["target_vf"].parameters():
        p.requires_grad_(False)
    opts = {k: torch.optim.Adam(nets[k].parameters(), lr=args.lr) for k in ("encoder", "qf", "vf", "policy")}
    return nets, opts


# ---------------------------------------------------------------------------------------------
# Rollouts and evaluation (batched over all tasks with common.evaluation.run_episodes)
# ---------------------------------------------------------------------------------------------


def policy_act(policy, obs_np, z, deterministic=True, generator=None):
    obs = torch.as_tensor(obs_np, dtype=torch.float32, device=z.device)
    with torch.no_grad():
        x = torch.cat([obs, z], -1)
        a = policy.act_deterministic(x) if deterministic else policy.sample(x, generator)[0]
    return a.cpu().numpy()


def transition_features(obs, act, rew, nobs, use_next_obs, device):
    """numpy step arrays -> (B, C) context features (s, a, r[, s'])."""
    parts = [obs, act, np.asarray(rew, np.float32)[:, None]] + ([nobs] if use_next_obs else [])
    return torch.as_tensor(np.concatenate(parts, -1), dtype=torch.float32, device=device)


def eval_mode_a(nets, ds, family, task_ids, args, device, seed):
    """Protocol A: z from the posterior of an offline context (context_size transitions of the task's data),
    one deterministic episode per context draw. Returns per-task returns, successes, and the z = mu return."""
    n = args.eval_context_draws
    ctxs = []
    for j in range(n):
        c = sample_context(ds, task_ids, kind="transitions", n=args.context_size, seed=seed + j)
        batch = {k: torch.as_tensor(c[k], dtype=torch.float32, device=device) for k in ("obs", "actions", "rewards", "next_obs")}
        ctxs.append(context_tensor(batch, "rewards", args.use_next_obs_in_context))
    context = torch.stack(ctxs, 1).flatten(0, 1)  # (tasks * draws, N, C), task-major like the vector env
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        mu, var = infer_posterior(nets["encoder"], context)
        z = sample_z(mu, var, gen)
    out = []
    for zz in (z, mu):
        venv = family.make_vec_env(task_ids, n, seed=seed)
        ret, succ = run_episodes(venv, lambda o, ep, t: policy_act(nets["policy"], o, zz), 1)
        out.append((per_task_mean(ret[:, 0], n), per_task_mean(succ[:, 0].astype(float), n)))
    stats = {"z_var": float(var.mean()) if var is not None else 0.0}
    return out[0][0], out[0][1], out[1][0], stats


def eval_mode_b(nets, family, task_ids, args, device, seed):
    """Protocol B (paper, oyster ``collect_paths``): per run, the first num_exp_traj_eval episodes use a fresh
    z ~ prior; every transition joins the online context; afterwards z ~ q(z | all transitions so far), resampled
    after every episode. Deterministic actions. Returns per-task returns [tasks, episodes] (mean over runs)."""
    n, E = args.num_evals, args.eval_episodes
    venv = family.make_vec_env(task_ids, n, seed=seed)
    Bn, L = venv.num_envs, args.latent_dim
    gen = torch.Generator(device=device).manual_seed(seed)
    ctx, mask = [], []
    state = {"z": torch.zeros(Bn, L, device=device)}

    def on_episode_start(ep):
        if ep < args.num_exp_traj_eval or not ctx:
            state["z"] = torch.randn(Bn, L, device=device, generator=gen) if not args.deterministic_z else \
                torch.zeros(Bn, L, device=device)
        else:
            with torch.no_grad():
                mu, var = infer_posterior(nets["encoder"], torch.stack(ctx, 1), torch.stack(mask, 1))
                state["z"] = sample_z(mu, var, gen)

    def observe(obs, a, r, nobs, term, trunc, info, alive):
        ctx.append(transition_features(obs, a, r, nobs, args.use_next_obs_in_context, device))
        mask.append(torch.as_tensor(alive, dtype=torch.float32, device=device))

    ret, succ = run_episodes(venv, lambda o, ep, t: policy_act(nets["policy"], o, state["z"]), E,
                             observe=observe, on_episode_start=on_episode_start)
    return per_task_mean(ret, n), per_task_mean(succ.astype(float), n)


def evaluate(step, nets, ds, family, args, device, logger):
    """Modes A and B on the test tasks and the first n_train_eval_tasks train tasks; logs metrics.csv rows."""
    for n in nets.values():
        n.eval()
    seed = 10_000 * args.seed + step % 9973
    res = {}
    train_ids = family.train_idx[: args.n_train_eval_tasks]
    for split, ids in (("test", family.test_idx), ("train", train_ids)):
        ret_a, succ_a, ret_mu, stats = eval_mode_a(nets, ds, family, ids, args, device, seed)
        ret_b, succ_b = eval_mode_b(nets, family, ids, args, device, seed + 1)
        logger.log_eval(step, "A", split, ids, ret_a, succ_a > 0.5)
        logger.log_eval(step, "B", split, ids, ret_b, succ_b > 0.5)
        res[split] = {"A": ret_a, "A_zmean": ret_mu, "B": ret_b[:, -1], "B_all": ret_b.mean(0), "A_var": stats["z_var"]}
    logger.log_scalars(step, {"eval/A_test": res["test"]["A"].mean(), "eval/A_zmean_test": res["test"]["A_zmean"].mean(),
                              "eval/B_test": res["test"]["B"].mean(), "eval/A_train": res["train"]["A"].mean(),
                              "eval/B_train": res["train"]["B"].mean(), "eval/A_posterior_var": res["test"]["A_var"]})
    for n in nets.values():
        n.train()
    return res


# ---------------------------------------------------------------------------------------------
# Online collection (oyster ``collect_data``), the sampled tasks stepped in lockstep
# ---------------------------------------------------------------------------------------------


def collect(nets, family, rows, n_steps, posterior, rl_buf, enc_buf, to_enc, args, device, gen, np_rng, ctx_key):
    """Collect >= n_steps per task (whole trajectories) for train-task rows ``rows`` with the stochastic policy.
    z starts from the prior (clear_z); after every trajectory z is resampled: from the prior, or (``posterior``)
    from q(z|c) with c drawn from the task's encoder buffer."""
    if n_steps <= 0:
        return
    task_ids = family.train_idx[rows]
    rows_t = torch.as_tensor(rows, device=device)
    venv = family.make_vec_env(task_ids, 1, seed=int(np_rng.randint(2**31)))
    K, L = len(rows), args.latent_dim
    def prior():  # oyster clear_z + sample_z: N(0, I), or z = 0 for the deterministic ablation
        return torch.zeros(K, L, device=device) if args.deterministic_z else torch.randn(K, L, device=device, generator=gen)

    z = prior()
    for _ in range(math.ceil(n_steps / family.horizon)):
        obs = venv.reset()
        alive = np.ones(K, bool)
        steps = []
        for _t in range(family.horizon):
            a = policy_act(nets["policy"], obs, z, deterministic=False, generator=gen)
            nobs, r, term, trunc, info = venv.step(a)
            steps.append((obs, a, r, info.get("rewards_dense", r), nobs, term, alive.copy()))
            alive &= ~(term | trunc)
            obs = nobs
            if not alive.any():
                break
        for k in range(K):
            keep = [s for s in steps if s[6][k]]
            fields = {"obs": np.stack([s[0][k] for s in keep]), "actions": np.stack([s[1][k] for s in keep]),
                      "rewards": np.array([s[2][k] for s in keep]), "rewards_dense": np.array([s[3][k] for s in keep]),
                      "next_obs": np.stack([s[4][k] for s in keep]), "terminals": np.array([s[5][k] for s in keep])}
            fields = {f: torch.as_tensor(np.asarray(v), dtype=torch.float32, device=device) for f, v in fields.items()}
            rl_buf.add(int(rows[k]), fields)
            if to_enc:
                enc_buf.add(int(rows[k]), fields)
        if posterior:
            c = sample_rows(enc_buf.data, enc_buf.counts, rows_t, args.context_size, gen)
            with torch.no_grad():
                mu, var = infer_posterior(nets["encoder"], context_tensor(c, ctx_key, args.use_next_obs_in_context))
            z = sample_z(mu, var, gen)
        else:
            z = prior()


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def variant_name(args: Args) -> str:
    """The method label of summary.json: pearl, plus the variant flags that change what is learned."""
    return "pearl" + "".join(tag for on, tag in ((args.online, "-online"), (args.context_relabel > 0, "-relabel"),
                                                 (args.rl_relabel > 0, "-rlrelabel"),
                                                 (args.deterministic_z, "-detz")) if on)


def main(args: Args):
    args = resolve_args(args)
    family = make_family(args.env_id, args.preset)
    if family.discrete:
        raise SystemExit(f"pearl.py supports continuous actions only; {args.env_id} is discrete")
    run_dir = make_run_dir(args.env_id, "pearl", args.seed, args.run_dir)
    check_fresh_run_dir(run_dir, args.resume)
    seed_everything(args.seed)
    device = pick_device(args.cuda)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    np_rng = np.random.RandomState(args.seed)

    # Test tasks' data are used only as evaluation context (mode A); training reads the train tasks only.
    ds = ensure_dataset(args.env_id, args.preset, path=args.dataset, family=family)
    sparse = "rewards_dense" in ds.arrays
    rl_key = "rewards_dense" if sparse else "rewards"  # pitfall 11: dense reward for RL, sparse for context
    keys = ("obs", "actions", "rewards", "next_obs", "terminals") + (("rewards_dense",) if sparse else ())
    train_rows = torch.arange(len(family.train_idx), device=device)
    if args.online:
        dims = {"obs": (family.obs_dim,), "actions": (family.act_dim,), "rewards": (), "rewards_dense": (),
                "next_obs": (family.obs_dim,), "terminals": ()}
        rl_src = TaskBuffers(len(train_rows), dims, device)
        ctx_src = TaskBuffers(len(train_rows), dims, device)
        rl_key = "rewards_dense"  # equals "rewards" on dense families
    else:
        rl_src = TaskBatchSampler(ds, family.train_idx, device, keys=keys)
        ctx_ds = tail_dataset(ds, args.context_tail) if args.context_pool == "tail" else ds
        ctx_src = rl_src if args.context_pool == "all" else TaskBatchSampler(ctx_ds, family.train_idx, device, keys=keys)
    relabel_src = None
    if args.context_relabel > 0 or args.rl_relabel > 0:
        if args.online:
            raise SystemExit("--context-relabel and --rl-relabel are offline options; online PEARL collects its own data")
        if args.rl_relabel > 0 and bool(ds.arrays["terminals"].any()):
            raise SystemExit(f"--rl-relabel needs a family without terminal states; {args.env_id} data has terminals, "
                             f"which depend on the task and cannot be relabelled")
        relabel_src = RelabelPool(ds, family, args.relabel_pool_size, device, seed=args.seed, mode=args.relabel_mode)

    nets, opts = make_nets(family.obs_dim, family.act_dim, args, device)
    step, train_time, wall_before, history = 0, 0.0, 0.0, []
    ckpt_path = Path(run_dir) / "checkpoint.pt"
    meta = {"method": "pearl", "env_id": args.env_id, "preset": args.preset, "seed": args.seed,
            "online": args.online, "obs_dim": family.obs_dim, "act_dim": family.act_dim, "net_size": args.net_size,
            "encoder_size": args.encoder_size, "deterministic_z": args.deterministic_z}
    if args.resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, expect=meta, map_location=device)
        for k, n in nets.items():
            n.load_state_dict(state["nets"][k])
        for k, o in opts.items():
            o.load_state_dict(state["opts"][k])
        step, train_time, history = state["step"], state["train_time"], state["history"]
        wall_before = state["wall_time"]
        gen.set_state(state["gen"])
        np_rng.set_state(state["np_rng"])
        torch.set_rng_state(state["torch_rng"])
        if args.online:
            rl_src.load_state_dict(state["rl_buf"])
            ctx_src.load_state_dict(state["enc_buf"])
        print(f"resumed {ckpt_path} at step {step}", flush=True)
    logger = Logger(run_dir, {**vars(args), "run_dir": str(run_dir)})
    print(f"PEARL {'online' if args.online else 'offline'} on {args.env_id}/{args.preset}: "
          f"{len(family.train_idx)} train / {len(family.test_idx)} test tasks, rs={args.reward_scale}, "
          f"beta={args.kl_lambda}, gamma={args.gamma}, meta_batch={args.meta_batch}, context={args.context_size}, "
          f"net={args.net_size}, encoder={args.encoder_size}x{args.encoder_layers}, steps={args.total_steps}", flush=True)

    def checkpoint():
        state = {"meta": meta, "args": vars(args), "step": step, "train_time": train_time, "history": history,
                 "wall_time": wall_before + time.time() - t_start,
                 "nets": {k: n.state_dict() for k, n in nets.items()}, "opts": {k: o.state_dict() for k, o in opts.items()},
                 "gen": gen.get_state(), "np_rng": np_rng.get_state(), "torch_rng": torch.get_rng_state()}
        if args.online:
            state |= {"rl_buf": rl_src.state_dict(), "enc_buf": ctx_src.state_dict()}
        save_checkpoint(ckpt_path, state)

    def do_eval():
        res = evaluate(step, nets, ds, family, args, device, logger)
        history.append({"step": step, "A": float(res["test"]["A"].mean()), "B": float(res["test"]["B"].mean())})
        return res

    t_start = time.time()
    start_step = step
    res = do_eval() if step == 0 else None
    if args.online and step == 0:  # num_initial_steps of prior-z data for every train task (both buffers)
        collect(nets, family, np.arange(len(train_rows)), args.num_initial_steps, False, rl_src, ctx_src, True,
                args, device, gen, np_rng, "rewards")
    last = {}
    while step < args.total_steps:
        if args.online and step % args.train_steps_per_itr == 0:
            # ALGO LOGIC: oyster train(): clear the encoder buffer, then prior / posterior / extra collection
            rows = np.sort(np_rng.choice(len(train_rows), args.num_tasks_sample, replace=False))
            ctx_src.clear(torch.as_tensor(rows, device=device))
            for n_steps, post, to_enc in ((args.num_steps_prior, False, True), (args.num_steps_posterior, True, True),
                                          (args.num_extra_rl_steps_posterior, True, False)):
                collect(nets, family, rows, n_steps, post, rl_src, ctx_src, to_enc, args, device, gen, np_rng, "rewards")
        t0 = time.time()
        n_block = min(args.eval_every - step % args.eval_every, args.total_steps - step,
                      args.train_steps_per_itr - step % args.train_steps_per_itr if args.online else 1 << 30)
        for _ in range(n_block):
            # ALGO LOGIC: meta-batch with replacement; RL batch and context drawn independently (decorrelated)
            tasks = train_rows[torch.randint(len(train_rows), (args.meta_batch,), device=device, generator=gen)]
            batch = sample_rows(rl_src.data, rl_src.counts, tasks, args.batch_size, gen)
            cbatch = sample_rows(ctx_src.data, ctx_src.counts, tasks, args.context_size, gen)
            if args.rl_relabel > 0:  # deviation: part of each task's RL rows come from other tasks' states
                rel = relabel_src.sample(tasks, args.batch_size, gen, mode="pool")
                pick = torch.rand(len(tasks), args.batch_size, 1, device=device, generator=gen) < args.rl_relabel
                batch = overlay(pick, rel, batch)
            if args.context_relabel > 0:  # deviation: some contexts carry the task in their rewards only
                rel = relabel_src.sample(tasks, args.context_size, gen)
                pick = torch.rand(len(tasks), 1, 1, device=device, generator=gen) < args.context_relabel
                cbatch = overlay(pick, rel, cbatch)
            context = context_tensor(cbatch, "rewards", args.use_next_obs_in_context)
            stats = pearl_update(nets, opts, batch, context, args, rl_key, gen)
            step += 1
            if step % args.log_every == 0:
                last = {k: float(v) for k, v in stats.items()}
                logger.log_scalars(step, last | {"perf/updates_per_s": step / max(train_time + time.time() - t0, 1e-9)})
            if step % args.print_every == 0:
                extra = {"kl": last.get("loss/kl", float("nan")), "z_var": last.get("z/posterior_var", float("nan")),
                         "Q": last.get("q/mean", float("nan"))}
                if history:
                    extra |= {"test_A": history[-1]["A"], "test_B": history[-1]["B"]}
                print_progress(step, args.total_steps, t_start, extra, start_step)
        train_time += time.time() - t0
        if step % args.eval_every == 0 or step == args.total_steps:
            res = do_eval()
            print(f"eval step {step}: test A {res['test']['A'].mean():.3f} (z=mu {res['test']['A_zmean'].mean():.3f}) | "
                  f"test B last {res['test']['B'].mean():.3f} per-episode {np.round(res['test']['B_all'], 2).tolist()} | "
                  f"train A {res['train']['A'].mean():.3f} B {res['train']['B'].mean():.3f}", flush=True)
            checkpoint()

    if res is None:  # resumed a finished run: evaluate once more for the summary
        res = do_eval()
    ups = step / max(train_time, 1e-9)  # train_time accumulates over resumes
    write_summary(run_dir, method=variant_name(args), env_id=args.env_id, preset=args.preset, seed=args.seed,
                  total_steps=step, wall_time_s=wall_before + time.time() - t_start, updates_per_s=ups, machine=machine_info(device),
                  dataset=str(ds.path),
                  eval={"A": {"test": float(res["test"]["A"].mean()), "train": float(res["train"]["A"].mean()),
                              "test_per_task": res["test"]["A"].tolist()},
                        "B": {"test": float(res["test"]["B"].mean()), "train": float(res["train"]["B"].mean()),
                              "test_per_task": res["test"]["B"].tolist()}},
                  extra={"online": args.online, "final_kl": last.get("loss/kl"), "final_posterior_var": last.get("z/posterior_var"),
                         "final_q_mean": last.get("q/mean"), "A_zmean_test": float(res["test"]["A_zmean"].mean()),
                         "B_per_episode_test": res["test"]["B_all"].tolist(), "train_time_s": train_time,
                         "settings": {k: getattr(args, k) for k in ("reward_scale", "kl_lambda", "gamma", "meta_batch",
                                                                     "context_size", "net_size", "encoder_size",
                                                                     "batch_size", "bf16", "context_pool", "context_relabel",
                                                                     "rl_relabel")}})
    logger.close()
    print(f"done: {step} steps, {ups:.2f} updates/s, summary in {run_dir}/summary.json", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
