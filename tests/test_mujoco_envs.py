"""MuJoCo task families: reward formulas from the env's own state, obs dims, rand-params physics,
paper task lists, batched == single, truncation without autoreset, every (family, preset) builds."""

import numpy as np
import pytest

pytest.importorskip("mujoco")

from gymnasium.envs.mujoco.humanoid_v5 import mass_center  # noqa: E402

from common.envs import MUJOCO_FAMILY_NAMES, make_family, presets  # noqa: E402

ALL = [(f, p) for f in MUJOCO_FAMILY_NAMES for p in presets(f)]
ACTION = np.array([0.3, -0.7, 1.0, -0.2, 0.5, -1.0, 0.1, 0.9, -0.4, 0.6, 0.0, -0.8, 0.2, 0.7, -0.3, 0.4, -0.6])


def _env(family, preset=None, task=0, **override):
    fam = make_family(family, preset)
    fam.config.update(override)
    env = fam.make_env(task, time_limit=False)
    env.reset(seed=0)
    return fam, env, env.unwrapped


def _act(env, scale=1.0):
    return scale * ACTION[: env.action_space.shape[0]]


# ------------------------------------------------------------------ obs dims and every preset


@pytest.mark.parametrize("family,preset,obs_dim,act_dim", [
    ("HalfCheetahVel", "cpu", 20, 6), ("HalfCheetahDir", "pearl", 20, 6), ("AntDir", "pearl", 27, 8),
    ("AntDir", "corro", 27, 8), ("AntGoal", "pearl", 113, 8), ("AntSemicircle", "borel", 29, 8),
    ("WalkerRandParams", "pearl", 17, 6), ("WalkerRandParams", "corro", 18, 6),
    ("HopperRandParams", "pearl", 11, 3), ("HopperRandParams", "corro", 12, 3), ("HumanoidDir", "pearl", 348, 17)])
def test_obs_and_action_dims(family, preset, obs_dim, act_dim):
    fam, env, _ = _env(family, preset)
    assert (fam.obs_dim, fam.act_dim) == (obs_dim, act_dim)
    obs, _ = env.reset(seed=1)
    assert obs.shape == (obs_dim,) and obs.dtype == np.float32
    assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
    obs, r, term, trunc, info = env.step(env.action_space.sample())
    assert obs.shape == (obs_dim,) and obs.dtype == np.float32 and isinstance(r, float)
    assert info["success"] in (True, False) and trunc is False


@pytest.mark.parametrize("family,preset", ALL)
def test_every_preset_builds_with_a_valid_split(family, preset):
    a, b = make_family(family, preset), make_family(family, preset)
    assert np.array_equal(a.tasks, b.tasks) and np.array_equal(a.test_idx, b.test_idx)  # seeded
    assert a.tasks.dtype == np.float32 and np.isfinite(a.tasks).all() and a.horizon == 200
    n = len(a.tasks)
    assert len(a.train_idx) > 0 and len(a.test_idx) > 0
    assert a.train_idx.min() >= 0 and a.test_idx.max() < n
    overlap = np.intersect1d(a.train_idx, a.test_idx)
    assert (overlap.size > 0) == a.allow_overlap
    if not a.allow_overlap:
        assert len(np.unique(a.tasks, axis=0)) == n


def test_paper_task_lists():
    vel = make_family("HalfCheetahVel", "pearl")
    assert vel.tasks[0, 0] == pytest.approx(0.78607, abs=1e-5)
    assert np.allclose(vel.tasks[vel.test_idx[:3], 0], [2.0510, 0.0831, 0.7015], atol=1e-4)
    assert (len(vel.train_idx), len(vel.test_idx)) == (100, 30)
    cpu = make_family("HalfCheetahVel")  # project default: the first 30 PEARL velocities, 20/10
    assert cpu.preset == "cpu" and np.array_equal(cpu.tasks, vel.tasks[:30]) and len(cpu.test_idx) == 10
    macaw = make_family("HalfCheetahVel", "macaw")
    assert np.allclose(macaw.tasks[macaw.test_idx, 0], [0.225, 0.6, 1.2, 1.8, 2.025])
    ldm = make_family("HalfCheetahVel", "ldm")
    assert np.allclose(ldm.tasks[ldm.test_idx, 0], [0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.25])
    tr = ldm.tasks[ldm.train_idx, 0]
    assert (((tr >= 0) & (tr <= 0.5)) | ((tr >= 3) & (tr <= 3.5))).all() and (tr < 1).any() and (tr > 3).any()
    small = make_family("HalfCheetahVel", "ldm-cpu")  # the same split at CPU size: 20 train in both bands, same 7 test
    st = small.tasks[small.train_idx, 0]
    assert len(st) == 20 and np.array_equal(small.tasks[small.test_idx], ldm.tasks[ldm.test_idx])
    assert (((st >= 0) & (st <= 0.5)) | ((st >= 3) & (st <= 3.5))).all() and (st < 1).sum() >= 5 and (st > 3).sum() >= 5
    assert small.episodes_per_task == 2
    corro = make_family("HalfCheetahVel", "corro")
    assert corro.tasks[0, 0] == pytest.approx(np.random.RandomState(1).uniform(0, 3), abs=1e-6)
    goal = make_family("AntGoal", "pearl").tasks
    assert goal.shape == (180, 2) and np.linalg.norm(goal, axis=1).max() <= 3.0
    lg = make_family("AntGoal", "ldm")
    r = np.linalg.norm(lg.tasks, axis=1)
    assert np.allclose(sorted(r[lg.test_idx]), np.repeat([0.5, 1.75, 2.75], 4), atol=1e-6)
    assert ((r[lg.train_idx] <= 1 + 1e-6) | ((r[lg.train_idx] >= 2.5 - 1e-6) & (r[lg.train_idx] <= 3 + 1e-6))).all()
    semi = make_family("AntSemicircle").tasks
    assert np.allclose(np.linalg.norm(semi, axis=1), 1, atol=1e-6) and (semi[:, 1] >= 0).all()
    ldm_dir = make_family("AntDir", "ldm")
    assert np.allclose(ldm_dir.tasks[ldm_dir.train_idx, 0], [0, np.pi / 2, np.pi, 3 * np.pi / 2], atol=1e-6)
    assert len(ldm_dir.test_idx) == 8
    assert np.array_equal(make_family("AntDir", "macaw").test_idx, [6, 17, 23, 30, 41])
    wc = make_family("WalkerRandParams", "corro").tasks  # mass (8) and friction (24) only
    assert (wc[:, 8:41] == 0).all() and (wc[:, :8] != 0).all() and (wc[:, 41:] != 0).all()


# ------------------------------------------------------------------ rewards by hand


def test_cheetah_vel_reward_by_hand():
    fam, env, u = _env("HalfCheetahVel", "pearl", task=5)
    assert u.dt == pytest.approx(0.05)
    for _ in range(3):
        x0 = float(u.data.qpos[0])
        a = _act(env)
        obs, r, term, _, _ = env.step(a)
        v = (u.data.qpos[0] - x0) / 0.05
        assert r == pytest.approx(-abs(v - fam.tasks[5, 0]) - 0.05 * np.sum(a ** 2), rel=1e-9, abs=1e-9)
        assert not term
        expect = np.concatenate([u.data.qpos[1:], u.data.qvel, u.data.body("torso").xpos])
        assert np.allclose(obs, expect.astype(np.float32))
    _, r, *_ = env.step(5 * a)  # actions are clipped to [-1, 1] before the cost
    assert r <= -0.05 * 6 * 0.3 ** 2


def test_cheetah_dir_reward_by_hand():
    fam, env, u = _env("HalfCheetahDir", task=0)
    assert fam.tasks[0, 0] == -1.0
    x0 = float(u.data.qpos[0])
    a = _act(env)
    _, r, *_ = env.step(a)
    v = (u.data.qpos[0] - x0) / u.dt
    assert r == pytest.approx(-v - 0.05 * np.sum(a ** 2), abs=1e-9)


def test_ant_dir_reward_termination_and_contact_flag():
    fam, env, u = _env("AntDir", "macaw", task=3)
    theta = float(fam.tasks[3, 0])
    for _ in range(5):  # the ant lands on the floor within a few steps, so contact forces become non-zero
        xy0 = u.data.body("torso").xpos[:2].copy()
        a = _act(env)
        _, r, term, _, _ = env.step(a)
        fwd = (u.data.body("torso").xpos[:2] - xy0) @ [np.cos(theta), np.sin(theta)] / 0.05
        assert r == pytest.approx(fwd - 0.5 * np.sum(a ** 2) + 1.0, abs=1e-9)  # contact weight 0 by default
        assert not term
    fam.config["contact_cost_weight"] = 5e-4
    env = fam.make_env(3, time_limit=False)
    env.reset(seed=0)
    u = env.unwrapped
    contact = 0.0
    for _ in range(5):
        xy0 = u.data.body("torso").xpos[:2].copy()
        _, r, *_ = env.step(_act(env))
        fwd = (u.data.body("torso").xpos[:2] - xy0) @ [np.cos(theta), np.sin(theta)] / 0.05
        contact = 5e-4 * np.sum(np.clip(u.data.cfrc_ext, -1, 1) ** 2)
        assert r == pytest.approx(fwd - 0.5 * np.sum(_act(env) ** 2) - contact + 1.0, abs=1e-9)
    assert contact > 0
    # torso lifted above z = 1: terminated in PEARL's ant-dir, never in CORRO's (reward = direction term only)
    for preset, should_end in (("pearl", True), ("corro", False)):
        fam, env, u = _env("AntDir", preset, task=1)
        q = u.data.qpos.copy()
        q[2] = 1.6
        u.set_state(q, np.zeros(u.model.nv))
        xy0 = u.data.body("torso").xpos[:2].copy()
        _, r, term, _, _ = env.step(np.zeros(8))
        assert term == should_end
        if preset == "corro":
            theta = float(fam.tasks[1, 0])
            fwd = (u.data.body("torso").xpos[:2] - xy0) @ [np.cos(theta), np.sin(theta)] / 0.05
            assert r == pytest.approx(fwd, abs=1e-9)


def test_ant_goal_reward_by_hand():
    fam, env, u = _env("AntGoal", "pearl", task=7)
    g = fam.tasks[7].astype(np.float64)
    for _ in range(6):  # long enough for the ant to touch the floor (real contact forces are non-zero)
        a = _act(env)
        obs, r, term, _, _ = env.step(a)
        xy = u.data.body("torso").xpos[:2]
        assert r == pytest.approx(-np.abs(xy - g).sum() - 0.1 * np.sum(a ** 2), abs=1e-6)
        assert not term
        assert np.allclose(obs[:29], np.concatenate([u.data.qpos, u.data.qvel]).astype(np.float32))
        assert (obs[29:] == 0).all()  # zero contact-force padding (the papers' MuJoCo 2.0 values)
    assert np.abs(u.data.cfrc_ext).sum() > 0


def test_ant_semicircle_sparse_and_dense_rewards():
    fam, env, u = _env("AntSemicircle", task=4)
    g = fam.tasks[4].astype(np.float64)
    obs, _ = env.reset(seed=3)
    assert (obs[:2] == 0).all()  # evaluation starts at the origin
    a = 0.5 * _act(env)
    _, r, _, _, info = env.step(a)  # far from the goal: no sparse reward
    xy = u.data.body("torso").xpos[:2]
    assert not info["success"] and r == pytest.approx(-0.1 * np.sum(a ** 2), abs=1e-9)
    assert info["rewards_dense"] == pytest.approx(-np.abs(xy - g).sum() - 0.1 * np.sum(a ** 2), abs=1e-9)
    q = u.data.qpos.copy()
    q[:2] = g + [0.05, -0.05]  # put the torso inside the goal radius
    u.set_state(q, np.zeros(u.model.nv))
    _, r, _, _, info = env.step(a)
    xy = u.data.body("torso").xpos[:2]
    assert np.linalg.norm(xy - g) <= 0.2 and info["success"]
    assert r == pytest.approx(1.0 - 0.1 * np.sum(a ** 2), abs=1e-9)
    assert info["rewards_dense"] == pytest.approx(-np.abs(xy - g).sum() - 0.1 * np.sum(a ** 2), abs=1e-9)
    starts = np.array([env.reset(options={"collect": True})[0][:2] for _ in range(200)])
    rad = np.linalg.norm(starts, axis=1)
    assert ((rad < 0.8) | (rad > 1.2)).all() and rad.max() > 1.2 and rad.min() < 0.8
    assert (starts[:, 0] >= -1.5).all() and (starts[:, 0] <= 1.5).all()
    assert (starts[:, 1] >= -0.5).all() and (starts[:, 1] <= 1.5).all()


def test_humanoid_dir_reward_and_action_scaling():
    fam, env, u = _env("HumanoidDir", task=2)
    theta = float(fam.tasks[2, 0])
    a = _act(env)
    com0 = mass_center(u.model, u.data)
    _, r, term, _, _ = env.step(a)
    assert np.allclose(u.data.ctrl, 0.4 * a)  # agent actions in [-1, 1], ctrlrange +-0.4
    fwd = (mass_center(u.model, u.data) - com0) @ [np.cos(theta), np.sin(theta)] / u.dt
    assert r == pytest.approx(1.25 * fwd - 0.1 * np.sum((0.4 * a) ** 2) + 5.0, abs=1e-9)
    assert not term
    _, env2, _ = _env("HumanoidDir", task=2, cfrc_in_obs=True)
    for _ in range(12):  # the feet touch the floor after ~10 steps
        obs, obs2 = env.step(0.1 * a)[0], env2.step(0.1 * a)[0]
    assert np.abs(u.data.cfrc_ext).sum() > 0 and np.abs(obs2[-78:]).sum() > 0  # real forces, if asked for
    assert (obs[-78:] == 0).all() and np.abs(obs[:-78]).sum() > 0  # by default zeroed, as in the papers
    q = u.data.qpos.copy()
    q[2] = 0.5  # fallen: terminated
    u.set_state(q, u.data.qvel.copy())
    assert env.step(np.zeros(17))[2]


# ------------------------------------------------------------------ rand-params physics


@pytest.mark.parametrize("family,sizes", [("WalkerRandParams", (8, 24, 9, 24)), ("HopperRandParams", (5, 15, 6, 15))])
def test_rand_params_set_task_in_place(family, sizes):
    fam, env, u = _env(family, task=0)
    keys = ("body_mass", "body_inertia", "dof_damping", "geom_friction")
    assert fam.task_dim == sum(sizes) and [np.size(fam.task_defaults[k]) for k in keys] == list(sizes)
    assert u.model.opt.timestep == 0.004
    defaults = {k: np.array(fam.task_defaults[k]).reshape(getattr(u.model, k).shape) for k in keys}
    t3 = fam.tasks[3].astype(np.float64)
    u.set_task(t3)
    first = {k: getattr(u.model, k).copy() for k in keys}
    u.set_task(t3)  # no compounding
    assert all(np.array_equal(first[k], getattr(u.model, k)) for k in keys)
    off = 0
    for k, n in zip(keys, sizes):  # per-element multipliers, damping base 1.3
        base = 1.3 if k == "dof_damping" else 1.5
        assert np.allclose(first[k].ravel(), defaults[k].ravel() * base ** t3[off:off + n], rtol=1e-12)
        off += n
    assert not np.array_equal(first["body_mass"][1:], defaults["body_mass"][1:])
    u.set_task(np.zeros(fam.task_dim))  # zero exponents restore the defaults bit-for-bit
    assert all(np.array_equal(getattr(u.model, k), defaults[k]) for k in keys)
    # different tasks: different next states from the same state and action
    env.reset(seed=0)
    q, v = u.data.qpos.copy(), u.data.qvel.copy()
    nxt = []
    for i in (1, 2):
        u.set_task(fam.tasks[i])
        u.set_state(q, v)
        nxt.append(env.step(_act(env))[0])
    assert not np.allclose(nxt[0], nxt[1])
    u.set_task(fam.tasks[1])  # ... and the same task reproduces the same next state
    u.set_state(q, v)
    assert np.array_equal(env.step(_act(env))[0], nxt[0])


def test_rand_params_models_rewards_and_corro_variants():
    fam, env, u = _env("WalkerRandParams", task=0)
    names = [u.model.geom(i).name for i in range(u.model.ngeom)]
    fr = dict(zip(names, np.array(fam.task_defaults["geom_friction"]).reshape(-1, 3)[:, 0]))
    assert fr["foot_geom"] == pytest.approx(0.9) and fr["foot_left_geom"] == pytest.approx(1.9)
    assert u.dt == pytest.approx(5 * 0.004)  # rand_param_envs' walker: frame_skip 5
    x0 = float(u.data.qpos[0])
    a = _act(env)
    _, r, term, _, _ = env.step(a)
    assert r == pytest.approx((u.data.qpos[0] - x0) / u.dt + 1.0 - 1e-3 * np.sum(a ** 2), abs=1e-9)
    assert not term
    # z = 0.6: below PEARL's 0.8 (terminates) but above CORRO's 0.5 (keeps going, full unclipped obs)
    for preset, should_end in (("pearl", True), ("corro", False)):
        _, env, u = _env("WalkerRandParams", preset)
        q = u.data.qpos.copy()
        q[1] = 0.6
        u.set_state(q, np.zeros(u.model.nv))
        obs, _, term, _, _ = env.step(np.zeros(6))
        assert term == should_end
    assert np.allclose(obs, np.concatenate([u.data.qpos, u.data.qvel]).astype(np.float32))
    _, env, u = _env("HopperRandParams", "corro")
    assert u.dt == pytest.approx(0.016)
    q = u.data.qpos.copy()
    q[1] = 0.3  # would end a PEARL hopper; CORRO's never terminates and pays no alive bonus
    u.set_state(q, np.zeros(u.model.nv))
    x0 = float(u.data.qpos[0])
    _, r, term, _, _ = env.step(_act(env))
    assert not term and r == pytest.approx((u.data.qpos[0] - x0) / 0.016 - 1e-3 * np.sum(_act(env) ** 2), abs=1e-9)


# ------------------------------------------------------------------ batched envs


def test_batched_equals_single_step_for_step():
    fam = make_family("AntSemicircle")
    venv = fam.make_vec_env([0, 3], n_per_task=2, seed=7)
    assert venv.task_idx.tolist() == [0, 0, 3, 3] and venv.num_envs == 4
    obs = venv.reset(collect=True)
    singles = [fam.make_env(int(t), time_limit=False) for t in venv.task_idx]
    for b, e in enumerate(singles):
        o, _ = e.reset(seed=7 + b, options={"collect": True})
        assert np.array_equal(o, obs[b])
    assert not np.array_equal(obs[0], obs[1])  # copies of a task get different seeds
    rng = np.random.RandomState(0)
    for _ in range(15):
        a = rng.uniform(-1, 1, (4, 8)).astype(np.float32)
        obs, r, term, trunc, info = venv.step(a)
        assert obs.dtype == np.float32 and r.dtype == np.float32 and info["rewards_dense"].dtype == np.float32
        for b, e in enumerate(singles):
            o, rs, te, _, inf = e.step(a[b])
            assert np.array_equal(o, obs[b]) and np.float32(rs) == r[b] and te == term[b]
            assert inf["success"] == info["success"][b] and np.float32(inf["rewards_dense"]) == info["rewards_dense"][b]
    assert not trunc.any()


def test_batched_truncates_at_horizon_without_autoreset():
    fam = make_family("HalfCheetahVel")
    venv = fam.make_vec_env([1, 2], seed=0)
    s0 = venv.reset()
    a = np.full((2, 6), 0.5, np.float32)
    for t in range(1, fam.horizon + 1):
        obs, r, term, trunc, info = venv.step(a)
        assert trunc.all() == (t == fam.horizon) and not term.any()
        assert info["success"].dtype == bool and "rewards_dense" not in info
    assert venv.t.tolist() == [200, 200]
    before = obs.copy()
    after = venv.step(a)[0]  # no autoreset: the envs keep running from where they were
    assert not np.allclose(after, before) and not np.allclose(after[:, 1:], s0[:, 1:], atol=0.5)
    s1 = venv.reset(mask=[False, True])
    assert np.array_equal(s1[0], after[0]) and venv.t.tolist() == [201, 0]
    assert np.abs(s1[1, 8:17]).max() < 1.0  # fresh start: small reset-noise velocities
    state = venv.rng.get_state()  # the collector checkpoints the sub-env generators
    x = venv.reset()
    assert not np.array_equal(venv.reset(), x)  # seeded once only: later resets draw new start states
    venv.rng.set_state(state)
    assert np.array_equal(venv.reset(), x)
