"""SMAC: offline meta-RL (PEARL-style encoder + AWAC) followed by self-supervised online meta-training.

Paper: Vitchyr H. Pong, Ashvin Nair, Laura Smith, Catherine Huang, Sergey Levine, "Offline Meta-Reinforcement
Learning with Online Self-Supervision", ICML 2022, arXiv:2107.03974. Official code: rail-berkeley/rlkit
(``rlkit/torch/smac``).

Method. A permutation-invariant context encoder q_phi_e(z|h) (product of per-transition Gaussians, as PEARL)
is trained *only* through a reward decoder r_phi_d(s, a, z) and a KL to the prior N(0, I). An AWAC actor-critic
(twin Q, tanh-Gaussian policy) is conditioned on the detached z. Phase 1 trains everything on the reward-
labelled offline data of the training tasks. Offline meta-RL then suffers a *z-shift*: at test time the
context comes from the agent's own exploration, not from the offline data, and the posterior lands where the
policy was never trained. Phase 2 fixes it without rewards: the agent explores the training tasks (z from the
prior, resampled every step, then posterior episodes), labels the new transitions with the frozen reward
decoder (z inferred from the task's *offline* context) and keeps training the actor-critic on the mixture.

Equations (tasks i of the meta-batch, RL batch b_i, an independent context h_i, both from task i):
    q(z|h) ∝ Π_n N(mu_n, sigma_n^2),  sigma_n^2 = softplus(.) >= 1e-7        (product of Gaussians)
    z_i = mu_i + sigma_i * eps;   zbar = stop_gradient(z)
    L_rew = mean_b (r - r_phi_d(s, a, z_i))^2 + lambda_KL * mean_i Σ_d KL(q(z|h_i) || N(0, I))   -> encoder, decoder
    y     = rs * r + gamma (1 - d) min_k Qbar_k(s', a', zbar),  a' ~ pi(.|s', zbar)            (alpha = 0)
    L_Q   = Σ_k mean (Q_k(s, a, zbar) - y)^2
    A     = min_k Q_k(s, a, zbar) - min_k Q_k(s, a~, zbar),  a~ ~ pi(.|s, zbar)          (V from one sample)
    w     = N * softmax over the whole meta-batch (A / beta)                               (N = tasks x batch)
    L_pi  = -mean (w * log pi(a|s, zbar))            [+ Phase 2: -mean min_k Q_k(s, a~_reparam, zbar)]
Phase 2 labels: r^ = r_phi_d(s, a, z_r),  z_r ~ q(z | h_off), h_off = 256 transitions of the task's offline
context data (a frozen copy), one z_r per trajectory; the encoder and decoder are frozen.
Meta-test (the paper's protocol, mode B): 2 episodes with z ~ p(z) resampled every step, their transitions
(true rewards) form the context, then episode 3 with z ~ q(z | those transitions), resampled every step.

Deviations:
- gymnasium 1.x task families of ``common/envs.py``; datasets are the project's per-task SAC replay buffers
  (the paper's are PEARL learning histories, not released). By default all of a task's data is its RL data
  and its context data (the Ant-Dir setting ``use_rl_buffer_for_enc_buffer``); ``--data-tail N`` keeps each
  task's last N transitions (Ant-Dir: 1200), ``--context-buffer separate`` the Cheetah routing.
- No official config exists for the point robot: ``ENV_OVERRIDES`` scales the Phase-2 collection to its
  horizon (2 prior-z episodes and 3 posterior episodes per task and iteration, as 400/600 steps are 2/3
  episodes of 200 steps), and its KL weight is 0.001 instead of 0.1: with 0.1 (and 0.01) the posterior collapses
  to the prior within 1k steps (KL < 0.01 nats; mode A at the task-agnostic level, -15.6) because on the
  project's point-robot data the decoder predicts r(s, a) from the state alone almost everywhere (each task's
  rows follow its own path; only near the start do tasks overlap, where r = -|s' - g| barely depends on g), so
  the reward-MSE gain from z is far below 0.1 x its KL. Everything else is the official default.
- ``--relabel-offline all`` (off by default) is the official launcher's unused ``relabel_offline_dataset``: task
  i's buffer holds every train task's offline rows with task i's rewards (sampled lazily from one reward table
  instead of copying the rows T times); ``--relabel-offline context`` relabels the context buffer only (RL rows
  stay the task's own). Why they exist: each task's rows of the project's datasets are its own learner's
  trajectories to its own goal, so the encoder reads the task from where the rows lie, and its posterior from
  the agent's own exploration episodes stays near the prior (the z-shift that Phase 2, with the encoder frozen,
  cannot repair). With ``all`` most rows carry another task's actions, so AWR needs a small beta (1 works, 100
  imitates them all). Numpy families only (their reward is a function of (s, a, s')); in MuJoCo families the
  observation hides the task (no x/y position), the paper's setting. ``--relabel-context-source task`` (off
  by default) draws each relabelled context from one random train task's rows instead of the whole pool, so a
  training context looks like one exploration trajectory scored with this task's rewards (what Phase 2 and the
  online protocol feed the encoder).
- ``--decoder-batch relabelled`` (not official, off by default): RL batches and contexts stay as they are, but
  the reward decoder reconstructs a second batch drawn from all train tasks' offline rows carrying this task's
  rewards. On the task's own rows the decoder can predict r from s alone, so z needs to say little; on the pooled
  rows it must say where the goal is, and the encoder (still free to read the states and rewards of its
  context) learns to. The actor-critic's batches are unchanged.
- The target action a' is drawn with the same zbar as the target Q (the official agent draws a second
  posterior sample for it; the spec calls this harmless).
- Vectorised: the meta-batch in one (T, B, .) tensor, Q1/Q2 as one 2-member batched network (one optimiser
  over the stacked weights equals two Adams), and all losses back-propagated in one call (disjoint parameters:
  the actor sees the Q weights detached; same gradients as rlkit's separate calls). Phase-2 rollouts step the
  sampled tasks in lockstep; each update draws its own 64-transition context instead of slicing a 256 one
  into 4 (statistically equivalent, spec §10).
- Phase 2 draws its 5 tasks per iteration without replacement. Evaluation: mode A (offline context of the test
  task, ``eval_context_draws`` draws, z resampled every step from the posterior; the paper's
  ``init_from_buffer`` diagnostic, here on test tasks too) beside mode B.
- ``--bf16``: optional autocast of the hidden layers (weights, optimisers, output layers, posterior and KL in
  fp32); off by default and not used in the measured runs.
- Not implemented: the recurrent encoder, debug flags, automatic beta, BRAC/BC terms, fake tasks, video.
  Discrete action spaces (GridNavi) are not supported.
"""

from __future__ import annotations

import copy
import dataclasses
import math
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
from common.runs import (Logger, check_fresh_run_dir, eval_entry, load_checkpoint, machine_info, make_run_dir, pick_device,
                         print_progress, save_checkpoint, seed_everything, write_summary)


@dataclass
class Args:
    env_id: str = "PointRobot"
    """task family (common/envs.py), e.g. PointRobot, HalfCheetahVel, AntDir"""
    preset: str | None = None
    """task preset of the family (default: the family's default preset)"""
    dataset: str | None = None
    """offline dataset path (default: datasets/{env}__{preset}__s0.npz, built if missing)"""
    seed: int = 1
    """random seed (same seed on CPU -> same curve)"""
    total_steps: int = 50_000
    """Phase 1: offline gradient steps (official num_batches)"""
    eval_every: int | None = None
    """Phase 1: gradient steps between evaluations/checkpoints (default: per-env table)"""
    online_iterations: int | None = None
    """Phase 2: self-supervised iterations (default: per-env table; 0 = offline only)"""
    online_eval_every: int = 1
    """Phase 2: iterations between evaluations/checkpoints"""
    cuda: bool = True
    """use cuda:0 when available"""
    resume: bool = False
    """continue the run in --run-dir from its checkpoint"""
    run_dir: str | None = None
    """run directory (default runs/{env}__smac__s{seed}__{time})"""
    bf16: bool = False
    """autocast the update's hidden layers to bfloat16 (weights, optimiser, outputs and posterior stay fp32)"""

    # networks (rlkit/torch/smac/base_config.py)
    latent_dim: int = 5
    """dimension of z"""
    net_size: int = 300
    """width of the 3 hidden layers of Q1, Q2 and the policy"""
    encoder_size: int = 200
    """width of the context encoder's 3 hidden layers"""
    decoder_size: int = 64
    """width of the reward decoder's 2 hidden layers"""

    # losses
    lr: float = 3e-4
    """Adam learning rate of policy, Q and encoder+decoder"""
    tau: float = 0.005
    """Polyak rate of the target Qs (every step)"""
    gamma: float = 0.99
    """discount"""
    reward_scale: float = 5.0
    """rs: scales rewards in the critic target only (decoder targets and labels stay raw)"""
    kl_lambda: float | None = None
    """weight of the KL (mean over tasks, sum over latent dims); default: per-env table (official 0.1)"""
    beta: float = 100.0
    """AWR temperature: weights softmax(A / beta) over the whole meta-batch"""
    meta_batch: int = 4
    """tasks per gradient step, drawn with replacement"""
    batch_size: int = 128
    """Phase 1: RL batch per task"""
    online_batch_size: int = 256
    """Phase 2: RL batch per task"""
    context_size: int = 64
    """transitions per training context (and per mode-A evaluation context)"""
    label_context_size: int = 256
    """Phase 2: offline-context transitions behind the posterior that labels rewards (and posterior episodes)"""

    # data routing
    data_tail: int = 0
    """keep each train task's last N offline transitions (0 = all; official Ant-Dir 1200)"""
    relabel_offline: Literal["off", "all", "context"] = "off"
    """all: every train task's buffer holds all train tasks' offline rows with its own rewards (the official,
    unused ``relabel_offline_dataset``); context: only its context buffer does (RL batches stay its own rows);
    numpy families only"""
    decoder_batch: Literal["own", "relabelled"] = "own"
    """rows the reward decoder reconstructs in Phase 1: own = the RL batch (official); relabelled (not official) =
    a separate batch of all train tasks' offline rows carrying the task's rewards; numpy families only"""
    relabel_context_source: Literal["pool", "task"] = "pool"
    """--relabel-offline all/context: a context's relabelled rows come from all train tasks' rows (pool, the
    official buffer) or all from one random train task's rows (task: like one test-time exploration trajectory)"""
    context_buffer: Literal["shared", "separate"] | None = None
    """shared: one buffer per task for RL batches and contexts (Ant-Dir); separate: posterior-episode data go
    to the RL buffer only (Cheetah-Vel). Default: separate with --relabel-offline context, else shared"""

    # Phase 2 (None = per-env table)
    num_tasks_sample: int = 5
    """Phase 2: train tasks explored per iteration"""
    num_steps_prior: int | None = None
    """Phase 2: steps per task with z ~ prior resampled every step"""
    num_extra_rl_steps_posterior: int | None = None
    """Phase 2: steps per task, first episode z ~ prior, later episodes z ~ q(z | task's context buffer)"""
    online_updates: int = 16_000
    """Phase 2: gradient steps per iteration (official 4000 x 4 context slices)"""
    oracle_rewards: bool = False
    """Phase 2 ablation: label new transitions with the true reward instead of the decoder's"""

    # evaluation
    eval_context_draws: int = 3
    """mode A: offline context draws per task (one deterministic episode each)"""
    num_evals: int = 4
    """mode B: independent runs per task"""
    eval_episodes: int = 3
    """mode B: episodes per run, the last one is reported"""
    num_exp_traj_eval: int = 2
    """mode B: leading episodes with z ~ prior (resampled every step)"""
    n_train_eval_tasks: int = 10
    """train tasks evaluated (first n of the split), for comparison"""
    log_every: int = 100
    """gradient steps between train.csv scalars"""
    print_every: int = 500
    """gradient steps between progress lines"""


# Per-env settings (official: examples/smac/{cheetah,ant}.py; the point robot scaled to its horizon of 20).
ENV_OVERRIDES = {
    "PointRobot": dict(eval_every=1000, online_iterations=51, num_steps_prior=40, num_extra_rl_steps_posterior=60,
                       kl_lambda=0.001),
    "HalfCheetahVel": dict(eval_every=25_000, online_iterations=51, num_steps_prior=400, kl_lambda=0.1,
                           num_extra_rl_steps_posterior=600),
    "AntDir": dict(eval_every=1000, online_iterations=501, num_steps_prior=400, num_extra_rl_steps_posterior=600,
                   kl_lambda=0.1),
}
FALLBACK = dict(eval_every=5000, online_iterations=51, num_steps_prior=400, num_extra_rl_steps_posterior=600,
                kl_lambda=0.1)


def resolve_args(args: Args) -> Args:
    env = canonical_env_id(args.env_id)
    table = ENV_OVERRIDES.get(env, FALLBACK)
    filled = {k: v for k, v in table.items() if getattr(args, k) is None}
    if args.context_buffer is None:
        filled["context_buffer"] = "separate" if args.relabel_offline == "context" else "shared"
    elif args.relabel_offline == "context" and args.context_buffer == "shared":
        raise SystemExit("--relabel-offline context needs --context-buffer separate (RL and context rows differ)")
    if args.relabel_context_source == "task" and args.relabel_offline not in ("all", "context"):
        raise SystemExit("--relabel-context-source task needs --relabel-offline all or context")
    return dataclasses.replace(args, env_id=env, preset=args.preset or default_preset(env), **filled)


# ---------------------------------------------------------------------------------------------
# Networks (rlkit Mlp / ConcatMlp / TanhGaussianPolicy / MlpEncoder / MlpDecoder), any leading dims
# ---------------------------------------------------------------------------------------------


def rlkit_init_(weight, bias, hidden: bool, init_w: float = 3e-3):
    """rlkit init: hidden weights U(+-1/sqrt(size[0])) -- for an nn.Linear weight size[0] is the *output* width,
    the long-standing ``fanin_init`` quirk -- hidden biases 0; last layer U(+-init_w)."""
    with torch.no_grad():
        if hidden:
            bound = 1.0 / math.sqrt(weight.shape[0] if weight.dim() == 2 else weight.shape[-1])
            weight.uniform_(-bound, bound)
            bias.zero_()
        else:
            weight.uniform_(-init_w, init_w)
            bias.uniform_(-init_w, init_w)


def at_least_fp32(x):
    return x.to(torch.promote_types(x.dtype, torch.float32))


class Mlp(nn.Module):
    """ReLU MLP on (..., in_dim); the output layer runs in fp32 even under --bf16 autocast."""

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
            x = F.relu(fc(x), inplace=True)
        with torch.autocast(x.device.type, enabled=False):
            return self.last(at_least_fp32(x))


class TwinQ(nn.Module):
    """Q1 and Q2 as one 2-member batched MLP: weights (2, in, out), one ``baddbmm`` per layer for both."""

    def __init__(self, in_dim, hidden, n_layers=3, init_w=3e-3):
        super().__init__()
        dims = [in_dim] + [hidden] * n_layers + [1]
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(2, i, o)) for i, o in zip(dims[:-1], dims[1:]))
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(2, 1, o)) for o in dims[1:])
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            rlkit_init_(w, b, hidden=k < n_layers, init_w=init_w)

    def forward(self, x, frozen: bool = False):
        """x (..., in_dim) -> (2, ..., 1). ``frozen``: weights detached, gradients reach x only."""
        lead = x.shape[:-1]
        h = x.reshape(1, -1, x.shape[-1]).expand(2, -1, -1)
        n = len(self.weights)
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            if frozen:
                w, b = w.detach(), b.detach()
            if k < n - 1:
                h = F.relu(torch.baddbmm(b, h, w), inplace=True)
            else:
                with torch.autocast(h.device.type, enabled=False):
                    h = torch.baddbmm(b, at_least_fp32(h), w)
        return h.reshape(2, *lead, 1)


class ContextEncoder(nn.Module):
    """phi_e: one transition (s, a, r) -> a Gaussian factor (mu_n, sigma_n^2 = softplus(raw))."""

    def __init__(self, in_dim, hidden, latent_dim):
        super().__init__()
        self.latent_dim = latent_dim
        self.mlp = Mlp(in_dim, hidden, 2 * latent_dim, 3)

    def forward(self, context):
        out = self.mlp(context)
        return out[..., : self.latent_dim], F.softplus(out[..., self.latent_dim:])


LOG_2 = math.log(2.0)


def tanh_normal_log_prob(u, mean, log_std):
    """log pi(tanh(u)) = Σ_d [log N(u; mean, sigma) - 2 (log 2 - u - softplus(-2u))] (the stable tanh form)."""
    log_n = -0.5 * ((u - mean) / log_std.exp()).pow(2) - log_std - 0.5 * math.log(2 * math.pi)
    return (log_n - 2.0 * (LOG_2 - u - F.softplus(-2.0 * u))).sum(-1, keepdim=True)


class TanhGaussianPolicy(nn.Module):
    """pi(a|s, z): mean and log-sigma heads (U(+-1e-3) init), log sigma clamped to [-20, 2], a = tanh(u)."""

    def __init__(self, in_dim, hidden, act_dim):
        super().__init__()
        self.mlp = Mlp(in_dim, hidden, 2 * act_dim, 3, init_w=1e-3)

    def forward(self, x):
        mean, log_std = self.mlp(x).chunk(2, dim=-1)
        return mean, log_std.clamp(-20.0, 2.0)

    def sample(self, x, generator=None):
        """Reparameterised a = tanh(mean + sigma * eps) and log pi(a|x)."""
        mean, log_std = self(x)
        u = mean + log_std.exp() * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype, generator=generator)
        return torch.tanh(u), tanh_normal_log_prob(u, mean, log_std)

    def log_prob(self, x, actions):
        """log pi(a|x) of given actions (the AWR term), clamped to +-0.999999 before atanh as rlkit."""
        mean, log_std = self(x)
        u = torch.atanh(actions.clamp(-0.999999, 0.999999))
        return tanh_normal_log_prob(u, mean, log_std)

    def act_deterministic(self, x):
        return torch.tanh(self(x)[0])


def make_nets(obs_dim, act_dim, args, device):
    L = args.latent_dim
    qf, target_qf = TwinQ(obs_dim + act_dim + L, args.net_size), TwinQ(obs_dim + act_dim + L, args.net_size)
    target_qf.load_state_dict(qf.state_dict())
    nets = {"encoder": ContextEncoder(obs_dim + act_dim + 1, args.encoder_size, L),
            "decoder": Mlp(obs_dim + act_dim + L, args.decoder_size, 1, n_layers=2),
            "qf": qf, "target_qf": target_qf, "policy": TanhGaussianPolicy(obs_dim + L, args.net_size, act_dim)}
    for n in nets.values():
        n.to(device)
    for p in target_qf.parameters():
        p.requires_grad_(False)
    opts = {"context": torch.optim.Adam(list(nets["encoder"].parameters()) + list(nets["decoder"].parameters()),
                                        lr=args.lr),
            "qf": torch.optim.Adam(qf.parameters(), lr=args.lr),
            "policy": torch.optim.Adam(nets["policy"].parameters(), lr=args.lr)}
    return nets, opts


# ---------------------------------------------------------------------------------------------
# Posterior and losses
# ---------------------------------------------------------------------------------------------


def infer_posterior(encoder, context, mask=None):
    """q(z|h) ∝ Π_n N(mu_n, sigma_n^2): context (T, N, in) [, mask (T, N)] -> mu, var (T, L)."""
    mu_n, var_n = encoder(context)
    precision = 1.0 / var_n.clamp(min=1e-7)
    if mask is not None:
        precision = precision * mask[..., None]
    var = 1.0 / precision.sum(dim=1)
    return var * (mu_n * precision).sum(dim=1), var


def sample_z(mu, var, generator=None):
    return mu + var.sqrt() * torch.randn(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)


def kl_to_prior(mu, var):
    """mean over tasks of Σ_dims KL(N(mu, var) || N(0, 1)) -- SMAC's ``.mean(0).sum()`` (PEARL sums over tasks)."""
    return (0.5 * (var + mu.pow(2) - 1.0 - torch.log(var))).sum(-1).mean()


def reward_decoder_loss(r_pred, r, mu, var, kl_lambda):
    """L_rew = mean (r - r^)^2 + lambda * KL; returns (total, mse, kl)."""
    mse = F.mse_loss(r_pred, r)
    kl = kl_to_prior(mu, var)
    return mse + kl_lambda * kl, mse, kl


def critic_target(r, done, q_next_min, reward_scale, gamma):
    """y = rs * r + gamma (1 - d) min_k Qbar_k(s', a', zbar)."""
    return reward_scale * r + (1.0 - done) * gamma * q_next_min


def awr_weights(q_data_min, v, beta):
    """w = N * softmax(A / beta) over the whole flattened meta-batch (N entries), A = min Q(s, a) - V(s)."""
    adv = (q_data_min - v).flatten()
    return (adv.numel() * torch.softmax(adv / beta, dim=0)).reshape(q_data_min.shape)


# ---------------------------------------------------------------------------------------------
# Data: per-task tensors (tasks, rows, dim) + counts; Phase 2 appends to them
# ---------------------------------------------------------------------------------------------

KEYS = ("obs", "actions", "rewards", "next_obs", "terminals")


def context_tensor(batch: dict):
    """(s, a, r) per transition (use_next_obs_in_context=False; rewards unscaled)."""
    return torch.cat([batch["obs"], batch["actions"], batch["rewards"][..., None]], dim=-1)


class TaskData:
    """A buffer per train task: the task's offline rows -- or with ``relabel`` (the official, off-by-default
    ``relabel_offline_dataset``) every train task's offline rows carrying this task's rewards -- plus the rows
    that Phase 2 appends (the official replay buffers keep the offline data: capacity 1e6). ``sample`` draws
    uniformly from the whole buffer of each listed task; ``offline_only`` from its offline part (the frozen copy
    behind the Phase-2 reward labels). The offline tensors are shared, never written."""

    def __init__(self, offline: dict, counts, relabel=None):
        self.off, self.off_counts, self.relabel = offline, counts, relabel  # relabel: (n_i, n_j, rows) rewards
        self.start = torch.cumsum(counts, 0) - counts  # first union index of each source task
        n, dev = len(counts), counts.device
        self.new = {k: torch.zeros(n, 64, *v.shape[2:], device=dev) for k, v in offline.items()}
        self.new_counts = torch.zeros(n, dtype=torch.int64, device=dev)

    def offline_size(self, rows):
        return self.off_counts.sum().expand(len(rows)) if self.relabel is not None else self.off_counts[rows]

    def sample(self, rows, n: int, generator=None, offline_only: bool = False, one_source: bool = False) -> dict:
        """n transitions per listed task row: dict of (len(rows), n, ...) tensors. ``one_source`` (relabelled
        buffers): each row's offline transitions all come from one random train task's rows."""
        n_off = self.offline_size(rows)[:, None]
        total = n_off if offline_only else n_off + self.new_counts[rows][:, None]
        u = torch.rand(len(rows), n, device=n_off.device, generator=generator, dtype=torch.float64)
        idx = (u * total).long()  # float64: enough bits to index large buffers evenly
        r = rows[:, None].expand(-1, n)
        i_off = idx.minimum(n_off - 1)  # offline index (rows drawn from the appended part are replaced below)
        if self.relabel is None:
            src, m = r, i_off
        elif one_source:
            src = torch.randint(len(self.off_counts), (len(rows), 1), device=n_off.device,
                                generator=generator).expand(-1, n)
            u2 = torch.rand(len(rows), n, device=n_off.device, generator=generator, dtype=torch.float64)
            m = (u2 * self.off_counts[src]).long()
        else:  # union index -> (source task, row)
            src = torch.searchsorted(self.start, i_off, right=True) - 1
            m = i_off - self.start[src]
        out = {k: v[src, m] for k, v in self.off.items()}
        if self.relabel is not None:
            out["rewards"] = self.relabel[r, src, m]
        if not offline_only and int(self.new_counts[rows].max()) > 0:
            is_new = idx >= n_off
            j = (idx - n_off).clamp(min=0)
            for k, v in self.new.items():
                nv = v[r, j]
                out[k] = torch.where(is_new.reshape(*is_new.shape, *([1] * (nv.dim() - 2))), nv, out[k])
        return out

    def add(self, row: int, fields: dict):
        n, c = len(fields["obs"]), int(self.new_counts[row])
        while c + n > self.new["obs"].shape[1]:
            self.new = {k: torch.cat([v, torch.zeros_like(v)], dim=1) for k, v in self.new.items()}
        for k in self.new:
            self.new[k][row, c:c + n] = fields[k]
        self.new_counts[row] = c + n

    def state_dict(self):
        return {"new": self.new, "new_counts": self.new_counts}

    def load_state_dict(self, s):
        self.new, self.new_counts = s["new"], s["new_counts"]


def offline_data(ds, family, args, device):
    """The train tasks' offline rows as (tasks, rows, dim) tensors + counts (each task's last --data-tail rows
    when set) and, with --relabel-offline, the rewards of every row under every train task (n_i, n_j, rows)."""
    src = TaskBatchSampler(ds, family.train_idx, device, keys=KEYS)
    data, counts = src.data, src.counts
    if args.data_tail > 0:
        n = counts.clamp(max=args.data_tail)
        idx = torch.minimum((counts - n)[:, None] + torch.arange(int(n.max()), device=device)[None], counts[:, None] - 1)
        rows = torch.arange(len(n), device=device)[:, None]
        data, counts = {k: v[rows, idx] for k, v in data.items()}, n
    relabel = None
    if args.relabel_offline != "off" or args.decoder_batch == "relabelled":
        try:
            r, _ = relabel_rewards(family, family.train_idx[:, None, None], data["obs"].cpu().numpy()[None],
                                   data["actions"].cpu().numpy()[None], data["next_obs"].cpu().numpy()[None])
        except NotImplementedError as e:
            raise SystemExit(f"--relabel-offline / --decoder-batch relabelled: {e}") from None
        relabel = torch.as_tensor(r, dtype=torch.float32, device=device)
    return data, counts, relabel


# ---------------------------------------------------------------------------------------------
# One SMAC gradient step (SmacTrainer.train_from_torch), all tasks of the meta-batch at once
# ---------------------------------------------------------------------------------------------


def smac_update(nets, opts, batch, context, args, online: bool, generator=None, dec_batch=None):
    """batch: dict of (T, B, .) tensors; context (T, N, 3+). Phase 1 (online=False) trains encoder + decoder,
    critics and actor; Phase 2 freezes encoder + decoder and adds the reparameterised term to the actor loss.
    dec_batch (--decoder-batch relabelled): the rows the reward decoder reconstructs, in place of the RL batch."""
    encoder, decoder, qf, target_qf, policy = (nets[k] for k in ("encoder", "decoder", "qf", "target_qf", "policy"))
    obs, act, nobs = batch["obs"], batch["actions"], batch["next_obs"]
    rew, done = batch["rewards"][..., None], batch["terminals"][..., None]
    T, B = obs.shape[:2]
    autocast = torch.autocast(obs.device.type, dtype=torch.bfloat16, enabled=args.bf16)
    stats = {}

    # ALGO LOGIC: encoder + reward decoder (their only gradient: L_rew + KL); frozen in Phase 2
    with torch.set_grad_enabled(not online), autocast:
        mu, var = infer_posterior(encoder, context)
        z = sample_z(mu, var, generator)
        z_b = z[:, None].expand(T, B, z.shape[-1])
        if not online:
            d = batch if dec_batch is None else dec_batch
            r_pred = decoder(torch.cat([d["obs"], d["actions"], z[:, None].expand(T, d["obs"].shape[1], z.shape[-1])], -1))
    loss = torch.zeros((), device=obs.device)
    if not online:
        loss_rew, mse, kl = reward_decoder_loss(r_pred, d["rewards"][..., None], mu, var, args.kl_lambda)
        loss = loss + loss_rew
        stats |= {"loss/reward_mse": mse.detach(), "loss/kl": kl.detach()}
    zbar = z_b.detach()

    # ALGO LOGIC: critics, target from a' ~ pi(.|s', zbar), no entropy term (alpha = 0)
    with autocast:
        with torch.no_grad():
            a_next, _ = policy.sample(torch.cat([nobs, zbar], -1), generator)
            q_next = target_qf(torch.cat([nobs, a_next, zbar], -1)).min(dim=0).values
        q_pred = qf(torch.cat([obs, act, zbar], -1))
    y = critic_target(rew, done, q_next, args.reward_scale, args.gamma)
    loss_q = (q_pred - y).pow(2).flatten(1).mean(dim=1).sum()

    # ALGO LOGIC: AWAC actor, advantage of the buffer action over one sampled action, batch-softmax weights
    s_z = torch.cat([obs, zbar], -1)
    with autocast:
        a_new, _ = policy.sample(s_z, generator)
        q_new = qf(torch.cat([obs, a_new, zbar], -1), frozen=True).min(dim=0).values
        log_pi_data = policy.log_prob(s_z, act)
    w = awr_weights(q_pred.detach().min(dim=0).values, q_new.detach(), args.beta)
    loss_pi = -(w * log_pi_data).mean()
    if online:
        loss_pi = loss_pi - q_new.mean()

    if not online:
        opts["context"].zero_grad(set_to_none=True)
    opts["qf"].zero_grad(set_to_none=True)
    opts["policy"].zero_grad(set_to_none=True)
    (loss + loss_q + loss_pi).backward()  # disjoint parameters: the same gradients as three backward calls
    if not online:
        opts["context"].step()
    opts["qf"].step()
    opts["policy"].step()
    with torch.no_grad():
        for p, tp in zip(qf.parameters(), target_qf.parameters()):
            tp.lerp_(p, args.tau)
    return stats | {"loss/q": loss_q.detach(), "loss/policy": loss_pi.detach(), "q/mean": q_pred.detach().mean(),
                    "q/target_mean": y.mean(), "awr/weight_max": w.max(), "policy/log_pi_data": log_pi_data.detach().mean(),
                    "z/posterior_var": var.detach().mean(), "z/mu_abs": mu.detach().abs().mean()}


# ---------------------------------------------------------------------------------------------
# Rollouts: evaluation (modes A and B) and Phase-2 collection, batched over tasks
# ---------------------------------------------------------------------------------------------


def act_with(policy, obs_np, z, deterministic=True, generator=None):
    obs = torch.as_tensor(obs_np, dtype=torch.float32, device=z.device)
    with torch.no_grad():
        x = torch.cat([obs, z], -1)
        a = policy.act_deterministic(x) if deterministic else policy.sample(x, generator)[0]
    return a.cpu().numpy()


def step_features(obs, act, rew, device):
    return torch.as_tensor(np.concatenate([obs, act, np.asarray(rew, np.float32)[:, None]], -1),
                           dtype=torch.float32, device=device)


def eval_mode_a(nets, ds, family, task_ids, args, device, seed):
    """Offline context: z ~ q(z | context_size transitions of the task's data), resampled every step; one
    deterministic episode per draw. Returns per-task returns, successes and the z = mu return."""
    n = args.eval_context_draws
    ctxs = []
    for j in range(n):
        c = sample_context(ds, task_ids, kind="transitions", n=args.context_size, seed=seed + j)
        ctxs.append(context_tensor({k: torch.as_tensor(c[k], dtype=torch.float32, device=device) for k in KEYS[:3]}))
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        mu, var = infer_posterior(nets["encoder"], torch.stack(ctxs, 1).flatten(0, 1))  # task-major as the venv
    out = []
    for resample in (True, False):
        venv = family.make_vec_env(task_ids, n, seed=seed)
        act = (lambda o, ep, t: act_with(nets["policy"], o, sample_z(mu, var, gen))) if resample else \
            (lambda o, ep, t: act_with(nets["policy"], o, mu))
        ret, succ = run_episodes(venv, act, 1)
        out.append((per_task_mean(ret[:, 0], n), per_task_mean(succ[:, 0].astype(float), n)))
    return out[0][0], out[0][1], out[1][0]


def eval_mode_b(nets, family, task_ids, args, device, seed):
    """The paper's online adaptation: per run, num_exp_traj_eval episodes with z ~ prior resampled every step,
    every transition (true reward) joins the context; later episodes z ~ q(z | all transitions so far),
    resampled every step. Deterministic actions. Returns per-task returns and successes [tasks, episodes]."""
    n, E, L = args.num_evals, args.eval_episodes, args.latent_dim
    venv = family.make_vec_env(task_ids, n, seed=seed)
    Bn = venv.num_envs
    gen = torch.Generator(device=device).manual_seed(seed)
    ctx, mask = [], []
    post = {}

    def on_episode_start(ep):
        post.clear()
        if ep >= args.num_exp_traj_eval and ctx:
            with torch.no_grad():
                post["mu"], post["var"] = infer_posterior(nets["encoder"], torch.stack(ctx, 1), torch.stack(mask, 1))

    def act(o, ep, t):
        if post:
            z = sample_z(post["mu"], post["var"], gen)
        else:
            z = torch.randn(Bn, L, device=device, generator=gen)
        return act_with(nets["policy"], o, z)

    def observe(obs, a, r, nobs, term, trunc, info, alive):
        ctx.append(step_features(obs, a, r, device))
        mask.append(torch.as_tensor(alive, dtype=torch.float32, device=device))

    ret, succ = run_episodes(venv, act, E, observe=observe, on_episode_start=on_episode_start)
    return per_task_mean(ret, n), per_task_mean(succ.astype(float), n)


def evaluate(step, nets, ds, family, args, device, logger):
    """Modes A and B on the test tasks and the first n_train_eval_tasks train tasks; logs metrics.csv rows."""
    seed = 10_000 * args.seed + step % 9973
    res = {}
    for split, ids in (("test", family.test_idx), ("train", family.train_idx[: args.n_train_eval_tasks])):
        ret_a, succ_a, ret_mu = eval_mode_a(nets, ds, family, ids, args, device, seed)
        ret_b, succ_b = eval_mode_b(nets, family, ids, args, device, seed + 1)
        logger.log_eval(step, "A", split, ids, ret_a, succ_a > 0.5)
        logger.log_eval(step, "B", split, ids, ret_b, succ_b > 0.5)
        res[split] = {"A": ret_a, "A_zmean": ret_mu, "B": ret_b[:, -1], "B_all": ret_b.mean(0)}
    logger.log_scalars(step, {"eval/A_test": res["test"]["A"].mean(), "eval/B_test": res["test"]["B"].mean(),
                              "eval/A_train": res["train"]["A"].mean(), "eval/B_train": res["train"]["B"].mean()})
    return res


def collect(nets, family, rows, n_steps, posterior, ctx_buf, args, device, gen, np_rng):
    """Phase 2: >= n_steps per task (whole episodes) for train-task rows ``rows`` with the stochastic policy, z
    resampled every step: from the prior, or (``posterior``) from the prior in the first episode and from
    q(z | label_context_size transitions of the task's context buffer) later. Rewards are labelled by the frozen
    decoder with one z_r ~ q(z | the task's offline context) per episode (--oracle-rewards: true rewards).
    Returns per-task dicts of tensors and the labels' mean absolute error against the true rewards."""
    if n_steps <= 0:
        return [], float("nan")
    K, L = len(rows), args.latent_dim
    rows_t = torch.as_tensor(rows, device=device)
    venv = family.make_vec_env(family.train_idx[rows], 1, seed=int(np_rng.randint(2**31)))
    out = [{k: [] for k in KEYS} for _ in range(K)]
    errs = []
    one_src = args.relabel_context_source == "task"
    for ep in range(math.ceil(n_steps / family.horizon)):
        with torch.no_grad():
            post = None
            if posterior and ep > 0:
                post = infer_posterior(nets["encoder"], context_tensor(
                    ctx_buf.sample(rows_t, args.label_context_size, gen, one_source=one_src)))
            z_r = sample_z(*infer_posterior(nets["encoder"], context_tensor(
                ctx_buf.sample(rows_t, args.label_context_size, gen, offline_only=True, one_source=one_src))), gen)
        obs, alive, steps = venv.reset(), np.ones(K, bool), []
        for _t in range(family.horizon):
            z = sample_z(*post, gen) if post is not None else torch.randn(K, L, device=device, generator=gen)
            a = act_with(nets["policy"], obs, z, deterministic=False, generator=gen)
            nobs, r, term, trunc, _ = venv.step(a)
            steps.append((obs, a, r, nobs, term, alive.copy()))
            alive &= ~(term | trunc)
            obs = nobs
            if not alive.any():
                break
        o, a, r, no, d, m = (torch.as_tensor(np.stack(x), dtype=torch.float32, device=device).transpose(0, 1)
                             for x in zip(*steps))  # (K, t, .)
        with torch.no_grad():
            r_hat = nets["decoder"](torch.cat([o, a, z_r[:, None].expand(-1, o.shape[1], -1)], -1))[..., 0]
        errs.append((r_hat - r).abs()[m > 0])
        labels = r if args.oracle_rewards else r_hat
        for k in range(K):
            keep = m[k] > 0
            for key, v in zip(KEYS, (o[k], a[k], labels[k], no[k], d[k])):
                out[k][key].append(v[keep])
    return [{key: torch.cat(v) for key, v in d.items()} for d in out], float(torch.cat(errs).mean())


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def variant_name(args: Args) -> str:
    relabel = {"off": "", "all": "-relabel", "context": "-relabelctx"}[args.relabel_offline]
    relabel += "-task" if relabel and args.relabel_context_source == "task" else ""
    relabel += "-relabeldec" if args.decoder_batch == "relabelled" else ""
    beta = "" if args.beta == 100.0 else f"-beta{args.beta:g}"  # the official temperature is 100 on every env
    return ("smac" + relabel + ("-tail" if args.data_tail > 0 else "") + ("-oracle" if args.oracle_rewards else "")
            + beta)


def main(args: Args):
    args = resolve_args(args)
    family = make_family(args.env_id, args.preset)
    if family.discrete:
        raise SystemExit(f"smac.py supports continuous actions only; {args.env_id} is discrete")
    run_dir = make_run_dir(args.env_id, variant_name(args), args.seed, args.run_dir)
    check_fresh_run_dir(run_dir, args.resume)
    seed_everything(args.seed)
    device = pick_device(args.cuda)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    np_rng = np.random.RandomState(args.seed)

    # Test tasks' data are used only as evaluation context (mode A); training reads the train tasks only.
    ds = ensure_dataset(args.env_id, args.preset, path=args.dataset, family=family)
    data, counts, relabel = offline_data(ds, family, args, device)
    rl_buf = TaskData(data, counts, relabel if args.relabel_offline == "all" else None)
    dec_buf = TaskData(data, counts, relabel) if args.decoder_batch == "relabelled" else None
    ctx_buf = rl_buf if args.context_buffer == "shared" else \
        TaskData(data, counts, relabel if args.relabel_offline in ("all", "context") else None)
    train_rows = torch.arange(len(family.train_idx), device=device)
    nets, opts = make_nets(family.obs_dim, family.act_dim, args, device)

    step, it, env_steps, train_time, wall_before, history = 0, 0, 0, 0.0, 0.0, []
    phase1_res = None
    ckpt_path = Path(run_dir) / "checkpoint.pt"
    meta = {"method": "smac", "env_id": args.env_id, "preset": args.preset, "seed": args.seed,
            "obs_dim": family.obs_dim, "act_dim": family.act_dim, "net_size": args.net_size,
            "encoder_size": args.encoder_size, "decoder_size": args.decoder_size, "latent_dim": args.latent_dim,
            "data_tail": args.data_tail, "relabel_offline": args.relabel_offline, "decoder_batch": args.decoder_batch}
    # (Phase-2-only flags such as --oracle-rewards are left out: a Phase-1 checkpoint may start either Phase 2)
    if args.resume and ckpt_path.exists():
        # checkpoints from before --decoder-batch ran with the official decoder batch
        state = load_checkpoint(ckpt_path, expect=meta, map_location=device, predates={"decoder_batch": "own"})
        for k, n in nets.items():
            n.load_state_dict(state["nets"][k])
        for k, o in opts.items():
            o.load_state_dict(state["opts"][k])
        step, it, env_steps = state["step"], state["iteration"], state["env_steps"]
        train_time, history, phase1_res, wall_before = state["train_time"], state["history"], state["phase1"], state["wall_time"]
        gen.set_state(state["gen"])
        np_rng.set_state(state["np_rng"])
        torch.set_rng_state(state["torch_rng"])
        rl_buf.load_state_dict(state["rl_buf"])
        if ctx_buf is not rl_buf:  # a shared-buffer checkpoint: the context buffer starts as a copy of it
            ctx_buf.load_state_dict(state["ctx_buf"] or copy.deepcopy(state["rl_buf"]))
        print(f"resumed {ckpt_path} at step {step}, online iteration {it}", flush=True)
    logger = Logger(run_dir, {**vars(args), "run_dir": str(run_dir)})
    total = args.total_steps + args.online_iterations * args.online_updates
    print(f"SMAC on {args.env_id}/{args.preset}: {len(family.train_idx)} train / {len(family.test_idx)} test tasks, "
          f"offline rows/task {int(rl_buf.offline_size(train_rows).min())}{' (relabelled union)' if args.relabel_offline == 'all' else ''}, phase 1 {args.total_steps} steps, "
          f"phase 2 {args.online_iterations} x {args.online_updates} steps, beta={args.beta}, rs={args.reward_scale}",
          flush=True)

    def checkpoint():
        save_checkpoint(ckpt_path, {
            "meta": meta, "args": vars(args), "step": step, "iteration": it, "env_steps": env_steps,
            "train_time": train_time, "history": history, "phase1": phase1_res,
            "wall_time": wall_before + time.time() - t_start,
            "nets": {k: n.state_dict() for k, n in nets.items()}, "opts": {k: o.state_dict() for k, o in opts.items()},
            "gen": gen.get_state(), "np_rng": np_rng.get_state(), "torch_rng": torch.get_rng_state(),
            "rl_buf": rl_buf.state_dict(), "ctx_buf": ctx_buf.state_dict() if ctx_buf is not rl_buf else None})

    def do_eval():
        res = evaluate(step, nets, ds, family, args, device, logger)
        history.append({"step": step, "iteration": it, "env_steps": env_steps, "A": float(res["test"]["A"].mean()),
                        "B": float(res["test"]["B"].mean())})
        print(f"eval step {step} (phase {1 if it == 0 else 2}, reward-free env steps {env_steps}): "
              f"test A {res['test']['A'].mean():.3f} (z=mu {res['test']['A_zmean'].mean():.3f}) | test B last "
              f"{res['test']['B'].mean():.3f} per-episode {np.round(res['test']['B_all'], 2).tolist()} | "
              f"train A {res['train']['A'].mean():.3f} B {res['train']['B'].mean():.3f}", flush=True)
        return res

    one_src = args.relabel_context_source == "task"

    def train_block(n_steps, online, batch_size):
        nonlocal step, train_time
        t0, last = time.time(), {}
        for _ in range(n_steps):
            # ALGO LOGIC: meta-batch with replacement; RL batch and context drawn independently from the task
            tasks = train_rows[torch.randint(len(train_rows), (args.meta_batch,), device=device, generator=gen)]
            batch = rl_buf.sample(tasks, batch_size, gen)
            context = context_tensor(ctx_buf.sample(tasks, args.context_size, gen, one_source=one_src))
            dec = None if online or dec_buf is None else dec_buf.sample(tasks, batch_size, gen, offline_only=True)
            stats = smac_update(nets, opts, batch, context, args, online, gen, dec)
            step += 1
            if step % args.log_every == 0:
                last = {k: float(v) for k, v in stats.items()}
                logger.log_scalars(step, last | {"perf/updates_per_s": step / max(train_time + time.time() - t0, 1e-9)})
            if step % args.print_every == 0:
                extra = {k: last[k] for k in ("loss/reward_mse", "loss/kl", "q/mean") if k in last}
                if history:
                    extra |= {"test_A": history[-1]["A"], "test_B": history[-1]["B"]}
                print_progress(step, total, t_start, extra, start_step)
        train_time += time.time() - t0

    def record(res):  # summary.json's eval modes A and B
        return {m: eval_entry(res["test"][m], res["train"][m]) for m in ("A", "B")}

    def record_phase1(res):  # kept in the checkpoint, so written before the Phase-1 checkpoint
        return record(res) | {"B_per_episode_test": res["test"]["B_all"].tolist()}

    t_start, start_step = time.time(), step
    res = do_eval() if step == 0 else None
    if step == args.total_steps == 0:
        phase1_res = record_phase1(res)
    # ---- Phase 1: offline meta-training ----
    while step < args.total_steps:
        train_block(min(args.eval_every - step % args.eval_every, args.total_steps - step), False, args.batch_size)
        if step % args.eval_every == 0 or step == args.total_steps:
            res = do_eval()
            if step == args.total_steps:
                phase1_res = record_phase1(res)
            checkpoint()

    # ---- Phase 2: self-supervised online meta-training (encoder and decoder frozen) ----
    while it < args.online_iterations:
        rows = np.sort(np_rng.choice(len(train_rows), min(args.num_tasks_sample, len(train_rows)), replace=False))
        errs = []
        for n_steps, posterior in ((args.num_steps_prior, False), (args.num_extra_rl_steps_posterior, True)):
            new, err = collect(nets, family, rows, n_steps, posterior, ctx_buf, args, device, gen, np_rng)
            errs.append(err)
            for k, row in enumerate(rows):
                rl_buf.add(int(row), new[k])
                if ctx_buf is not rl_buf and not posterior:  # separate: prior-z data go to the context buffer too
                    ctx_buf.add(int(row), new[k])
                env_steps += len(new[k]["obs"])
        logger.log_scalars(step, {"online/label_abs_err": float(np.nanmean(errs)), "online/env_steps": env_steps})
        train_block(args.online_updates, True, args.online_batch_size)
        it += 1
        if it % args.online_eval_every == 0 or it == args.online_iterations:
            res = do_eval()
            checkpoint()

    if res is None:  # resumed a finished run: evaluate once more for the summary
        res = do_eval()
    ups = step / max(train_time, 1e-9)
    ev = record(res)
    if args.online_iterations > 0:  # the Phase-1 model beside the final one
        ev |= {f"{m}_offline": phase1_res[m] for m in ("A", "B")}
    write_summary(run_dir, method=variant_name(args), env_id=args.env_id, preset=args.preset, seed=args.seed,
                  total_steps=step, wall_time_s=wall_before + time.time() - t_start, updates_per_s=ups,
                  machine=machine_info(device), dataset=str(ds.path), eval=ev,
                  extra={"online_iterations": it, "reward_free_env_steps": env_steps, "train_time_s": train_time,
                         "B_per_episode_test": res["test"]["B_all"].tolist(), "A_zmean_test": float(res["test"]["A_zmean"].mean()),
                         "phase1_B_per_episode_test": phase1_res["B_per_episode_test"], "history": history,
                         "settings": {k: getattr(args, k) for k in ("beta", "reward_scale", "kl_lambda", "gamma",
                                                                     "meta_batch", "batch_size", "context_size",
                                                                     "net_size", "encoder_size", "bf16", "data_tail", "relabel_offline",
                                                                     "context_buffer", "online_updates")}})
    logger.close()
    print(f"done: {step} steps ({it} online iterations, {env_steps} reward-free env steps), {ups:.2f} updates/s, "
          f"summary in {run_dir}/summary.json", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
