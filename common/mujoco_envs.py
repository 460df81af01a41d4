"""MuJoCo task families on gymnasium's v5 envs and the official ``mujoco`` bindings.

Loaded lazily by ``common.envs`` (``FAMILIES`` below has the same layout as ``_NUMPY_FAMILIES``). Each
family subclasses a gymnasium v5 env and replaces its reward (and where needed its observation) by the
formula of the meta-RL papers, read from the official repos (katerakelly/oyster, dennisl88/rand_param_envs,
Rondorf/BOReL, PKU-RL/CORRO, eric-mitchell/macaw, suyoung-lee/LDM). Port decisions:

* Agent actions are Box(-1, 1) and are rescaled to the model's ctrlrange inside (PEARL's NormalizedBoxEnv);
  control costs use the rescaled action, as in the papers (only Humanoid's +-0.4 differs from +-1).
* Contact costs default to 0: the papers ran MuJoCo 2.0, where ``cfrc_ext`` was all zeros. gymnasium calls
  ``mj_rnePostConstraint`` so the forces are real here; ``contact_cost_weight`` turns the cost back on.
  For the same reason AntGoal pads its 84 contact-force dims with zeros and HumanoidDir zeroes the
  ``cfrc_ext`` part of its 348-d v5 observation (``cfrc_in_obs=True`` keeps the real forces).
* Alive bonuses are constants (oyster / rand_param_envs add them even on the terminal step; v5 pays
  ``is_healthy * bonus``). Terminations use v5's healthy checks, which equal the papers' ones.
* Rand-params: the task vector is the per-element exponent u ~ U(-3, 3) (PEARL order: body_mass,
  body_inertia, dof_damping, geom_friction); ``set_task`` writes ``default * base**u`` (base 1.5, damping
  1.3) into the MjModel in place, from defaults copied at construction (the binding's arrays are views).
  Models: gymnasium's old ``walker2d.xml`` (feet friction 0.9 / 1.9) and ``hopper.xml`` with timestep
  0.004 like mjpro131's XMLs. rand_param_envs' walker uses frame_skip 5 (dt 0.02) and its hopper 4
  (dt 0.016); CORRO's copy forces frame_skip 4 for both.
* Task lists are drawn with ``np.random.RandomState`` (seed 1337 unless a preset is one-task-per-seed),
  so every preset is fixed; the papers' own draws were often unseeded.
* Observations are returned as float32. There is no TimeLimit inside; ``Family.make_env`` adds it and
  ``BatchedMujocoEnv`` truncates at the horizon itself.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium.envs.mujoco.ant_v5 import AntEnv
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv
from gymnasium.envs.mujoco.hopper_v5 import HopperEnv
from gymnasium.envs.mujoco.humanoid_v5 import HumanoidEnv, mass_center
from gymnasium.envs.mujoco.mujoco_env import expand_model_path
from gymnasium.envs.mujoco.walker2d_v5 import Walker2dEnv

# ---------------------------------------------------------------------------------------------
# Shared pieces of the single envs
# ---------------------------------------------------------------------------------------------


class _MetaMujoco:
    """Mixed in front of a v5 env: Box(-1,1) agent actions, float32 observations, ``set_task``, and
    ``reset(options={"collect": True})`` for families with a data-collection start distribution."""

    sparse = False  # True: step() adds info["rewards_dense"]

    def _finish_init(self, task):
        low, high = self.model.actuator_ctrlrange.T.astype(np.float64)
        self._act_scale, self._act_center = (high - low) / 2.0, (high + low) / 2.0
        self.action_space = gym.spaces.Box(-1.0, 1.0, (self.model.nu,), np.float32)
        self._collect = False
        self.set_task(task)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, self._get_obs().shape, np.float32)

    def _env_action(self, action):
        a = np.clip(np.asarray(action, np.float64).reshape(self.model.nu), -1.0, 1.0)
        return a * self._act_scale + self._act_center  # exact identity for a ctrlrange of [-1, 1]

    def _obs(self):
        return self._get_obs().astype(np.float32)

    def reset(self, *, seed=None, options=None):
        self._collect = bool((options or {}).get("collect", False))
        obs, info = super().reset(seed=seed)
        return obs.astype(np.float32), info


# ---------------------------------------------------------------------------------------------
# HalfCheetah: velocity and direction
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_settotalmass():
    """gymnasium's half_cheetah.xml uses the deprecated ``settotalmass``; MuJoCo 4 prints a warning and appends
    to ./MUJOCO_LOG.TXT on every compile. Drop that one message while the model loads; re-raise any other
    MuJoCo warning as a Python warning."""
    def handler(msg):
        if "settotalmass" not in msg:
            warnings.warn(f"MuJoCo: {msg}", RuntimeWarning, stacklevel=2)

    previous = mujoco.get_mju_user_warning()
    mujoco.set_mju_user_warning(handler)
    try:
        yield
    finally:
        mujoco.set_mju_user_warning(previous)


class _CheetahBase(_MetaMujoco, HalfCheetahEnv):
    """HalfCheetah-v5 with PEARL's 20-d obs (qpos[1:], qvel, torso xyz) and ctrl weight 0.05."""

    def __init__(self, task, ctrl_cost_weight=0.05, **kw):
        with _quiet_settotalmass():
            super().__init__(ctrl_cost_weight=ctrl_cost_weight, **kw)
        self._finish_init(task)

    def _get_obs(self):
        d = self.data
        return np.concatenate([d.qpos[1:], d.qvel, d.body("torso").xpos])

    def step(self, action):
        a = self._env_action(action)
        x_before = self.data.qpos[0]
        self.do_simulation(a, self.frame_skip)
        v = (self.data.qpos[0] - x_before) / self.dt
        reward = self._forward_reward(v) - self._ctrl_cost_weight * np.sum(np.square(a))
        return self._obs(), float(reward), False, False, {"success": False, "x_velocity": float(v)}


class HalfCheetahVelEnv(_CheetahBase):
    """Reward -|v_x - v*| - 0.05 ||a||^2; task = target velocity v*."""

    def set_task(self, task):
        self.goal_vel = float(np.asarray(task).reshape(-1)[0])

    def _forward_reward(self, v):
        return -abs(v - self.goal_vel)


class HalfCheetahDirEnv(_CheetahBase):
    """Reward d * v_x - 0.05 ||a||^2; task = direction d in {-1, +1}."""

    def set_task(self, task):
        self.direction = float(np.asarray(task).reshape(-1)[0])

    def _forward_reward(self, v):
        return self.direction * v


# ---------------------------------------------------------------------------------------------
# Ant: direction, goal, sparse semicircle
# ---------------------------------------------------------------------------------------------


class AntDirEnv(_MetaMujoco, AntEnv):
    """Ant-v5 without contact forces in the obs (27-d). Reward (torso xy velocity) . (cos t, sin t)
    - 0.5 ||a||^2 - contact + 1, terminated when the torso z leaves [0.2, 1] (oyster ant_dir.py).
    ``direction_only=True`` (CORRO): reward is the direction term alone and the episode never terminates."""

    def __init__(self, task, contact_cost_weight=0.0, direction_only=False, **kw):
        self.direction_only = direction_only
        super().__init__(contact_cost_weight=contact_cost_weight, include_cfrc_ext_in_observation=False,
                         terminate_when_unhealthy=not direction_only, **kw)
        self._finish_init(task)

    def set_task(self, task):
        self.angle = float(np.asarray(task).reshape(-1)[0])
        self._dir = np.array([np.cos(self.angle), np.sin(self.angle)])

    def step(self, action):
        a = self._env_action(action)
        xy_before = self.data.body("torso").xpos[:2].copy()
        self.do_simulation(a, self.frame_skip)
        xy_vel = (self.data.body("torso").xpos[:2] - xy_before) / self.dt
        forward = float(xy_vel @ self._dir)
        if self.direction_only:
            reward = forward
        else:
            reward = (forward - self._ctrl_cost_weight * np.sum(np.square(a)) - self.contact_cost
                      + self._healthy_reward)
        terminated = self._terminate_when_unhealthy and not self.is_healthy
        return self._obs(), float(reward), bool(terminated), False, {"success": False, "forward": forward}


class _AntGoalBase(_MetaMujoco, AntEnv):
    """Ant-v5 keeping the xy position in the obs; goal-reaching families never terminate."""

    def __init__(self, task, ctrl_cost_weight=0.1, contact_cost_weight=0.0, reset_noise_scale=0.1, **kw):
        super().__init__(ctrl_cost_weight=ctrl_cost_weight, contact_cost_weight=contact_cost_weight,
                         healthy_reward=0.0, terminate_when_unhealthy=False, reset_noise_scale=reset_noise_scale,
                         exclude_current_positions_from_observation=False, include_cfrc_ext_in_observation=False,
                         **kw)
        self._finish_init(task)

    def set_task(self, task):
        self.goal = np.asarray(task, np.float64).reshape(2)

    def _dense_reward(self, a):
        xy = self.data.body("torso").xpos[:2]
        return -np.sum(np.abs(xy - self.goal)) - self._ctrl_cost_weight * np.sum(np.square(a)) - self.contact_cost


class AntGoalEnv(_AntGoalBase):
    """Reward -||xy - g||_1 - 0.1 ||a||^2 - contact (oyster ant_goal.py). Obs 113 = qpos 15 + qvel 14 + 84 zeros
    in place of the contact forces, which were zeros in the papers' MuJoCo 2.0."""

    def _get_obs(self):
        return np.concatenate([self.data.qpos, self.data.qvel, np.zeros(self.data.cfrc_ext.size)])

    def step(self, action):
        a = self._env_action(action)
        self.do_simulation(a, self.frame_skip)
        return self._obs(), float(self._dense_reward(a)), False, False, {"success": False}


class AntSemicircleEnv(_AntGoalBase):
    """BOReL's sparse ant-semicircle. Reward 1[||xy - g|| <= 0.2] - 0.1 ||a||^2; the dense -||xy - g||_1 -
    0.1 ||a||^2 goes to info["rewards_dense"]. Obs 29 = qpos + qvel. BOReL resets without noise at xy = 0;
    ``reset(options={"collect": True})`` starts at xy ~ U[-1.5,1.5] x U[-0.5,1.5] off the goal band."""

    sparse = True

    def __init__(self, task, goal_radius=0.2, reset_noise_scale=0.0, **kw):
        self.goal_radius = goal_radius
        super().__init__(task, reset_noise_scale=reset_noise_scale, **kw)

    def _get_obs(self):
        return np.concatenate([self.data.qpos, self.data.qvel])

    def reset_model(self):
        rng, c = self.np_random, self._reset_noise_scale
        qpos = self.init_qpos + rng.uniform(-c, c, self.model.nq)
        qvel = self.init_qvel + c * rng.standard_normal(self.model.nv)
        qpos[:2] = 0.0
        if self._collect:  # rejection-sample a start outside 0.8 <= |xy| <= 1.2 (BOReL's identifiability trick)
            while True:
                xy = np.array([rng.uniform(-1.5, 1.5), rng.uniform(-0.5, 1.5)])
                if not 0.8 <= np.linalg.norm(xy) <= 1.2:
                    break
            qpos[:2] = xy
        self.set_state(qpos, qvel)
        return self._get_obs()

    def step(self, action):
        a = self._env_action(action)
        self.do_simulation(a, self.frame_skip)
        inside = bool(np.linalg.norm(self.data.body("torso").xpos[:2] - self.goal) <= self.goal_radius)
        dense = self._dense_reward(a)
        sparse = float(inside) - self._ctrl_cost_weight * np.sum(np.square(a)) - self.contact_cost
        return self._obs(), float(sparse), False, False, {"success": inside, "rewards_dense": float(dense)}


# ---------------------------------------------------------------------------------------------
# Humanoid direction
# ---------------------------------------------------------------------------------------------


class HumanoidDirEnv(_MetaMujoco, HumanoidEnv):
    """Humanoid-v5 (obs 348, actions +-0.4 inside). Reward 1.25 (com xy velocity . (cos t, sin t))
    - 0.1 ||ctrl||^2 - contact + 5, terminated when z leaves [1, 2] (oyster humanoid_dir.py; 1.25 / dt equals
    its 0.25 / timestep since dt = 5 timesteps)."""

    def __init__(self, task, contact_cost_weight=0.0, cfrc_in_obs=False, **kw):
        super().__init__(contact_cost_weight=contact_cost_weight, **kw)
        self._n_cfrc = self.data.cfrc_ext[1:].size if not cfrc_in_obs else 0
        self._finish_init(task)

    def set_task(self, task):
        self.angle = float(np.asarray(task).reshape(-1)[0])
        self._dir = np.array([np.cos(self.angle), np.sin(self.angle)])

    def _get_obs(self):
        obs = super()._get_obs()
        if self._n_cfrc:
            obs[-self._n_cfrc:] = 0.0  # cfrc_ext is the last block of the v5 obs
        return obs

    def step(self, action):
        a = self._env_action(action)
        com_before = mass_center(self.model, self.data)
        self.do_simulation(a, self.frame_skip)
        com_vel = (mass_center(self.model, self.data) - com_before) / self.dt
        forward = float(com_vel @ self._dir)
        reward = (self._forward_reward_weight * forward - self._ctrl_cost_weight * np.sum(np.square(self.data.ctrl))
                  - self.contact_cost + self._healthy_reward)
        terminated = not self.is_healthy
        return self._obs(), float(reward), bool(terminated), False, {"success": False, "forward": forward}


# ---------------------------------------------------------------------------------------------
# Walker / Hopper with randomised physics
# ---------------------------------------------------------------------------------------------

RAND_PARAMS = ("body_mass", "body_inertia", "dof_damping", "geom_friction")  # PEARL's order in the task vector
RAND_PARAM_BASE = {"body_mass": 1.5, "body_inertia": 1.5, "dof_damping": 1.3, "geom_friction": 1.5}
RAND_PARAM_TIMESTEP = 0.004  # mjpro131 XMLs of rand_param_envs (gymnasium's use 0.002)


class _RandParams(_MetaMujoco):
    """Task = log-multipliers u (base 1.5, damping 1.3) of every element of the four model arrays.

    Reward Δx/dt + alive_bonus - 1e-3 ||a||^2. ``termination``: "pearl" = v5's healthy check (equal to
    rand_param_envs'), "z_only" = z <= 0.5 (CORRO walker), "none" (CORRO hopper). ``full_obs``: qpos + qvel
    unclipped (CORRO) instead of qpos[1:] + clip(qvel, +-10)."""

    XML = ""

    def __init__(self, task, frame_skip=4, alive_bonus=1.0, termination="pearl", full_obs=False):
        if termination not in ("pearl", "z_only", "none"):
            raise ValueError(f"unknown termination {termination!r}")
        self.alive_bonus, self.termination, self.full_obs = alive_bonus, termination, full_obs
        super().__init__(xml_file=self.XML, frame_skip=frame_skip)
        self.model.opt.timestep = RAND_PARAM_TIMESTEP
        self.metadata = dict(self.metadata, render_fps=int(np.round(1.0 / self.dt)))
        # .copy() matters: the binding's model arrays are views, so aliasing them would compound multipliers.
        self._defaults = {k: getattr(self.model, k).copy() for k in RAND_PARAMS}
        self._finish_init(task)

    def task_defaults(self):
        return {k: v.tolist() for k, v in self._defaults.items()}

    def set_task(self, task):
        u = np.asarray(task, np.float64).reshape(-1)
        sizes = [self._defaults[k].size for k in RAND_PARAMS]
        if u.size != sum(sizes):
            raise ValueError(f"{type(self).__name__} task has {u.size} numbers, expected {sum(sizes)}")
        for k, part in zip(RAND_PARAMS, np.split(u, np.cumsum(sizes)[:-1])):
            d = self._defaults[k]
            getattr(self.model, k)[:] = d * RAND_PARAM_BASE[k] ** part.reshape(d.shape)
        self.log_multipliers = u

    def _get_obs(self):
        if self.full_obs:
            return np.concatenate([self.data.qpos, self.data.qvel])
        return super()._get_obs()

    def step(self, action):
        a = self._env_action(action)
        x_before = self.data.qpos[0]
        self.do_simulation(a, self.frame_skip)
        x_after, z = self.data.qpos[0], self.data.qpos[1]
        reward = (x_after - x_before) / self.dt + self.alive_bonus - self._ctrl_cost_weight * np.sum(np.square(a))
        if self.termination == "pearl":
            terminated = not self.is_healthy
        else:
            terminated = self.termination == "z_only" and not z > 0.5
        return self._obs(), float(reward), bool(terminated), False, {"success": False}


class WalkerRandParamsEnv(_RandParams, Walker2dEnv):
    XML = "walker2d.xml"  # not v5's walker2d_v5.xml: keeps the 0.9 / 1.9 feet frictions of the papers


class HopperRandParamsEnv(_RandParams, HopperEnv):
    XML = "hopper.xml"


@functools.lru_cache(maxsize=None)
def _param_shapes(xml):
    model = mujoco.MjModel.from_xml_path(expand_model_path(xml))
    return {k: getattr(model, k).shape for k in RAND_PARAMS}


def _rand_param_tasks(xml, n=None, seeds=None, kinds=RAND_PARAMS, limit=3.0):
    """Exponents U(-limit, limit) per element, drawn per task in PEARL's order (mass, inertia, damping,
    friction); kinds left out stay 0 and draw nothing. ``n`` tasks from RandomState(1337), or one per seed."""
    shapes = _param_shapes(xml)

    def draw(rng):
        return np.concatenate([rng.uniform(-limit, limit, size=shapes[k]).ravel() if k in kinds
                               else np.zeros(int(np.prod(shapes[k]))) for k in RAND_PARAMS])

    if seeds is not None:
        return np.stack([draw(np.random.RandomState(s)) for s in seeds])
    rng = np.random.RandomState(1337)
    return np.stack([draw(rng) for _ in range(n)])


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


def _split(n_train, n_test):
    """PEARL's rule: first n_train tasks train, last n_test test."""
    return np.arange(n_train), np.arange(n_train, n_train + n_test)


def _explicit_split(n, test):
    test = np.asarray(test, np.int64)
    return np.setdiff1d(np.arange(n), test), test


def _uniform(lo, hi, n, seed=1337):
    return np.random.RandomState(seed).uniform(lo, hi, size=n)


def _per_seed(lo, hi, seeds):
    # BOReL / CORRO: one task per data-collection seed.
    return np.array([np.random.RandomState(s).uniform(lo, hi) for s in seeds])


def _polar(r, angles):
    return np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)


H = 200  # every MuJoCo family of the papers uses 200-step episodes

# HalfCheetahVel


def _cheetah_vel_cpu():
    # Project default: the first 30 PEARL velocities, 20 train / 10 test (small enough to collect on CPU).
    return dict(tasks=_uniform(0.0, 3.0, 30), split=_split(20, 10), horizon=H)


def _cheetah_vel_pearl():
    # oyster: np.random.seed(1337); U(0, 3) x 130; test tasks start 2.0510, 0.0831, 0.7015.
    return dict(tasks=_uniform(0.0, 3.0, 130), split=_split(100, 30), horizon=H)


def _cheetah_vel_macaw():
    return dict(tasks=np.linspace(0.075, 3.0, 40), split=_explicit_split(40, [2, 7, 15, 23, 26]), horizon=H)


def _cheetah_vel_corro():
    return dict(tasks=_per_seed(0.0, 3.0, range(1, 41)), split=_split(20, 20), horizon=H)


def _cheetah_vel_borel():
    return dict(tasks=_uniform(0.0, 3.0, 120), split=_split(100, 20), horizon=H, episodes_per_task=2)


def _cheetah_vel_bands(n_train):
    # LDM: training velocities from U(0, 0.5) or U(3, 3.5) (prob. 1/2 each); OOD test grid 0.25 ... 3.25.
    rng = np.random.RandomState(1337)
    low = rng.rand(n_train) < 0.5
    train = np.where(low, rng.uniform(0.0, 0.5, n_train), rng.uniform(3.0, 3.5, n_train))
    test = np.arange(0.25, 3.26, 0.5)
    return dict(tasks=np.concatenate([train, test]), split=_split(n_train, len(test)), horizon=H, episodes_per_task=2)


def _cheetah_vel_ldm():
    return _cheetah_vel_bands(100)


def _cheetah_vel_ldm_cpu():
    # The ldm split at CPU size: 20 training velocities from the same two bands, the same 7 test velocities.
    return _cheetah_vel_bands(20)


def _cheetah_dir_pearl():
    # Two tasks; PEARL and MACAW train and test on both.
    return dict(tasks=np.array([-1.0, 1.0]), split=(np.arange(2), np.arange(2)), allow_overlap=True, horizon=H)


# AntDir


def _ant_dir_pearl():
    # PEARL paper / MQL: forward and backward.
    return dict(tasks=np.array([0.0, np.pi]), split=(np.arange(2), np.arange(2)), allow_overlap=True, horizon=H)


def _ant_dir_macaw():
    return dict(tasks=_uniform(0.0, 2 * np.pi, 50), split=_explicit_split(50, [6, 17, 23, 30, 41]), horizon=H)


def _ant_dir_smac():
    # SMAC ships a fixed list (degrees) in a joblib file; we draw the same distribution, in radians.
    return dict(tasks=_uniform(0.0, 2 * np.pi, 120), split=_split(100, 20), horizon=H)


def _ant_dir_corro():
    return dict(tasks=_per_seed(0.0, 2 * np.pi, range(1, 41)), split=_split(20, 20), horizon=H, direction_only=True)


def _ant_dir_ldm():
    # LDM trains on the 4 axis directions and tests on all 8 multiples of pi/4 (so the axes overlap).
    angles = np.arange(8) * np.pi / 4
    return dict(tasks=angles, split=(np.arange(0, 8, 2), np.arange(8)), allow_overlap=True, horizon=H,
                episodes_per_task=2)


# AntGoal


def _ant_goal_pearl():
    # oyster ant_goal.py: a = 2 pi U, r = 3 sqrt(U) (uniform on the radius-3 disc), angles drawn first.
    rng = np.random.RandomState(1337)
    a = rng.random_sample(180) * 2 * np.pi
    r = 3 * rng.random_sample(180) ** 0.5
    return dict(tasks=_polar(r, a), split=_split(150, 30), horizon=H)


def _ant_goal_ldm():
    # Area-uniform on {r <= 1} u {2.5 <= r <= 3}: the inner disc has 1 / 3.75 = 4/15 of the area.
    rng = np.random.RandomState(1337)
    inner = rng.rand(100) < 4 / 15
    r = np.sqrt(np.where(inner, rng.uniform(0.0, 1.0, 100), rng.uniform(2.5 ** 2, 9.0, 100)))
    train = _polar(r, rng.uniform(0.0, 2 * np.pi, 100))
    axes = np.arange(4) * np.pi / 2
    test = np.concatenate([_polar(np.full(4, rad), axes) for rad in (0.5, 1.75, 2.75)])
    return dict(tasks=np.concatenate([train, test]), split=_split(100, 12), horizon=H, episodes_per_task=2)


def _ant_semicircle_borel():
    a = _uniform(0.0, np.pi, 100)
    return dict(tasks=_polar(1.0, a), split=_split(80, 20), horizon=H, episodes_per_task=2)


# Walker / Hopper rand-params


def _walker_pearl():
    return dict(tasks=_rand_param_tasks("walker2d.xml", 50), split=_split(40, 10), horizon=H, frame_skip=5)


def _walker_macaw():
    return dict(tasks=_rand_param_tasks("walker2d.xml", 50), split=_explicit_split(50, [2, 12, 15, 39, 43]),
                horizon=H, frame_skip=5)


def _walker_corro():
    # CORRO: mass and friction only, seeds 1..24; its RandomEnv forces frame_skip 4; ends iff z <= 0.5.
    tasks = _rand_param_tasks("walker2d.xml", seeds=range(1, 25), kinds=("body_mass", "geom_friction"))
    return dict(tasks=tasks, split=_split(16, 8), horizon=H, frame_skip=4, termination="z_only", full_obs=True)


def _hopper_pearl():
    return dict(tasks=_rand_param_tasks("hopper.xml", 50), split=_split(40, 10), horizon=H, frame_skip=4)


def _hopper_corro():
    # CORRO: all four kinds, no alive bonus, no termination, full unclipped qpos + qvel.
    return dict(tasks=_rand_param_tasks("hopper.xml", seeds=range(1, 41)), split=_split(20, 20), horizon=H,
                frame_skip=4, alive_bonus=0.0, termination="none", full_obs=True)


def _humanoid_dir_pearl():
    return dict(tasks=_uniform(0.0, 2 * np.pi, 130), split=_split(100, 30), horizon=H)


# ---------------------------------------------------------------------------------------------
# Batched stepping: a Python loop over sub-envs
# ---------------------------------------------------------------------------------------------


class _EnvRngs:
    """``get_state`` / ``set_state`` over all sub-env generators (what the collector checkpoints as
    ``venv.rng``; the numpy families expose a RandomState with the same two methods)."""

    def __init__(self, venv):
        self.venv = venv

    def get_state(self):
        return dict(seeded=self.venv._seeded.copy(),
                    states=[e.np_random.bit_generator.state for e in self.venv.envs])

    def set_state(self, state):
        self.venv._seeded[:] = state["seeded"]
        for e, s in zip(self.venv.envs, state["states"]):
            e.np_random.bit_generator.state = s


class BatchedMujocoEnv:
    """``num_envs = len(task_idx) * n_per_task`` sub-envs, task-major. Sub-env b is seeded with ``seed + b``
    on its first reset. No autoreset: the caller resets (masked) envs after ``terminated | truncated``."""

    def __init__(self, family, task_idx, n_per_task=1, seed=0):
        self.family = family
        self.task_idx = np.repeat(np.asarray(task_idx, np.int64).reshape(-1), n_per_task)
        self.num_envs = len(self.task_idx)
        self.horizon = family.horizon
        self.seed = int(seed)
        self.envs = [family.make_env(int(i), time_limit=False) for i in self.task_idx]
        self.sparse = bool(getattr(self.envs[0], "sparse", False))
        self.obs = np.zeros((self.num_envs,) + self.envs[0].observation_space.shape, np.float32)
        self.t = np.zeros(self.num_envs, np.int64)
        self._seeded = np.zeros(self.num_envs, bool)
        self.rng = _EnvRngs(self)

    def reset(self, mask=None, collect=False):
        m = np.ones(self.num_envs, bool) if mask is None else np.asarray(mask, bool)
        options = {"collect": True} if collect else None
        for b in np.flatnonzero(m):
            seed = None if self._seeded[b] else self.seed + int(b)
            self.obs[b] = self.envs[b].reset(seed=seed, options=options)[0]
            self._seeded[b] = True
            self.t[b] = 0
        return self.obs.copy()

    def step(self, actions):
        actions = np.asarray(actions, np.float32).reshape(self.num_envs, -1)
        reward = np.zeros(self.num_envs, np.float32)
        terminated = np.zeros(self.num_envs, bool)
        success = np.zeros(self.num_envs, bool)
        dense = np.zeros(self.num_envs, np.float32) if self.sparse else None
        for b, env in enumerate(self.envs):
            self.obs[b], reward[b], terminated[b], _, info = env.step(actions[b])
            success[b] = info["success"]
            if dense is not None:
                dense[b] = info["rewards_dense"]
        self.t += 1
        info = {"success": success}
        if dense is not None:
            info["rewards_dense"] = dense
        return self.obs.copy(), reward, terminated, self.t >= self.horizon, info

    def close(self):
        for e in self.envs:
            e.close()


# family -> (default preset, {preset: preset fn}, single-env class, batched-env class)
FAMILIES = {
    "HalfCheetahVel": ("cpu", {"cpu": _cheetah_vel_cpu, "pearl": _cheetah_vel_pearl, "macaw": _cheetah_vel_macaw,
                               "corro": _cheetah_vel_corro, "borel": _cheetah_vel_borel, "ldm": _cheetah_vel_ldm,
                               "ldm-cpu": _cheetah_vel_ldm_cpu},
                       HalfCheetahVelEnv, BatchedMujocoEnv),
    "HalfCheetahDir": ("pearl", {"pearl": _cheetah_dir_pearl}, HalfCheetahDirEnv, BatchedMujocoEnv),
    "AntDir": ("pearl", {"pearl": _ant_dir_pearl, "macaw": _ant_dir_macaw, "smac": _ant_dir_smac,
                         "corro": _ant_dir_corro, "ldm": _ant_dir_ldm}, AntDirEnv, BatchedMujocoEnv),
    "AntGoal": ("pearl", {"pearl": _ant_goal_pearl, "ldm": _ant_goal_ldm}, AntGoalEnv, BatchedMujocoEnv),
    "AntSemicircle": ("borel", {"borel": _ant_semicircle_borel}, AntSemicircleEnv, BatchedMujocoEnv),
    "WalkerRandParams": ("pearl", {"pearl": _walker_pearl, "macaw": _walker_macaw, "corro": _walker_corro},
                         WalkerRandParamsEnv, BatchedMujocoEnv),
    "HopperRandParams": ("pearl", {"pearl": _hopper_pearl, "corro": _hopper_corro},
                         HopperRandParamsEnv, BatchedMujocoEnv),
    "HumanoidDir": ("pearl", {"pearl": _humanoid_dir_pearl}, HumanoidDirEnv, BatchedMujocoEnv),
}
