"""BOReL: Bayesian offline meta-RL -- a VariBAD belief model learned from fixed data, reward relabelling against
MDP ambiguity, and offline RL on belief-augmented states.

Paper: Ron Dorfman, Idan Shenfeld, Aviv Tamar, "Offline Meta Reinforcement Learning -- Identifiability Challenges
and Effective Data Collection Strategies", NeurIPS 2021, arXiv:2008.02598. Official code: github.com/Rondorf/BOReL
(the VAE is VariBAD's, Zintgraf et al. 2020).

Method. A task is a BAMDP rollout of k consecutive episodes (H+ = k H steps, the task is kept, the state is reset).
1. Belief model (VariBAD VAE) on the pooled training data: a GRU encoder reads the history (a_t, s_{t+1}, r_t) and
   outputs q_phi(m | tau_{:t}) = N(mu_t, diag sigma_t^2) (t = 0 is the prior, from a zero hidden state); a reward
   decoder p_theta(r | m, s') (grid: one Bernoulli per cell; MuJoCo: also s and a) reconstructs EVERY reward of the
   rollout, past and future, from every latent.
2. Reward relabelling (RR): each task's data agent heads for its own goal, so states alone give the task away and a
   VAE trained on them ignores rewards (MDP ambiguity). Before fitting the VAE, some episodes of each rollout are
   replaced by other tasks' episodes whose rewards are recomputed with this task's reward function.
3. The frozen encoder relabels every stored (unmixed) transition with its belief: s+_t = [s_t, mu_t, log sigma_t^2],
   and an offline DQN (discrete actions) or SAC (continuous) is trained on (s+_t, a_t, r_t, s+_{t+1}).
Meta-test: in a new task, act on [s_t, b_t] with b_t updated online after every step, carried across the k
episodes (no gradient steps, no offline context).

Equations (tau one rollout of H+ steps, z_t ~ q_t by one reparameterised sample, q_{-1} = N(0, I)):
    ELBO loss  L(tau) = sum_{t=0..H+} [ sum_{j=0..H+-1} l(R_theta(z_t, s_{j+1}[, s_j, a_j]), r_j) + beta KL(q_t || q_{t-1}) ]
               l = squared error (continuous rewards) or BCE of the goal-cell Bernoulli (grid), beta = 0.05
    DQN        y = r + gamma (1 - d) max_a' Qbar(s+', a'),   L = mean (Q(s+, a) - y)^2
               (--double-q: y = r + gamma (1 - d) Qbar(s+', argmax_a' Q(s+', a')))
    SAC        y = r + gamma (1 - d) [min_i Qbar_i(s+', a') - alpha log pi(a'|s+')],   L_Q = sum_i mean (Q_i - y)^2
               L_pi = mean [alpha log pi(a~|s+) - min_i Q_i(s+, a~)]   (fixed alpha)

Deviations (and fixes of the official defects, spec borel.md §8):
- Relabelled rewards come from ``common.envs.relabel_rewards``, the envs' own step reward (the official sparse point
  robot relabels with a function that disagrees with its step reward, and the cheetah's needs a simulator replay).
  Families without such a function (MuJoCo) refuse RR: pass ``--no-relabel``.
- The GRU is never reset inside a rollout, in the VAE, the belief relabelling and at test (the official data
  conversion resets it whenever the data agent stands on the goal, test never does).
- Each episode starts from its true reset state (the official buffers store the previous episode's last state as the
  first obs of the next episode). The encoder still reads the "episode ended" bit with s_{t+1} (k > 1); the policy's
  input is [s, mu, log sigma^2] without it. Targets bootstrap across episode boundaries into the next episode's
  start, as in a BAMDP.
- The project's datasets hold single episodes of per-task agents (episodes_per_task = 1 at collection); rollouts
  are k consecutive episodes of a task. The data agents are plain per-task RL agents, as in the paper
  (GridNavi/borel: 2040 episodes = 510 rollouts of 4 per task, the paper's 30.6k transitions).
- With ``--goal-terminal`` (default, as the official code: its stored "terminal" is "agent on the goal") reaching the
  goal region ends the bootstrap in the grid and the sparse point robot; dense families use the dataset terminals.
- RR mixes once, from the unmixed data, with a seeded RNG (official: in place, so sources may be mixed already;
  same fraction semantics: R draws with replacement per task, about 63% of rollouts touched). With k = 1 (the
  project's default PointRobot) the whole episode is swapped.
- Tasks of a VAE minibatch are drawn without replacement, its rollouts with replacement; one epoch = ceil(R/8) x
  ceil(T/8) updates as in the official code. The decoder's first layer is split into a z part and an x part that are
  broadcast-added, so the (H+ + 1) x H+ decode grid costs one small matmul per side (same function).
- ``--rl-relabel`` (off by default, as in the official configs) trains the RL stage on the relabelled rollouts too
  (official option ``hindsight_relabelling``). The official code mixes rows that already carry the beliefs of their
  original rewards; here the beliefs are recomputed on the mixed rollouts, so a relabelled row's belief matches its
  reward sequence, as it will at test.
- Fixed alpha only, no CQL (both as the official configs run). ``--cql-weight`` adds the official CQL ablation to the
  DQN, exact for discrete actions: + alpha_cql (logsumexp_a Q(s+, a) - Q(s+, a_data)) (official alpha_cql 2).
- ``--relabel-episodes N`` (not official) swaps the first N episodes of a relabelled rollout instead of the first half.
- ``--elbo-latents N`` (off by default) reconstructs each rollout's rewards from N random latents instead of all
  H+ + 1, rescaled (VariBAD's ``vae_subsample_elbos``): the MuJoCo decode grid (201 x 200 per rollout) is the VAE's
  cost on a CPU.
- ``--vae-from RUN_DIR`` reuses the finished VAE of another run, so RL-stage settings can be compared on one belief.
- ``--belief-input cells`` (GridNavi, not official) gives the policy the decoder's goal probability of every cell at
  mu_t instead of [mu_t, log sigma_t^2]: many latents decode to one belief, and a DQN on the raw latent can fail to
  act on a belief it has never seen in that form (a goal decoded with p = 1, yet the greedy policy walks elsewhere).
- Also reported: mode A (the belief after one offline episode of the test task's data, then one episode), the
  project's common offline-context protocol.
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

from common.data import bamdp_rollout_rows, ensure_dataset
from common.envs import MUJOCO_FAMILY_NAMES, canonical_env_id, default_preset, make_family, relabel_rewards, relabel_unsupported
from common.evaluation import run_episodes
from common.runs import (Logger, check_fresh_run_dir, eval_entry, load_checkpoint, machine_info, make_run_dir,
                         pick_device, print_progress, save_checkpoint, seed_everything, write_summary)


@dataclass
class Args:
    env_id: str = "GridNavi"
    """task family (common/envs.py): GridNavi, PointRobot, SparsePointRobot, HalfCheetahVel, ..."""
    preset: str | None = None
    """task preset (default: the family's default; GridNavi: borel)"""
    dataset: str | None = None
    """offline dataset path (default: datasets/{env}__{preset}__s0.npz, built if missing)"""
    seed: int = 1
    """seed of the VAE, the RL learner and the evaluation"""
    total_steps: int | None = None
    """offline RL updates (official: iterations x updates per iteration; grid 1000 x 250, point 5000 x 1000)"""
    eval_every: int | None = None
    """RL updates between evaluations and checkpoints (official: every 10 iterations)"""
    cuda: bool = True
    """use cuda:0 when available"""
    resume: bool = False
    """continue the run in --run-dir from its checkpoint"""
    run_dir: str | None = None
    """run directory (default runs/{env}__borel__s{seed}__{time})"""

    # belief model (VariBAD VAE)
    vae_epochs: float = 100.0
    """VAE epochs (official num_iters 100); an epoch is ceil(R/rollouts_per_task) x ceil(T/tasks_per_batch) updates"""
    vae_tasks_per_batch: int | None = None
    """tasks per VAE minibatch (official 8; MuJoCo 4)"""
    vae_rollouts_per_task: int = 8
    """rollouts per task in a VAE minibatch"""
    vae_lr: float = 3e-4
    """VAE Adam learning rate"""
    kl_weight: float = 0.05
    """beta: weight of the KL(q_t || q_{t-1}) terms"""
    latent_dim: int = 5
    """task latent m"""
    gru_hidden: int | None = None
    """GRU hidden size (grid 64, others 128)"""
    state_embed: int = 32
    """encoder/decoder state embedding"""
    action_embed: int | None = None
    """encoder action embedding (grid 0: actions not encoded; others 16)"""
    reward_embed: int | None = None
    """encoder reward embedding (grid 8, others 16)"""
    decoder_hidden: int = 32
    """reward decoder: two hidden layers of this width"""
    elbo_latents: int = 0
    """latents per rollout that reconstruct the rollout's rewards in a VAE update (0: all H+ + 1, official; fewer,
    drawn at random and rescaled, is an unbiased and cheaper estimate, as VariBAD's vae_subsample_elbos)"""
    relabel: bool = True
    """reward relabelling of the VAE's training rollouts (--no-relabel: the paper's ablation)"""
    relabel_episodes: int | None = None
    """episodes replaced at the start of each relabelled rollout (official: the first half, at least 1; GridNavi 2 of 4)"""
    rl_relabel: bool = False
    """also train the RL stage on the relabelled rollouts (official option hindsight_relabelling, off in its configs):
    a task's batch then holds other tasks' episodes scored with its own reward, so the policy cannot read the task
    from the states of its data and must use the belief"""

    vae_from: str | None = None
    """skip stage 1: take the trained VAE of this run directory (a run of the same env and VAE settings, e.g. one
    stopped after the VAE with --total-steps 0), to compare RL-stage settings on one belief model"""

    # offline RL on belief-augmented states
    hidden: int | None = None
    """DQN / SAC hidden width, two layers (grid DQN 64, point SAC 128, MuJoCo 256)"""
    meta_batch: int = 16
    """tasks per RL update, drawn with replacement once per iteration"""
    batch_size: int = 256
    """transitions per task in an RL update"""
    updates_per_iter: int | None = None
    """RL updates per iteration (tasks are redrawn every iteration; grid 250, others 1000)"""
    lr: float = 3e-4
    """critic / Q learning rate"""
    actor_lr: float | None = None
    """SAC actor learning rate (3e-4)"""
    gamma: float | None = None
    """discount (grid and MuJoCo 0.99, point 0.9)"""
    tau: float = 0.005
    """Polyak rate of the target networks, every update"""
    alpha: float | None = None
    """SAC entropy weight, fixed (point 0.01, MuJoCo 0.2)"""
    cql_weight: float = 0.0
    """DQN only: weight of the CQL(H) term alpha_cql (logsumexp_a Q(s+, a) - Q(s+, a_data)) (official ablation
    flag use_cql with alpha_cql 2; off in the official configs)"""
    double_q: bool = False
    """DQN only: double DQN targets (the official online learner's policy ddqn; its offline configs use plain DQN)"""
    goal_terminal: bool = True
    """official: reaching the goal region ends the bootstrap (grid, sparse point robot)"""
    belief_input: Literal["latent", "cells"] = "latent"
    """what the policy reads next to the state: latent = [mu, log sigma^2] (official); cells (grid only, not
    official) = the decoder's goal probability of every cell at mu, so histories with one decoded belief look alike"""

    # evaluation
    eval_tasks: int | None = None
    """test tasks evaluated (default all)"""
    log_every: int = 100
    """RL updates between train.csv rows"""
    print_every: int = 2500
    """RL updates between progress lines"""


# per-family defaults (official configs: vae_config/, offline_config/)
GRID = dict(gru_hidden=64, action_embed=0, reward_embed=8, hidden=64, gamma=0.99, alpha=0.0, actor_lr=3e-4,
            total_steps=250_000, updates_per_iter=250, eval_every=2_500, vae_tasks_per_batch=8)
POINT = dict(gru_hidden=128, action_embed=16, reward_embed=16, hidden=128, gamma=0.9, alpha=0.01, actor_lr=3e-4,
             total_steps=5_000_000, updates_per_iter=1000, eval_every=10_000, vae_tasks_per_batch=8)
MUJOCO = dict(gru_hidden=128, action_embed=16, reward_embed=16, hidden=256, gamma=0.99, alpha=0.2, actor_lr=3e-4,
              total_steps=1_000_000, updates_per_iter=1000, eval_every=10_000, vae_tasks_per_batch=4)


def resolve_args(args: Args) -> Args:
    env = canonical_env_id(args.env_id)
    table = GRID if env == "GridNavi" else MUJOCO if env in MUJOCO_FAMILY_NAMES else POINT
    filled = {k: v for k, v in table.items() if getattr(args, k) is None}
    return dataclasses.replace(args, env_id=env, preset=args.preset or default_preset(env), **filled)


# ---------------------------------------------------------------------------------------------
# Data: BAMDP rollouts of k consecutive episodes per task
# ---------------------------------------------------------------------------------------------


def build_rollouts(ds, family, task_ids, k: int) -> dict:
    """Group each task's episodes into rollouts of k consecutive episodes (a remainder is dropped).
    Returns numpy arrays obs/next_obs (R, H+, obs_dim), actions (R, H+[, act_dim]), rewards/terminals/success
    (R, H+) and task (R,) (the family's task index), sorted by task."""
    rows, task = bamdp_rollout_rows(ds, task_ids, family.horizon, k, "borel.py")
    out = {key: ds[key][rows] for key in ("obs", "next_obs", "actions", "rewards", "terminals")}
    out["success"] = goal_reached(family, out["next_obs"], task, out["rewards"])
    out["task"] = task
    return out


def goal_reached(family, next_obs, task, rewards):
    """'In the goal region' after each step (the official stored terminal): grid goal cell, sparse point radius."""
    if family.env_id == "GridNavi":
        return np.all(next_obs == family.tasks[task][:, None], axis=-1)
    if family.env_id == "SparsePointRobot":
        dist = np.linalg.norm(next_obs - family.tasks[task][:, None], axis=-1)
        return dist <= family.config.get("goal_radius", 0.2)
    return np.zeros(rewards.shape, bool)


def mix_rollouts(roll: dict, family, k: int, rng: np.random.RandomState, n_swap: int | None = None) -> dict:
    """Reward relabelling (official ``mix_task_rollouts``): per task i, R draws of its rollouts with replacement;
    in each, the swapped episodes (the first n_swap; official: k = 1, 2: the first; k = 4: the first two) are
    replaced by the same episode of a random rollout of a random other task j, with rewards recomputed by task i's
    reward function."""
    H = family.horizon
    out = {key: v.copy() for key, v in roll.items()}
    tasks = np.unique(roll["task"])
    if len(tasks) < 2:
        raise SystemExit("reward relabelling needs at least two training tasks (or pass --no-relabel)")
    by_task = {t: np.flatnonzero(roll["task"] == t) for t in tasks}
    swap = list(range(n_swap)) if n_swap else [0] if k <= 2 else list(range(k // 2))
    for t in tasks:
        own = by_task[t]
        targets = rng.choice(own, size=len(own), replace=True)
        for e in swap:
            others = rng.choice(tasks[tasks != t], size=len(targets))
            src = np.array([rng.choice(by_task[j]) for j in others])
            cols = slice(e * H, (e + 1) * H)
            for key in ("obs", "next_obs", "actions"):
                out[key][targets, cols] = roll[key][src, cols]
            nobs, act = out["next_obs"][targets, cols], out["actions"][targets, cols]
            out["rewards"][targets, cols] = relabel_rewards(family, np.full((len(targets), 1), t), out["obs"][targets, cols],
                                                            act, nobs)[0]
            out["terminals"][targets, cols] = False
            out["success"][targets, cols] = goal_reached(family, nobs, np.full(len(targets), t), out["rewards"][targets, cols])
    return out


def to_tensors(roll: dict, discrete: bool, device) -> dict:
    t = {key: torch.as_tensor(v, device=device) for key, v in roll.items()}
    for key in ("obs", "next_obs", "rewards"):
        t[key] = t[key].float()
    t["actions"] = t["actions"].long() if discrete else t["actions"].float()
    t["terminals"], t["success"] = t["terminals"].bool(), t["success"].bool()
    return t


# ---------------------------------------------------------------------------------------------
# Belief model: VariBAD VAE (models/encoder.py, models/decoder.py)
# ---------------------------------------------------------------------------------------------


class VAE(nn.Module):
    """GRU encoder q(m | a_{:t}, s_{1:t+1}, r_{:t}) and reward decoder p(r | m, s'[, s, a]).

    kind: "grid" (one Bernoulli per cell from m alone), "point" ([m, emb(s')]), "mujoco" ([m, emb(s'), emb(a), emb(s)])."""

    def __init__(self, obs_dim, act_dim, n_actions, kind, args, done_bit: bool, n_cells: int = 0, grid_size: int = 0):
        super().__init__()
        self.kind, self.done_bit, self.discrete, self.grid_size = kind, done_bit, n_actions > 0, grid_size
        self.n_actions = n_actions
        enc_obs = obs_dim + int(done_bit)
        self.s_emb = nn.Linear(enc_obs, args.state_embed)
        a_in = n_actions if self.discrete else act_dim
        self.a_emb = nn.Linear(a_in, args.action_embed) if args.action_embed > 0 else None
        self.r_emb = nn.Linear(1, args.reward_embed)
        self.gru = nn.GRU(args.state_embed + args.action_embed + args.reward_embed, args.gru_hidden)
        for name, p in self.gru.named_parameters():  # varibad: orthogonal weights, zero biases
            nn.init.orthogonal_(p) if "weight" in name else nn.init.zeros_(p)
        self.fc_mu = nn.Linear(args.gru_hidden, args.latent_dim)
        self.fc_logvar = nn.Linear(args.gru_hidden, args.latent_dim)
        D = args.decoder_hidden
        if kind == "grid":
            self.dec = nn.Sequential(nn.Linear(args.latent_dim, D), nn.ReLU(), nn.Linear(D, D), nn.ReLU(), nn.Linear(D, n_cells))
        else:
            self.dec_s_emb = nn.Linear(obs_dim, args.state_embed)
            x_dim = args.state_embed * (2 if kind == "mujoco" else 1) + (args.action_embed if kind == "mujoco" else 0)
            if kind == "mujoco":
                self.dec_a_emb = nn.Linear(act_dim, args.action_embed)
            # first layer of the MLP on [m, x], split as W_m m + W_x x so the (latent, target) grid is a broadcast add
            self.dec_in_m = nn.Linear(args.latent_dim, D)
            self.dec_in_x = nn.Linear(x_dim, D, bias=False)
            self.dec_rest = nn.Sequential(nn.ReLU(), nn.Linear(D, D), nn.ReLU(), nn.Linear(D, 1))

    # encoder -----------------------------------------------------------------------------------
    def encoder_input(self, actions, next_obs, rewards, bits):
        """(T, B, ...) history entries (a_t, [s_{t+1}, done_t], r_t) -> GRU input (T, B, E)."""
        s = torch.cat([next_obs, bits], -1) if self.done_bit else next_obs
        parts = [F.relu(self.s_emb(s))]
        if self.a_emb is not None:
            a = F.one_hot(actions, self.n_actions).float() if self.discrete else actions
            parts.append(F.relu(self.a_emb(a)))
        parts.append(F.relu(self.r_emb(rewards[..., None])))
        return torch.cat(parts, -1)

    def heads(self, h):
        return self.fc_mu(h), self.fc_logvar(h)

    def encode(self, actions, next_obs, rewards, bits, h0=None):
        """Beliefs along time-major histories: mu, logvar (T+1, B, m) -- index 0 is the belief before any step
        (the prior when h0 is None) -- and the last hidden state (1, B, hidden)."""
        x = self.encoder_input(actions, next_obs, rewards, bits)
        if h0 is None:
            h0 = x.new_zeros(1, x.shape[1], self.gru.hidden_size)
        out, hT = self.gru(x, h0)
        mu, logvar = self.heads(torch.cat([h0, out], 0))
        return mu, logvar, hT

    # decoder -----------------------------------------------------------------------------------
    def decode_grid(self, z, obs, actions, next_obs):
        """Reward prediction of every latent (L, B, m) for every target step (T, B): (L, T, B)."""
        if self.kind == "grid":
            logits = self.dec(z)  # (L, B, cells)
            cell = (next_obs[..., 0] * self.grid_size + next_obs[..., 1]).long()  # (T, B)
            return logits.gather(2, cell.T[None].expand(z.shape[0], -1, -1)).transpose(1, 2)  # (L, T, B)
        x = F.relu(self.dec_s_emb(next_obs))
        if self.kind == "mujoco":
            x = torch.cat([x, F.relu(self.dec_a_emb(actions)), F.relu(self.dec_s_emb(obs))], -1)
        h = self.dec_in_m(z)[:, None] + self.dec_in_x(x)[None]  # (L, T, B, D)
        return self.dec_rest(h).squeeze(-1)


def gaussian_kl(mu_q, logvar_q, mu_p, logvar_p):
    """KL(N(mu_q, var_q) || N(mu_p, var_p)) summed over the last dim."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) / logvar_p.exp() - 1).sum(-1)


def elbo_loss(vae: VAE, batch: dict, bits, kl_weight: float, generator=None, n_latents: int = 0):
    """Negative ELBO of each rollout, averaged over the batch: sum over all H+ + 1 latents of the reconstruction of all
    H+ rewards, plus beta times the sum of KL(q_t || q_{t-1}) with q_{-1} = N(0, I). batch fields are (B, T, ...).
    n_latents > 0: the reconstruction uses that many random latents per rollout, scaled by (H+ + 1) / n_latents."""
    tm = {key: v.transpose(0, 1) for key, v in batch.items() if key in ("obs", "next_obs", "actions", "rewards")}
    T, B = tm["rewards"].shape
    mu, logvar, _ = vae.encode(tm["actions"], tm["next_obs"], tm["rewards"], bits[:, None, None].expand(-1, B, 1))
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    z = mu + (0.5 * logvar).exp() * eps  # one sample per latent
    scale = 1.0
    if n_latents and n_latents < T + 1:  # each rollout's own random subset of its T + 1 latents
        pick = torch.rand(B, T + 1, generator=generator, device=mu.device).argsort(-1)[:, :n_latents].T  # (n, B)
        z, scale = z.gather(0, pick[..., None].expand(-1, -1, z.shape[-1])), (T + 1) / n_latents
    pred = vae.decode_grid(z, tm["obs"], tm["actions"], tm["next_obs"])  # (L, T, B)
    target = tm["rewards"][None].expand_as(pred)
    if vae.kind == "grid":
        rec = F.binary_cross_entropy_with_logits(pred, (target == 1.0).to(pred.dtype), reduction="none")
    else:
        rec = (pred - target).pow(2)
    mu_prev = torch.cat([torch.zeros_like(mu[:1]), mu[:-1]])
    lv_prev = torch.cat([torch.zeros_like(logvar[:1]), logvar[:-1]])
    kl = gaussian_kl(mu, logvar, mu_prev, lv_prev)  # (T+1, B)
    rec_sum, kl_sum = scale * rec.sum((0, 1)).mean(), kl.sum(0).mean()
    return rec_sum + kl_weight * kl_sum, rec_sum, kl_sum


def done_bits(H: int, k: int, device) -> torch.Tensor:
    """The encoder's 'episode ended' bit of each of the k H steps (1 on each episode's last step)."""
    return ((torch.arange(H * k, device=device) % H) == H - 1).float()


@torch.no_grad()
def beliefs(vae: VAE, roll: dict, bits, chunk: int = 4096):
    """Belief of every stored rollout at every step: (R, H+ + 1, 2m) = [mu_t, logvar_t], t = 0..H+."""
    out = []
    for i in range(0, len(roll["rewards"]), chunk):
        sl = {key: roll[key][i: i + chunk].transpose(0, 1) for key in ("actions", "next_obs", "rewards")}
        B = sl["rewards"].shape[1]
        mu, logvar, _ = vae.encode(sl["actions"], sl["next_obs"], sl["rewards"], bits[:, None, None].expand(-1, B, 1))
        out.append(torch.cat([mu, logvar], -1).transpose(0, 1))
    return torch.cat(out)


@torch.no_grad()
def policy_belief(vae: VAE, b, belief_input: str):
    """The belief part of the policy's input from [mu, logvar] (..., 2m): itself, or the decoded cell probabilities."""
    if belief_input == "latent":
        return b
    return torch.sigmoid(vae.dec(b[..., : b.shape[-1] // 2]))


# ---------------------------------------------------------------------------------------------
# Offline RL networks (rlkit Mlp init: hidden U(+-1/sqrt(out_features)), bias 0.1; last layer U(+-3e-3))
# ---------------------------------------------------------------------------------------------


def rlkit_init_(weight, bias, hidden: bool, init_w: float = 3e-3):
    with torch.no_grad():
        if hidden:
            bound = 1.0 / math.sqrt(weight.shape[-1])  # out_features: nn.Linear size(0), batched (.., in, out) last
            weight.uniform_(-bound, bound)
            bias.fill_(0.1)
        else:
            weight.uniform_(-init_w, init_w)
            bias.uniform_(-init_w, init_w)


class EnsembleMlp(nn.Module):
    """M MLPs with weights (M, in, out) (twin critics: M = 2; DQN and actor: M = 1); x (..., in) -> (M, ..., out)."""

    def __init__(self, members, in_dim, hidden, out_dim, init_w=3e-3):
        super().__init__()
        dims = [in_dim, hidden, hidden, out_dim]
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(members, i, o)) for i, o in zip(dims[:-1], dims[1:]))
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(members, 1, o)) for o in dims[1:])
        for j, (w, b) in enumerate(zip(self.weights, self.biases)):
            rlkit_init_(w, b, hidden=j < 2, init_w=init_w)

    def forward(self, x, frozen: bool = False):
        lead = x.shape[:-1]
        M = self.weights[0].shape[0]
        h = x.reshape(1, -1, x.shape[-1]).expand(M, -1, -1)
        for j, (w, b) in enumerate(zip(self.weights, self.biases)):
            if frozen:  # the actor's step: gradients reach the action only
                w, b = w.detach(), b.detach()
            # one member: a plain addmm is faster than a batched matmul of batch 1 on the CPU
            h = torch.addmm(b[0], h[0], w[0])[None] if M == 1 else torch.baddbmm(b, h, w)
            if j < 2:
                h = F.relu(h)
        return h.reshape(M, *lead, h.shape[-1])


def policy_sample(pi, x, deterministic=False, generator=None):
    """tanh-Gaussian pi(a | s+): log sigma clamped to [-20, 2]; deterministic action tanh(mean)."""
    mean, log_std = pi(x)[0].chunk(2, -1)
    if deterministic:
        return torch.tanh(mean), None
    log_std = log_std.clamp(-20.0, 2.0)
    eps = torch.randn(mean.shape, generator=generator, device=mean.device)
    a = torch.tanh(mean + log_std.exp() * eps)
    log_pi = (-0.5 * eps.pow(2) - log_std - 0.5 * math.log(2 * math.pi) - torch.log(1 - a.pow(2) + 1e-6)).sum(-1)
    return a, log_pi


def polyak_(target, source, tau):
    with torch.no_grad():
        for pt, p in zip(target.parameters(), source.parameters()):
            pt.lerp_(p, tau)


def dqn_update(nets, opts, b, args):
    """One DQN step on hyper-states: y = r + gamma (1 - d) max_a' Qbar(s+', a') (double DQN: Qbar(s+', argmax_a' Q(s+', a')))."""
    with torch.no_grad():
        q_next = nets["q_targ"](b["x2"])[0]
        if args.double_q:  # the online net picks a', the target net scores it
            v_next = q_next.gather(-1, nets["q"](b["x2"])[0].argmax(-1, keepdim=True)).squeeze(-1)
        else:
            v_next = q_next.max(-1).values
        y = b["r"] + args.gamma * (1 - b["d"]) * v_next
    q_all = nets["q"](b["x"])[0]
    q = q_all.gather(-1, b["a"][..., None]).squeeze(-1)
    loss = F.mse_loss(q, y)
    stats = {"loss/q": loss.detach(), "q/mean": q.detach().mean()}
    if args.cql_weight > 0:  # CQL(H) for discrete actions: push down log-sum-exp Q, push up Q of the data action
        gap = (torch.logsumexp(q_all, -1) - q).mean()
        loss = loss + args.cql_weight * gap
        stats["loss/cql_gap"] = gap.detach()
    opts["q"].zero_grad(set_to_none=True)
    loss.backward()
    opts["q"].step()
    polyak_(nets["q_targ"], nets["q"], args.tau)
    return stats


def sac_update(nets, opts, b, args, gen):
    """One SAC step (fixed alpha, twin Q): critic on the target, then the actor on the updated critics."""
    with torch.no_grad():
        a2, logp2 = policy_sample(nets["pi"], b["x2"], generator=gen)
        q2 = nets["q_targ"](torch.cat([b["x2"], a2], -1)).squeeze(-1).min(0).values
        y = b["r"] + args.gamma * (1 - b["d"]) * (q2 - args.alpha * logp2)
    q = nets["q"](torch.cat([b["x"], b["a"]], -1)).squeeze(-1)  # (2, ...)
    q_loss = (q - y).pow(2).mean((1, 2)).sum()
    opts["q"].zero_grad(set_to_none=True)
    q_loss.backward()
    opts["q"].step()
    a_new, logp = policy_sample(nets["pi"], b["x"], generator=gen)
    q_new = nets["q"](torch.cat([b["x"], a_new], -1), frozen=True).squeeze(-1).min(0).values
    pi_loss = (args.alpha * logp - q_new).mean()
    opts["pi"].zero_grad(set_to_none=True)
    pi_loss.backward()
    opts["pi"].step()
    polyak_(nets["q_targ"], nets["q"], args.tau)
    return {"loss/q": q_loss.detach(), "loss/pi": pi_loss.detach(), "q/mean": q.detach().mean(), "pi/logp": logp.detach().mean()}


class HyperData:
    """The training tasks' unmixed transitions with their beliefs, per task as padded (tasks, rows, .) tensors:
    x = [s_t, mu_t, logvar_t], a_t, r_t, d_t, x2 = [s_{t+1}, mu_{t+1}, logvar_{t+1}] (s_{t+1}: the next row's state, the
    next episode's start at an episode boundary; the true next state at the rollout's end)."""

    def __init__(self, roll: dict, belief, goal_terminal: bool):
        R, T = roll["rewards"].shape
        nxt = torch.cat([roll["obs"][:, 1:], roll["next_obs"][:, -1:]], 1)
        x = torch.cat([roll["obs"], belief[:, :-1]], -1)
        x2 = torch.cat([nxt, belief[:, 1:]], -1)
        d = (roll["terminals"] | roll["success"]) if goal_terminal else roll["terminals"]
        a = roll["actions"].float()
        fields = {"x": x, "x2": x2, "a": a if a.dim() == 3 else a[..., None], "r": roll["rewards"][..., None],
                  "d": d.float()[..., None]}
        self.discrete = roll["actions"].dim() == 2
        # one packed (tasks, rows, features) tensor, so a batch is a single gather
        widths = [v.shape[-1] for v in fields.values()]
        self.slices = dict(zip(fields, np.split(np.arange(sum(widths)), np.cumsum(widths)[:-1])))
        packed = torch.cat(list(fields.values()), -1)
        tasks = roll["task"]
        self.task_ids = torch.unique(tasks)
        per = [torch.nonzero(tasks == t).squeeze(1) for t in self.task_ids]
        n = max(len(p) for p in per) * T
        self.counts = torch.as_tensor([len(p) * T for p in per], device=tasks.device)
        flat = [packed[p].reshape(len(p) * T, packed.shape[-1]) for p in per]
        self.packed = torch.stack([torch.cat([f, f[: n - len(f)]]) if len(f) < n else f for f in flat])

    def sample(self, task_rows, n, generator=None):
        u = torch.rand(len(task_rows), n, device=self.counts.device, generator=generator)
        c = self.counts[task_rows][:, None]
        idx = torch.minimum((u * c).long(), c - 1)
        rows = self.packed[task_rows[:, None], idx]
        b = {key: rows[..., sl[0]: sl[-1] + 1] for key, sl in self.slices.items()}
        b["r"], b["d"] = b["r"][..., 0], b["d"][..., 0]
        b["a"] = b["a"][..., 0].long() if self.discrete else b["a"]
        return b


# ---------------------------------------------------------------------------------------------
# Evaluation: online BAMDP rollouts (belief updated every step, carried over the k episodes)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def act_on(nets, x, discrete):
    if discrete:
        return nets["q"](x)[0].argmax(-1)
    return policy_sample(nets["pi"], x, deterministic=True)[0]


@torch.no_grad()
def evaluate_bamdp(nets, vae, family, task_ids, k, device, seed, h0=None, belief_input="latent"):
    """k consecutive deterministic episodes per task from the belief of hidden state h0 (None: the prior);
    returns (returns, successes) of shape (tasks, k)."""
    venv = family.make_vec_env(task_ids, 1, seed=seed)
    B, H = venv.num_envs, family.horizon
    h = torch.zeros(1, B, vae.gru.hidden_size, device=device) if h0 is None else h0
    belief = lambda h: policy_belief(vae, torch.cat(vae.heads(h[0]), -1), belief_input)
    state = {"h": h, "b": belief(h), "t": 0}

    def act(obs, ep, t):
        x = torch.cat([torch.as_tensor(obs, dtype=torch.float32, device=device), state["b"]], -1)
        return act_on(nets, x, family.discrete).cpu().numpy()

    def observe(o, a, r, no, term, trunc, info, alive):
        bit = torch.full((1, B, 1), float(state["t"] % H == H - 1), device=device)
        a_t = torch.as_tensor(a, device=device)[None]
        a_t = a_t.long() if family.discrete else a_t.float()
        _, _, state["h"] = vae.encode(a_t, torch.as_tensor(no, dtype=torch.float32, device=device)[None],
                                      torch.as_tensor(r, dtype=torch.float32, device=device)[None], bit, state["h"])
        state["b"] = belief(state["h"])
        state["t"] += 1

    return run_episodes(venv, act, k, observe=observe)


@torch.no_grad()
def context_hidden(vae, ds, family, task_ids, device, seed):
    """Mode A: the GRU state after one random offline episode of each task's data (seeded draw)."""
    rng = np.random.RandomState(seed)
    H = family.horizon
    rows = []
    for t in task_ids:
        sl = ds.task_slice(int(t))
        starts = sl.start + np.flatnonzero(ds["step"][sl] == 0)
        rows.append(rng.choice(starts) + np.arange(H))
    rows = np.stack(rows).T  # (H, tasks)
    a = torch.as_tensor(ds["actions"][rows], device=device)
    a = a.long() if family.discrete else a.float()
    bits = torch.zeros(H, len(task_ids), 1, device=device)
    bits[-1] = 1.0
    _, _, h = vae.encode(a, torch.as_tensor(ds["next_obs"][rows], device=device).float(),
                         torch.as_tensor(ds["rewards"][rows], device=device).float(), bits, None)
    return h


def evaluate(step, nets, vae, family, ds, k, args, device, logger):
    """Online BAMDP episodes (the paper's protocol) on the test tasks and, for comparison, the training tasks;
    mode A on the test tasks."""
    seed = 10_000 * args.seed + step % 9973
    test_ids = family.test_idx[: args.eval_tasks] if args.eval_tasks else family.test_idx
    res = {}
    for split, ids in (("test", test_ids), ("train", family.train_idx[: len(test_ids)])):
        ret, succ = evaluate_bamdp(nets, vae, family, ids, k, device, seed, belief_input=args.belief_input)
        logger.log_eval(step, "B", split, ids, ret, succ)
        res[("B", split)] = (ret, succ)
    h = context_hidden(vae, ds, family, test_ids, device, seed + 1)
    ret, succ = evaluate_bamdp(nets, vae, family, test_ids, 1, device, seed + 2, h0=h, belief_input=args.belief_input)
    logger.log_eval(step, "A", "test", test_ids, ret, succ)
    res[("A", "test")] = (ret, succ)
    ret_b = res[("B", "test")][0]
    scalars = {f"eval/B_test_ep{e + 1}": float(ret_b[:, e].mean()) for e in range(k)}
    scalars |= {"eval/B_test_sum": float(ret_b.sum(1).mean()), "eval/B_test_success": float(res[("B", "test")][1].any(1).mean()),
                "eval/B_train_sum": float(res[("B", "train")][0].sum(1).mean()), "eval/A_test": float(ret.mean())}
    logger.log_scalars(step, scalars)
    return res, scalars


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def variant_name(args: Args, vae_lr: float | None = None) -> str:
    """The method label of summary.json: borel plus the flags that change what is learned; vae_lr: the lr that
    trained the VAE when it came from another run (--vae-from)."""
    method = ("borel-rlrelabel" if args.rl_relabel else "borel") if args.relabel else "borel-norelabel"
    method += f"-rr{args.relabel_episodes}" if args.relabel and args.relabel_episodes else ""
    method += f"-cql{args.cql_weight:g}" if args.cql_weight > 0 else ""
    method += "-cells" if args.belief_input == "cells" else ""
    method += "-ddqn" if args.double_q else ""
    lr = args.vae_lr if vae_lr is None else vae_lr
    return method + (f"-vaelr{lr:g}" if lr != Args.vae_lr else "")  # report.py keeps it apart from the official lr


def make_nets(family, args, k, device):
    kind = "grid" if family.env_id == "GridNavi" else "mujoco" if family.env_id in MUJOCO_FAMILY_NAMES else "point"
    size = family.config.get("size", 0)
    vae = VAE(family.obs_dim, family.act_dim, family.n_actions, kind, args, done_bit=k > 1,
              n_cells=size * size, grid_size=size).to(device)
    x_dim = family.obs_dim + (size * size if args.belief_input == "cells" else 2 * args.latent_dim)
    if family.discrete:
        nets = {"q": EnsembleMlp(1, x_dim, args.hidden, family.n_actions)}
        nets["q_targ"] = EnsembleMlp(1, x_dim, args.hidden, family.n_actions)
    else:
        nets = {"q": EnsembleMlp(2, x_dim + family.act_dim, args.hidden, 1),
                "pi": EnsembleMlp(1, x_dim, args.hidden, 2 * family.act_dim, init_w=1e-3)}
        nets["q_targ"] = EnsembleMlp(2, x_dim + family.act_dim, args.hidden, 1)
    nets["q_targ"].load_state_dict(nets["q"].state_dict())
    nets = {key: n.to(device) for key, n in nets.items()}
    opts = {"vae": torch.optim.Adam(vae.parameters(), lr=args.vae_lr), "q": torch.optim.Adam(nets["q"].parameters(), lr=args.lr)}
    if "pi" in nets:
        opts["pi"] = torch.optim.Adam(nets["pi"].parameters(), lr=args.actor_lr)
    return vae, nets, opts


def main(args: Args):
    args = resolve_args(args)
    family = make_family(args.env_id, args.preset)
    k = family.episodes_per_task
    if args.rl_relabel and not args.relabel:
        raise SystemExit("--rl-relabel trains the RL stage on the relabelled rollouts; it needs reward relabelling "
                         "(drop --no-relabel)")
    if args.belief_input not in ("latent", "cells"):
        raise SystemExit(f"--belief-input must be latent or cells, not {args.belief_input!r}")
    if args.belief_input == "cells" and family.env_id != "GridNavi":
        raise SystemExit("--belief-input cells decodes one goal probability per grid cell: GridNavi only")
    if args.elbo_latents < 0:
        raise SystemExit(f"--elbo-latents must be 0 (all latents) or positive, not {args.elbo_latents}")
    if args.double_q and not family.discrete:
        raise SystemExit("--double-q is for the DQN learner (discrete actions) only")
    if args.cql_weight > 0 and not family.discrete:
        raise SystemExit("--cql-weight is implemented for the DQN learner (discrete actions) only")
    if args.relabel and (why := relabel_unsupported(family)):
        raise SystemExit(f"reward relabelling: {why}; pass --no-relabel (the official cheetah config trains without it)")
    run_dir = make_run_dir(args.env_id, "borel", args.seed, args.run_dir)
    check_fresh_run_dir(run_dir, args.resume)
    seed_everything(args.seed)
    device = pick_device(args.cuda)
    gen = torch.Generator(device=device).manual_seed(args.seed)

    ds = ensure_dataset(args.env_id, args.preset, path=args.dataset, family=family)
    roll_np = build_rollouts(ds, family, family.train_idx, k)
    if args.relabel_episodes is not None and not args.relabel:
        raise SystemExit("--relabel-episodes sets how reward relabelling mixes rollouts; drop --no-relabel")
    if args.relabel_episodes is not None and not 1 <= args.relabel_episodes <= k:
        raise SystemExit(f"--relabel-episodes must be between 1 and k = {k}")
    vae_np = mix_rollouts(roll_np, family, k, np.random.RandomState(args.seed), args.relabel_episodes) if args.relabel else roll_np
    roll, vae_data = to_tensors(roll_np, family.discrete, device), to_tensors(vae_np, family.discrete, device)
    bits = done_bits(family.horizon, k, device)
    vae, nets, opts = make_nets(family, args, k, device)

    T_tasks = len(family.train_idx)
    n_roll = int(np.bincount(roll_np["task"]).max())
    per_epoch = math.ceil(n_roll / args.vae_rollouts_per_task) * math.ceil(T_tasks / args.vae_tasks_per_batch)
    vae_steps = int(round(args.vae_epochs * per_epoch))
    stage, vae_step, step, train_time, wall_before, history = "vae", 0, 0, 0.0, 0.0, []
    ckpt_path = Path(run_dir) / "checkpoint.pt"
    meta = {"method": "borel", "env_id": args.env_id, "preset": args.preset, "seed": args.seed, "obs_dim": family.obs_dim,
            "act_dim": family.act_dim, "n_actions": family.n_actions, "latent_dim": args.latent_dim, "hidden": args.hidden,
            "gru_hidden": args.gru_hidden, "relabel": args.relabel, "relabel_episodes": args.relabel_episodes,
            "rl_relabel": args.rl_relabel, "cql_weight": args.cql_weight, "vae_from": args.vae_from,
            "double_q": args.double_q, "belief_input": args.belief_input}
    vae_source = None  # the VAE settings of --vae-from's run, for the summary
    if args.resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, expect=meta, map_location=device)
        vae.load_state_dict(state["vae"])
        for key, n in nets.items():
            n.load_state_dict(state["nets"][key])
        for key, o in opts.items():
            o.load_state_dict(state["opts"][key])
        stage, vae_step, step, train_time, history = state["stage"], state["vae_step"], state["step"], state["train_time"], state["history"]
        wall_before, vae_source = state["wall_time"], state.get("vae_source")
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed {ckpt_path}: stage {stage}, VAE step {vae_step}, RL step {step}", flush=True)
    elif args.vae_from:
        vae_keys = ("env_id", "preset", "obs_dim", "act_dim", "n_actions", "latent_dim", "gru_hidden", "relabel",
                    "relabel_episodes")
        src = load_checkpoint(Path(args.vae_from) / "checkpoint.pt", expect={key: meta[key] for key in vae_keys})
        if src["stage"] != "rl":
            raise SystemExit(f"--vae-from {args.vae_from}: its VAE stage has not finished (VAE step {src['vae_step']})")
        try:
            vae.load_state_dict(src["vae"])
        except RuntimeError as e:
            raise SystemExit(f"--vae-from {args.vae_from}: incompatible VAE (other embedding or decoder sizes): {e}") from None
        stage, vae_step, vae_steps, history = "rl", src["vae_step"], src["vae_step"], src["history"][:1]
        vae_source = src.get("vae_source") or {key: src["args"].get(key)
                                               for key in ("seed", "vae_epochs", "vae_lr", "kl_weight", "elbo_latents")}
        print(f"VAE from {args.vae_from} ({vae_step} updates; {vae_source})", flush=True)
    logger = Logger(run_dir, {**vars(args), "run_dir": str(run_dir)})
    print(f"BOReL on {args.env_id}/{args.preset}: {T_tasks} train / {len(family.test_idx)} test tasks, k={k} episodes of "
          f"H={family.horizon}, {len(roll_np['task'])} rollouts, relabel={args.relabel}, rl_relabel={args.rl_relabel}, VAE {vae_steps} updates "
          f"({args.vae_epochs:g} epochs), {'DQN' if family.discrete else 'SAC'} {args.hidden}x2 for {args.total_steps} updates",
          flush=True)
    t_start = time.time()

    def checkpoint():
        save_checkpoint(ckpt_path, {
            "meta": meta, "args": vars(args), "stage": stage, "vae_step": vae_step, "step": step, "train_time": train_time,
            "history": history, "wall_time": wall_before + time.time() - t_start, "vae": vae.state_dict(),
            "nets": {key: n.state_dict() for key, n in nets.items()}, "opts": {key: o.state_dict() for key, o in opts.items()},
            "gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "vae_source": vae_source})

    # ALGO LOGIC: stage 1, the VAE on the (relabelled) training rollouts
    if stage == "vae":
        task_rows = torch.as_tensor(np.searchsorted(np.unique(roll_np["task"]), vae_np["task"]), device=device)
        by_task = [torch.nonzero(task_rows == i).squeeze(1) for i in range(T_tasks)]
        counts = torch.as_tensor([len(b) for b in by_task], device=device)
        first = torch.as_tensor([int(b[0]) for b in by_task], device=device)  # rollouts of a task are contiguous
        t0, losses = time.time(), []
        while vae_step < vae_steps:
            tasks = torch.randperm(T_tasks, device=device, generator=gen)[: args.vae_tasks_per_batch]
            u = torch.rand(len(tasks), args.vae_rollouts_per_task, device=device, generator=gen, dtype=torch.float64)
            idx = (first[tasks, None] + (u * counts[tasks, None]).long()).reshape(-1)
            batch = {key: vae_data[key][idx] for key in ("obs", "next_obs", "actions", "rewards")}
            loss, rec, kl = elbo_loss(vae, batch, bits, args.kl_weight, gen, args.elbo_latents)
            opts["vae"].zero_grad(set_to_none=True)
            loss.backward()
            opts["vae"].step()
            losses.append((rec.item(), kl.item()))
            vae_step += 1
            if vae_step % args.log_every == 0:
                m = np.mean(losses[-args.log_every:], 0)
                logger.log_scalars(vae_step, {"vae/reconstruction": m[0], "vae/kl": m[1]})
            if vae_step % 1000 == 0 or vae_step == vae_steps:
                m = np.mean(losses[-200:], 0)
                print(f"VAE {vae_step}/{vae_steps}: reconstruction {m[0]:.3f} KL {m[1]:.3f} (sums per rollout), "
                      f"{vae_step / max(time.time() - t0, 1e-9):.0f} updates/s", flush=True)
                checkpoint()
        history.append({"vae_reconstruction": float(np.mean([l[0] for l in losses[-200:]])) if losses else None,
                        "vae_kl": float(np.mean([l[1] for l in losses[-200:]])) if losses else None})
        stage = "rl"
        checkpoint()

    # ALGO LOGIC: stage 2, state relabelling with the frozen encoder (the unmixed data, or with --rl-relabel the
    # relabelled rollouts, whose beliefs are then computed from the relabelled rewards), then offline DQN / SAC
    for p in vae.parameters():
        p.requires_grad_(False)
    rl_roll = vae_data if args.rl_relabel else roll
    data = HyperData(rl_roll, policy_belief(vae, beliefs(vae, rl_roll, bits), args.belief_input), args.goal_terminal)
    res, scalars = None, {}
    if step == 0:
        res, scalars = evaluate(step, nets, vae, family, ds, k, args, device, logger)
        print(f"eval step 0: " + " | ".join(f"{key[5:]} {v:.2f}" for key, v in scalars.items()), flush=True)
    start_step, last, tasks = step, {}, None
    n_tasks = len(data.task_ids)
    t_rl = time.time()  # SPS and ETA of the RL stage, not counting the VAE stage
    while step < args.total_steps:
        t0 = time.time()
        n_block = min(args.eval_every - step % args.eval_every, args.total_steps - step)
        for _ in range(n_block):
            if tasks is None or step % args.updates_per_iter == 0:
                tasks = torch.randint(n_tasks, (args.meta_batch,), device=device, generator=gen)
            b = data.sample(tasks, args.batch_size, gen)
            stats = dqn_update(nets, opts, b, args) if family.discrete else sac_update(nets, opts, b, args, gen)
            step += 1
            if step % args.log_every == 0:
                last = {key: float(v) for key, v in stats.items()}
                logger.log_scalars(step, last | {"perf/updates_per_s": (step - start_step) / max(train_time + time.time() - t0, 1e-9)})
            if step % args.print_every == 0:
                extra = {"Q": last.get("q/mean", float("nan"))}
                if scalars:
                    extra |= {"test_sum": scalars["eval/B_test_sum"], "test_ep1": scalars["eval/B_test_ep1"]}
                print_progress(step, args.total_steps, t_rl, extra, start_step)
        train_time += time.time() - t0
        if step % args.eval_every == 0 or step == args.total_steps:
            res, scalars = evaluate(step, nets, vae, family, ds, k, args, device, logger)
            history.append({"step": step} | {key[5:]: v for key, v in scalars.items()})
            print(f"eval step {step}: " + " | ".join(f"{key[5:]} {v:.2f}" for key, v in scalars.items()), flush=True)
            checkpoint()

    if res is None:
        res, scalars = evaluate(step, nets, vae, family, ds, k, args, device, logger)
    ups = step / max(train_time, 1e-9)
    ret_b, succ_b = res[("B", "test")]
    modes = {"B_sum": eval_entry(ret_b.sum(1), res[("B", "train")][0].sum(1))}
    modes |= {f"B_ep{e + 1}": eval_entry(ret_b[:, e], res[("B", "train")][0][:, e]) for e in range(k)}
    modes["A"] = eval_entry(res[("A", "test")][0][:, 0])
    method = variant_name(args, (vae_source or {}).get("vae_lr"))
    write_summary(run_dir, method=method, env_id=args.env_id, preset=args.preset,
                  seed=args.seed, total_steps=step, wall_time_s=wall_before + time.time() - t_start, updates_per_s=ups,
                  machine=machine_info(device), dataset=str(ds.path), eval=modes,
                  extra={"vae": history[0] if history else None, "final": last, "train_time_s": train_time,
                         "success_B_test": float(succ_b.any(1).mean()), "vae_updates": vae_steps,
                         "best_B_test_sum": max((h.get("B_test_sum", -1e9) for h in history), default=None),
                         "vae_from": args.vae_from, "vae_source": vae_source})
    logger.close()
    print(f"done: {step} RL updates, {ups:.1f} updates/s, summary in {run_dir}/summary.json", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
