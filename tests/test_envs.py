"""numpy task families: reward formulas, batched == single, splits, registry errors, speed."""

import time

import gymnasium as gym
import numpy as np
import pytest

from common.envs import family_names, make_family, presets, relabel_rewards, relabel_unsupported

NUMPY = [("PointRobot", p) for p in ("default", "pearl", "corro")] + \
        [("SparsePointRobot", p) for p in ("default", "pearl", "borel")] + \
        [("PointRobotWind", "default"), ("GridNavi", "borel"), ("GridNavi", "ldm")]


def test_point_dense_reward_by_hand():
    fam = make_family("PointRobot")
    env = fam.make_env(3)
    obs, _ = env.reset(seed=0)
    assert np.array_equal(obs, [0, 0])  # default preset starts at the origin
    obs, r, term, trunc, info = env.step(np.array([1.0, 0.5]))
    assert np.allclose(obs, [0.1, 0.05])
    assert r == pytest.approx(-np.hypot(0.1 - fam.tasks[3, 0], 0.05 - fam.tasks[3, 1]), abs=1e-6)
    obs, *_ = env.step(np.array([5.0, -5.0]))  # actions are clipped to [-1, 1] before the 0.1 scale
    assert np.allclose(obs, [0.2, -0.05])
    assert not term and not trunc


def test_sparse_rewards_by_hand():
    for preset, inside_reward in (("pearl", lambda d: 1 - d), ("borel", lambda d: 1.0)):
        fam = make_family("SparsePointRobot", preset)
        env = fam.make_env(0, time_limit=False)
        env.reset(seed=0)
        g = fam.tasks[0]
        env.unwrapped._state = (g - np.array([0.05, 0.1], np.float32)).astype(np.float32)  # 1 step from the goal
        _, r, _, _, info = env.step(np.array([0.0, 0.0]))
        d = np.hypot(0.05, 0.1)
        assert r == pytest.approx(inside_reward(d), abs=1e-6) and info["success"]
        assert info["rewards_dense"] == pytest.approx(-d, abs=1e-6)
        env.unwrapped._state = np.zeros(2, np.float32)
        _, r, _, _, info = env.step(np.array([0.0, 0.0]))
        assert r == 0.0 and not info["success"] and info["rewards_dense"] == pytest.approx(-1.0, abs=1e-6)


def test_wind_pushes_the_point():
    fam = make_family("PointRobotWind")
    env = fam.make_env(5)
    env.reset(seed=0)
    w = fam.tasks[5]
    obs, r, *_ = env.step(np.array([0.0, 1.0]))
    assert np.allclose(obs, w + [0.0, 0.1])
    assert r == pytest.approx(-np.linalg.norm(obs - np.array([1.0, 0.0])), abs=1e-6)


def test_gridnavi_moves_and_reward():
    fam = make_family("GridNavi", "borel")
    goal = np.array([1.0, 2.0])
    i = int(np.flatnonzero((fam.tasks == goal).all(1))[0])
    env = fam.make_env(i)
    env.reset(seed=0)
    path = [(4, [0, 0], -0.1), (1, [0, 1], -0.1), (1, [0, 2], -0.1), (2, [1, 2], 1.0), (0, [1, 2], 1.0), (3, [1, 1], -0.1)]
    for a, pos, rew in path:
        obs, r, _, _, info = env.step(a)
        assert np.array_equal(obs, pos) and r == pytest.approx(rew) and info["success"] == (rew == 1.0)
    for _ in range(10):  # walls clip
        obs, *_ = env.step(2)
    assert obs[0] == 4


@pytest.mark.parametrize("env_id,preset", NUMPY)
def test_batched_equals_single(env_id, preset):
    fam = make_family(env_id, preset)
    idx = np.arange(min(len(fam.tasks), 7))
    venv = fam.make_vec_env(idx, n_per_task=2, seed=1)
    obs = venv.reset()
    singles = []
    for b in range(venv.num_envs):
        e = fam.make_env(int(venv.task_idx[b]))
        e.reset(seed=0)
        e.unwrapped._state = obs[b].copy()  # start from the batched env's (possibly random) start state
        singles.append(e)
    rng = np.random.RandomState(0)
    for t in range(fam.horizon):
        a = rng.randint(5, size=venv.num_envs) if fam.discrete else rng.uniform(-1.5, 1.5, (venv.num_envs, 2))
        obs, r, term, trunc, info = venv.step(a)
        for b, e in enumerate(singles):
            o, rs, te, tr, inf = e.step(a[b])
            assert np.allclose(o, obs[b], atol=1e-6)
            assert rs == pytest.approx(float(r[b]), abs=1e-5)
            assert te == term[b] and tr == trunc[b]  # TimeLimit at H == batched truncation
            assert inf["success"] == info["success"][b]
            if "rewards_dense" in inf:
                assert inf["rewards_dense"] == pytest.approx(float(info["rewards_dense"][b]), abs=1e-5)
    assert trunc.all()


def test_batched_reset_mask_and_no_autoreset():
    fam = make_family("PointRobot", "pearl")  # random start states
    venv = fam.make_vec_env([0, 1, 2], seed=0)
    s0 = venv.reset()
    venv.step(np.ones((3, 2)))
    moved = venv.state.copy()
    s1 = venv.reset(mask=[True, False, False])
    assert np.array_equal(s1[1:], moved[1:]) and not np.array_equal(s1[0], moved[0])
    assert venv.t.tolist() == [0, 1, 1]
    for _ in range(fam.horizon - 1):
        *_, trunc, _ = venv.step(np.zeros((3, 2)))
    assert trunc.tolist() == [False, True, True]
    before = venv.state.copy()
    after = venv.step(np.ones((3, 2)))[0]  # no autoreset: the truncated envs keep moving from where they are
    assert np.allclose(after, before + 0.1, atol=1e-6)
    assert not np.allclose(after, s0)


def test_collect_start_is_off_the_goal_band():
    fam = make_family("SparsePointRobot", "borel")
    venv = fam.make_vec_env(np.arange(10), 100, seed=0)
    r = np.linalg.norm(venv.reset(collect=True), axis=1)
    assert ((r < 0.8) | (r > 1.2)).all() and r.max() > 1.2
    assert np.array_equal(venv.reset(), np.zeros((1000, 2)))  # evaluation starts at the origin


@pytest.mark.parametrize("env_id,preset", NUMPY)
def test_split_seeded_and_disjoint(env_id, preset):
    a, b = make_family(env_id, preset), make_family(env_id, preset)
    assert np.array_equal(a.tasks, b.tasks) and np.array_equal(a.test_idx, b.test_idx)
    overlap = np.intersect1d(a.train_idx, a.test_idx)
    assert (overlap.size > 0) == a.allow_overlap  # only BOReL's grid trains and tests on the same goals
    assert len(np.unique(a.tasks, axis=0)) == len(a.tasks)


def test_presets_match_the_papers():
    assert make_family("PointRobot", "pearl").tasks.shape == (100, 2)
    sp = make_family("SparsePointRobot", "pearl").tasks
    assert np.allclose(np.linalg.norm(sp, axis=1), 1) and (sp[:, 1] >= -1e-7).all()
    assert sorted(np.round(np.arctan2(sp[:, 1], sp[:, 0]) / np.pi * 99).astype(int)) == list(range(100))
    assert np.allclose(sp[0], [0.998, 0.063], atol=1e-3)  # oyster's order: shuffled right after seed 1337
    assert len(make_family("GridNavi", "borel").tasks) == 21
    ldm = make_family("GridNavi", "ldm")
    assert len(ldm.train_idx) == 18 and len(ldm.test_idx) == 27
    assert np.isin(ldm.tasks[ldm.test_idx].max(1), (3, 4, 5)).all()
    assert make_family("PointRobot", "corro").horizon == 10


def test_unknown_ids_and_presets_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid ids: PointRobot"):
        make_family("PointRobo")
    with pytest.raises(ValueError, match="valid presets: default, pearl, corro"):
        make_family("PointRobot", "macaw")
    assert "HalfCheetahVel" in family_names() and presets("omrl/GridNavi-v0") == ["borel", "ldm"]


def test_gym_registration_applies_the_preset_horizon():
    env = gym.make("omrl/PointRobot-v0", preset="corro", task_idx=2)
    env.reset(seed=0)
    steps = 0
    while True:
        *_, term, trunc, _ = env.step(env.action_space.sample())
        steps += 1
        if term or trunc:
            break
    assert steps == 10


def test_batched_numpy_speed_over_a_million_steps_per_second():
    fam = make_family("PointRobot")
    venv = fam.make_vec_env(np.arange(50), 2000)
    venv.reset()
    a = np.random.uniform(-1, 1, (venv.num_envs, 2)).astype(np.float32)
    t0 = time.perf_counter()
    for _ in range(10):
        venv.step(a)
    rate = 10 * venv.num_envs / (time.perf_counter() - t0)
    assert rate > 1e6, f"{rate:.0f} transitions/s"


@pytest.mark.parametrize("env_id,preset", [("PointRobot", "default"), ("SparsePointRobot", "pearl"),
                                           ("SparsePointRobot", "borel"), ("PointRobotWind", "default"),
                                           ("GridNavi", "borel")])
def test_relabelled_reward_equals_the_other_tasks_env_reward(env_id, preset):
    """Transitions collected in task 0, relabelled for task j, earn exactly what task j's env would pay for the
    same (s, a, s') -- checked by stepping task j's env from the same states with the same actions."""
    fam = make_family(env_id, preset)
    src = fam.make_vec_env(np.zeros(64, np.int64), seed=3)
    obs = src.reset()
    rng = np.random.default_rng(0)
    for _ in range(5):  # move away from the start so that some goals are reached and some are not
        obs, *_ = src.step(rng.integers(0, fam.n_actions, 64) if fam.discrete else rng.uniform(-1, 1, (64, 2)))
    act = rng.integers(0, fam.n_actions, 64) if fam.discrete else rng.uniform(-1, 1, (64, 2)).astype(np.float32)
    targets = rng.integers(0, len(fam.tasks), 64)
    if not fam.discrete and env_id != "PointRobotWind":  # half the states next to the target goal: sparse hits
        obs[:32] = fam.tasks[targets[:32]] + rng.normal(0, 0.1, (32, 2)).astype(np.float32)
        src.state = obs.copy()
    dst = fam.make_vec_env(targets, seed=4)
    dst.reset()
    dst.state = obs.copy()
    nobs_dst, r_dst, _, _, info_dst = dst.step(act)
    if env_id != "PointRobotWind":  # same dynamics: the (s, a, s') of task 0 are those of task j
        nobs_src, *_ = src.step(act)
        np.testing.assert_array_equal(nobs_src, nobs_dst)
    r, dense = relabel_rewards(fam, targets, obs, act, nobs_dst)
    np.testing.assert_allclose(r, r_dst, atol=1e-6)
    if env_id == "SparsePointRobot":
        np.testing.assert_allclose(dense, info_dst["rewards_dense"], atol=1e-6)
    else:
        assert dense is None
    assert len(np.unique(r)) > 1  # the check is not vacuous


def test_relabel_refuses_mujoco_families():
    pytest.importorskip("mujoco")
    fam = make_family("HalfCheetahVel", "cpu")
    with pytest.raises(NotImplementedError, match="HalfCheetahVel"):
        relabel_rewards(fam, [0], np.zeros((1, fam.obs_dim)), np.zeros((1, fam.act_dim)), np.zeros((1, fam.obs_dim)))
    assert "HalfCheetahVel" in relabel_unsupported(fam)  # the up-front check the method scripts use says the same
    assert relabel_unsupported(make_family("PointRobot", "default")) is None
    assert relabel_unsupported(make_family("GridNavi", "borel")) is None
