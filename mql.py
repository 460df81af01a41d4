"""MQL: Meta-Q-Learning, offline by default, the paper's online loop with ``--online``.

Paper: Rasool Fakoor, Pratik Chaudhari, Stefano Soatto, Alexander J. Smola, "Meta-Q-Learning", ICLR 2020,
arXiv:1910.00125. Official code: github.com/amazon-research/meta-q-learning.

Method. TD3 whose actor and critics read a deterministic context: a GRU over the last H transitions (a, r, s) of
the current episode. Meta-training is plain multi-task TD3 on one pooled buffer of all training tasks (no task ids,
no inference loss, no meta-gradient). A new task is met zero-shot (the context alone, the paper's "TD3-context")
or after adaptation on a little data D_new of the new task that re-uses the meta-training buffer: a logistic
classifier tells D_new from D_meta, its odds give every meta-training transition an importance weight beta, and
the effective sample size (ESS) of the weights sets how far the adapted parameters may move from the meta-trained
ones.

Equations (transition x = (s, a, r, s', d), pre-context h = the H entries before it, next-context h'):
    c = GRU_pi(h), c^Q = GRU_Q(h)                                       separate GRUs for actor and critics
    a' = clip(pi_targ(s', h') + clip(N(0, sigma_p), -c_n, c_n), -1, 1)
    y  = r + gamma (1 - d) min_i Q_targ_i(s', a', h')                       (no gradient)
    L_Q  = mean_x w(x) [(Q_1(s, a, h) - y)^2 + (Q_2(s, a, h) - y)^2]  + lambda ||theta_Q  - theta_Q^meta||^2
    L_pi = -mean_x w(x) Q_1(s, pi(s, h), h)                           + lambda ||theta_pi - theta_pi^meta||^2
           (every policy_freq critic steps, then Polyak tau for both targets)
    meta-training: w = 1, lambda = 0, minibatches drawn uniformly from the pool of all training tasks.
    adaptation to a new task from D_new (one trajectory) and D_meta (the pool):
      f(x) = w_c . phi(x) + b_c,  phi = stopgrad GRU_pi(h) (or [s, GRU_pi(h)]);  D_new labelled -1, D_meta +1,
      fitted by  min 0.5 ||w_c||^2 + C sum_i log(1 + exp(-y_i f(x_i)))        (sklearn's L2 logistic regression)
      beta(x) = exp(-max(f(x), -beta_clip)), beta < 0.1 -> 0                   (~ p(new | x) / p(meta | x))
      ESS = (sum beta)^2 / (n sum beta^2),  lambda = 1 - ESS  (paper; ``--prox-mode const``: lambda = 0.1, the
      official commands)
      stage 1: n TD3 steps on D_new (w = 1, no prox); stage 2: m steps on D_meta minibatches with w = beta and
      the proximal term; fresh Adam(lr 1e-3); the adapted parameters are discarded after the evaluation.

Offline variant (default; spec §5.3): the pooled buffer is the union of the training tasks' offline datasets,
the collection loop is gone (``total_steps`` TD3 updates), the classifier's negatives come from each train task's
data, and D_new is one trajectory of the test task's offline data (mode A). ``--online`` runs the paper's loop:
random-action cold start, then per iteration ``num_tasks_sample`` exploration episodes with Gaussian noise and
one update per collected step until the pool holds ``min_buffer_size`` transitions, ``num_train_steps`` after.

Evaluation on the test tasks (every ``eval_every`` updates): ``zero_shot`` (meta-trained policy, own in-episode
history as context), mode ``A`` (adapted on one offline trajectory of the task) and mode ``B`` (the paper's
protocol: adapted on one deterministic episode of the meta-trained policy in the task); ``num_evals`` fresh
episodes each, deterministic actions. Train tasks: zero-shot only.

Deviations:
- gymnasium 1.x task families of ``common/envs.py`` (numpy point robots, gymnasium v5 MuJoCo) instead of rlkit's
  mujoco-py envs; tasks and splits from the chosen preset (PointRobot default: 40/10 semicircle goals, H = 20).
- Offline by default (no paper counterpart, spec §5.3). ``--bc-alpha`` adds TD3+BC's actor term (off by default;
  the squared error is averaged over action dimensions as in TD3+BC).
- Histories: a zero-padded window of H entries in training and evaluation, h'_t = h_{t+1}. The official code adds
  a dummy first entry (random action, r = 0) to pre-contexts and evaluates with unpadded (and for Ant/Humanoid
  200-long) windows; neither is kept (spec §2 allows it).
- The classifier is fitted by batched Newton steps in torch (same objective as sklearn's lbfgs, intercept
  unpenalised) instead of sklearn, all test tasks at once.
- Vectorised: all test tasks adapt at once with "ensemble" networks whose weights carry a leading task dimension
  (one ``baddbmm`` per layer, a hand-written GRU cell with nn.GRU's gate layout and init); one Adam over the stacked
  weights equals one Adam per task because the loss is the sum of the per-task losses. Q1 and Q2 are likewise one
  2-member batched MLP over the critic's shared GRU context.
- The actor step evaluates Q_1 with the critic's parameters frozen (the official code lets the actor loss write
  gradients into the critic and clears them before the next critic step: same updates).
- Classifier negatives are drawn from each train task's whole data (offline) / all of its rows in the online pool,
  instead of the last ``snapshot_size`` transitions of a per-task FIFO.
- Online mode: the ``num_tasks_sample`` episodes of an iteration are collected in lockstep before the updates
  (official: updates, then collection); cold-start episodes are cut at horizon / 4 as in the official code;
  no learning-rate decay (off in every official command); the replay FIFO drops whole oldest episodes.
- ``--relabel F`` (offline, off by default; numpy families, whose reward is a function of s'): a share F of the
  meta-training rows gets the rewards of a random train task for the transition and both of its histories (the whole
  episode is relabelled), BOReL's reward relabelling applied to MQL's pool. Why: each task's offline episodes follow
  its own learner to its own goal, so a GRU can tell the task from the states alone, while at test time the agent's
  own early states are the same in every task and only the rewards differ.
- Train tasks are evaluated zero-shot only (adaptation is per test task and costs n + m TD3 steps).
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

from common.data import ensure_dataset, sample_context
from common.envs import canonical_env_id, default_preset, make_family, relabel_rewards
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
    total_steps: int | None = None
    """TD3 gradient steps of meta-training (default: per-env table)"""
    eval_every: int | None = None
    """gradient steps between evaluations/checkpoints (default: per-env table)"""
    cuda: bool = True
    """use cuda:0 when available"""
    resume: bool = False
    """continue the run in --run-dir from its checkpoint"""
    run_dir: str | None = None
    """run directory (default runs/{env}__mql__s{seed}__{time})"""
    bf16: bool = False
    """autocast the TD3 updates' matmuls to bfloat16 (weights, optimiser and Q targets stay fp32)"""
    online: bool = False
    """the paper's online meta-training (exploration episodes on the train tasks) instead of the offline dataset"""

    # TD3 with GRU context (official run_script.py columns; None = per-env table ENV_OVERRIDES)
    lr: float | None = None
    """Adam learning rate of actor and critic (meta-training)"""
    policy_freq: int | None = None
    """critic steps per actor step and Polyak update (TD3's delay)"""
    policy_noise: float | None = None
    """std sigma_p of the target-policy smoothing noise"""
    noise_clip: float = 0.5
    """clip c_n of the target-policy smoothing noise"""
    expl_noise: float | None = None
    """online: std of the Gaussian exploration noise (also the cold start's history dummy, unused offline)"""
    history_length: int | None = None
    """H, transitions (a, r, s) in the GRU context window"""
    ctx_dim: int | None = None
    """hidden size of each GRU (the context dimension)"""
    net_size: int = 300
    """width of the two hidden layers of the actor and of each critic"""
    batch_size: int = 256
    """minibatch of meta-training (transitions from the pool of all train tasks)"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """Polyak rate of the target actor and critic"""
    bc_alpha: float = 0.0
    """offline option: TD3+BC actor term with this alpha (2.5 in TD3+BC); 0 = MQL's plain TD3"""
    relabel: float = 0.0
    """offline deviation: share of meta-training rows whose episode (the transition and its histories) gets the
    rewards of a random train task, so that only rewards identify the task (numpy families; 0 = off)"""

    # adaptation (paper Sec. 3, official ``adapt``)
    adapt: bool = True
    """evaluate after adaptation (modes A and B) as well as zero-shot"""
    adapt_every: int | None = None
    """gradient steps between evaluations with adaptation (each costs ~2 x m steps on sample_mult x larger batches
    per test task; not at step 0); default: every evaluation. The final evaluation always adapts (with --adapt)"""
    snap_iter_nums: int | None = None
    """n, stage-1 TD3 steps on D_new alone"""
    main_snap_iter_nums: int | None = None
    """m, stage-2 TD3 steps on propensity-weighted D_meta minibatches with the proximal term"""
    sample_mult: int | None = None
    """stage-2 minibatch = sample_mult * batch_size"""
    beta_clip: float | None = None
    """f is clamped below at -beta_clip, so beta <= exp(beta_clip)"""
    lam_csc: float | None = None
    """C of the logistic regression (sklearn semantics: weight of the summed log-loss; smaller = stronger L2)"""
    beta_obs_cxt: bool | None = None
    """classifier features [s, GRU_pi(h)] instead of GRU_pi(h) (enable_beta_obs_cxt)"""
    prox_mode: Literal["ess", "const"] = "ess"
    """proximal weight lambda: 1 - ESS per minibatch (paper) or the constant --prox-coef (official commands)"""
    prox_coef: float = 0.1
    """lambda in const mode, and the fallback when 1 - ESS is not positive/finite"""
    adapt_lr: float = 1e-3
    """Adam learning rate of adaptation (official: Adam's default, fresh moments)"""

    # evaluation
    num_evals: int | None = None
    """episodes per test task after adaptation (and zero-shot)"""
    n_train_eval_tasks: int = 10
    """train tasks evaluated zero-shot (first n of the split), for comparison"""
    log_every: int = 100
    """gradient steps between train.csv scalars"""
    print_every: int = 1000
    """gradient steps between progress lines"""

    # online collection (official main.py; None = per-env table)
    num_initial_steps: int | None = None
    """online: random-action steps per train task before training (at least --burn-in in all)"""
    burn_in: int = 10_000
    """online: minimum random-action steps of the cold start"""
    num_tasks_sample: int | None = None
    """online: exploration episodes per iteration (first on the iteration's task, the rest on random train tasks)"""
    num_train_steps: int | None = None
    """online: updates per iteration once the pool holds --min-buffer-size transitions (before: one per env step)"""
    min_buffer_size: int = 100_000
    """online: pool size from which num_train_steps updates run per iteration"""
    replay_size: int = 1_000_000
    """online: FIFO capacity of the pooled replay (whole oldest episodes are dropped)"""


# Official run_script.py columns (spec §3); PAPER_DEFAULTS is the cheetah-vel column plus the offline schedule of
# spec §5.3 (500k updates, evaluation every 5k). PointRobot: the spec's CPU check (§9).
PAPER_DEFAULTS = dict(lr=1e-3, policy_freq=2, expl_noise=0.3, policy_noise=0.3, history_length=20, ctx_dim=15,
                      snap_iter_nums=10, main_snap_iter_nums=100, sample_mult=5, beta_clip=1.0, lam_csc=0.1,
                      beta_obs_cxt=False, num_evals=2, num_initial_steps=500, num_tasks_sample=1, num_train_steps=200,
                      total_steps=500_000, eval_every=5_000)
ENV_OVERRIDES = {
    "PointRobot": dict(history_length=10, ctx_dim=15, num_tasks_sample=5, num_initial_steps=200,
                       total_steps=40_000, eval_every=5_000),
    "HalfCheetahVel": dict(),
    "HalfCheetahDir": dict(lr=3e-4, num_train_steps=500, num_initial_steps=1000, beta_clip=1.5, lam_csc=0.5,
                           main_snap_iter_nums=50, sample_mult=10, num_evals=4),
    "AntDir": dict(lr=3e-4, policy_freq=4, expl_noise=0.2, policy_noise=0.4, history_length=25, ctx_dim=30,
                   num_train_steps=1000, num_tasks_sample=5, num_initial_steps=1500, beta_clip=1.2, lam_csc=0.05,
                   snap_iter_nums=5, main_snap_iter_nums=400, num_evals=4),
    "AntGoal": dict(lr=4e-4, policy_freq=4, history_length=40, ctx_dim=40, num_tasks_sample=5,
                    num_initial_steps=1500, beta_clip=2.0, beta_obs_cxt=True, main_snap_iter_nums=150, sample_mult=1),
    "HumanoidDir": dict(lr=3e-4, policy_freq=3, expl_noise=0.2, history_length=15, ctx_dim=20, num_train_steps=500,
                        num_initial_steps=1000, beta_clip=2.0, beta_obs_cxt=True, snap_iter_nums=5,
                        main_snap_iter_nums=15),
    "WalkerRandParams": dict(lr=8e-4, policy_freq=3, expl_noise=0.2, policy_noise=0.2, history_length=10,
                             ctx_dim=30, num_tasks_sample=5, num_initial_steps=2000, beta_clip=1.1, lam_csc=0.06,
                             beta_obs_cxt=True, main_snap_iter_nums=400),
}


def paper_column(env_id: str) -> dict:
    """The env's column of the official commands: PAPER_DEFAULTS with its ENV_OVERRIDES."""
    return {**PAPER_DEFAULTS, **ENV_OVERRIDES.get(canonical_env_id(env_id), {})}


def resolve_args(args: Args) -> Args:
    """Fill every None hyperparameter from the env's column of the official commands."""
    env = canonical_env_id(args.env_id)
    table = paper_column(env)
    filled = {k: table[k] for k in table if getattr(args, k) is None}
    return dataclasses.replace(args, env_id=env, preset=args.preset or default_preset(env), **filled)


# ---------------------------------------------------------------------------------------------
# Networks with a leading "member" dimension E: E = 1 at meta-training, E = number of test tasks at adaptation
# ---------------------------------------------------------------------------------------------


class ELinear(nn.Module):
    """E independent linear layers: x (E, B, in) -> (E, B, out). nn.Linear's default init per member."""

    def __init__(self, E, in_dim, out_dim):
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(E, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(E, 1, out_dim).uniform_(-bound, bound))

    def forward(self, x):
        return torch.baddbmm(self.bias, x, self.weight)


class EGRU(nn.Module):
    """E independent one-layer GRUs with nn.GRU's equations, gate order (r, z, n) and init, h0 = 0; returns the
    final hidden state. Weights are stored transposed: weight_ih[e] = nn.GRU's weight_ih_l0.T.
        r = sigmoid(W_ir x + b_ir + W_hr h + b_hr),  z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r * (W_hn h + b_hn)),  h <- (1 - z) * n + z * h"""

    def __init__(self, E, in_dim, hidden):
        super().__init__()
        self.hidden = hidden
        bound = 1.0 / math.sqrt(hidden)
        self.weight_ih = nn.Parameter(torch.empty(E, in_dim, 3 * hidden).uniform_(-bound, bound))
        self.weight_hh = nn.Parameter(torch.empty(E, hidden, 3 * hidden).uniform_(-bound, bound))
        self.bias_ih = nn.Parameter(torch.empty(E, 1, 3 * hidden).uniform_(-bound, bound))
        self.bias_hh = nn.Parameter(torch.empty(E, 1, 3 * hidden).uniform_(-bound, bound))

    def forward(self, x):
        """x (E, B, H, in) -> (E, B, hidden)."""
        E, B, H, _ = x.shape
        gi = torch.baddbmm(self.bias_ih, x.reshape(E, B * H, -1), self.weight_ih).view(E, B, H, 3 * self.hidden)
        h = x.new_zeros(E, B, self.hidden)
        for t in range(H):  # the input projections of all steps are done above; only h @ W_hh is sequential
            gh = torch.baddbmm(self.bias_hh, h, self.weight_hh)
            i_r, i_z, i_n = gi[:, :, t].chunk(3, dim=-1)
            h_r, h_z, h_n = gh.chunk(3, dim=-1)
            r = torch.sigmoid(i_r + h_r)
            z = torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            h = n + z * (h - n)
        return h


class Actor(nn.Module):
    """pi(s, h) = tanh(MLP([s, GRU_pi(h)])), MLP 300-300 with ReLU (official ``Actor`` + ``Context``)."""

    def __init__(self, E, obs_dim, act_dim, ctx_dim, hidden):
        super().__init__()
        self.gru = EGRU(E, act_dim + 1 + obs_dim, ctx_dim)
        self.l1, self.l2 = ELinear(E, obs_dim + ctx_dim, hidden), ELinear(E, hidden, hidden)
        self.l3 = ELinear(E, hidden, act_dim)

    def context(self, hist):
        return self.gru(hist)

    def forward(self, obs, hist):
        """obs (E, B, S), hist (E, B, H, A+1+S) -> actions (E, B, A) in [-1, 1]."""
        x = torch.cat([obs, self.gru(hist).to(obs.dtype)], -1)
        x = F.relu(self.l1(x))
        x = F.relu(self.l2(x))
        return torch.tanh(self.l3(x))


class Critic(nn.Module):
    """Q1, Q2 on [s, a, GRU_Q(h)]: one GRU shared by both heads, the heads as one 2-member batched MLP 300-300."""

    def __init__(self, E, obs_dim, act_dim, ctx_dim, hidden):
        super().__init__()
        self.gru = EGRU(E, act_dim + 1 + obs_dim, ctx_dim)
        # member 2e + k is head k of ensemble member e (task-major, so the weights of member e are contiguous)
        self.l1 = ELinear(2 * E, obs_dim + act_dim + ctx_dim, hidden)
        self.l2, self.l3 = ELinear(2 * E, hidden, hidden), ELinear(2 * E, hidden, 1)

    def forward(self, obs, act, hist):
        """obs (E, B, S), act (E, B, A), hist (E, B, H, A+1+S) -> (E, 2, B) (Q1 and Q2)."""
        x = torch.cat([obs, act, self.gru(hist).to(obs.dtype)], -1)
        E, B, D = x.shape
        x = x[:, None].expand(E, 2, B, D).reshape(2 * E, B, D)
        x = F.relu(self.l1(x))
        x = F.relu(self.l2(x))
        return self.l3(x).view(E, 2, B)


def make_nets(obs_dim, act_dim, args, device):
    actor = Actor(1, obs_dim, act_dim, args.ctx_dim, args.net_size).to(device)
    critic = Critic(1, obs_dim, act_dim, args.ctx_dim, args.net_size).to(device)
    nets = {"actor": actor, "critic": critic, "actor_targ": copy.deepcopy(actor), "critic_targ": copy.deepcopy(critic)}
    for k in ("actor_targ", "critic_targ"):
        nets[k].requires_grad_(False)
    return nets


def make_opts(nets, lr):
    return {k: torch.optim.Adam(nets[k].parameters(), lr=lr) for k in ("actor", "critic")}


def replicate(module, E: int):
    """A copy of an E = 1 network with its weights repeated for E members (task-major for the twin heads)."""
    new = copy.deepcopy(module)
    for p in new.parameters():
        p.data = p.data.repeat(E, *([1] * (p.dim() - 1)))
    return new


# ---------------------------------------------------------------------------------------------
# Transitions in episode order, histories gathered by index
# ---------------------------------------------------------------------------------------------


class Transitions:
    """Rows in episode order on the device (the pooled D_meta, or the D_new of every test task). ``step`` is a row's
    index in its episode and ``task`` its task row, so histories are gathered by index (no stored windows)."""

    FIELDS = ("obs", "actions", "rewards", "next_obs", "terminals", "step", "task")

    def __init__(self, obs, actions, rewards, next_obs, terminals, step, task):
        self.data = dict(obs=obs, actions=actions, rewards=rewards, next_obs=next_obs, terminals=terminals, step=step,
                         task=task)
        self.n = len(obs)
        self._refresh()

    def _refresh(self):
        d = {k: v[: self.n] for k, v in self.data.items()}
        self.__dict__.update(d)
        # history entry of a row: (a, r, s), the action taken in s and the reward it got (official order)
        self.feat = torch.cat([d["actions"], d["rewards"][:, None], d["obs"]], -1)

    def add(self, fields: dict, max_size: int | None = None):
        """Append rows (online); whole episodes only. Beyond ``max_size`` the oldest whole episodes are dropped."""
        m = len(fields["obs"])
        if self.n + m > len(self.data["obs"]):
            cap = max(2 * len(self.data["obs"]), self.n + m)
            self.data = {k: torch.cat([v[: self.n], v.new_zeros((cap - self.n, *v.shape[1:]))]) for k, v in self.data.items()}
        for k, v in fields.items():
            self.data[k][self.n: self.n + m] = v
        self.n += m
        if max_size is not None and self.n > max_size:
            starts = torch.nonzero(self.data["step"][: self.n] == 0).flatten()
            cut = int(starts[starts >= self.n - max_size][0]) if (starts >= self.n - max_size).any() else 0
            self.data = {k: torch.cat([v[cut: self.n], v[self.n:], v[:cut]]) for k, v in self.data.items()}
            self.n -= cut
        self._refresh()

    def histories(self, idx, H: int, relabel_task=None, reward_table=None):
        """Pre-contexts h_t (entries of steps t-H .. t-1) and next-contexts h'_t = h_{t+1} (steps t-H+1 .. t) of the
        rows ``idx`` (any shape) -> two (*idx.shape, H, A+1+S) tensors, zero where the window reaches before the
        episode start. ``relabel_task`` (idx.shape, -1 = keep): the entries' rewards come from
        ``reward_table[task, row]`` instead (the same task for the whole window)."""
        offs = torch.arange(-H, 0, device=idx.device)
        t = self.step[idx][..., None]
        out = []
        for shift in (0, 1):
            rows = (idx[..., None] + offs + shift).clamp(min=0)
            valid = ((t + shift + offs) >= 0)[..., None]
            h = self.feat[rows]
            if relabel_task is not None:
                a = self.actions.shape[1]
                task = relabel_task[..., None].expand_as(rows)
                r = torch.where(task >= 0, reward_table[task.clamp(min=0), rows], h[..., a])
                h = torch.cat([h[..., :a], r[..., None], h[..., a + 1:]], -1)
            out.append(h * valid)
        return out[0], out[1]

    def batch(self, idx, H: int, relabel_task=None, reward_table=None) -> dict:
        """The transitions at rows idx (E, B) with their histories (optionally relabelled, see ``histories``)."""
        h, h2 = self.histories(idx, H, relabel_task, reward_table)
        b = {k: getattr(self, k)[idx] for k in ("obs", "actions", "rewards", "next_obs", "terminals")}
        if relabel_task is not None:
            b["rewards"] = torch.where(relabel_task >= 0, reward_table[relabel_task.clamp(min=0), idx], b["rewards"])
        return b | {"hist": h, "next_hist": h2}

    def task_index(self, n_tasks: int):
        """(order, ptr): rows of task k are order[ptr[k]:ptr[k+1]]."""
        order = torch.argsort(self.task, stable=True)
        ptr = torch.zeros(n_tasks + 1, dtype=torch.int64, device=order.device)
        ptr[1:] = torch.cumsum(torch.bincount(self.task, minlength=n_tasks), 0)
        return order, ptr

    def state_dict(self):
        return {"data": {k: v[: self.n].clone() for k, v in self.data.items()}}

    @classmethod
    def from_state_dict(cls, s):
        return cls(**s["data"])


def transitions_from_arrays(arrays: dict, task, device) -> Transitions:
    """numpy rows in episode order (dataset layout) -> Transitions."""
    f32 = lambda k: torch.as_tensor(np.asarray(arrays[k], np.float32), device=device)  # noqa: E731
    return Transitions(f32("obs"), f32("actions"), f32("rewards"), f32("next_obs"), f32("terminals"),
                       torch.as_tensor(np.asarray(arrays["step"], np.int64), device=device),
                       torch.as_tensor(np.asarray(task, np.int64), device=device))


def sample_task_rows(order, ptr, tasks, n: int, generator=None):
    """n rows drawn uniformly (with replacement) from each listed task: tasks (...,) -> (..., n)."""
    u = torch.rand(*tasks.shape, n, device=order.device, generator=generator, dtype=torch.float64)
    lo, cnt = ptr[tasks][..., None], (ptr[tasks + 1] - ptr[tasks])[..., None]
    return order[lo + (u * cnt).long()]


# ---------------------------------------------------------------------------------------------
# TD3 step (meta-training: E = 1, w = 1; adaptation: E = tasks, w = beta, proximal term)
# ---------------------------------------------------------------------------------------------


def weighted_mean(x, w):
    """mean over the batch of w * x per member: x, w (E, B) -> (E,)."""
    return (x if w is None else w * x).mean(dim=1)


def actor_loss(q1, pi, a, bc_alpha: float, w=None):
    """TD3's -Q(s, pi(s)) summed over members; with bc_alpha > 0 TD3+BC's -lambda Q + mean_j (pi_j - a_j)^2,
    lambda = alpha / mean|Q| (per member, no gradient). The squared error is averaged over action dimensions, as
    TD3+BC's F.mse_loss, so alpha means the same for every action size. q1 (E, B), pi and a (E, B, act_dim)."""
    if bc_alpha <= 0:
        return -weighted_mean(q1, w).sum()
    lam = bc_alpha / q1.abs().mean(1).detach().clamp(min=1e-6)
    return (-lam * weighted_mean(q1, w) + weighted_mean((pi - a).pow(2).mean(-1), w)).sum()


def proximal(module, anchor, E: int):
    """||theta_e - theta_e^meta||^2 summed over every tensor of the module (GRU included) -> (E,)."""
    total = 0.0
    for p, p0 in zip(module.parameters(), anchor):
        total = total + (p - p0).pow(2).reshape(E, -1).sum(1)
    return total


def critic_target(nets, batch, args, generator=None):
    """y = r + gamma (1 - d) min_i Q_targ_i(s', a', h') with the smoothed target action a' (no gradient)."""
    with torch.no_grad():
        nobs, h2 = batch["next_obs"], batch["next_hist"]
        noise = torch.randn(batch["actions"].shape, device=nobs.device, generator=generator) * args.policy_noise
        a2 = (nets["actor_targ"](nobs, h2) + noise.clamp(-args.noise_clip, args.noise_clip)).clamp(-1.0, 1.0)
        q_next = nets["critic_targ"](nobs, a2, h2).float().min(dim=1).values  # (E, B)
        return batch["rewards"] + args.gamma * (1.0 - batch["terminals"]) * q_next


def td3_update(nets, opts, batch, args, it: int, generator=None, w=None, lam=None, anchor=None):
    """One TD3 step on batch (E, B, ...) for every member. w (E, B): per-transition weights; lam (E,) with anchor:
    the proximal term. The loss is the sum of the per-member losses, so members learn independently."""
    actor, critic = nets["actor"], nets["critic"]
    E = batch["obs"].shape[0]
    autocast = torch.autocast(batch["obs"].device.type, dtype=torch.bfloat16, enabled=args.bf16)
    y = critic_target(nets, batch, args, generator)
    with autocast:
        q = critic(batch["obs"], batch["actions"], batch["hist"]).float()  # (E, 2, B)
    per_x = (q - y[:, None]).pow(2).sum(1)  # (Q1 - y)^2 + (Q2 - y)^2, no 1/2 (official)
    loss_q = weighted_mean(per_x, w).sum()
    if lam is not None:
        loss_q = loss_q + (lam * proximal(critic, anchor["critic"], E)).sum()
    opts["critic"].zero_grad(set_to_none=True)
    loss_q.backward()
    opts["critic"].step()
    stats = {"loss/q": loss_q.detach(), "q/mean": q.detach().mean(), "q/target_mean": y.mean()}

    if it % args.policy_freq == 0:
        critic.requires_grad_(False)  # the actor step moves the actor only
        with autocast:
            pi = actor(batch["obs"], batch["hist"])
            q1 = critic(batch["obs"], pi, batch["hist"])[:, 0].float()  # (E, B)
        loss_pi = actor_loss(q1, pi.float(), batch["actions"], args.bc_alpha, w)
        if lam is not None:
            loss_pi = loss_pi + (lam * proximal(actor, anchor["actor"], E)).sum()
        critic.requires_grad_(True)
        opts["actor"].zero_grad(set_to_none=True)
        loss_pi.backward()
        opts["actor"].step()
        with torch.no_grad():
            for k in ("actor", "critic"):
                for p, tp in zip(nets[k].parameters(), nets[k + "_targ"].parameters()):
                    tp.lerp_(p, args.tau)
        stats["loss/pi"] = loss_pi.detach()
    return stats


# ---------------------------------------------------------------------------------------------
# Adaptation: propensity classifier, ESS, stage 1 on D_new, stage 2 on weighted D_meta with the proximal term
# ---------------------------------------------------------------------------------------------


def fit_logistic(X, y, C: float, mask=None, iters: int = 30):
    """Batched L2 logistic regression, sklearn's objective min 0.5 ||w||^2 + C sum_i m_i log(1 + exp(-y_i f(x_i))),
    f = w.x + b with the intercept unpenalised, by damped Newton steps. X (T, n, d), y (T, n) in {-1, +1},
    mask (T, n) of 0/1 (padding). Returns w (T, d), b (T,)."""
    X = torch.cat([X, torch.ones_like(X[..., :1])], -1).double()
    y = y.double()
    m = torch.ones_like(y) if mask is None else mask.double()
    T, n, d1 = X.shape
    reg = torch.ones(d1, dtype=X.dtype, device=X.device)
    reg[-1] = 0.0
    eye = torch.eye(d1, dtype=X.dtype, device=X.device)

    def objective(theta):  # (T, k, d1) -> (T, k)
        f = torch.einsum("tnd,tkd->tkn", X, theta)
        return 0.5 * (reg * theta.pow(2)).sum(-1) + C * (m[:, None] * F.softplus(-y[:, None] * f)).sum(-1)

    theta = torch.zeros(T, d1, dtype=X.dtype, device=X.device)
    steps = 0.5 ** torch.arange(8, dtype=X.dtype, device=X.device)  # backtracking: take the best of 8 step sizes
    for _ in range(iters):
        f = (X @ theta[..., None])[..., 0]
        grad = reg * theta - C * (X * (m * y * torch.sigmoid(-y * f))[..., None]).sum(1)
        s = m * torch.sigmoid(f) * torch.sigmoid(-f)
        hess = torch.diag(reg) + C * torch.einsum("tn,tnd,tne->tde", s, X, X) + 1e-9 * eye
        delta = torch.linalg.solve(hess, grad[..., None])[..., 0]
        cand = theta[:, None] - steps[None, :, None] * delta[:, None]  # (T, 8, d1)
        cand = torch.cat([theta[:, None], cand], 1)  # step 0 keeps a converged theta
        best = objective(cand).argmin(1)
        theta = cand[torch.arange(T, device=X.device), best]
    return theta[:, :-1].float(), theta[:, -1].float()


def propensity(f, beta_clip: float):
    """beta = exp(-max(f, -beta_clip)), zero below 0.1 (official ``get_propensity``; f is the 'meta' logit)."""
    beta = torch.exp(-f.clamp(min=-beta_clip))
    return torch.where(beta < 0.1, torch.zeros_like(beta), beta)


def effective_sample_size(beta):
    """Normalised ESS = (sum beta)^2 / (n sum beta^2) per row of beta (E, n) -> (E,), in [0, 1] (0 if all zero)."""
    n = beta.shape[-1]
    return beta.sum(-1).pow(2) / (n * beta.pow(2).sum(-1)).clamp(min=1e-12)


def classifier_features(actor, obs, hist, with_obs: bool):
    phi = actor.context(hist)
    return torch.cat([obs, phi], -1) if with_obs else phi


def adapt(meta_nets, d_new: Transitions, n_tasks: int, pool: Transitions, pool_index, n_train: int, args,
          generator=None):
    """Adapt the meta-trained networks to each of the n_tasks tasks of d_new at once (official ``adapt``).
    Returns the adapted actor (E = n_tasks) and per-task statistics."""
    T, H, dev = n_tasks, args.history_length, pool.obs.device
    nets = {k: replicate(v, T) for k, v in meta_nets.items()}
    anchor = {k: [p.detach().clone() for p in nets[k].parameters()] for k in ("actor", "critic")}
    opts = make_opts(nets, args.adapt_lr)  # fresh Adam, default lr (official)
    new_order, new_ptr = d_new.task_index(T)
    new_len = new_ptr[1:] - new_ptr[:-1]
    L = int(new_len.max())

    # ALGO LOGIC: propensity classifier, D_new (-1) against floor(|D_new| / n_train) + 2 rows of every train task (+1)
    with torch.no_grad():
        slot = torch.arange(L, device=dev)
        pos_mask = (slot[None] < new_len[:, None]).float()  # (T, L): shorter trajectories are padded
        pos_idx = new_order[(new_ptr[:-1, None] + slot[None]).clamp(max=d_new.n - 1)]
        pos_h, _ = d_new.histories(pos_idx, H)
        phi_pos = classifier_features(nets["actor"], d_new.obs[pos_idx], pos_h, args.beta_obs_cxt)
        k_neg = L // n_train + 2
        order, ptr = pool_index
        train_rows = torch.arange(n_train, device=dev)[None].expand(T, -1)
        neg_idx = sample_task_rows(order, ptr, train_rows, k_neg, generator).reshape(T, -1)  # (T, n_train * k)
        neg_h, _ = pool.histories(neg_idx, H)
        phi_neg = classifier_features(nets["actor"], pool.obs[neg_idx], neg_h, args.beta_obs_cxt)
        X = torch.cat([phi_pos, phi_neg], 1)
        y = torch.cat([-torch.ones_like(pos_mask), torch.ones(T, neg_idx.shape[1], device=dev)], 1)
        mask = torch.cat([pos_mask, torch.ones(T, neg_idx.shape[1], device=dev)], 1)
        w_c, b_c = fit_logistic(X, y, args.lam_csc, mask)
        f_train = (X * w_c[:, None]).sum(-1) + b_c[:, None]
        acc = (((f_train > 0).float() * 2 - 1 == y).float() * mask).sum(1) / mask.sum(1)

    # ALGO LOGIC: stage 1, n TD3 steps on D_new alone (batch |D_new| with replacement, w = 1, no proximal term)
    for it in range(args.snap_iter_nums):
        u = torch.rand(T, L, device=dev, generator=generator, dtype=torch.float64)
        idx = new_order[new_ptr[:-1, None] + (u * new_len[:, None]).long()]
        td3_update(nets, opts, d_new.batch(idx, H), args, it, generator)

    # ALGO LOGIC: stage 2, m TD3 steps on D_meta minibatches weighted by beta (features of the current actor GRU)
    ess_log, lam_log, beta_log = [], [], []
    for it in range(args.main_snap_iter_nums):
        idx = torch.randint(pool.n, (T, args.sample_mult * args.batch_size), device=dev, generator=generator)
        batch = pool.batch(idx, H)
        with torch.no_grad():
            phi = classifier_features(nets["actor"], batch["obs"], batch["hist"], args.beta_obs_cxt)
            beta = propensity((phi * w_c[:, None]).sum(-1) + b_c[:, None], args.beta_clip)
            ess = effective_sample_size(beta)
            if args.prox_mode == "ess":
                lam = 1.0 - ess
                lam = torch.where(torch.isfinite(lam) & (lam > 1e-7), lam, torch.full_like(lam, args.prox_coef))
            else:
                lam = torch.full((T,), args.prox_coef, device=dev)
        td3_update(nets, opts, batch, args, it, generator, w=beta, lam=lam, anchor=anchor)
        ess_log.append(ess)
        lam_log.append(lam)
        beta_log.append(beta.mean(1))
    mean = lambda xs: torch.stack(xs).mean(0) if xs else torch.full((T,), float("nan"), device=dev)  # noqa: E731
    stats = {"ess": mean(ess_log), "lambda": mean(lam_log), "beta_mean": mean(beta_log), "clf_acc": acc}
    return nets["actor"], stats


# ---------------------------------------------------------------------------------------------
# Rollouts (all tasks in one batched env; actor members = 1 shared or one per task)
# ---------------------------------------------------------------------------------------------


def rollout(actor, family, task_ids, n_per_task: int, n_episodes: int, H: int, seed: int, device, noise: float = 0.0,
            generator=None, record: bool = False, horizon: int | None = None, np_rng=None, task_labels=None):
    """Episodes with the running in-episode history (zero-padded window of H entries) as context, reset at every
    episode; ``actor=None`` takes uniform random actions from ``np_rng``, ``horizon`` cuts the episodes (time-outs).
    Returns returns [envs, episodes], successes, and (record, one episode) the transitions of the envs as a
    Transitions (task = task_labels[the env's index in task_ids], default the index itself; alive steps only)."""
    if record and n_episodes != 1:
        raise ValueError("rollout(record=True) records one episode")
    venv = family.make_vec_env(task_ids, n_per_task, seed=seed)
    if horizon is not None:
        venv.horizon = min(horizon, venv.horizon)  # the batched envs truncate at their own ``horizon``
    B = venv.num_envs
    E = 1 if actor is None else len(actor.l1.weight)
    obs_dim, act_dim = family.obs_dim, family.act_dim
    hist = torch.zeros(B, H, act_dim + 1 + obs_dim, device=device)
    rec = []

    def act(obs, ep, t):
        if t == 0:
            hist.zero_()
        if actor is None:
            return np_rng.uniform(-1.0, 1.0, (B, act_dim)).astype(np.float32)
        o = torch.as_tensor(obs, dtype=torch.float32, device=device)
        with torch.no_grad():
            a = actor(o.view(E, B // E, -1), hist.view(E, B // E, H, -1)).view(B, -1)
            if noise > 0:
                a = (a + noise * torch.randn(a.shape, device=device, generator=generator)).clamp(-1.0, 1.0)
        return a.cpu().numpy()

    def observe(obs, a, r, nobs, term, trunc, info, alive):
        entry = torch.as_tensor(np.concatenate([a, np.asarray(r, np.float32)[:, None], obs], -1), dtype=torch.float32,
                                device=device)
        hist.copy_(torch.cat([hist[:, 1:], entry[:, None]], 1))
        if record:
            rec.append((obs, a, r, nobs, term, alive))

    ret, succ = run_episodes(venv, act, n_episodes, observe=observe)
    if not record:
        return ret, succ, None
    fields = {k: [] for k in ("obs", "actions", "rewards", "next_obs", "terminals", "step", "task")}
    for b in range(B):  # regroup the lockstep steps per env, alive steps only (record: one episode)
        chunk = [s for s in rec if s[5][b]]
        for k, j in (("obs", 0), ("actions", 1), ("rewards", 2), ("next_obs", 3), ("terminals", 4)):
            fields[k] += [s[j][b] for s in chunk]
        fields["step"] += list(range(len(chunk)))
        fields["task"] += [b // n_per_task if task_labels is None else task_labels[b // n_per_task]] * len(chunk)
    arrays = {k: np.asarray(v, np.float32) for k, v in fields.items()}
    return ret, succ, transitions_from_arrays(arrays, fields["task"], device)


def evaluate(step, nets, ds, pool, family, args, device, logger, adapt_now=True):
    """Zero-shot, mode A (adapted on an offline trajectory) and mode B (adapted on the meta-policy's own episode)
    on the test tasks; zero-shot on the first n_train_eval_tasks train tasks. Logs metrics.csv rows."""
    seed = 10_000 * args.seed + step % 9973
    gen = torch.Generator(device=device).manual_seed(seed)
    test_ids, n_ev, H = family.test_idx, args.num_evals, args.history_length
    n_train = len(family.train_idx)
    res, stats = {}, {}
    zs, succ, _ = rollout(nets["actor"], family, test_ids, n_ev, 1, H, seed, device)
    res["zero_shot"] = per_task_mean(zs[:, 0], n_ev)
    logger.log_eval(step, "zero_shot", "test", test_ids, res["zero_shot"], per_task_mean(succ[:, 0], n_ev) > 0.5)
    train_ids = family.train_idx[: args.n_train_eval_tasks]
    tr, tr_succ, _ = rollout(nets["actor"], family, train_ids, n_ev, 1, H, seed, device)
    res["zero_shot_train"] = per_task_mean(tr[:, 0], n_ev)
    logger.log_eval(step, "zero_shot", "train", train_ids, res["zero_shot_train"], per_task_mean(tr_succ[:, 0], n_ev) > 0.5)
    if args.adapt and adapt_now:
        pool_index = pool.task_index(n_train)  # classifier negatives per train task, shared by modes A and B
        # mode A: D_new = one trajectory of each test task's offline data (seeded draw)
        c = sample_context(ds, test_ids, kind="trajectory", seed=seed)
        keep = c["mask"].reshape(-1) > 0
        arrays = {k: c[k].reshape(-1, *c[k].shape[2:])[keep] for k in ("obs", "actions", "rewards", "next_obs",
                                                                        "terminals", "step")}
        task = np.repeat(np.arange(len(test_ids)), c["mask"].shape[1])[keep]
        d_new_a = transitions_from_arrays(arrays, task, device)
        # mode B (paper): D_new = one deterministic episode of the meta-trained policy in each test task
        first, _, d_new_b = rollout(nets["actor"], family, test_ids, 1, 1, H, seed + 1, device, record=True)
        stats["B_first_episode"] = float(first.mean())
        for mode, d_new in (("A", d_new_a), ("B", d_new_b)):
            actor, st = adapt(nets, d_new, len(test_ids), pool, pool_index, n_train, args, gen)
            ret, succ, _ = rollout(actor, family, test_ids, n_ev, 1, H, seed + 2, device)
            res[mode] = per_task_mean(ret[:, 0], n_ev)
            logger.log_eval(step, mode, "test", test_ids, res[mode], per_task_mean(succ[:, 0], n_ev) > 0.5)
            stats |= {f"{mode}_{k}": float(v.mean()) for k, v in st.items()}
    logger.log_scalars(step, {f"eval/{k}_test": float(v.mean()) for k, v in res.items() if k != "zero_shot_train"}
                       | {"eval/zero_shot_train": float(res["zero_shot_train"].mean())}
                       | {f"adapt/{k}": v for k, v in stats.items()})
    return res, stats


# ---------------------------------------------------------------------------------------------
# Online collection (official main.py): cold start, then exploration episodes of the iteration's tasks
# ---------------------------------------------------------------------------------------------


def collect_episodes(nets, family, rows, args, device, gen, np_rng, random_actions=False, horizon=None):
    """One episode per train-task row, all in lockstep, with Gaussian exploration noise (or uniform random actions)
    -> Transitions with task = train-task row. ``horizon`` cuts the episodes (cold start: horizon / 4)."""
    _, _, tr = rollout(None if random_actions else nets["actor"], family, family.train_idx[rows], 1, 1,
                       args.history_length, int(np_rng.randint(2**31)), device, args.expl_noise, gen, record=True,
                       horizon=horizon, np_rng=np_rng, task_labels=rows)
    return tr


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def variant_name(args: Args) -> str:
    """The method label of summary.json: mql, plus the flags that change what is learned."""
    # another learning rate than the paper's column for this env
    lr_tag = f"-lr{args.lr:g}" if args.lr not in (None, paper_column(args.env_id)["lr"]) else ""
    return "mql" + "".join(tag for on, tag in ((args.online, "-online"), (args.bc_alpha > 0, "-bc"), (args.relabel > 0, "-relabel"),
                                               (args.prox_mode == "const", "-constprox")) if on) + lr_tag


def main(args: Args):
    args = resolve_args(args)
    family = make_family(args.env_id, args.preset)
    if family.discrete:
        raise SystemExit(f"mql.py supports continuous actions only (TD3); {args.env_id} is discrete")
    run_dir = make_run_dir(args.env_id, "mql", args.seed, args.run_dir)
    check_fresh_run_dir(run_dir, args.resume)
    seed_everything(args.seed)
    device = pick_device(args.cuda)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    np_rng = np.random.RandomState(args.seed)
    n_train = len(family.train_idx)

    # Test tasks' data are used only as D_new of mode A; the pool holds the train tasks' rows only.
    ds = ensure_dataset(args.env_id, args.preset, path=args.dataset, family=family)
    if args.online:
        pool = None
    else:
        rows = np.concatenate([np.arange(ds.task_slice(int(t)).start, ds.task_slice(int(t)).stop) for t in family.train_idx])
        row_of_task = np.full(len(family.tasks), -1)
        row_of_task[family.train_idx] = np.arange(n_train)
        pool = transitions_from_arrays({k: ds[k][rows] for k in ("obs", "actions", "rewards", "next_obs", "terminals",
                                                                  "step")}, row_of_task[ds["task_id"][rows]], device)

    reward_table = None
    if args.relabel > 0:
        if args.online:
            raise SystemExit("--relabel is an offline option; online MQL collects its own episodes")
        try:  # rewards of every pool row under every train task, (n_train, N)
            r, _ = relabel_rewards(family, family.train_idx[:, None], pool.obs.cpu().numpy()[None],
                                   pool.actions.cpu().numpy()[None], pool.next_obs.cpu().numpy()[None])
        except NotImplementedError as e:
            raise SystemExit(f"--relabel: {e}") from None
        reward_table = torch.as_tensor(r, dtype=torch.float32, device=device)

    nets = make_nets(family.obs_dim, family.act_dim, args, device)
    opts = make_opts(nets, args.lr)
    step, train_time, wall_before, history, env_steps = 0, 0.0, 0.0, [], 0
    ckpt_path = Path(run_dir) / "checkpoint.pt"
    meta = {"method": "mql", "env_id": args.env_id, "preset": args.preset, "seed": args.seed, "online": args.online,
            "obs_dim": family.obs_dim, "act_dim": family.act_dim, "net_size": args.net_size, "ctx_dim": args.ctx_dim,
            "history_length": args.history_length}
    if args.resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, expect=meta, map_location=device)
        for k, n in nets.items():
            n.load_state_dict(state["nets"][k])
        for k, o in opts.items():
            o.load_state_dict(state["opts"][k])
        step, train_time, history, env_steps = state["step"], state["train_time"], state["history"], state["env_steps"]
        wall_before = state["wall_time"]
        gen.set_state(state["gen"])
        np_rng.set_state(state["np_rng"])
        torch.set_rng_state(state["torch_rng"])
        if args.online:
            pool = Transitions.from_state_dict(state["pool"])
        print(f"resumed {ckpt_path} at step {step}", flush=True)
    logger = Logger(run_dir, {**vars(args), "run_dir": str(run_dir)})
    print(f"MQL {'online' if args.online else 'offline'} on {args.env_id}/{args.preset}: {n_train} train / "
          f"{len(family.test_idx)} test tasks, H={args.history_length}, ctx={args.ctx_dim}, net={args.net_size}, "
          f"lr={args.lr}, policy_freq={args.policy_freq}, bc_alpha={args.bc_alpha}, adapt n={args.snap_iter_nums} "
          f"m={args.main_snap_iter_nums} prox={args.prox_mode}, steps={args.total_steps}", flush=True)

    def checkpoint():
        state = {"meta": meta, "args": vars(args), "step": step, "train_time": train_time, "history": history,
                 "env_steps": env_steps, "wall_time": wall_before + time.time() - t_start,
                 "nets": {k: n.state_dict() for k, n in nets.items()}, "opts": {k: o.state_dict() for k, o in opts.items()},
                 "gen": gen.get_state(), "np_rng": np_rng.get_state(), "torch_rng": torch.get_rng_state()}
        if args.online:
            state["pool"] = pool.state_dict()
        save_checkpoint(ckpt_path, state)

    def do_eval():
        adapt_now = (step == args.total_steps or args.adapt_every is None
                     or (args.adapt_every > 0 and step > 0 and step % args.adapt_every == 0))
        res, st = evaluate(step, nets, ds, pool, family, args, device, logger, adapt_now)
        history.append({"step": step} | {k: float(v.mean()) for k, v in res.items()})
        print(f"eval step {step}: test zero-shot {res['zero_shot'].mean():.3f}"
              + "".join(f" | {m} adapted {res[m].mean():.3f} (ESS {st[m + '_ess']:.2f}, clf acc {st[m + '_clf_acc']:.2f})"
                        for m in ("A", "B") if m in res)
              + f" | train zero-shot {res['zero_shot_train'].mean():.3f}", flush=True)
        return res, st

    def add_rows(tr):
        nonlocal pool, env_steps
        env_steps += tr.n
        if pool is None:
            pool = tr
        else:
            pool.add({k: getattr(tr, k) for k in Transitions.FIELDS}, max_size=args.replay_size)

    t_start = time.time()
    start_step = step
    if args.online and step == 0:
        # ALGO LOGIC: cold start, random actions cycling over the train tasks, episodes cut at horizon / 4
        n_cold = max(args.num_initial_steps * n_train, args.burn_in)
        cut = max(1, family.horizon // 4)
        while env_steps < n_cold:
            add_rows(collect_episodes(nets, family, np.arange(n_train), args, device, gen, np_rng, True, cut))
    res = st = None
    if step == 0:
        res, st = do_eval()
    last = {}
    it_steps = args.eval_every
    while step < args.total_steps:
        if args.online:
            # ALGO LOGIC: one iteration: episodes on the iteration's task and random train tasks, then updates
            rows = np.concatenate([[np_rng.randint(n_train)], np_rng.randint(n_train, size=args.num_tasks_sample - 1)])
            tr = collect_episodes(nets, family, rows, args, device, gen, np_rng)
            add_rows(tr)
            it_steps = tr.n if pool.n < args.min_buffer_size else args.num_train_steps
        t0 = time.time()
        n_block = min(it_steps, args.total_steps - step, args.eval_every - step % args.eval_every)
        for _ in range(n_block):
            # ALGO LOGIC: multi-task TD3, a minibatch drawn uniformly from the pool of all train tasks
            idx = torch.randint(pool.n, (1, args.batch_size), device=device, generator=gen)
            relabel_task = None
            if reward_table is not None:  # deviation: some episodes carry another train task's rewards
                pick = torch.rand(idx.shape, device=device, generator=gen) < args.relabel
                other = torch.randint(n_train, idx.shape, device=device, generator=gen)
                relabel_task = torch.where(pick, other, torch.full_like(other, -1))
            batch = pool.batch(idx, args.history_length, relabel_task, reward_table)
            stats = td3_update(nets, opts, batch, args, step, gen)
            step += 1
            if step % args.log_every == 0:
                last |= {k: float(v) for k, v in stats.items()}
                logger.log_scalars(step, last | {"perf/updates_per_s": step / max(train_time + time.time() - t0, 1e-9),
                                                 "perf/env_steps": env_steps})
            if step % args.print_every == 0:
                extra = {"Q": last.get("q/mean", float("nan")), "loss_q": last.get("loss/q", float("nan"))}
                if history:
                    extra |= {"zero_shot": history[-1]["zero_shot"]}
                print_progress(step, args.total_steps, t_start, extra, start_step)
        train_time += time.time() - t0
        if step % args.eval_every == 0 or step == args.total_steps:
            res, st = do_eval()
            checkpoint()

    if res is None:  # resumed a finished run: evaluate once more for the summary
        res, st = do_eval()
    ups = step / max(train_time, 1e-9)
    evals = {"zero_shot": eval_entry(res["zero_shot"], res["zero_shot_train"])}
    for m in ("A", "B"):
        if m in res:
            evals[m] = eval_entry(res[m])
    write_summary(run_dir, method=variant_name(args), env_id=args.env_id, preset=args.preset, seed=args.seed,
                  total_steps=step, wall_time_s=wall_before + time.time() - t_start, updates_per_s=ups,
                  machine=machine_info(device), dataset=str(ds.path), eval=evals,
                  extra={"online": args.online, "env_steps": env_steps, "train_time_s": train_time,
                         "final_q_mean": last.get("q/mean"), "adaptation": st, "curve": history,
                         "settings": {k: getattr(args, k) for k in ("lr", "policy_freq", "policy_noise", "history_length",
                                                                     "ctx_dim", "net_size", "batch_size", "bc_alpha",
                                                                     "snap_iter_nums", "main_snap_iter_nums",
                                                                     "sample_mult", "beta_clip", "lam_csc", "prox_mode", "relabel",
                                                                     "bf16")}})
    logger.close()
    print(f"done: {step} steps, {ups:.2f} updates/s, summary in {run_dir}/summary.json", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
