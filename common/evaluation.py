"""Evaluation rollouts, batched across tasks (spec envs_and_data.md §4.2).

Every method evaluates with ``run_episodes``: one batched env holds all the evaluation tasks, the
method supplies ``act(obs, episode, t) -> actions`` and, if it adapts online, ``observe(...)`` which
receives every transition (its context / belief update). The two standard modes are then:

- Mode A (offline context): the method builds its adapted policy from ``common.data.sample_context``
  (one trajectory or 256 transitions of each test task's offline data, seeded), then runs 1 episode
  with deterministic actions: ``run_episodes(venv, act, 1)``.
- Mode B (online adaptation): ``run_episodes(venv, act, k, observe=...)`` runs k consecutive episodes in
  each task; the method updates its context from ``observe`` and reports the last (PEARL/SMAC/MQL) or
  every episode and the sum (BOReL/LDM).
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def run_episodes(venv, act: Callable, n_episodes: int = 1, observe: Callable | None = None,
                 on_episode_start: Callable | None = None):
    """Run ``n_episodes`` consecutive episodes in every env of ``venv`` (no learning inside).

    act(obs [B, obs_dim], episode, t) -> actions [B, ...]
    observe(obs, actions, rewards, next_obs, terminated, truncated, info, alive)   # optional, per step
    on_episode_start(episode)   # optional, e.g. to resample z from the posterior between episodes

    Envs whose episode ended early (termination) are masked: their later rewards do not count.
    Returns ``returns`` and ``successes`` as [B, n_episodes] arrays (success = reached the goal at any
    step, for families that define it)."""
    B = venv.num_envs
    returns = np.zeros((B, n_episodes))
    successes = np.zeros((B, n_episodes), bool)
    for ep in range(n_episodes):
        if on_episode_start is not None:
            on_episode_start(ep)
        obs = venv.reset()
        alive = np.ones(B, bool)
        for t in range(venv.horizon):
            a = act(obs, ep, t)
            nobs, r, term, trunc, info = venv.step(a)
            returns[:, ep] += r * alive
            successes[:, ep] |= np.asarray(info["success"], bool) & alive
            if observe is not None:
                observe(obs, a, r, nobs, term, trunc, info, alive.copy())
            alive &= ~(term | trunc)
            obs = nobs
            if not alive.any():
                break
    return returns, successes


def per_task_mean(values: np.ndarray, n_per_task: int) -> np.ndarray:
    """Average the ``n_per_task`` copies of each task (task-major layout) -> [n_tasks, ...]."""
    return values.reshape(-1, n_per_task, *values.shape[1:]).mean(axis=1)
