"""Meta-RL task families: gymnasium envs, seeded task lists, train/test splits, batched stepping.

A *family* (e.g. ``PointRobot``) is a set of MDPs that differ in a task parameter (a goal, a target
velocity, physics multipliers). A *preset* fixes the task list, the split and the horizon the way one
paper did it. ``make_family(env_id, preset)`` returns a ``Family`` with

    tasks      float32 [T, task_dim]      task parameters
    train_idx  int64 [n_train]            indices into tasks used for meta-training
    test_idx   int64 [n_test]             held-out tasks (only their offline data is ever seen in training)
    horizon    episode length H (truncation, never a terminal)
    make_env(i)                 -> a gymnasium.Env for task i (with a TimeLimit of H)
    make_vec_env(idx, n, seed)  -> a batched env stepping len(idx) * n envs at once

Batched envs (numpy families vectorised, MuJoCo families a loop over sub-envs) share one API:
    obs = venv.reset(mask=None)                      # [B, obs_dim]; resets the masked envs only
    obs, r, terminated, truncated, info = venv.step(actions)   # no autoreset: the caller resets
with env b running task ``venv.task_idx[b]`` (task-major: b = t * n + i) and ``info["success"]``
([B] bool) always present; sparse families add ``info["rewards_dense"]``.

numpy families: PointRobot, SparsePointRobot, PointRobotWind, GridNavi (always available).
MuJoCo families (gymnasium v5 + official bindings, see common/mujoco_envs.py): HalfCheetahVel,
HalfCheetahDir, AntDir, AntGoal, AntSemicircle, WalkerRandParams, HopperRandParams, HumanoidDir.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import gymnasium as gym
import numpy as np

# ---------------------------------------------------------------------------------------------
# Presets of the numpy families. Each returns tasks, split and the family's constants.
# ---------------------------------------------------------------------------------------------


def _semicircle(angles):
    return np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)


def _split(n_train, n_test):
    """PEARL's rule: first n_train tasks train, last n_test test."""
    return np.arange(n_train), np.arange(n_train, n_train + n_test)


def _point_default():
    # Project default: goals on the unit upper semicircle, start at the origin, H=20, 40/10.
    goals = _semicircle(np.random.RandomState(1337).uniform(0.0, np.pi, size=50))
    return dict(tasks=goals, split=_split(40, 10), horizon=20, start="origin")


def _point_pearl_dense():
    # oyster point_robot.py: np.random.seed(1337); goals U[-1,1]^2 drawn as pairs; start U[-1,1]^2.
    rng = np.random.RandomState(1337)
    goals = np.array([[rng.uniform(-1.0, 1.0), rng.uniform(-1.0, 1.0)] for _ in range(100)], np.float32)
    return dict(tasks=goals, split=_split(80, 20), horizon=20, start="uniform")


def _point_corro():
    # CORRO PointRobot-v1: one goal angle U(0, pi) per seed 1..40; H=10; seeds 1-20 train, 21-40 test.
    angles = np.array([np.random.RandomState(s).uniform(0.0, np.pi) for s in range(1, 41)])
    return dict(tasks=_semicircle(angles), split=_split(20, 20), horizon=10, start="origin")


def _sparse_pearl():
    # oyster SparsePointEnv: linspace(0, pi) on the unit circle, shuffled right after np.random.seed(1337).
    goals = _semicircle(np.linspace(0.0, np.pi, num=100))
    np.random.RandomState(1337).shuffle(goals)
    return dict(tasks=goals, split=_split(80, 20), horizon=20, start="origin",
                goal_radius=0.2, sparse="pearl")


def _sparse_default():
    return dict(_point_default(), goal_radius=0.2, sparse="pearl")


def _sparse_borel():
    # BOReL: angle U(0, pi), 80/20, H=60 with 2 episodes per BAMDP; reward 1 inside the goal radius.
    # Data collection starts off the semicircle band so that the offline data identifies the task.
    goals = _semicircle(np.random.RandomState(1337).uniform(0.0, np.pi, size=100))
    return dict(tasks=goals, split=_split(80, 20), horizon=60, episodes_per_task=2, start="origin",
                collect_start="off_band", goal_radius=0.2, sparse="borel")


def _wind_default():
    # FOCAL-style point-robot-wind: goal (1, 0), wind U[-0.05, 0.05]^2 per task (seed 1337), H=20.
    wind = np.random.RandomState(1337).uniform(-0.05, 0.05, size=(50, 2)).astype(np.float32)
    return dict(tasks=wind, split=_split(40, 10), horizon=20, start="origin", goal=(1.0, 0.0),
                wind=True)


def _grid_cells(size, exclude=((0, 0), (0, 1), (1, 0), (1, 1))):
    return np.array([(x, y) for x in range(size) for y in range(size) if (x, y) not in exclude], np.float32)


def _grid_borel():
    # BOReL/varibad 5x5: 21 goals (all cells but the 2x2 start corner); the paper trains and tests on all.
    goals = _grid_cells(5)
    idx = np.arange(len(goals))
    return dict(tasks=goals, split=(idx, idx), allow_overlap=True, horizon=15, episodes_per_task=4, size=5)


def _grid_ldm():
    # LDM 7x7: training goals avoid every cell with max(x, y) in {3, 4, 5}. The paper tests on all 45 goals;
    # we hold out exactly the 27 gap cells so the split is disjoint (the all-45 figure is the task-weighted
    # mean of the train and test figures), the other 18 are training goals.
    goals = _grid_cells(7)
    in_gap = np.isin(goals.max(axis=1), (3, 4, 5))
    return dict(tasks=goals, split=(np.flatnonzero(~in_gap), np.flatnonzero(in_gap)), horizon=30,
                episodes_per_task=4, size=7)


# ---------------------------------------------------------------------------------------------
# Single (gymnasium) envs of the numpy families
# ---------------------------------------------------------------------------------------------


def _start_states(kind, n, rng):
    if kind == "origin":
        return np.zeros((n, 2), np.float32)
    if kind == "uniform":
        return rng.uniform(-1.0, 1.0, size=(n, 2)).astype(np.float32)
    if kind == "off_band":  # U[-1.5,1.5] x U[-0.5,1.5], rejecting 0.8 <= |s| <= 1.2 (BOReL)
        out = np.empty((n, 2), np.float32)
        filled = 0
        while filled < n:
            s = np.stack([rng.uniform(-1.5, 1.5, 2 * n), rng.uniform(-0.5, 1.5, 2 * n)], axis=1)
            r = np.linalg.norm(s, axis=1)
            s = s[(r < 0.8) | (r > 1.2)][: n - filled]
            out[filled:filled + len(s)] = s
            filled += len(s)
        return out
    raise ValueError(f"unknown start distribution {kind!r}")


class PointEnv(gym.Env):
    """2-d point robot: s' = s + 0.1 * clip(a, -1, 1) (+ wind). Agent actions live in [-1, 1]^2 and are
    scaled to PEARL's +-0.1 inside. Reward -||s' - g|| (dense); sparse variants in ``SparsePointEnv``."""

    metadata = {"render_modes": []}

    def __init__(self, task, start="origin", collect_start=None, goal=None, wind=False, **_):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.start, self.collect_start, self.fixed_goal, self.wind = start, collect_start, goal, wind
        self.set_task(task)

    def set_task(self, task):
        task = np.asarray(task, np.float32)
        self._task = task
        self._goal = np.asarray(self.fixed_goal, np.float32) if self.wind else task
        self._wind = task if self.wind else np.zeros(2, np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        kind = self.collect_start if (options or {}).get("collect") and self.collect_start else self.start
        self._state = _start_states(kind, 1, self.np_random)[0]
        return self._state.copy(), {}

    def _dense(self):
        return -float(np.linalg.norm(self._state - self._goal))

    def step(self, action):
        a = np.clip(np.asarray(action, np.float32), -1.0, 1.0)
        self._state = (self._state + 0.1 * a + self._wind).astype(np.float32)
        dense = self._dense()
        return self._state.copy(), dense, False, False, {"success": -dense <= 0.2}


class SparsePointEnv(PointEnv):
    """Point robot with a sparse goal reward. ``sparse='pearl'``: 1 - d inside the radius (oyster);
    ``sparse='borel'``: 1 inside the radius. The dense reward is returned in ``info['rewards_dense']``."""

    def __init__(self, task, goal_radius=0.2, sparse="pearl", **kw):
        self.goal_radius, self.sparse = goal_radius, sparse
        super().__init__(task, **kw)

    def step(self, action):
        obs, dense, term, trunc, _ = super().step(action)
        inside = -dense <= self.goal_radius
        reward = (1.0 + dense if self.sparse == "pearl" else 1.0) if inside else 0.0
        return obs, float(reward), term, trunc, {"success": inside, "rewards_dense": dense}


class GridNaviEnv(gym.Env):
    """varibad/BOReL GridNavi: start (0, 0), actions 0 stay, 1 up, 2 right, 3 down, 4 left; reward +1 on
    the goal cell, else -0.1. Observation: the cell coordinates as floats."""

    metadata = {"render_modes": []}
    MOVES = np.array([[0, 0], [0, 1], [1, 0], [0, -1], [-1, 0]], np.float32)

    def __init__(self, task, size=5, **_):
        self.size = size
        self.observation_space = gym.spaces.Box(0.0, size - 1.0, (2,), np.float32)
        self.action_space = gym.spaces.Discrete(5)
        self.set_task(task)

    def set_task(self, task):
        self._goal = np.asarray(task, np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._state = np.zeros(2, np.float32)
        return self._state.copy(), {}

    def step(self, action):
        self._state = np.clip(self._state + self.MOVES[int(action)], 0, self.size - 1).astype(np.float32)
        at_goal = bool(np.all(self._state == self._goal))
        return self._state.copy(), 1.0 if at_goal else -0.1, False, False, {"success": at_goal}


# ---------------------------------------------------------------------------------------------
# Batched versions: every (task, copy) pair stepped in one numpy call
# ---------------------------------------------------------------------------------------------


class _BatchedBase:
    """Shared bookkeeping of the batched numpy envs: task per env, step counters, truncation at H."""

    def __init__(self, family, task_idx, n_per_task, seed):
        self.family = family
        self.task_idx = np.repeat(np.asarray(task_idx, np.int64), n_per_task)  # task-major layout
        self.tasks = family.tasks[self.task_idx]  # [B, task_dim]
        self.num_envs = len(self.task_idx)
        self.horizon = family.horizon
        self.rng = np.random.RandomState(seed)
        self.t = np.zeros(self.num_envs, np.int64)
        self.state = None

    def _mask(self, mask):
        return np.ones(self.num_envs, bool) if mask is None else np.asarray(mask, bool)

    def _advance(self):
        self.t += 1
        return self.t >= self.horizon


def _point_rewards(family, next_pos, goal):
    """Point-robot reward of landing at ``next_pos`` [..., 2] with goal(s) ``goal``: (reward, dense, inside);
    shared by the batched env and ``relabel_rewards``."""
    dist = np.linalg.norm(next_pos - goal, axis=-1)
    dense = (-dist).astype(np.float32)
    inside = dist <= family.config.get("goal_radius", 0.2)
    if family.env_id != "SparsePointRobot":
        return dense, dense, inside
    reward = np.where(inside, 1.0 + dense if family.config.get("sparse") == "pearl" else 1.0, 0.0)
    return reward.astype(np.float32), dense, inside


def _grid_rewards(next_pos, goal):
    """GridNavi reward of landing at ``next_pos``: +1 on the goal cell, -0.1 elsewhere; (reward, at_goal)."""
    at_goal = np.all(next_pos == goal, axis=-1)
    return np.where(at_goal, 1.0, -0.1).astype(np.float32), at_goal


class BatchedPointEnv(_BatchedBase):
    """All point-robot variants (dense, sparse, wind) for B envs at once: state [B, 2]."""

    def __init__(self, family, task_idx, n_per_task=1, seed=0):
        super().__init__(family, task_idx, n_per_task, seed)
        c = family.config
        self.kind = family.env_id
        if self.kind == "PointRobotWind":
            self.goal = np.broadcast_to(np.asarray(c["goal"], np.float32), (self.num_envs, 2))
            self.wind = self.tasks
        else:
            self.goal, self.wind = self.tasks, np.zeros_like(self.tasks)
        self.state = np.zeros((self.num_envs, 2), np.float32)

    def reset(self, mask=None, collect=False):
        m = self._mask(mask)
        c = self.family.config
        kind = c.get("collect_start") if collect and c.get("collect_start") else c["start"]
        self.state[m] = _start_states(kind, int(m.sum()), self.rng)
        self.t[m] = 0
        return self.state.copy()

    def step(self, actions):
        a = np.clip(np.asarray(actions, np.float32), -1.0, 1.0)
        self.state = (self.state + 0.1 * a + self.wind).astype(np.float32)
        reward, dense, inside = _point_rewards(self.family, self.state, self.goal)
        info = {"success": inside}
        if self.kind == "SparsePointRobot":
            info["rewards_dense"] = dense
        truncated = self._advance()
        return self.state.copy(), reward, np.zeros(self.num_envs, bool), truncated, info


class BatchedGridNavi(_BatchedBase):
    def __init__(self, family, task_idx, n_per_task=1, seed=0):
        super().__init__(family, task_idx, n_per_task, seed)
        self.size = family.config["size"]
        self.state = np.zeros((self.num_envs, 2), np.float32)

    def reset(self, mask=None, collect=False):
        m = self._mask(mask)
        self.state[m] = 0.0
        self.t[m] = 0
        return self.state.copy()

    def step(self, actions):
        moves = GridNaviEnv.MOVES[np.asarray(actions, np.int64).reshape(-1)]
        self.state = np.clip(self.state + moves, 0, self.size - 1).astype(np.float32)
        reward, at_goal = _grid_rewards(self.state, self.tasks)
        truncated = self._advance()
        return self.state.copy(), reward, np.zeros(self.num_envs, bool), truncated, {"success": at_goal}


# ---------------------------------------------------------------------------------------------
# Registry and the Family object
# ---------------------------------------------------------------------------------------------

# family -> (default preset, {preset: preset fn}, single-env class, batched-env class)
_NUMPY_FAMILIES = {
    "PointRobot": ("default", {"default": _point_default, "pearl": _point_pearl_dense, "corro": _point_corro},
                   PointEnv, BatchedPointEnv),
    "SparsePointRobot": ("default", {"default": _sparse_default, "pearl": _sparse_pearl, "borel": _sparse_borel},
                         SparsePointEnv, BatchedPointEnv),
    "PointRobotWind": ("default", {"default": _wind_default}, PointEnv, BatchedPointEnv),
    "GridNavi": ("borel", {"borel": _grid_borel, "ldm": _grid_ldm}, GridNaviEnv, BatchedGridNavi),
}
SPARSE_FAMILIES = ("SparsePointRobot", "AntSemicircle")  # sparse reward + info["rewards_dense"]
MUJOCO_FAMILY_NAMES = ("HalfCheetahVel", "HalfCheetahDir", "AntDir", "AntGoal", "AntSemicircle",
                       "WalkerRandParams", "HopperRandParams", "HumanoidDir")


def _mujoco_module():
    try:
        import mujoco  # noqa: F401
    except ImportError as e:
        raise ImportError('This task family needs MuJoCo: pip install "gymnasium[mujoco]" mujoco') from e
    from common import mujoco_envs

    return mujoco_envs


def family_names():
    return list(_NUMPY_FAMILIES) + list(MUJOCO_FAMILY_NAMES)


def canonical_env_id(env_id: str) -> str:
    """Accept 'PointRobot', 'omrl/PointRobot-v0' or 'PointRobot-v0'; return 'PointRobot'."""
    name = env_id.split("/")[-1]
    name = name[:-3] if name.endswith("-v0") else name
    if name not in family_names():
        raise ValueError(f"unknown env id {env_id!r}; valid ids: {', '.join(family_names())} "
                         f"(also as omrl/<Name>-v0)")
    return name


def _family_spec(name):
    if name in _NUMPY_FAMILIES:
        return _NUMPY_FAMILIES[name]
    return _mujoco_module().FAMILIES[name]


def presets(env_id: str) -> list[str]:
    name = canonical_env_id(env_id)
    if name in _NUMPY_FAMILIES:
        return list(_NUMPY_FAMILIES[name][1])
    return list(_mujoco_module().FAMILIES[name][1])


def default_preset(env_id: str) -> str:
    return _family_spec(canonical_env_id(env_id))[0]


@dataclasses.dataclass
class Family:
    env_id: str  # canonical short name, e.g. "PointRobot"
    preset: str
    tasks: np.ndarray  # float32 [T, task_dim]
    train_idx: np.ndarray  # int64
    test_idx: np.ndarray  # int64
    horizon: int
    episodes_per_task: int  # BAMDP episodes (BOReL/LDM evaluation); 1 elsewhere
    allow_overlap: bool  # train == test in the paper (cheetah-dir, BOReL grid)
    config: dict  # preset constants passed to the env constructors
    env_cls: type
    batched_cls: Callable
    obs_dim: int = 0
    act_dim: int = 0  # 0 for discrete
    n_actions: int = 0  # >0 for discrete
    task_defaults: dict | None = None  # rand-params: the model's default arrays

    @property
    def task_dim(self) -> int:
        return self.tasks.shape[1]

    @property
    def discrete(self) -> bool:
        return self.n_actions > 0

    def make_env(self, task_idx: int, time_limit: bool = True) -> gym.Env:
        env = self.env_cls(self.tasks[task_idx], **self.config)
        return gym.wrappers.TimeLimit(env, self.horizon) if time_limit else env

    def make_vec_env(self, task_idx, n_per_task: int = 1, seed: int = 0):
        return self.batched_cls(self, task_idx, n_per_task, seed)


def make_family(env_id: str, preset: str | None = None) -> Family:
    """Build a task family. Task lists are fixed per preset (seeded inside), so every method and every
    dataset of a preset sees the same tasks."""
    name = canonical_env_id(env_id)
    default, preset_fns, env_cls, batched_cls = _family_spec(name)
    preset = preset or default
    if preset not in preset_fns:
        raise ValueError(f"unknown preset {preset!r} for {name}; valid presets: {', '.join(preset_fns)}")
    p = dict(preset_fns[preset]())
    tasks = np.asarray(p.pop("tasks"), np.float32)
    tasks = tasks.reshape(len(tasks), -1)
    train_idx, test_idx = (np.asarray(i, np.int64) for i in p.pop("split"))
    fam = Family(env_id=name, preset=preset, tasks=tasks, train_idx=train_idx, test_idx=test_idx,
                 horizon=int(p.pop("horizon")), episodes_per_task=int(p.pop("episodes_per_task", 1)),
                 allow_overlap=bool(p.pop("allow_overlap", False)), task_defaults=p.pop("task_defaults", None),
                 config=p, env_cls=env_cls, batched_cls=batched_cls)
    probe = fam.make_env(0, time_limit=False)
    fam.obs_dim = int(probe.observation_space.shape[0])
    if isinstance(probe.action_space, gym.spaces.Discrete):
        fam.n_actions = int(probe.action_space.n)
    else:
        fam.act_dim = int(probe.action_space.shape[0])
    if fam.task_defaults is None and hasattr(probe, "task_defaults"):
        fam.task_defaults = probe.task_defaults()
    probe.close()
    return fam


def relabel_unsupported(family: Family) -> str | None:
    """Why ``relabel_rewards`` cannot serve this family, or None when it can (checked before any data is loaded)."""
    if family.env_id not in _NUMPY_FAMILIES:
        return (f"reward relabelling is not available for {family.env_id}: its reward needs simulator state that the "
                f"observations do not contain")
    return None


def relabel_rewards(family: Family, task_idx, obs, actions, next_obs):
    """The rewards that transitions (s, a, s') would have earned in task(s) ``task_idx`` (broadcast against the
    leading dims of ``next_obs``). Returns ``(rewards, rewards_dense)`` as float32 arrays; ``rewards_dense`` is
    None for dense families. Used to relabel data across tasks (BOReL; PEARL's ``--context-relabel``).

    Only families whose reward is a function of (s, a, s') and the task are supported: the point robots and
    GridNavi. MuJoCo rewards need simulator quantities (x-velocity from positions, contact forces) that are
    not in the observation, so they raise ``NotImplementedError``."""
    if why := relabel_unsupported(family):
        raise NotImplementedError(why)
    nobs = np.asarray(next_obs, np.float32)
    tasks = family.tasks[np.asarray(task_idx, np.int64)]
    if family.env_id == "GridNavi":
        return _grid_rewards(nobs, tasks)[0], None
    goal = np.broadcast_to(np.asarray(family.config["goal"], np.float32), tasks.shape) \
        if family.env_id == "PointRobotWind" else tasks
    reward, dense, _ = _point_rewards(family, nobs, goal)
    return reward, (dense if family.env_id == "SparsePointRobot" else None)


def _gym_entry(family: str, preset: str | None = None, task_idx: int = 0):
    return make_family(family, preset).make_env(task_idx)


for _name in family_names():
    if f"omrl/{_name}-v0" not in gym.registry:
        # The horizon depends on the preset, so the entry point adds the TimeLimit itself.
        gym.register(id=f"omrl/{_name}-v0", entry_point=_gym_entry, kwargs={"family": _name},
                     disable_env_checker=True)
