"""LDM: imaginary tasks from a latent dynamics mixture, trained from offline data.

Paper: Suyoung Lee, Sae-Young Chung, "Improving Generalization in Meta-RL with Imaginary Tasks from Latent Dynamics
Mixture", NeurIPS 2021, arXiv:2105.13524. Official code: github.com/suyoung-lee/LDM (built on VariBAD).

Method. A task is a BAMDP rollout of k consecutive episodes (H+ = k H steps, the task is kept, the state is reset;
the "episode ended" bit is appended to the observation the encoders read when k > 1). Two networks share nothing:
1. Latent dynamics model (a VariBAD VAE), trained by its ELBO on real training-task rollouts only: a GRU encoder
   q_phi(m | tau_{:t}) = N(mu_t, diag sigma_t^2) over (a_t, s_{t+1}, r_t) (t = 0 is the prior of a zero hidden state)
   and a reward decoder p_theta(r | s, a, s'; m) with dropout on its input embeddings (not on m).
2. The policy: an RL^2 agent, its own deterministic GRU over (a_t, s_{t+1}, r_t) whose state is read by two linear
   heads [mu, logvar] and fed to the value/policy trunks. It trains on real AND imaginary tasks.
Imaginary task: n = workers - n_mix latents of n distinct training tasks are mixed per latent dimension,
    alpha[d, :] = beta Dirichlet(1_n) - (beta - 1) / n              (sum_k alpha[d, k] = 1; beta > 1 extrapolates)
    mhat_t[d]  = sum_k alpha[d, k] m_t^(k)[d],   m_t^(k) ~ q_phi(m | tau^(k)_{:t})   (posterior samples before step t)
    rhat_t     = p_theta(s_t, a_t, s_{t+1}; mhat_t)   with the decoder's dropout ON   (grid: 1.1 sigmoid - 0.1)
and a "host" rollout's transitions get the rewards rhat_t (all LDM benchmarks vary the reward only).

Equations (tau one rollout, z_t ~ q_t one reparameterised sample, q_{-1} = N(0, I)):
    ELBO loss  L(tau) = sum_{t=0..H+} [ sum_{j=0..H+-1} l(p_theta(s_j, a_j, s_{j+1}; z_t), r_j) + kl_w KL(q_t || q_{t-1}) ]
               l = BCE of [r_j = 1] (grid) or squared error (continuous), kl_w = 1
    Policy (offline, see Deviations), f_t = [mu_t, logvar_t] of the policy GRU after t steps (+ s_t if --policy-obs):
    double DQN y_t = r_t + gamma (1 - d_t) Qbar(f'_{t+1}, argmax_a Q(f_{t+1}, a)),   L = mean (Q(f_t, a_t) - y_t)^2
    SAC        y_t = r_t + gamma (1 - d_t) [min_i Qbar_i(f'_{t+1}, a') - alpha log pi(a' | f_{t+1})],  a' ~ pi
               L_pi = mean [alpha log pi(a~ | f_t) - min_i Q_i(f_t, a~)]   (f detached: the GRU learns from the TD loss)
Meta-test: in each held-out task, k consecutive deterministic episodes with the policy GRU carried across them
(no gradient steps); the VAE is not used at test time.

Deviations (LDM is online and on-policy in the paper; the offline variant of spec ldm.md §5a):
- Data: the project's shared offline datasets (per-task learners' replay data of the training tasks, single episodes
  grouped into rollouts of k consecutive episodes) instead of 16 on-policy workers with continuously resampled tasks.
- The VAE is trained first, on real rollouts only, then frozen (the official VAE buffer freezes after its first
  10k-100k trajectories anyway, spec P3); the policy then trains on real rollouts plus imaginary ones.
- RL loss: A2C (grid) / PPO (MuJoCo) cannot consume logged data; replaced by the off-policy learner borel.py uses
  (double DQN for the grid, SAC with fixed alpha for continuous actions) over whole BAMDP rollouts, BPTT through the
  policy GRU from a zero hidden state, target networks by Polyak averaging (tau 0.005). The policy network's sizes,
  its separation from the VAE, gamma and the grad-norm clip (0.5, GRU and trunks separately) are LDM's.
- Imaginary rollouts: each policy batch holds round(batch n_mix / workers) of them (the paper's share of mixture
  workers). Host transitions are a random training rollout from the data (the offline analogue of the mixture
  worker's own rollout in a random training task); the n mixed latents come from one random rollout of each of n
  distinct training tasks (posterior samples before each step t, fresh noise per batch, spec P6).
- The mixture's role is assigned per whole rollout (spec P5 fix); grid imaginary rewards are the expected reward
  1.1 p - 0.1 (as official), continuous ones the raw regression output (no return normalisation here, for real or
  imaginary rewards; official PPO normalises both).
- Continuous families: SAC's tanh-Gaussian actor (state-dependent std) instead of PPO's unsquashed Gaussian with a
  learned state-independent std; no observation normalisation (off-policy, fixed data).
- Families outside the paper (point robots) use the MuJoCo sizes; the policy sees the state there (--policy-obs).
- The grid decoder reads the cell (x, y) without the episode-ended bit (the reward does not depend on it). Hidden
  layers use PyTorch's default init (official: normc); the GRUs keep VariBAD's orthogonal weights / zero biases.
- GRUs are never reset inside a rollout (official quirk P7 not reproduced); each episode starts from its true
  reset state, the encoders read the terminal state with the ended bit at each episode's last step.
- `--elbo-latents N` (off by default) reconstructs from N random latents per rollout instead of all H+ + 1, rescaled:
  an unbiased, cheaper ELBO for CPU runs (the grid's 121 x 120 x 25 decoder rows cost ~0.65 s per update here).
- Measured, not changed: trained with dropout 0.7, the grid decoder in eval mode (dropout off) is badly calibrated (its
  p(r = 1) at the true goal falls to ~0 while it is 0.96-0.98 with dropout on), so `--no-mix-dropout` imagines almost no
  reward at all; the official code never switches dropout off.
- ``--relabel-share F`` (not in the paper, off by default): F of the real rollouts of each policy batch are replaced by
  relabelled ones, another training task's stored rollout with the true rewards of a random other training task
  (from a fixed pool drawn once). The per-task data agents only walk to their own goals, so without it a policy can
  tell the task from its states; with it every task's reward appears on every task's states.
- Also reported: mode A (policy GRU state after one offline episode of the test task's data, then one episode).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

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
    """task family (common/envs.py): GridNavi, PointRobot, HalfCheetahVel, ..."""
    preset: str | None = None
    """task preset (default: GridNavi ldm -- test goals outside the training region; others: the family's default)"""
    dataset: str | None = None
    """offline dataset path (default: datasets/{env}__{preset}__s0.npz, built if missing)"""
    seed: int = 1
    """seed of the VAE, the mixture, the RL learner and the evaluation"""
    total_steps: int | None = None
    """policy updates (grid 50k ~ the official 1e8 frames / (16 x 120) iterations; others 100k)"""
    eval_every: int | None = None
    """policy updates between evaluations and checkpoints"""
    cuda: bool = True
    """use cuda:0 when available"""
    resume: bool = False
    """continue the run in --run-dir from its checkpoint"""
    run_dir: str | None = None
    """run directory (default runs/{env}__ldm__s{seed}__{time})"""

    # latent dynamics model (VAE, the *_ldm.py configs)
    vae_steps: int = 10_000
    """ELBO updates before the policy stage"""
    vae_batch: int | None = None
    """rollouts per ELBO update (grid 25, others 10)"""
    vae_lr: float = 1e-3
    """VAE Adam learning rate"""
    kl_weight: float = 1.0
    """weight of the KL(q_t || q_{t-1}) terms"""
    latent_dim: int | None = None
    """task latent m (grid 32, others 5)"""
    decoder_hidden: tuple[int, ...] | None = None
    """reward decoder MLP (grid 32 32, others 64 32)"""
    decoder_dropout: float | None = None
    """dropout on the decoder's input embeddings (grid 0.7, others 0.5)"""
    elbo_latents: int = 0
    """latents per rollout that reconstruct the rollout's rewards in an ELBO update (0: all H+ + 1, official; fewer,
    rescaled, is an unbiased and cheaper estimate)"""

    # imaginary tasks
    n_mix: int | None = None
    """mixture workers out of --workers (grid 2, cheetah 4); 0 = no imaginary tasks (the offline RL^2 ablation)"""
    workers: int = 16
    """official parallel workers; n = workers - n_mix latents are mixed, and n_mix / workers of a batch is imaginary"""
    mix_beta: float = 1.0
    """extrapolation beta of the mixture weights (1: convex mixtures; AntGoal 2)"""
    mix_dropout: bool = True
    """decoder dropout on when imagining rewards (official: the decoder is never put in eval mode)"""
    relabel_share: float = 0.0
    """share of the real rollouts in a policy batch replaced by reward-relabelled ones: another training task's
    rollout scored with this rollout's task reward (true rewards, not decoded; point robots and grid only). Not in the
    paper (0 = off): per-task data cover only the way to each goal, relabelling shows the policy every task's reward
    on every task's states, so it must read the task from rewards"""
    relabel_pool: int = 4
    """relabelled rollouts precomputed per stored rollout (fixed pool, drawn once with the run's seed)"""

    # policy (RL^2 network, the *_rl2.py configs) and its offline learner
    policy_gru: int = 128
    """policy GRU hidden size"""
    policy_latent: int | None = None
    """size of each of the policy GRU's mu / logvar heads (grid 32, others 128)"""
    policy_hidden: tuple[int, ...] | None = None
    """value / actor trunk (tanh; grid 32, others 128)"""
    policy_obs: bool | None = None
    """the trunks also read the current state (official: AntDir only; point robots here)"""
    batch_size: int = 32
    """rollouts per policy update (real + imaginary)"""
    lr: float = 7e-4
    """policy and policy-GRU learning rate"""
    gamma: float | None = None
    """discount (grid 0.95, MuJoCo 0.97, point robots 0.9)"""
    tau: float = 0.005
    """Polyak rate of the target networks, every update"""
    alpha: float | None = None
    """SAC entropy weight, fixed (point 0.01, MuJoCo 0.2)"""
    max_grad_norm: float = 0.5
    """grad-norm clip, applied to the GRU and the trunks separately"""

    # evaluation
    eval_tasks: int | None = None
    """test tasks evaluated (default all)"""
    log_every: int = 100
    """updates between train.csv rows"""
    print_every: int = 1000
    """updates between progress lines"""


# per-family defaults (official configs: config/gridworld/args_grid_{ldm,rl2}.py, config/mujoco/*cheetah_vel*)
GRID = dict(preset="ldm", total_steps=50_000, eval_every=2_500, vae_batch=25, latent_dim=32, decoder_hidden=(32, 32),
            decoder_dropout=0.7, n_mix=2, policy_latent=32, policy_hidden=(32,), policy_obs=False, gamma=0.95, alpha=0.0)
MUJOCO = dict(total_steps=100_000, eval_every=5_000, vae_batch=10, latent_dim=5, decoder_hidden=(64, 32),
              decoder_dropout=0.5, n_mix=4, policy_latent=128, policy_hidden=(128,), policy_obs=False, gamma=0.97,
              alpha=0.2)
POINT = dict(MUJOCO, policy_obs=True, gamma=0.9, alpha=0.01, eval_every=2_500)


def family_table(env: str) -> dict:
    return GRID if env == "GridNavi" else MUJOCO if env in MUJOCO_FAMILY_NAMES else POINT


def resolve_args(args: Args) -> Args:
    env = canonical_env_id(args.env_id)
    table = family_table(env)
    filled = {k: v for k, v in table.items() if k != "preset" and getattr(args, k) is None}
    return dataclasses.replace(args, env_id=env, preset=args.preset or table.get("preset") or default_preset(env), **filled)


# ---------------------------------------------------------------------------------------------
# Data: BAMDP rollouts of k consecutive episodes per task
# ---------------------------------------------------------------------------------------------


def build_rollouts(ds, family, task_ids, k: int) -> dict:
    """Group each task's episodes into rollouts of k consecutive episodes (a remainder is dropped). Returns numpy arrays
    obs/next_obs (R, H+, obs_dim), actions (R, H+[, act_dim]), rewards/terminals (R, H+), task (R,), sorted by task."""
    rows, task = bamdp_rollout_rows(ds, task_ids, family.horizon, k, "ldm.py")
    return {key: ds[key][rows] for key in ("obs", "next_obs", "actions", "rewards", "terminals")} | {"task": task}


def to_tensors(roll: dict, discrete: bool, device) -> dict:
    t = {key: torch.as_tensor(v, device=device) for key, v in roll.items()}
    for key in ("obs", "next_obs", "rewards"):
        t[key] = t[key].float()
    t["actions"] = t["actions"].long() if discrete else t["actions"].float()
    t["terminals"] = t["terminals"].float()
    return t


def done_bits(H: int, k: int, device) -> torch.Tensor:
    """The encoders' 'episode ended' bit of each of the k H steps (1 on each episode's last step)."""
    return ((torch.arange(H * k, device=device) % H) == H - 1).float()


class HistoryEmbed(nn.Module):
    """Embeddings of one history entry (a_t, [s_{t+1}, done_t], r_t) -> ReLU features (models/encoder.py; an embedding
    size 0 drops that input, as the grid's actions)."""

    def __init__(self, obs_in, act_in, n_actions, s_emb, a_emb, r_emb):
        super().__init__()
        self.n_actions = n_actions
        self.s = nn.Linear(obs_in, s_emb)
        self.a = nn.Linear(act_in, a_emb) if a_emb > 0 else None
        self.r = nn.Linear(1, r_emb)
        self.out_dim = s_emb + a_emb + r_emb

    def forward(self, actions, next_obs, rewards, bits=None):
        s = next_obs if bits is None else torch.cat([next_obs, bits], -1)
        parts = [F.relu(self.s(s))]
        if self.a is not None:
            a = F.one_hot(actions, self.n_actions).float() if self.n_actions else actions
            parts.append(F.relu(self.a(a)))
        parts.append(F.relu(self.r(rewards[..., None])))
        return torch.cat(parts, -1)


def make_gru(n_in, hidden):
    gru = nn.GRU(n_in, hidden)
    for name, p in gru.named_parameters():  # varibad: orthogonal weights, zero biases
        nn.init.orthogonal_(p) if "weight" in name else nn.init.zeros_(p)
    return gru


# ---------------------------------------------------------------------------------------------
# Latent dynamics model: VariBAD encoder + reward decoder with input dropout
# ---------------------------------------------------------------------------------------------


class LatentDynamics(nn.Module):
    """q_phi(m | tau_{:t}) and p_theta(r | s, a, s'; m). grid: decoder input [m, emb(s')] and a Bernoulli logit;
    continuous: [m, emb(s'), emb(a), emb(s)] and a regression output. Dropout acts on the embeddings only."""

    def __init__(self, family, args, done_bit: bool):
        super().__init__()
        self.grid, self.done_bit = family.env_id == "GridNavi", done_bit
        a_in = family.n_actions or family.act_dim
        a_emb, r_emb = (0, 8) if self.grid else (16, 16)
        self.embed = HistoryEmbed(family.obs_dim + int(done_bit), a_in, family.n_actions, 32, a_emb, r_emb)
        self.gru = make_gru(self.embed.out_dim, 128)
        self.fc_mu = nn.Linear(128, args.latent_dim)
        self.fc_logvar = nn.Linear(128, args.latent_dim)
        self.dec_s = nn.Linear(family.obs_dim, 32)
        self.dec_a = None if self.grid else nn.Linear(family.act_dim, 16)
        x_dim = 32 if self.grid else 32 + 16 + 32
        # first layer on [m, x] split as W_m m + W_x x, so a latent is broadcast over many targets without copies
        self.dec_in_m = nn.Linear(args.latent_dim, args.decoder_hidden[0])
        self.dec_in_x = nn.Linear(x_dim, args.decoder_hidden[0], bias=False)
        layers = []
        for i, o in zip(args.decoder_hidden[:-1], args.decoder_hidden[1:]):
            layers += [nn.ReLU(), nn.Linear(i, o)]
        self.dec_rest = nn.Sequential(*layers, nn.ReLU(), nn.Linear(args.decoder_hidden[-1], 1))
        self.dropout = nn.Dropout(args.decoder_dropout)

    def encode(self, actions, next_obs, rewards, bits, h0=None):
        """Beliefs along time-major histories: mu, logvar (T+1, B, m), index 0 the belief before any step (the prior
        when h0 is None), and the last hidden state (1, B, 128)."""
        x = self.embed(actions, next_obs, rewards, bits if self.done_bit else None)
        if h0 is None:
            h0 = x.new_zeros(1, x.shape[1], self.gru.hidden_size)
        out, hT = self.gru(x, h0)
        h = torch.cat([h0, out], 0)
        return self.fc_mu(h), self.fc_logvar(h), hT

    def decode(self, z, obs, actions, next_obs, expand=None):
        """Reward (grid: logit of r = 1) of transitions under latents z (broadcast against the transitions' leading
        dims). expand: leading shape the embeddings are materialised to before dropout, so that every (latent,
        transition) row draws its own mask, as when the official code decodes expanded inputs."""
        x = [F.relu(self.dec_s(next_obs))]
        if not self.grid:
            x += [F.relu(self.dec_a(actions)), F.relu(self.dec_s(obs))]
        x = torch.cat(x, -1)
        if expand is not None:
            x = x.expand(*expand, x.shape[-1])
        return self.dec_rest(self.dec_in_m(z) + self.dec_in_x(self.dropout(x))).squeeze(-1)


def gaussian_kl(mu_q, logvar_q, mu_p, logvar_p):
    """KL(N(mu_q, var_q) || N(mu_p, var_p)) summed over the last dim."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) / logvar_p.exp() - 1).sum(-1)


def elbo_loss(vae: LatentDynamics, batch: dict, bits, kl_weight: float, generator=None, n_latents: int = 0):
    """Negative ELBO per rollout, averaged over the batch: every one of the H+ + 1 latents reconstructs every one of the
    H+ rewards (decoder inputs materialised as (H+ + 1, H+, B) rows, so dropout masks are per row), plus kl_weight times
    the sum of KL(q_t || q_{t-1}), q_{-1} = N(0, I). batch fields are (B, T, ...). n_latents > 0: the reconstruction
    uses that many random latents per rollout, scaled by (H+ + 1) / n_latents (a CPU shortcut; 0 = all, official)."""
    tm = {key: batch[key].transpose(0, 1) for key in ("obs", "next_obs", "actions", "rewards")}
    T, B = tm["rewards"].shape
    mu, logvar, _ = vae.encode(tm["actions"], tm["next_obs"], tm["rewards"], bits[:, None, None].expand(-1, B, 1))
    z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    scale = 1.0
    if n_latents and n_latents < T + 1:  # --elbo-latents: an unbiased subsample of the reconstruction terms
        pick = torch.rand(B, T + 1, generator=generator, device=mu.device).argsort(-1)[:, :n_latents].T  # (n, B)
        z, scale = z.gather(0, pick[..., None].expand(-1, -1, z.shape[-1])), (T + 1) / n_latents
    L = z.shape[0]
    pred = vae.decode(z[:, None], tm["obs"], tm["actions"], tm["next_obs"], expand=(L, T, B))  # (L, T, B)
    target = tm["rewards"][None]
    if vae.grid:
        rec = F.binary_cross_entropy_with_logits(pred, (target == 1.0).to(pred.dtype).expand_as(pred), reduction="none")
    else:
        rec = (pred - target).pow(2)
    mu_prev = torch.cat([torch.zeros_like(mu[:1]), mu[:-1]])
    lv_prev = torch.cat([torch.zeros_like(logvar[:1]), logvar[:-1]])
    kl = gaussian_kl(mu, logvar, mu_prev, lv_prev)  # (T+1, B)
    rec_sum, kl_sum = scale * rec.sum((0, 1)).mean(), kl.sum(0).mean()
    return rec_sum + kl_weight * kl_sum, rec_sum, kl_sum


@torch.no_grad()
def posteriors(vae: LatentDynamics, roll: dict, bits, chunk: int = 2048):
    """The frozen encoder's belief of every stored rollout at every step: mu, logvar (R, H+ + 1, m)."""
    mus, lvs = [], []
    for i in range(0, len(roll["rewards"]), chunk):
        sl = {key: roll[key][i: i + chunk].transpose(0, 1) for key in ("actions", "next_obs", "rewards")}
        B = sl["rewards"].shape[1]
        mu, logvar, _ = vae.encode(sl["actions"], sl["next_obs"], sl["rewards"], bits[:, None, None].expand(-1, B, 1))
        mus.append(mu.transpose(0, 1))
        lvs.append(logvar.transpose(0, 1))
    return torch.cat(mus), torch.cat(lvs)


# ---------------------------------------------------------------------------------------------
# Imaginary tasks: latent mixture and decoded rewards
# ---------------------------------------------------------------------------------------------


def mixture_weights(n_seq: int, latent_dim: int, n: int, beta: float, generator=None, device="cpu"):
    """alpha (n_seq, latent_dim, n): per latent dimension beta Dirichlet(1_n) - (beta - 1) / n (rows sum to 1).
    Dirichlet(1_n) is sampled as normalised Exp(1) draws (so the seeded generator drives it)."""
    e = -torch.log(torch.rand(n_seq, latent_dim, n, generator=generator, device=device).clamp_min(1e-12))
    return beta * e / e.sum(-1, keepdim=True) - (beta - 1.0) / n


def mix_latents(alpha, z):
    """mhat[b, t, d] = sum_k alpha[b, d, k] z[b, k, t, d]; alpha (B, m, n), z (B, n, T, m) -> (B, T, m)."""
    return torch.einsum("bdk,bktd->btd", alpha, z)


def imaginary_rewards(vae: LatentDynamics, mhat, obs, actions, next_obs, dropout: bool = True):
    """Rewards of the host transitions (B, T, ...) under the mixed latents (B, T, m), decoded with dropout on (official:
    the decoder stays in train mode) or off; grid: the expected reward 1.1 sigmoid - 0.1 of {-0.1, +1}."""
    was = vae.training
    vae.train(dropout)
    with torch.no_grad():
        out = vae.decode(mhat, obs, actions, next_obs)
    vae.train(was)
    return 1.1 * torch.sigmoid(out) - 0.1 if vae.grid else out


class Mixer:
    """Makes imaginary rollouts: per rollout, n distinct training tasks, one random rollout of each, posterior samples
    of their beliefs mixed with fresh alpha, rewards of a random host rollout decoded under the mixture."""

    def __init__(self, vae, roll: dict, mu, logvar, n: int, beta: float, dropout: bool):
        self.vae, self.roll, self.mu, self.logvar, self.beta, self.dropout = vae, roll, mu, logvar, beta, dropout
        task_ids, self.task_of = torch.unique(roll["task"], return_inverse=True)
        self.n_tasks = len(task_ids)
        if not 1 <= n <= self.n_tasks:
            raise SystemExit(f"the mixture needs n = workers - n_mix = {n} distinct training tasks, the data has "
                             f"{self.n_tasks}; lower --workers")
        self.n = n
        self.counts = torch.bincount(self.task_of, minlength=self.n_tasks)
        self.first = torch.cumsum(self.counts, 0) - self.counts  # rollouts are sorted by task

    def pick(self, n_seq, generator=None):
        """Rollout indices (n_seq, n): one random rollout of each of n distinct random training tasks per sequence."""
        dev = self.mu.device
        tasks = torch.rand(n_seq, self.n_tasks, generator=generator, device=dev).argsort(-1)[:, : self.n]
        u = torch.rand(n_seq, self.n, generator=generator, device=dev, dtype=torch.float64)
        return self.first[tasks] + (u * self.counts[tasks]).long()

    def latents(self, n_seq, t_index, generator=None):
        """Mixed latents (n_seq, len(t_index), m) at belief indices t_index (posterior samples, fresh alpha)."""
        dev = self.mu.device
        rows = self.pick(n_seq, generator)
        mu, lv = self.mu[rows][:, :, t_index], self.logvar[rows][:, :, t_index]  # (n_seq, n, T, m)
        z = mu + (0.5 * lv).exp() * torch.randn(mu.shape, generator=generator, device=dev)
        alpha = mixture_weights(n_seq, mu.shape[-1], self.n, self.beta, generator, dev)
        return mix_latents(alpha, z)

    def sample(self, n_seq, generator=None):
        """n_seq imaginary rollouts: host rollouts' obs/actions/next_obs/terminals with decoded rewards."""
        R, T = self.roll["rewards"].shape
        host = torch.randint(R, (n_seq,), generator=generator, device=self.mu.device)
        b = {key: self.roll[key][host] for key in ("obs", "next_obs", "actions", "terminals")}
        mhat = self.latents(n_seq, torch.arange(T, device=self.mu.device), generator)  # belief before step t
        b["rewards"] = imaginary_rewards(self.vae, mhat, b["obs"], b["actions"], b["next_obs"], self.dropout)
        return b


def relabel_pool(roll: dict, family, size: int, rng: np.random.RandomState) -> dict:
    """--relabel-share: `size` relabelled rollouts as numpy arrays, host (P,) a stored rollout index and rewards (P, H+)
    the rewards its transitions earn in target (P,), a random training task other than the host's own."""
    tasks = np.unique(roll["task"])
    if len(tasks) < 2:
        raise SystemExit("--relabel-share needs at least two training tasks")
    host = rng.randint(len(roll["task"]), size=size)
    shift = rng.randint(1, len(tasks), size=size)  # a uniformly random task other than the host's
    target = tasks[(np.searchsorted(tasks, roll["task"][host]) + shift) % len(tasks)]
    rewards = relabel_rewards(family, target[:, None], roll["obs"][host], roll["actions"][host], roll["next_obs"][host])[0]
    return {"host": host, "target": target, "rewards": rewards.astype(np.float32)}


@torch.no_grad()
def grid_probe(vae, mixer, family, n_latents=1000, generator=None):
    """The mixture check of spec §9 on the grid. For n_latents imaginary latents mixed from final beliefs (after the whole
    rollout), decode p(r = 1 | cell) over all cells; returns the fraction whose argmax cell is a test goal, with dropout on
    (one mask per cell) and off (eval mode), and the fraction of training rollouts whose own final belief decodes its goal
    cell as the argmax of p averaged over 20 dropout masks."""
    size = family.config["size"]
    cells = torch.tensor([(x, y) for x in range(size) for y in range(size)], dtype=torch.float32, device=mixer.mu.device)
    T = mixer.mu.shape[1] - 1
    m = mixer.latents(n_latents, torch.tensor([T], device=cells.device), generator)[:, 0]  # (N, m)
    test_cells = torch.as_tensor(family.tasks[family.test_idx], device=cells.device)
    is_test = (cells[:, None] == test_cells[None]).all(-1).any(-1)  # (cells,)
    out = {}
    was = vae.training
    for name, drop in (("dropout", True), ("no_dropout", False)):
        vae.train(drop)
        logits = vae.decode(m[:, None], None, None, cells, expand=(len(m), len(cells)))
        out[f"mix_argmax_test_{name}"] = float(is_test[logits.argmax(-1)].float().mean())
    # the decoder as it is used (dropout on, the official decoder is never in eval mode), averaged over 20 masks
    vae.train()
    goals = torch.as_tensor(family.tasks, device=cells.device)[mixer.roll["task"]]  # (R, 2)
    p = torch.stack([torch.sigmoid(vae.decode(mixer.mu[:, -1, None], None, None, cells, expand=(len(goals), len(cells))))
                     for _ in range(20)]).mean(0)
    out["own_goal_argmax"] = float((cells[p.argmax(-1)] == goals).all(-1).float().mean())
    vae.train(was)
    return out


# ---------------------------------------------------------------------------------------------
# Policy: RL^2 network (GRU -> [mu, logvar] -> tanh trunks) and its offline learner
# ---------------------------------------------------------------------------------------------


class RL2Encoder(nn.Module):
    """The policy's own GRU over (a_t, [s_{t+1}, done_t], r_t); features f_t = [mu_t, logvar_t] (deterministic heads)."""

    def __init__(self, family, args, done_bit: bool):
        super().__init__()
        self.done_bit = done_bit
        grid = family.env_id == "GridNavi"
        a_emb, r_emb = (0, 8) if grid else (16, 16)
        self.embed = HistoryEmbed(family.obs_dim + int(done_bit), family.n_actions or family.act_dim, family.n_actions,
                                  32, a_emb, r_emb)
        self.gru = make_gru(self.embed.out_dim, args.policy_gru)
        self.fc_mu = nn.Linear(args.policy_gru, args.policy_latent)
        self.fc_logvar = nn.Linear(args.policy_gru, args.policy_latent)
        self.out_dim = 2 * args.policy_latent

    def heads(self, h):
        return torch.cat([self.fc_mu(h), self.fc_logvar(h)], -1)

    def forward(self, actions, next_obs, rewards, bits, h0=None):
        """(T, B, ...) histories -> features (T+1, B, F) (index t: after t steps) and the last hidden state."""
        x = self.embed(actions, next_obs, rewards, bits if self.done_bit else None)
        if h0 is None:
            h0 = x.new_zeros(1, x.shape[1], self.gru.hidden_size)
        out, hT = self.gru(x, h0)
        return self.heads(torch.cat([h0, out], 0)), hT


class Trunks(nn.Module):
    """M tanh MLPs as one batched network, weights (M, in, out); x (..., in) -> (M, ..., out)."""

    def __init__(self, members, in_dim, hidden, out_dim):
        super().__init__()
        dims = [in_dim, *hidden, out_dim]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i, o in zip(dims[:-1], dims[1:]):
            lin = [nn.Linear(i, o) for _ in range(members)]  # PyTorch's default init, member by member
            self.weights.append(nn.Parameter(torch.stack([l.weight.detach().T for l in lin])))
            self.biases.append(nn.Parameter(torch.stack([l.bias.detach()[None] for l in lin])))

    def forward(self, x, frozen: bool = False):
        lead, M = x.shape[:-1], self.weights[0].shape[0]
        h = x.reshape(1, -1, x.shape[-1]).expand(M, -1, -1)
        n = len(self.weights)
        for j, (w, b) in enumerate(zip(self.weights, self.biases)):
            if frozen:  # the actor's step: gradients reach the action only
                w, b = w.detach(), b.detach()
            h = torch.baddbmm(b, h, w)
            if j < n - 1:
                h = torch.tanh(h)
        return h.reshape(M, *lead, h.shape[-1])


def make_policy(family, args, done_bit: bool, device):
    """nets: 'enc' (policy GRU), 'q' (DQN: 1 member, n_actions outputs; SAC: twin critics), 'pi' (SAC actor), and
    target copies 'enc_targ', 'q_targ'."""
    x_dim = 2 * args.policy_latent + (family.obs_dim if args.policy_obs else 0)
    if family.discrete:
        critic = lambda: Trunks(1, x_dim, args.policy_hidden, family.n_actions)  # noqa: E731
    else:
        critic = lambda: Trunks(2, x_dim + family.act_dim, args.policy_hidden, 1)  # noqa: E731
    nets = {"enc": RL2Encoder(family, args, done_bit), "q": critic(),
            "enc_targ": RL2Encoder(family, args, done_bit), "q_targ": critic()}
    if not family.discrete:
        nets["pi"] = Trunks(1, x_dim, args.policy_hidden, 2 * family.act_dim)
    nets["enc_targ"].load_state_dict(nets["enc"].state_dict())
    nets["q_targ"].load_state_dict(nets["q"].state_dict())
    nets = {key: n.to(device) for key, n in nets.items()}
    opts = {key: torch.optim.Adam(nets[key].parameters(), lr=args.lr) for key in ("enc", "q", "pi") if key in nets}
    return nets, opts


def policy_sample(pi, x, deterministic=False, generator=None):
    """tanh-Gaussian pi(a | f): log sigma clamped to [-20, 2]; deterministic action tanh(mean)."""
    mean, log_std = pi(x)[0].chunk(2, -1)
    if deterministic:
        return torch.tanh(mean), None
    log_std = log_std.clamp(-20.0, 2.0)
    eps = torch.randn(mean.shape, generator=generator, device=mean.device)
    a = torch.tanh(mean + log_std.exp() * eps)
    log_pi = (-0.5 * eps.pow(2) - log_std - 0.5 * np.log(2 * np.pi) - torch.log(1 - a.pow(2) + 1e-6)).sum(-1)
    return a, log_pi


def polyak_(target, source, tau):
    with torch.no_grad():
        for pt, p in zip(target.parameters(), source.parameters()):
            pt.lerp_(p, tau)


def policy_inputs(enc, b, bits, policy_obs: bool, h0=None):
    """Time-major features x_t (T+1, B, .) of rollouts b (B, T, ...): GRU features after t steps [+ s_t]."""
    tm = {key: b[key].transpose(0, 1) for key in ("actions", "next_obs", "rewards")}
    B = tm["rewards"].shape[1]
    f, _ = enc(tm["actions"], tm["next_obs"], tm["rewards"], bits[:, None, None].expand(-1, B, 1), h0)
    if policy_obs:
        s = torch.cat([b["obs"], b["next_obs"][:, -1:]], 1).transpose(0, 1)  # s_t for t = 0..T
        f = torch.cat([f, s], -1)
    return f


def step_(opts, nets, keys, loss, max_grad_norm):
    for key in keys:
        opts[key].zero_grad(set_to_none=True)
    loss.backward()
    for key in keys:
        nn.utils.clip_grad_norm_(nets[key].parameters(), max_grad_norm)
        opts[key].step()


def dones(b, bootstrap_end: bool):
    """d_t (T, B): dataset terminals, and the rollout's last step unless the end is a time limit to bootstrap through."""
    d = b["terminals"].transpose(0, 1).clone()
    if not bootstrap_end:
        d[-1] = 1.0
    return d


def dqn_update(nets, opts, b, bits, args, bootstrap_end):
    """Double DQN over whole rollouts: y_t = r_t + gamma (1 - d_t) Qbar(f'_{t+1}, argmax_a Q(f_{t+1}, a))."""
    x = policy_inputs(nets["enc"], b, bits, args.policy_obs)
    q_all = nets["q"](x)[0]  # (T+1, B, A)
    a = b["actions"].transpose(0, 1)
    q = q_all[:-1].gather(-1, a[..., None]).squeeze(-1)
    with torch.no_grad():
        x_t = policy_inputs(nets["enc_targ"], b, bits, args.policy_obs)
        a_star = q_all[1:].argmax(-1, keepdim=True)
        q_next = nets["q_targ"](x_t[1:])[0].gather(-1, a_star).squeeze(-1)
        y = b["rewards"].transpose(0, 1) + args.gamma * (1 - dones(b, bootstrap_end)) * q_next
    loss = F.mse_loss(q, y)
    step_(opts, nets, ("enc", "q"), loss, args.max_grad_norm)
    polyak_(nets["enc_targ"], nets["enc"], args.tau)
    polyak_(nets["q_targ"], nets["q"], args.tau)
    return {"loss/q": loss.detach(), "q/mean": q.detach().mean()}


def sac_update(nets, opts, b, bits, args, bootstrap_end, gen):
    """SAC over whole rollouts (fixed alpha, twin Q): the GRU and critics on the TD loss, then the actor on detached
    features and the updated critics."""
    x = policy_inputs(nets["enc"], b, bits, args.policy_obs)
    a = b["actions"].transpose(0, 1)
    with torch.no_grad():
        x_t = policy_inputs(nets["enc_targ"], b, bits, args.policy_obs)
        a2, logp2 = policy_sample(nets["pi"], x[1:].detach(), generator=gen)
        q2 = nets["q_targ"](torch.cat([x_t[1:], a2], -1)).squeeze(-1).min(0).values
        y = b["rewards"].transpose(0, 1) + args.gamma * (1 - dones(b, bootstrap_end)) * (q2 - args.alpha * logp2)
    q = nets["q"](torch.cat([x[:-1], a], -1)).squeeze(-1)  # (2, T, B)
    q_loss = (q - y).pow(2).mean((1, 2)).sum()
    step_(opts, nets, ("enc", "q"), q_loss, args.max_grad_norm)
    xd = x[:-1].detach()
    a_new, logp = policy_sample(nets["pi"], xd, generator=gen)
    q_new = nets["q"](torch.cat([xd, a_new], -1), frozen=True).squeeze(-1).min(0).values
    pi_loss = (args.alpha * logp - q_new).mean()
    step_(opts, nets, ("pi",), pi_loss, args.max_grad_norm)
    polyak_(nets["enc_targ"], nets["enc"], args.tau)
    polyak_(nets["q_targ"], nets["q"], args.tau)
    return {"loss/q": q_loss.detach(), "loss/pi": pi_loss.detach(), "q/mean": q.detach().mean(),
            "pi/logp": logp.detach().mean()}


# ---------------------------------------------------------------------------------------------
# Evaluation: online BAMDP episodes (policy GRU carried over the k episodes)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def act_on(nets, x, discrete):
    if discrete:
        return nets["q"](x)[0].argmax(-1)
    return policy_sample(nets["pi"], x, deterministic=True)[0]


@torch.no_grad()
def encoder_step(enc, h, actions, next_obs, rewards, bit: float):
    """One online step of the policy GRU on a batch of transitions (B, ...): hidden (1, B, hidden) -> next hidden."""
    bits = torch.full((1, next_obs.shape[0], 1), bit, device=next_obs.device) if enc.done_bit else None
    _, h = enc.gru(enc.embed(actions[None], next_obs[None], rewards[None], bits), h)
    return h


@torch.no_grad()
def evaluate_bamdp(nets, family, task_ids, k, args, device, seed, h0=None):
    """k consecutive deterministic episodes per task, the policy GRU from h0 (None: zero) carried across them; returns
    (returns, successes) of shape (tasks, k)."""
    enc = nets["enc"]
    venv = family.make_vec_env(task_ids, 1, seed=seed)
    B, H = venv.num_envs, family.horizon
    h = torch.zeros(1, B, enc.gru.hidden_size, device=device) if h0 is None else h0
    state = {"h": h, "f": enc.heads(h[0]), "t": 0}

    def act(obs, ep, t):
        x = state["f"]
        if args.policy_obs:
            x = torch.cat([x, torch.as_tensor(obs, dtype=torch.float32, device=device)], -1)
        return act_on(nets, x, family.discrete).cpu().numpy()

    def observe(o, a, r, no, term, trunc, info, alive):
        a_t = torch.as_tensor(a, device=device)
        state["h"] = encoder_step(enc, state["h"], a_t.long() if family.discrete else a_t.float(),
                                  torch.as_tensor(no, dtype=torch.float32, device=device),
                                  torch.as_tensor(r, dtype=torch.float32, device=device), float(state["t"] % H == H - 1))
        state["f"] = enc.heads(state["h"][0])
        state["t"] += 1

    return run_episodes(venv, act, k, observe=observe)


@torch.no_grad()
def context_hidden(enc, ds, family, task_ids, device, seed):
    """Mode A: the policy GRU state after one random offline episode of each task's data (seeded draw)."""
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
    _, h = enc(a, torch.as_tensor(ds["next_obs"][rows], device=device).float(),
               torch.as_tensor(ds["rewards"][rows], device=device).float(), bits)
    return h


def evaluate(step, nets, family, ds, k, args, device, logger):
    """Online BAMDP episodes (the paper's protocol) on the test and the training tasks; mode A on the test tasks."""
    seed = 10_000 * args.seed + step % 9973
    test_ids = family.test_idx[: args.eval_tasks] if args.eval_tasks else family.test_idx
    res = {}
    for split, ids in (("test", test_ids), ("train", family.train_idx)):
        ret, succ = evaluate_bamdp(nets, family, ids, k, args, device, seed)
        logger.log_eval(step, "B", split, ids, ret, succ)
        res[("B", split)] = (ret, succ)
    h = context_hidden(nets["enc"], ds, family, test_ids, device, seed + 1)
    ret, succ = evaluate_bamdp(nets, family, test_ids, 1, args, device, seed + 2, h0=h)
    logger.log_eval(step, "A", "test", test_ids, ret, succ)
    res[("A", "test")] = (ret, succ)
    ret_b, ret_tr = res[("B", "test")][0], res[("B", "train")][0]
    scalars = {f"eval/B_test_ep{e + 1}": float(ret_b[:, e].mean()) for e in range(k)}
    scalars |= {"eval/B_test_sum": float(ret_b.sum(1).mean()), "eval/B_train_sum": float(ret_tr.sum(1).mean()),
                "eval/B_train_ep1": float(ret_tr[:, 0].mean()), "eval/A_test": float(ret.mean())}
    logger.log_scalars(step, scalars)
    return res, scalars


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main(args: Args):
    args = resolve_args(args)
    family = make_family(args.env_id, args.preset)
    k = family.episodes_per_task
    if not 0 <= args.n_mix < args.workers:
        raise SystemExit(f"--n-mix must lie in [0, --workers) = [0, {args.workers}), got {args.n_mix}")
    if not 0.0 <= args.relabel_share <= 1.0:
        raise SystemExit(f"--relabel-share must lie in [0, 1], got {args.relabel_share}")
    if args.relabel_share > 0 and (why := relabel_unsupported(family)):  # before any data is loaded or built
        raise SystemExit(f"--relabel-share: {why}")
    run_dir = make_run_dir(args.env_id, "ldm", args.seed, args.run_dir)
    check_fresh_run_dir(run_dir, args.resume)
    seed_everything(args.seed)
    device = pick_device(args.cuda)
    gen = torch.Generator(device=device).manual_seed(args.seed)

    ds = ensure_dataset(args.env_id, args.preset, path=args.dataset, family=family)
    roll_np = build_rollouts(ds, family, family.train_idx, k)
    roll = to_tensors(roll_np, family.discrete, device)
    R = len(roll["rewards"])
    bits = done_bits(family.horizon, k, device)
    bootstrap_end = family.env_id != "GridNavi"  # grid: the official config has no proper time limits
    vae = LatentDynamics(family, args, done_bit=k > 1).to(device)
    nets, opts = make_policy(family, args, k > 1, device)
    opts["vae"] = torch.optim.Adam(vae.parameters(), lr=args.vae_lr)
    n_imag = int(round(args.batch_size * args.n_mix / args.workers))
    n_real = args.batch_size - n_imag
    n_rel = int(round(n_real * args.relabel_share))
    pool = None
    if n_rel:
        pool = relabel_pool(roll_np, family, args.relabel_pool * R, np.random.RandomState(args.seed))
        pool = {key: torch.as_tensor(v, device=device) for key, v in pool.items()}
        pool["terminals"] = torch.zeros(n_rel, roll["terminals"].shape[1], device=device)  # never ends the bootstrap

    stage, vae_step, step, train_time, wall_before, history, probe = "vae", 0, 0, 0.0, 0.0, [], {}
    ckpt_path = Path(run_dir) / "checkpoint.pt"
    meta = {"method": "ldm", "env_id": args.env_id, "preset": args.preset, "seed": args.seed, "obs_dim": family.obs_dim,
            "act_dim": family.act_dim, "n_actions": family.n_actions, "latent_dim": args.latent_dim,
            "policy_gru": args.policy_gru, "policy_latent": args.policy_latent, "n_mix": args.n_mix,
            "relabel_share": args.relabel_share, "relabel_pool": args.relabel_pool}
    if args.resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, expect=meta, map_location=device)
        vae.load_state_dict(state["vae"])
        for key, n in nets.items():
            n.load_state_dict(state["nets"][key])
        for key, o in opts.items():
            o.load_state_dict(state["opts"][key])
        stage, vae_step, step, train_time = state["stage"], state["vae_step"], state["step"], state["train_time"]
        history, probe, wall_before = state["history"], state["probe"], state["wall_time"]
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed {ckpt_path}: stage {stage}, VAE step {vae_step}, policy step {step}", flush=True)
    logger = Logger(run_dir, {**vars(args), "run_dir": str(run_dir)})
    print(f"LDM on {args.env_id}/{args.preset}: {len(family.train_idx)} train / {len(family.test_idx)} test tasks, k={k} "
          f"episodes of H={family.horizon}, {R} rollouts; VAE {args.vae_steps} updates, "
          f"{'double DQN' if family.discrete else 'SAC'} on {n_real} real ({n_rel} relabelled) + {n_imag} imaginary rollouts for "
          f"{args.total_steps} updates (n_mix {args.n_mix}/{args.workers})", flush=True)
    t_start = time.time()

    def checkpoint():
        save_checkpoint(ckpt_path, {
            "meta": meta, "args": vars(args), "stage": stage, "vae_step": vae_step, "step": step, "train_time": train_time,
            "history": history, "probe": probe, "wall_time": wall_before + time.time() - t_start,
            "vae": vae.state_dict(), "nets": {key: n.state_dict() for key, n in nets.items()},
            "opts": {key: o.state_dict() for key, o in opts.items()}, "gen": gen.get_state(),
            "torch_rng": torch.get_rng_state()})

    # ALGO LOGIC: stage 1, the latent dynamics model on real training rollouts only (unused without imaginary tasks)
    if stage == "vae" and not n_imag:
        print("--n-mix 0: no imaginary tasks, the latent dynamics model is not needed and not trained", flush=True)
        stage = "policy"
    if stage == "vae":
        t0, v0, losses = time.time(), vae_step, []
        vae.train()
        while vae_step < args.vae_steps:
            idx = torch.randint(R, (args.vae_batch,), device=device, generator=gen)
            loss, rec, kl = elbo_loss(vae, {key: roll[key][idx] for key in roll}, bits, args.kl_weight, gen,
                                      args.elbo_latents)
            opts["vae"].zero_grad(set_to_none=True)
            loss.backward()
            opts["vae"].step()
            losses.append((rec.item(), kl.item()))
            vae_step += 1
            if vae_step % args.log_every == 0:
                m = np.mean(losses[-args.log_every:], 0)
                logger.log_scalars(vae_step, {"vae/reconstruction": m[0], "vae/kl": m[1]})
            if vae_step % 500 == 0 or vae_step == args.vae_steps:
                m = np.mean(losses[-200:], 0)
                print(f"VAE {vae_step}/{args.vae_steps}: reconstruction {m[0]:.2f} KL {m[1]:.2f} (sums per rollout), "
                      f"{(vae_step - v0) / max(time.time() - t0, 1e-9):.1f} updates/s", flush=True)
                checkpoint()
        if losses:
            history.append({"vae_reconstruction": float(np.mean([l[0] for l in losses[-200:]])),
                            "vae_kl": float(np.mean([l[1] for l in losses[-200:]]))})
        stage = "policy"

    # ALGO LOGIC: stage 2, the RL^2 policy on real + imaginary rollouts (frozen VAE)
    for p in vae.parameters():
        p.requires_grad_(False)
    mixer = None
    if n_imag:  # the frozen encoder's beliefs of every stored rollout, the mixture's source
        mixer = Mixer(vae, roll, *posteriors(vae, roll, bits), args.workers - args.n_mix, args.mix_beta, args.mix_dropout)
    if family.env_id == "GridNavi" and mixer is not None and not probe:
        probe = grid_probe(vae, mixer, family, generator=torch.Generator(device=device).manual_seed(args.seed))
        print("mixture probe: " + ", ".join(f"{key} {v:.3f}" for key, v in probe.items()), flush=True)
        logger.log_scalars(vae_step, {f"vae/{key}": v for key, v in probe.items()})
    if step == 0:
        checkpoint()
    res, scalars = None, {}
    if step == 0:
        res, scalars = evaluate(step, nets, family, ds, k, args, device, logger)
        history.append({"step": 0} | {key[5:]: v for key, v in scalars.items()})
        print("eval step 0: " + " | ".join(f"{key[5:]} {v:.2f}" for key, v in scalars.items()), flush=True)
    start_step, last, t_pol = step, {}, time.time()
    while step < args.total_steps:
        t0 = time.time()
        n_block = min(args.eval_every - step % args.eval_every, args.total_steps - step)
        for _ in range(n_block):
            idx = torch.randint(R, (n_real - n_rel,), device=device, generator=gen)
            b = {key: roll[key][idx] for key in ("obs", "next_obs", "actions", "rewards", "terminals")}
            if n_rel:  # another task's rollout with this pool entry's task rewards
                j = torch.randint(len(pool["host"]), (n_rel,), device=device, generator=gen)
                host = pool["host"][j]
                rel = {key: roll[key][host] for key in ("obs", "next_obs", "actions")}
                rel |= {"rewards": pool["rewards"][j], "terminals": pool["terminals"]}
                b = {key: torch.cat([b[key], rel[key]]) for key in b}
            if n_imag:
                imag = mixer.sample(n_imag, gen)
                b = {key: torch.cat([b[key], imag[key]]) for key in b}
            if family.discrete:
                stats = dqn_update(nets, opts, b, bits, args, bootstrap_end)
            else:
                stats = sac_update(nets, opts, b, bits, args, bootstrap_end, gen)
            step += 1
            if step % args.log_every == 0:
                last = {key: float(v) for key, v in stats.items()}
                ups = (step - start_step) / max(time.time() - t_pol, 1e-9)
                logger.log_scalars(step, last | {"perf/updates_per_s": ups})
            if step % args.print_every == 0:
                extra = {"Q": last.get("q/mean", float("nan"))}
                if scalars:
                    extra |= {"test_sum": scalars["eval/B_test_sum"], "train_sum": scalars["eval/B_train_sum"]}
                print_progress(step, args.total_steps, t_pol, extra, start_step)
        train_time += time.time() - t0
        if step % args.eval_every == 0 or step == args.total_steps:
            res, scalars = evaluate(step, nets, family, ds, k, args, device, logger)
            history.append({"step": step} | {key[5:]: v for key, v in scalars.items()})
            print(f"eval step {step}: " + " | ".join(f"{key[5:]} {v:.2f}" for key, v in scalars.items()), flush=True)
            checkpoint()

    if res is None:
        res, scalars = evaluate(step, nets, family, ds, k, args, device, logger)
    ups = step / max(train_time, 1e-9)
    ret_b, ret_tr = res[("B", "test")][0], res[("B", "train")][0]
    modes = {"B_sum": eval_entry(ret_b.sum(1), ret_tr.sum(1))}
    modes |= {f"B_ep{e + 1}": eval_entry(ret_b[:, e], ret_tr[:, e]) for e in range(k)}
    modes["A"] = eval_entry(res[("A", "test")][0][:, 0])
    vae_hist = next((h for h in history if "vae_reconstruction" in h), None)
    first_eval = next((h for h in history if h.get("step") == 0), None)
    # the summary's method names the variant, so ablations sit in their own rows of the results table
    variant = "ldm-nomix" if not args.n_mix else "ldm" if args.n_mix == family_table(args.env_id)["n_mix"] \
        else f"ldm-mix{args.n_mix}"
    variant += "-relabel" if n_rel else ""
    write_summary(run_dir, method=variant, env_id=args.env_id, preset=args.preset,
                  seed=args.seed, total_steps=step, wall_time_s=wall_before + time.time() - t_start, updates_per_s=ups,
                  machine=machine_info(device), dataset=str(ds.path), eval=modes,
                  extra={"vae": vae_hist, "probe": probe, "final": last, "train_time_s": train_time,
                         "vae_updates": args.vae_steps, "n_mix": args.n_mix, "imaginary_per_batch": n_imag,
                         "relabelled_per_batch": n_rel,
                         "success_B_test": float(res[("B", "test")][1].any(1).mean()), "first_eval": first_eval,
                         "best_B_test_sum": max((h.get("B_test_sum", -1e9) for h in history), default=None)})
    logger.close()
    print(f"done: {step} policy updates, {ups:.1f} updates/s, summary in {run_dir}/summary.json", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
