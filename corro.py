"""CORRO: contrastive task representations for offline meta-RL, robust to the behaviour policy of the context.

Paper: Haoqi Yuan, Zongqing Lu, "Robust Task Representations for Offline Meta-Reinforcement Learning via
Contrastive Learning", ICML 2022, arXiv:2206.10442. Official code: github.com/PKU-RL/CORRO.

Method. A transition encoder E1 maps one transition x = (s, a, r, s') to a unit vector z_x. It is trained first and
alone with InfoNCE, where the negatives keep the query's (s, a) and only change (r, s') -- so the only way to tell
them from the positive (another transition of the same task) is the task-dependent part of the transition, and z
ignores the behaviour policy that chose (s, a). Negatives come from a CVAE of p(r, s' | s, a) fitted on the
training tasks' pooled data (its prior samples are transitions of "some task"), or from reward noise. E1 is then
frozen; an attention aggregator E2 pools the z_x of one context trajectory into the task representation z, and an
offline SAC on (s, z) is trained with E2 learning through the critic loss only.

Equations (query x = (s, a, r, s') of task M, positive x' ~ D_M, negatives x~_j = (s, a, r~_j, s~'_j), j = 1..N):
    z_x = E1(x) / ||E1(x)||,   S(u, v) = u.v / tau,   tau = 0.1
    L_NCE = -E log[ exp S(z_x, z_x') / (exp S(z_x, z_x') + Σ_j exp S(z_x, z_x~j)) ]      (paper eq. 5)
    (r~, s~') = CVAE decoder(s, a, h), h ~ N(0, I)     or   r~ = r + N(0, 0.5^2), s~' = s'
    CVAE: q(h|s, a, r, s'), p(r, s'|s, a, h):  L = MSE(s') + MSE(r) + beta KL(q || N(0, I)),  beta = 0.2
    z = Σ_i softmax_i(w.z_i + b) z_i over the context's transitions                         (E2)
    SAC (fixed alpha = 0.2, twin Q with targets):  y = r + gamma (1 - d) [min_k Qbar_k(s', z, a') - alpha log pi(a'|s', z)]
    L_Q = Σ_k mean (Q_k(s, z, a) - y)^2  -> Q1, Q2 and E2;   L_pi = mean [alpha log pi(a~|s, zbar) - min_k Q_k(s, zbar, a~)]
Evaluation (no gradient steps at test time): z from ONE context trajectory of the test task, then one deterministic
episode. IID: the trajectory is a random episode of the test task's offline data. OOD: it is collected in the test
task by another behaviour policy (a uniform random policy; another task's collector policy, acting stochastically).

Deviations:
- The CVAE is fitted on the training tasks only (the official ``train_generative_model.py`` also fits it on the
  test tasks' data, which leaks them into training); ``--cvae-include-test-tasks`` reproduces the leak.
- gymnasium 1.x task families of ``common/envs.py`` and the project's per-task SAC replay buffers; the dataset's
  true terminations are used in the target (the official buffers store 0 always; none of the families benchmarked
  here terminates). The OOD behaviour policies are the collector's final per-task policies (the official test uses
  10 intermediate checkpoints of other tasks' collectors), plus a uniform random policy.
- ``--normalize-inputs`` (off by default; the official code normalises nothing): E1 reads s and s' standardised per
  dimension by the training tasks' data. On HalfCheetahVel the raw 20-d observation is dominated by the torso's
  absolute x, which grows through an episode; the positive (another transition of the task) then differs from the
  query mostly in x while the negatives share it, and InfoNCE collapses every z to one point within a few thousand
  updates (loss at ln(1 + N)) with every negative type. Standardised, the paper's CVAE negatives do not collapse and
  the SAC stage learns the task (README); reward-noise negatives still collapse at the official width 64.
- CVAE: batches drawn with replacement for ``cvae_epochs`` passes' worth of steps (official: shuffled epochs).
- Vectorised: Q1/Q2 as one 2-member batched network (their losses have disjoint parameters, so one backward equals
  the official two), all sampled tasks' contexts encoded in one E1 pass; evaluation encodes every (task, draw)
  context at once and steps all test tasks in one batched env.
- Logged beyond the paper: the InfoNCE loss against its chance level ln(1 + N), and a linear probe from z to the
  task parameter (fit on train tasks' episodes, R^2 on test tasks' episodes).
- Options beyond the paper, off by default, for families whose reward is a known function of (s, a, s') (the numpy
  families, ``common.envs.relabel_rewards``), because the paper's recipe fails on the project's PointRobot data
  (measured, README): each task's replay buffer runs from the origin to that task's goal, so (s, a) nearly
  determines the task. The CVAE then learns a deterministic p(r, s' | s, a) (KL -> 0), its "negatives" equal the
  query, and InfoNCE sits at ln(1 + N) with a collapsed encoder (as the official code does here). Negatives from
  the true rewards of other train tasks (``--negatives relabel``, the official ``gt`` type) avoid that but leave a
  shortcut: a real transition's reward is near the best possible at its own on-path state, a relabelled one is not,
  so the encoder learns "real or relabelled" and maps every task to nearly the same z.
  ``--relabel-queries`` removes the shortcut (queries and positives are pooled train transitions carrying the query
  task's reward); ``--context-relabel F`` lets a share F of the aggregator's training contexts be other tasks'
  episodes with the context task's rewards (as PEARL's ``--context-relabel``), for robustness to the context's
  behaviour policy. ``--rl-relabel F`` does the same for the SAC batches: a share F of each task's RL rows are
  other train tasks' transitions with the batch task's rewards, so a task's critic and policy also learn on the
  states its own collector never visited (families without terminal states).
- ``--cql-weight W`` (off by default, as the paper) adds CQL(H) to each critic loss. The official SAC has a
  ``use_cql`` path that no config turns on and that cannot run as written (it takes the log of a mean of
  Q / density, not of exp Q, so negative Q values give NaN); the term here is the CQL paper's, with n uniform
  and n policy actions per state. ``--cql-target-gap tau`` uses the CQL paper's Lagrangian form instead of a
  fixed weight.
- ``--oracle-z`` is a diagnostic, not CORRO: z is the true task parameter, the SAC stage's ceiling (README).
- Not implemented: the RNN encoder, the DQN/grid variant, ``gt`` and ``separate`` relabelling, the
  supervised-debug head. Continuous actions only.
"""

from __future__ import annotations

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

from common.data import ensure_dataset, sample_context
from common.envs import canonical_env_id, default_preset, make_family, relabel_rewards, relabel_unsupported
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
    total_steps: int = 200_000
    """offline SAC updates (stage 3; official 1000 iterations x 200)"""
    eval_every: int = 1000
    """SAC updates between evaluations and checkpoints (official: every 5 iterations)"""
    cuda: bool = True
    """use cuda:0 when available"""
    resume: bool = False
    """continue the run in --run-dir from its checkpoint"""
    run_dir: str | None = None
    """run directory (default runs/{env}__corro__s{seed}__{time})"""

    # task representation (offline_rl_config / relabel_model_config; None = per-env table)
    latent_dim: int | None = None
    """dimension of z (5; Hopper 40, Walker 32)"""
    encoder_hidden: int | None = None
    """width of the transition encoder's 2 hidden layers"""
    negatives: Literal["cvae", "reward_noise", "relabel", "random"] = "cvae"
    """negative pairs: CVAE samples sharing the query's (s, a); reward noise (r + N(0, reward_std^2), same s');
    relabel: the query's (s, a, s') with the reward of random train tasks (the official ``gt`` type; needs the
    family's reward function, numpy families only); or random transitions of the pooled training data
    (ablation: negatives do not share (s, a))"""
    n_negatives: int = 16
    """negatives per query"""
    infonce_batch: int = 64
    """queries per InfoNCE update"""
    temperature: float = 0.1
    """InfoNCE temperature tau"""
    reward_std: float = 0.5
    """--negatives reward_noise: std of the reward noise"""
    relabel_queries: bool = False
    """a deviation (numpy families): queries and positives are transitions of random train tasks relabelled with the
    query task's reward, so that neither the states nor the "realness" of a reward identify the task"""
    encoder_steps: int = 200_000
    """InfoNCE updates of the transition encoder (stage 2; official 1000 x 200)"""
    normalize_inputs: bool = False
    """a deviation (off as the paper): standardise the transition encoder's s and s' per dimension by the training
    tasks' data (mean / std). The cheetah's 20-d observation mixes the torso's absolute x with small joint angles,
    and without it InfoNCE collapses to ln(1 + N) on HalfCheetahVel with every negative type (README)"""
    encoder_lr: float = 3e-4
    """Adam lr of the transition encoder (stage 2) and of the aggregator (stage 3)"""
    cvae_hidden: int | None = None
    """width of the CVAE's hidden layer (1 layer each for encoder and decoder)"""
    cvae_latent: int | None = None
    """dimension of the CVAE latent h"""
    cvae_beta: float = 0.2
    """weight of the CVAE's KL term"""
    cvae_lr: float = 3e-4
    """Adam lr of the CVAE"""
    cvae_batch: int = 128
    """CVAE batch size"""
    cvae_epochs: float = 100.0
    """CVAE training length in passes over the pooled training data (stage 1)"""
    cvae_include_test_tasks: bool = False
    """reproduce the official code's leak: fit the CVAE on the test tasks' data too"""

    # offline SAC (stage 3)
    hidden: int | None = None
    """width of the 2 hidden layers of Q1, Q2 and the policy (64 point robots, 256 MuJoCo)"""
    meta_batch: int = 16
    """tasks per update, drawn with replacement"""
    batch_size: int = 256
    """RL batch per task"""
    actor_lr: float = 3e-4
    """Adam lr of the policy"""
    critic_lr: float = 3e-4
    """Adam lr of Q1 and Q2"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """Polyak rate of the target critics"""
    alpha: float = 0.2
    """fixed entropy weight"""
    cql_weight: float = 0.0
    """off (0) as the paper: weight of a CQL(H) term added to each critic loss (the official SAC's unused
    ``use_cql`` path, written here as in the CQL paper; spec pitfall 6)"""
    cql_samples: int = 10
    """--cql-weight: uniform and policy actions per state in CQL's log-sum-exp"""
    cql_target_gap: float | None = None
    """--cql-weight with a target gap tau: CQL's Lagrangian form; the weight (started at --cql-weight) is learned so
    that each critic's gap E[log-sum-exp Q - Q(data)] settles at tau instead of being pushed down without bound
    (default: a fixed weight)"""
    context_relabel: float = 0.0
    """a deviation (numpy families): share of the training contexts that are an episode of a random train task's
    data with the rewards of the context's task, so the aggregator also learns from other behaviours' episodes"""
    rl_relabel: float = 0.0
    """a deviation (numpy families without terminal states): share of each task's RL rows that are transitions of
    random train tasks with the rewards of the batch's task, so the critic and the policy of a task also see the
    states that its own collector never visited"""
    oracle_z: bool = False
    """diagnostic, not CORRO: z is the true task parameter (zero-padded to --latent-dim) in training and evaluation,
    E1 and E2 unused; the SAC stage's ceiling with a perfect task representation"""

    # evaluation and logging
    eval_draws: int = 3
    """context trajectories per test task and protocol, one deterministic episode each"""
    n_train_eval_tasks: int = 10
    """train tasks evaluated (first n of the split), for comparison"""
    log_every: int = 100
    """updates between train.csv scalars"""
    print_every: int = 1000
    """updates between progress lines"""


# Per-env columns of the official offline_rl_config / relabel_model_config files (spec §3a).
ENV_DEFAULTS = dict(latent_dim=5, encoder_hidden=64, cvae_hidden=64, cvae_latent=5, hidden=256)
ENV_OVERRIDES = {
    "PointRobot": dict(hidden=64), "SparsePointRobot": dict(hidden=64), "PointRobotWind": dict(hidden=64),
    "AntDir": dict(cvae_hidden=128, cvae_latent=64),
    "HopperRandParams": dict(latent_dim=40, encoder_hidden=128, cvae_hidden=128, cvae_latent=64),
    "WalkerRandParams": dict(latent_dim=32, encoder_hidden=128, cvae_hidden=128, cvae_latent=64),
}


def resolve_args(args: Args) -> Args:
    env = canonical_env_id(args.env_id)
    table = {**ENV_DEFAULTS, **ENV_OVERRIDES.get(env, {})}
    filled = {k: v for k, v in table.items() if getattr(args, k) is None}
    if args.cql_target_gap is not None and args.cql_weight <= 0:
        raise SystemExit("--cql-target-gap needs --cql-weight > 0 (the Lagrange weight's starting value)")
    return dataclasses.replace(args, env_id=env, preset=args.preset or default_preset(env), **filled)


# ---------------------------------------------------------------------------------------------
# Networks (rlkit Mlp with its init quirks; models/encoder.py, models/generative.py)
# ---------------------------------------------------------------------------------------------


def rlkit_init_(weight, bias, hidden: bool, init_w: float = 3e-3):
    """rlkit: hidden weights U(+-1/sqrt(size(0))) -- size(0) of an nn.Linear weight is its OUTPUT width (the
    ``fanin_init`` quirk) -- and biases 0.1; last layer U(+-init_w). Batched weights (members, in, out) alike."""
    with torch.no_grad():
        if hidden:
            bound = 1.0 / math.sqrt(weight.shape[0] if weight.dim() == 2 else weight.shape[-1])
            weight.uniform_(-bound, bound)
            bias.fill_(0.1)
        else:
            weight.uniform_(-init_w, init_w)
            bias.uniform_(-init_w, init_w)


class Mlp(nn.Module):
    def __init__(self, in_dim, hidden, out_dim, n_layers, init_w=3e-3):
        super().__init__()
        dims = [in_dim] + [hidden] * n_layers
        self.hidden = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims[:-1], dims[1:]))
        self.last = nn.Linear(dims[-1], out_dim)
        for fc in self.hidden:
            rlkit_init_(fc.weight, fc.bias, hidden=True)
        rlkit_init_(self.last.weight, self.last.bias, hidden=False, init_w=init_w)

    def forward(self, x):
        for fc in self.hidden:
            x = F.relu(fc(x))
        return self.last(x)


class TransitionEncoder(nn.Module):
    """E1: (s, a, r, s') -> unit vector z_x (2 hidden layers). ``obs_mean`` / ``obs_std`` (buffers, saved with the
    weights) standardise s and s' on the way in; they stay 0 / 1 (no change) unless --normalize-inputs sets them."""

    def __init__(self, obs_dim, act_dim, hidden, latent_dim):
        super().__init__()
        self.obs_dim = obs_dim
        self.mlp = Mlp(2 * obs_dim + act_dim + 1, hidden, latent_dim, 2)
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))

    def forward(self, x):
        d = self.obs_dim
        s, a_r, s2 = x[..., :d], x[..., d:-d], x[..., -d:]
        x = torch.cat([(s - self.obs_mean) / self.obs_std, a_r, (s2 - self.obs_mean) / self.obs_std], -1)
        return F.normalize(self.mlp(x), dim=-1)


class AttentionAggregator(nn.Module):
    """E2: z = Σ_i softmax_i(w.z_i + b) z_i over a context (not re-normalised); ``mask`` marks real transitions."""

    def __init__(self, latent_dim):
        super().__init__()
        self.score = nn.Linear(latent_dim, 1)  # PyTorch default init (official)

    def forward(self, z_i, mask=None):  # z_i (tasks, K, d), mask (tasks, K)
        scores = self.score(z_i).squeeze(-1)
        if mask is not None:
            scores = scores.masked_fill(mask <= 0, float("-inf"))
        return (torch.softmax(scores, dim=1)[..., None] * z_i).sum(1)


class CVAE(nn.Module):
    """q(h | s, a, r, s') and p(s', r | s, a, h), one hidden layer each (negatives generator)."""

    def __init__(self, obs_dim, act_dim, hidden, latent):
        super().__init__()
        self.obs_dim, self.latent = obs_dim, latent
        self.encoder = Mlp(2 * obs_dim + act_dim + 1, hidden, 2 * latent, 1)
        self.decoder = Mlp(obs_dim + act_dim + latent, hidden, obs_dim + 1, 1)

    def decode(self, obs, act, h):
        out = self.decoder(torch.cat([obs, act, h], -1))
        return out[..., : self.obs_dim], out[..., self.obs_dim]  # s', r

    def loss(self, obs, act, rew, nobs, beta, generator=None):
        """L = MSE(s') + MSE(r) + beta * mean_batch KL(q(h|x) || N(0, I)) (official train_generative_model.py)."""
        mean, logvar = self.encoder(torch.cat([obs, act, rew[..., None], nobs], -1)).chunk(2, -1)
        h = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator, device=mean.device)
        nobs_hat, rew_hat = self.decode(obs, act, h)
        kl = (-0.5 * (1 + logvar - mean.pow(2) - logvar.exp()).sum(-1)).mean()
        return F.mse_loss(nobs_hat, nobs) + F.mse_loss(rew_hat, rew) + beta * kl, kl

    def sample(self, obs, act, generator=None):
        """Prior samples (s~', r~) ~ p(. | s, a, h), h ~ N(0, I): transitions of 'some task' from (s, a)."""
        h = torch.randn(*obs.shape[:-1], self.latent, generator=generator, device=obs.device)
        return self.decode(obs, act, h)


class TwinQ(nn.Module):
    """Q1 and Q2 as one 2-member batched MLP (weights (2, in, out)); x (..., in) -> (2, ..., 1)."""

    def __init__(self, in_dim, hidden, n_layers=2):
        super().__init__()
        dims = [in_dim] + [hidden] * n_layers + [1]
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(2, i, o)) for i, o in zip(dims[:-1], dims[1:]))
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(2, 1, o)) for o in dims[1:])
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            rlkit_init_(w, b, hidden=k < n_layers)

    def forward(self, x, frozen: bool = False):
        lead = x.shape[:-1]
        h = x.reshape(1, -1, x.shape[-1]).expand(2, -1, -1)
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            if frozen:  # actor step: gradients reach the action only
                w, b = w.detach(), b.detach()
            h = torch.baddbmm(b, h, w)
            if k < len(self.weights) - 1:
                h = F.relu(h)
        return h.reshape(2, *lead, 1)


class TanhGaussianPolicy(nn.Module):
    """pi(a | s, z): tanh-Gaussian, log sigma clamped to [-20, 2], heads initialised U(+-1e-3)."""

    def __init__(self, in_dim, hidden, act_dim):
        super().__init__()
        self.mlp = Mlp(in_dim, hidden, 2 * act_dim, 2, init_w=1e-3)

    def forward(self, x, deterministic=False, generator=None):
        mean, log_std = self.mlp(x).chunk(2, -1)
        if deterministic:
            return torch.tanh(mean), None
        log_std = log_std.clamp(-20.0, 2.0)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device)
        u = mean + log_std.exp() * eps
        a = torch.tanh(u)
        log_pi = (-0.5 * eps.pow(2) - log_std - 0.5 * math.log(2 * math.pi) - torch.log(1 - a.pow(2) + 1e-6)).sum(-1, keepdim=True)
        return a, log_pi


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def transition_features(obs, act, rew, nobs):
    """x = (s, a, r, s') as the encoders read it."""
    return torch.cat([obs, act, rew[..., None], nobs], -1)


def infonce_loss(q, k, neg, temperature: float):
    """L_NCE (paper eq. 5): q, k (B, d), neg (B, N, d) unit vectors; cross-entropy with the positive at index 0."""
    logits = torch.cat([(q * k).sum(-1, keepdim=True), torch.einsum("bd,bnd->bn", q, neg)], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def critic_loss(q_pred, y):
    """L_Q = Σ_k mean (Q_k - y)^2, q_pred (2, ..., 1), y (..., 1)."""
    return (q_pred - y).pow(2).flatten(1).mean(1).sum()


def cql_penalty(qf, pi, s_z, q_pred, n: int, gen):
    """CQL(H) (Kumar et al. 2020): Σ_k mean [log Σ_a exp Q_k(s, z, a) - Q_k(s, z, a_data)], the log-sum-exp over
    actions estimated by importance sampling from n uniform and n current-policy actions per state:
        log [ 1/2n Σ_j exp(Q(a_j^unif) - log U(a_j)) + 1/2n Σ_j exp(Q(a_j^pi) - log pi(a_j)) ].
    Pushes Q down on actions the data do not take; s_z (..., D) carries z with its gradient (E2 learns from it too)."""
    s_rep = s_z[..., None, :].expand(*s_z.shape[:-1], n, s_z.shape[-1])
    with torch.no_grad():
        a_pi, logp_pi = pi(s_rep.detach(), generator=gen)
    a_unif = torch.rand(a_pi.shape, generator=gen, device=a_pi.device) * 2 - 1  # actions live in [-1, 1]
    log_u = -a_pi.shape[-1] * math.log(2.0)
    q_unif = qf(torch.cat([s_rep, a_unif], -1)) - log_u  # (2, ..., n, 1)
    q_pi = qf(torch.cat([s_rep, a_pi], -1)) - logp_pi
    lse = torch.logsumexp(torch.cat([q_unif, q_pi], -2), -2) - math.log(2 * n)  # (2, ..., 1)
    return (lse - q_pred).flatten(1).mean(1).sum()


class LagrangeWeight(nn.Module):
    """CQL's Lagrange multiplier alpha' = exp(log alpha') >= 0 (--cql-target-gap): gradient ascent on
    alpha' (gap - tau) raises the weight while the gap exceeds tau and lowers it toward 0 once it does not."""

    def __init__(self, init: float):
        super().__init__()
        self.log_w = nn.Parameter(torch.tensor(math.log(init)))

    def forward(self):
        return self.log_w.exp().clamp(max=1e6)


# ---------------------------------------------------------------------------------------------
# Data: per-task transitions and episodes on the device
# ---------------------------------------------------------------------------------------------


class TaskData:
    """Tasks' transitions as padded (tasks, rows, dim) tensors plus each task's episodes (start row, length), so
    that RL batches, single transitions and whole context episodes of many tasks are one gather each."""

    KEYS = ("obs", "actions", "rewards", "next_obs", "terminals")

    def __init__(self, ds, task_ids, device):
        self.task_ids = np.asarray(task_ids)
        counts = np.array([ds.task_ptr[t + 1] - ds.task_ptr[t] for t in self.task_ids])
        rows = np.zeros((len(self.task_ids), counts.max()), np.int64)
        starts, lens = [], []
        for i, t in enumerate(self.task_ids):
            sl = ds.task_slice(int(t))
            rows[i] = sl.start
            rows[i, : counts[i]] = np.arange(sl.start, sl.stop)
            first = np.flatnonzero(ds["step"][sl] == 0)
            starts.append(first)
            lens.append(np.diff(np.append(first, counts[i])))
        self.data = {k: torch.as_tensor(ds[k][rows], dtype=torch.float32, device=device) for k in self.KEYS}
        self.counts = torch.as_tensor(counts, device=device)
        self.valid = torch.arange(counts.max(), device=device)[None] < self.counts[:, None]  # real rows, not padding
        n_eps = max(len(s) for s in starts)
        self.ep_start = torch.as_tensor(np.stack([np.pad(s, (0, n_eps - len(s))) for s in starts]), device=device)
        self.ep_len = torch.as_tensor(np.stack([np.pad(n, (0, n_eps - len(n))) for n in lens]), device=device)
        self.n_eps = torch.as_tensor([len(s) for s in starts], device=device)
        self.max_len = int(self.ep_len.max())

    def rows(self, task_rows, n: int, generator=None) -> dict:
        """n uniform transitions of each listed task: dict of (k, n, ...)."""
        u = torch.rand(len(task_rows), n, device=self.counts.device, generator=generator, dtype=torch.float64)
        idx = (u * self.counts[task_rows][:, None]).long()
        return {k: v[task_rows[:, None], idx] for k, v in self.data.items()}

    def episodes(self, task_rows, generator=None) -> tuple[dict, torch.Tensor]:
        """One uniformly drawn episode per listed task: dict of (k, max_len, ...) padded, and the mask (k, max_len)."""
        dev = self.counts.device
        e = (torch.rand(len(task_rows), device=dev, generator=generator) * self.n_eps[task_rows]).long()
        start, length = self.ep_start[task_rows, e], self.ep_len[task_rows, e]
        t = torch.arange(self.max_len, device=dev)
        mask = (t[None] < length[:, None]).float()
        idx = start[:, None] + torch.minimum(t[None], length[:, None] - 1)
        return {k: v[task_rows[:, None], idx] for k, v in self.data.items()}, mask


def rewards_in(family, task_ids, obs, act, nobs):
    """The rewards that transitions (s, a, s') earn in tasks ``task_ids`` (numpy, broadcast against the leading dims):
    ``common.envs.relabel_rewards`` on the tensors, returned on their device."""
    r = relabel_rewards(family, task_ids, obs.cpu().numpy(), act.cpu().numpy(), nobs.cpu().numpy())[0]
    return torch.as_tensor(r, device=obs.device)


def relabel_contexts(ctx, mask, tasks, data: TaskData, family, share: float, gen):
    """Replace a share of the context episodes by an episode of a random train task, relabelled with the rewards of
    the context's own task (``tasks``: rows of ``data``)."""
    dev = tasks.device
    other, other_mask = data.episodes(torch.randint(len(data.task_ids), (len(tasks),), generator=gen, device=dev), gen)
    task_ids = np.broadcast_to(data.task_ids[tasks.cpu().numpy()][:, None], other["rewards"].shape)
    other["rewards"] = rewards_in(family, task_ids, other["obs"], other["actions"], other["next_obs"])
    pick = torch.rand(len(tasks), device=dev, generator=gen) < share
    return ({k: torch.where(pick.view(-1, *[1] * (v.dim() - 1)), other[k], v) for k, v in ctx.items()},
            torch.where(pick[:, None], other_mask, mask))


def relabel_rl_batch(batch, tasks, data: TaskData, family, share: float, gen):
    """Replace a share of each task's RL rows (batch fields (T, B, ...)) by transitions of random train tasks,
    relabelled with the rewards of the row's task (``tasks``: rows of ``data``)."""
    T, B = batch["rewards"].shape
    dev = tasks.device
    src = torch.randint(len(data.task_ids), (T * B,), generator=gen, device=dev)
    other = {k: v.reshape(T, B, *v.shape[2:]) for k, v in data.rows(src, 1, gen).items()}
    task_ids = np.broadcast_to(data.task_ids[tasks.cpu().numpy()][:, None], (T, B))
    other["rewards"] = rewards_in(family, task_ids, other["obs"], other["actions"], other["next_obs"])
    pick = torch.rand(T, B, device=dev, generator=gen) < share
    return {k: torch.where(pick.view(T, B, *[1] * (v.dim() - 2)), other[k], v) for k, v in batch.items()}


def context_z(e1, e2, batch, mask):
    """z of each context: E2 over E1 of its transitions, batch (tasks, K, .) -> (tasks, d)."""
    z_i = e1(transition_features(batch["obs"], batch["actions"], batch["rewards"], batch["next_obs"]))
    return e2(z_i, mask)


def oracle_z(family, task_ids, latent_dim: int, device):
    """--oracle-z: each task's true parameter as z, zero-padded (or cut) to latent_dim: (len(task_ids), latent_dim)."""
    p = torch.as_tensor(np.asarray(family.tasks, dtype=np.float32)[np.asarray(task_ids)].reshape(len(task_ids), -1))
    return F.pad(p, (0, max(0, latent_dim - p.shape[1])))[:, :latent_dim].to(device)


# ---------------------------------------------------------------------------------------------
# Stage 1: CVAE; stage 2: InfoNCE pre-training of the transition encoder
# ---------------------------------------------------------------------------------------------


def fit_cvae(cvae, data: TaskData, args, gen, logger, step_offset=0):
    opt = torch.optim.Adam(cvae.parameters(), lr=args.cvae_lr)
    n_rows = int(data.counts.sum())
    steps = max(1, int(args.cvae_epochs * n_rows / args.cvae_batch))
    n_tasks = len(data.task_ids)
    t0 = time.time()
    for step in range(1, steps + 1):
        # rows uniform over the pooled data: a task in proportion to its size, then a row within it
        task = torch.multinomial(data.counts.float(), args.cvae_batch, replacement=True, generator=gen)
        idx = (torch.rand(args.cvae_batch, generator=gen, device=task.device) * data.counts[task]).long()
        b = {k: v[task, idx] for k, v in data.data.items()}
        loss, kl = cvae.loss(b["obs"], b["actions"], b["rewards"], b["next_obs"], args.cvae_beta, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 1000 == 0 or step == steps:
            logger.log_scalars(step_offset + step, {"cvae/loss": loss.item(), "cvae/kl": kl.item()})
        if step % 10_000 == 0 or step == steps:
            print(f"cvae {step}/{steps} ({n_tasks} tasks) loss {loss.item():.4f} kl {kl.item():.3f} "
                  f"{step / (time.time() - t0):.0f} steps/s", flush=True)
    return steps


def negatives(q: dict, args, cvae, data: TaskData, gen, family=None):
    """(s, a, r~, s~') of the N negatives of each query: (B, N, ...) fields."""
    B, N = len(q["rewards"]), args.n_negatives
    if args.negatives == "random":  # ablation: whole transitions of random training tasks (other (s, a))
        rows = torch.randint(len(data.task_ids), (B * N,), generator=gen, device=q["rewards"].device)
        b = data.rows(rows, 1, gen)
        return {k: v.reshape(B, N, *v.shape[2:]) for k, v in b.items()}
    obs = q["obs"][:, None].expand(-1, N, -1)
    act = q["actions"][:, None].expand(-1, N, -1)
    if args.negatives == "cvae":
        with torch.no_grad():
            nobs, rew = cvae.sample(obs, act, gen)
    elif args.negatives == "relabel":  # the same transition in random train tasks (shared dynamics), their rewards
        nobs = q["next_obs"][:, None].expand(-1, N, -1)
        task = data.task_ids[torch.randint(len(data.task_ids), (B, N), generator=gen, device=obs.device).cpu().numpy()]
        rew = rewards_in(family, task, obs, act, nobs)
    else:  # reward_noise: r + N(0, std^2), same s'
        nobs = q["next_obs"][:, None].expand(-1, N, -1)
        rew = q["rewards"][:, None] + args.reward_std * torch.randn(B, N, generator=gen, device=obs.device)
    return {"obs": obs, "actions": act, "rewards": rew, "next_obs": nobs}


def contrastive_pairs(data: TaskData, args, gen, family=None):
    """Queries and positives: two random transitions of the same random train task, (B,) task rows and dicts of
    (B, ...) fields. ``--relabel-queries``: the two transitions come from random train tasks' data and carry the
    query task's rewards."""
    dev = data.counts.device
    tasks = torch.randint(len(data.task_ids), (args.infonce_batch,), generator=gen, device=dev)
    if args.relabel_queries:
        src = torch.randint(len(data.task_ids), (args.infonce_batch * 2,), generator=gen, device=dev)
        both = {k: v.reshape(args.infonce_batch, 2, *v.shape[2:]) for k, v in data.rows(src, 1, gen).items()}
        task_ids = np.repeat(data.task_ids[tasks.cpu().numpy()][:, None], 2, 1)
        both["rewards"] = rewards_in(family, task_ids, both["obs"], both["actions"], both["next_obs"])
    else:
        both = data.rows(tasks, 2, gen)  # (B, 2, .): column 0 query, column 1 key
    return tasks, {k: v[:, 0] for k, v in both.items()}, {k: v[:, 1] for k, v in both.items()}


def encoder_update(e1, opt, data: TaskData, cvae, args, gen, family=None):
    """One InfoNCE step of the transition encoder."""
    _, q, k = contrastive_pairs(data, args, gen, family)
    neg = negatives(q, args, cvae, data, gen, family)
    feats = lambda b: transition_features(b["obs"], b["actions"], b["rewards"], b["next_obs"])
    loss = infonce_loss(e1(feats(q)), e1(feats(k)), e1(feats(neg)), args.temperature)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


# ---------------------------------------------------------------------------------------------
# Stage 3: offline SAC on (s, z), the aggregator trained through the critic loss only
# ---------------------------------------------------------------------------------------------


def sac_update(nets, opts, batch, ctx, ctx_mask, args, gen, z_task=None):
    """batch: (T, B, .) RL transitions; ctx: one context episode per task (T, K, .). Order as the official code:
    critic (+ E2) step, Polyak, actor step on the updated critics with z detached. z_task (T, d): --oracle-z's z."""
    e1, e2, qf, qf_targ, pi = nets["e1"], nets["e2"], nets["qf"], nets["qf_targ"], nets["pi"]
    if z_task is None:
        with torch.no_grad():
            z_i = e1(transition_features(ctx["obs"], ctx["actions"], ctx["rewards"], ctx["next_obs"]))  # E1 frozen
        z_task = e2(z_i, ctx_mask)
    z = z_task[:, None].expand(-1, batch["obs"].shape[1], -1)  # (T, B, d)
    s_z = torch.cat([batch["obs"], z], -1)
    with torch.no_grad():
        ns_z = torch.cat([batch["next_obs"], z], -1)
        a2, logp2 = pi(ns_z, generator=gen)
        q_next = qf_targ(torch.cat([ns_z, a2], -1)).min(0).values - args.alpha * logp2
        y = batch["rewards"][..., None] + args.gamma * (1 - batch["terminals"][..., None]) * q_next
    q_pred = qf(torch.cat([s_z, batch["actions"]], -1))
    loss_td = critic_loss(q_pred, y)
    stats, loss_q = {"loss/critic": loss_td.item() / 2}, loss_td
    if args.cql_weight > 0:  # option: conservative critics (off in the paper)
        pen = cql_penalty(qf, pi, s_z, q_pred, args.cql_samples, gen)
        stats["loss/cql"] = pen.item() / 2
        if args.cql_target_gap is not None:  # Lagrangian form: pen sums the two critics' gaps, so the target is 2 tau
            w = nets["cql_w"]()
            loss_q = loss_td + w.detach() * (pen - 2 * args.cql_target_gap)
            loss_w = -w * (pen.detach() - 2 * args.cql_target_gap)
            opts["cql_w"].zero_grad(set_to_none=True)
            loss_w.backward()
            opts["cql_w"].step()
            stats["cql/weight"] = w.item()
        else:
            loss_q = loss_td + args.cql_weight * pen
    opts["qf"].zero_grad(set_to_none=True)
    opts["e2"].zero_grad(set_to_none=True)
    loss_q.backward()
    opts["qf"].step()
    opts["e2"].step()
    with torch.no_grad():
        for p, pt in zip(qf.parameters(), qf_targ.parameters()):
            pt.lerp_(p, args.tau)
    s_zbar = s_z.detach()  # official: the actor reads obs.detach(), so E2 learns from the critic only
    a, logp = pi(s_zbar, generator=gen)
    loss_pi = (args.alpha * logp - qf(torch.cat([s_zbar, a], -1), frozen=True).min(0).values).mean()
    opts["pi"].zero_grad(set_to_none=True)
    loss_pi.backward()
    opts["pi"].step()
    return stats | {"loss/actor": loss_pi.item(), "q/mean": q_pred.mean().item(), "q/target_mean": y.mean().item()}


# ---------------------------------------------------------------------------------------------
# Evaluation: IID (offline episode) and OOD (episode of another behaviour policy) contexts, linear probe
# ---------------------------------------------------------------------------------------------


def rollout_with_z(pi, family, task_ids, z, n_per_task, device, seed):
    """One deterministic episode per (task, draw) with its fixed z (task-major rows)."""
    venv = family.make_vec_env(task_ids, n_per_task, seed=seed)

    def act(obs, ep, t):
        with torch.no_grad():
            o = torch.as_tensor(obs, dtype=torch.float32, device=device)
            return pi(torch.cat([o, z], -1), deterministic=True)[0].cpu().numpy()

    ret, succ = run_episodes(venv, act, 1)
    return per_task_mean(ret[:, 0], n_per_task), per_task_mean(succ[:, 0].astype(float), n_per_task)


def collect_context(family, task_ids, n_per_task, behaviour, device, seed):
    """One episode per (task, draw) collected by ``behaviour(obs) -> actions`` in the task: padded fields + mask."""
    venv = family.make_vec_env(task_ids, n_per_task, seed=seed)
    steps = []
    run_episodes(venv, lambda obs, ep, t: behaviour(obs),
                 observe=lambda o, a, r, no, te, tr, info, alive: steps.append((o, a, r, no, alive)))
    f = lambda i: torch.as_tensor(np.stack([s[i] for s in steps], 1), dtype=torch.float32, device=device)
    return {"obs": f(0), "actions": f(1), "rewards": f(2), "next_obs": f(3)}, f(4)


def behaviour_policies(ds_path, family):
    """OOD behaviours ``(obs, rng) -> actions``: a uniform random policy and, when the collector's final policies
    are stored beside the dataset, the policy of another task (test task i gets train task i mod n_train's),
    acting stochastically."""
    out = {"random": lambda obs, rng: rng.uniform(-1, 1, (len(obs), family.act_dim)).astype(np.float32)}
    path = Path(ds_path).with_name(Path(ds_path).stem + ".policies.pt")
    if path.exists():
        from common.collect import TanhGaussianActor, learner_features
        ck = torch.load(path, map_location="cpu", weights_only=False)
        R, T = ck["recipe"], len(family.tasks)
        actor = TanhGaussianActor(T, ck["obs_in"], family.act_dim, R["hidden"], R["layers"])
        actor.load_state_dict(ck["modules"]["actor"])
        feat = learner_features(family, R)[0]
        n_train = len(family.train_idx)

        def other_task(obs, rng):
            # env b (task-major over the test tasks) runs the policy of train task (b's test task index) mod n_train:
            # feed every member the obs of all envs, keep each env's own member
            b = np.arange(len(obs))
            members = family.train_idx[(b // (len(obs) // len(family.test_idx))) % n_train]
            o = feat(torch.as_tensor(obs, dtype=torch.float32))[None].expand(T, -1, -1)
            with torch.no_grad():
                mean, log_std = actor.net(o).chunk(2, -1)
            mean, log_std = mean[members, b].numpy(), log_std[members, b].clamp(-20, 2).numpy()
            return np.tanh(mean + np.exp(log_std) * rng.standard_normal(mean.shape)).astype(np.float32)

        out["other_task"] = other_task
    return out


def linear_probe_r2(z_train, y_train, z_test, y_test):
    """Least squares z -> task parameter (with bias) on train tasks' episodes; R^2 on test tasks' episodes
    (1 - SS_res / SS_tot, pooled over the parameter's dims)."""
    X = torch.cat([z_train, torch.ones(len(z_train), 1, dtype=z_train.dtype)], 1).double()
    W = torch.linalg.lstsq(X, y_train.double()).solution
    pred = torch.cat([z_test, torch.ones(len(z_test), 1, dtype=z_test.dtype)], 1).double() @ W
    ss_res = (pred - y_test.double()).pow(2).sum()
    ss_tot = (y_test.double() - y_test.double().mean(0)).pow(2).sum()
    return float(1 - ss_res / ss_tot)


def probe(nets, data_train, data_test, family, device, seed, episodes_per_task=10):
    gen = torch.Generator(device=device).manual_seed(seed)
    zs = []
    for data in (data_train, data_test):
        rows = torch.arange(len(data.task_ids), device=device).repeat_interleave(episodes_per_task)
        batch, mask = data.episodes(rows, gen)
        with torch.no_grad():
            zs.append(context_z(nets["e1"], nets["e2"], batch, mask).cpu())
    y = [torch.as_tensor(family.tasks[d.task_ids]).repeat_interleave(episodes_per_task, 0) for d in (data_train, data_test)]
    return linear_probe_r2(zs[0], y[0], zs[1], y[1])


def evaluate(step, nets, data, family, ds, behaviours, args, device, logger):
    """IID and OOD protocols on the test tasks (and IID on the first train tasks); linear probe R^2."""
    seed = 10_000 * args.seed + step % 9973
    D = args.eval_draws
    res = {}
    for split, ids, d in (("test", family.test_idx, data["test"]),
                          ("train", family.train_idx[: args.n_train_eval_tasks], data["train"])):
        rows = torch.as_tensor([int(np.flatnonzero(d.task_ids == t)[0]) for t in ids], device=device).repeat_interleave(D)
        batch, mask = d.episodes(rows, torch.Generator(device=device).manual_seed(seed))
        contexts = {"iid": (batch, mask)}
        if split == "test":
            for k, (name, beh) in enumerate(sorted(behaviours.items())):
                rng = np.random.RandomState(seed + 10 + k)
                contexts["ood_" + name] = collect_context(family, ids, D, lambda o: beh(o, rng), device, seed + 1)
        for name, (b, m) in contexts.items():
            with torch.no_grad():
                z = oracle_z(family, np.repeat(ids, D), args.latent_dim, device) if args.oracle_z \
                    else context_z(nets["e1"], nets["e2"], b, m)
            ret, succ = rollout_with_z(nets["pi"], family, ids, z, D, device, seed + 3)
            logger.log_eval(step, name, split, ids, ret, succ > 0.5)
            res[(name, split)] = ret
    res["probe_r2"] = probe(nets, data["train"], data["test"], family, device, seed)
    scalars = {f"eval/{n}_{s}": float(r.mean()) for (n, s), r in ((k, v) for k, v in res.items() if isinstance(k, tuple))}
    logger.log_scalars(step, scalars | {"eval/probe_r2": res["probe_r2"]})
    return res


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def variant_name(args: Args) -> str:
    """The method label of summary.json: corro plus the flags that change what is learned."""
    tags = {"cvae": "", "reward_noise": "-rewnoise", "relabel": "-relabel", "random": "-randneg"}[args.negatives]
    for on, tag in ((args.relabel_queries, "-rq"), (args.context_relabel > 0, "-ctxrel"), (args.rl_relabel > 0, "-rlrel"),
                    (args.oracle_z, "-oraclez"),
                    (args.cvae_include_test_tasks, "-leak"),
                    (args.normalize_inputs, "-norm"),
                    (args.cql_weight > 0, "-cql"), (args.cql_target_gap is not None, "gap")):
        tags += tag if on else ""
    return "corro" + tags


# Flags a --resume may not change: they decide what the encoder and SAC stages learn (lengths and logging may change).
RESUME_FIXED = ("n_negatives", "infonce_batch", "temperature", "reward_std", "relabel_queries", "encoder_hidden",
                "normalize_inputs",
                "meta_batch", "batch_size", "gamma", "tau", "alpha", "cql_weight", "cql_samples", "cql_target_gap",
                "context_relabel", "rl_relabel", "oracle_z")


def make_nets(obs_dim, act_dim, args, device):
    nets = {"e1": TransitionEncoder(obs_dim, act_dim, args.encoder_hidden, args.latent_dim),
            "e2": AttentionAggregator(args.latent_dim),
            "cvae": CVAE(obs_dim, act_dim, args.cvae_hidden, args.cvae_latent),
            "qf": TwinQ(obs_dim + args.latent_dim + act_dim, args.hidden),
            "pi": TanhGaussianPolicy(obs_dim + args.latent_dim, args.hidden, act_dim)}
    nets["qf_targ"] = TwinQ(obs_dim + args.latent_dim + act_dim, args.hidden)
    nets["qf_targ"].load_state_dict(nets["qf"].state_dict())
    nets = {k: v.to(device) for k, v in nets.items()}
    opts = {"e1": torch.optim.Adam(nets["e1"].parameters(), lr=args.encoder_lr),
            "e2": torch.optim.Adam(nets["e2"].parameters(), lr=args.encoder_lr),
            "qf": torch.optim.Adam(nets["qf"].parameters(), lr=args.critic_lr),
            "pi": torch.optim.Adam(nets["pi"].parameters(), lr=args.actor_lr)}
    if args.cql_target_gap is not None:
        nets["cql_w"] = LagrangeWeight(args.cql_weight).to(device)
        opts["cql_w"] = torch.optim.Adam(nets["cql_w"].parameters(), lr=args.critic_lr)
    return nets, opts


def main(args: Args):
    args = resolve_args(args)
    family = make_family(args.env_id, args.preset)
    if family.discrete:
        raise SystemExit(f"corro.py supports continuous actions only; {args.env_id} is discrete")
    # the relabelling options need the family's reward as a function of (s, a, s')
    if (args.negatives == "relabel" or args.relabel_queries or args.context_relabel > 0 or args.rl_relabel > 0) \
            and (why := relabel_unsupported(family)):
        raise SystemExit(f"--negatives relabel / --relabel-queries / --context-relabel / --rl-relabel: {why}")
    run_dir = make_run_dir(args.env_id, "corro", args.seed, args.run_dir)
    check_fresh_run_dir(run_dir, args.resume)
    seed_everything(args.seed)
    device = pick_device(args.cuda)
    gen = torch.Generator(device=device).manual_seed(args.seed)

    # Test tasks' data serve only as evaluation contexts (and, with the official leak flag, as CVAE data).
    ds = ensure_dataset(args.env_id, args.preset, path=args.dataset, family=family)
    data = {"train": TaskData(ds, family.train_idx, device), "test": TaskData(ds, family.test_idx, device)}
    cvae_ids = np.union1d(family.train_idx, family.test_idx) if args.cvae_include_test_tasks else family.train_idx
    if args.rl_relabel > 0 and bool(ds.arrays["terminals"].any()):
        raise SystemExit(f"--rl-relabel needs a family without terminal states; the {args.env_id} data has terminals, "
                         "which belong to the task that collected them")
    behaviours = behaviour_policies(ds.path, family)
    nets, opts = make_nets(family.obs_dim, family.act_dim, args, device)

    stage, step, enc_step, train_time, wall_before, history = "cvae", 0, 0, 0.0, 0.0, []
    ckpt_path = Path(run_dir) / "checkpoint.pt"
    meta = {"method": "corro", "env_id": args.env_id, "preset": args.preset, "seed": args.seed, "obs_dim": family.obs_dim,
            "act_dim": family.act_dim, "latent_dim": args.latent_dim, "hidden": args.hidden, "negatives": args.negatives}
    if args.resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, expect=meta, map_location=device)
        # flags that change what the remaining stages learn must match the checkpoint's run (older checkpoints
        # predate some flags: they ran with the flag's default)
        base = Args()
        bad = [f"{k}={state['args'].get(k, getattr(base, k))!r} in the checkpoint, {getattr(args, k)!r} here"
               for k in RESUME_FIXED if state["args"].get(k, getattr(base, k)) != getattr(args, k)]
        if bad:
            raise ValueError(f"{ckpt_path}: incompatible checkpoint: " + "; ".join(bad))
        # checkpoints written before --normalize-inputs have no E1 statistics: the identity ones
        state["nets"]["e1"] = {"obs_mean": nets["e1"].obs_mean, "obs_std": nets["e1"].obs_std} | state["nets"]["e1"]
        for k, n in nets.items():
            n.load_state_dict(state["nets"][k])
        for k, o in opts.items():
            o.load_state_dict(state["opts"][k])
        stage, step, enc_step, train_time, history = state["stage"], state["step"], state["enc_step"], state["train_time"], state["history"]
        wall_before = state["wall_time"]
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed {ckpt_path}: stage {stage}, step {step}", flush=True)
    logger = Logger(run_dir, {**vars(args), "run_dir": str(run_dir)})
    print(f"CORRO on {args.env_id}/{args.preset}: {len(family.train_idx)} train / {len(family.test_idx)} test tasks, "
          f"negatives={args.negatives}, z dim {args.latent_dim}, SAC {args.hidden}x2, encoder steps {args.encoder_steps}, "
          f"SAC steps {args.total_steps}, OOD behaviours {sorted(behaviours)}", flush=True)
    t_start = time.time()

    def checkpoint():
        save_checkpoint(ckpt_path, {
            "meta": meta, "args": vars(args), "stage": stage, "step": step, "enc_step": enc_step,
            "train_time": train_time, "history": history, "wall_time": wall_before + time.time() - t_start,
            "nets": {k: n.state_dict() for k, n in nets.items()}, "opts": {k: o.state_dict() for k, o in opts.items()},
            "gen": gen.get_state(), "torch_rng": torch.get_rng_state()})

    # ALGO LOGIC: stage 1, the CVAE negatives generator (training tasks only unless the leak is asked for)
    if stage == "cvae":
        if args.normalize_inputs:  # E1's statistics, fixed before any training (restored with E1 on --resume)
            obs = data["train"].data["obs"][data["train"].valid]
            nets["e1"].obs_mean.copy_(obs.mean(0))
            nets["e1"].obs_std.copy_(obs.std(0).clamp_min(1e-6))
        if args.negatives == "cvae":
            cvae_data = data["train"] if not args.cvae_include_test_tasks else TaskData(ds, cvae_ids, device)
            fit_cvae(nets["cvae"], cvae_data, args, gen, logger)
        stage = "encoder"
        checkpoint()

    # ALGO LOGIC: stage 2, InfoNCE pre-training of E1 (then frozen)
    chance = math.log(1 + args.n_negatives)
    if stage == "encoder":
        t0, losses = time.time(), []
        while enc_step < args.encoder_steps:
            losses.append(encoder_update(nets["e1"], opts["e1"], data["train"], nets["cvae"], args, gen, family))
            enc_step += 1
            if enc_step % args.log_every == 0:
                logger.log_scalars(enc_step, {"encoder/infonce": float(np.mean(losses[-args.log_every:])),
                                              "encoder/chance": chance})
            if enc_step % 10_000 == 0 or enc_step == args.encoder_steps:
                print(f"encoder {enc_step}/{args.encoder_steps}: InfoNCE {np.mean(losses[-1000:]):.3f} "
                      f"(chance ln(1+N) = {chance:.3f}), {enc_step / max(time.time() - t0, 1e-9):.0f} updates/s", flush=True)
                checkpoint()
        stage = "sac"
        r2 = probe(nets, data["train"], data["test"], family, device, args.seed)
        history.append({"encoder_infonce": float(np.mean(losses[-1000:])) if losses else None, "probe_r2_after_encoder": r2})
        print(f"encoder done: linear probe R^2 (test episodes, untrained aggregator) {r2:.3f}", flush=True)
        checkpoint()

    # ALGO LOGIC: stage 3, offline SAC with the attention aggregator
    for p in nets["e1"].parameters():
        p.requires_grad_(False)
    res = None
    if step == 0:
        res = evaluate(step, nets, data, family, ds, behaviours, args, device, logger)
    train_rows = torch.arange(len(family.train_idx), device=device)
    z_table = oracle_z(family, data["train"].task_ids, args.latent_dim, device) if args.oracle_z else None  # per train task
    start_step, last = step, {}
    while step < args.total_steps:
        t0 = time.time()
        n_block = min(args.eval_every - step % args.eval_every, args.total_steps - step)
        for _ in range(n_block):
            tasks = train_rows[torch.randint(len(train_rows), (args.meta_batch,), device=device, generator=gen)]
            batch = data["train"].rows(tasks, args.batch_size, gen)
            if args.rl_relabel > 0:  # deviation: part of each task's RL rows are other tasks' states, this task's rewards
                batch = relabel_rl_batch(batch, tasks, data["train"], family, args.rl_relabel, gen)
            ctx, mask = data["train"].episodes(tasks, gen)  # one context episode per sampled task (duplicates differ)
            if args.context_relabel > 0:  # deviation: some contexts are other tasks' episodes with this task's rewards
                ctx, mask = relabel_contexts(ctx, mask, tasks, data["train"], family, args.context_relabel, gen)
            stats = sac_update(nets, opts, batch, ctx, mask, args, gen, None if z_table is None else z_table[tasks])
            step += 1
            if step % args.log_every == 0:
                last = stats
                logger.log_scalars(step, stats | {"perf/updates_per_s": (step - start_step) / max(train_time + time.time() - t0, 1e-9)})
            if step % args.print_every == 0:
                extra = {"Q": last.get("q/mean", float("nan"))}
                if history and "iid" in history[-1]:
                    extra |= {"test_iid": history[-1]["iid"], "test_ood_random": history[-1].get("ood_random", float("nan"))}
                print_progress(step, args.total_steps, t_start, extra, start_step)
        train_time += time.time() - t0
        if step % args.eval_every == 0 or step == args.total_steps:
            res = evaluate(step, nets, data, family, ds, behaviours, args, device, logger)
            history.append({"step": step, "probe_r2": res["probe_r2"]} |
                           {n: float(r.mean()) for (n, s), r in ((k, v) for k, v in res.items() if isinstance(k, tuple)) if s == "test"})
            print(f"eval step {step}: test " + " | ".join(f"{k} {v:.3f}" for k, v in history[-1].items() if k != "step")
                  + f" | train iid {res[('iid', 'train')].mean():.3f}", flush=True)
            checkpoint()

    if res is None:
        res = evaluate(step, nets, data, family, ds, behaviours, args, device, logger)
    ups = step / max(train_time, 1e-9)
    modes = {n: eval_entry(r, res[("iid", "train")] if n == "iid" else None)
             for (n, s), r in ((k, v) for k, v in res.items() if isinstance(k, tuple)) if s == "test"}
    write_summary(run_dir, method=variant_name(args), env_id=args.env_id, preset=args.preset, seed=args.seed,
                  total_steps=step, wall_time_s=wall_before + time.time() - t_start, updates_per_s=ups,
                  machine=machine_info(device), dataset=str(ds.path), eval=modes,
                  extra={"probe_r2": res["probe_r2"], "encoder": history[0] if history else None, "final": last,
                         "train_time_s": train_time, "best_iid_test": max((h.get("iid", -1e9) for h in history), default=None),
                         "settings": {k: getattr(args, k) for k in ("negatives", "normalize_inputs", "relabel_queries", "context_relabel",
                                                                     "rl_relabel", "oracle_z", "encoder_steps", "cvae_epochs", "hidden",
                                                                     "latent_dim", "meta_batch", "batch_size", "eval_draws")}})
    logger.close()
    print(f"done: {step} SAC updates, {ups:.1f} updates/s, summary in {run_dir}/summary.json", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
