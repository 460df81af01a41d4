"""mql.py: the batched GRU against nn.GRU, histories from episode boundaries, TD3 losses and step schedule, the
propensity classifier (objective, sign, clipping), ESS, vectorised adaptation, plumbing and resume."""

import json
import math

import numpy as np
import pytest
import torch

import mql
from common.data import ensure_dataset
from common.envs import make_family


def tiny_args(**kw):
    kw = dict(net_size=32, ctx_dim=8, cuda=False, batch_size=16, snap_iter_nums=2, main_snap_iter_nums=3,
              sample_mult=1) | kw
    return mql.resolve_args(mql.Args(**kw))


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


def test_batched_gru_equals_nn_gru_member_by_member():
    torch.manual_seed(0)
    E, B, H, D, hid = 3, 5, 7, 4, 6
    egru = mql.EGRU(E, D, hid)
    x = torch.randn(E, B, H, D)
    out = egru(x)
    for e in range(E):
        ref = torch.nn.GRU(D, hid, batch_first=True)
        with torch.no_grad():
            ref.weight_ih_l0.copy_(egru.weight_ih[e].T)
            ref.weight_hh_l0.copy_(egru.weight_hh[e].T)
            ref.bias_ih_l0.copy_(egru.bias_ih[e, 0])
            ref.bias_hh_l0.copy_(egru.bias_hh[e, 0])
        _, h_n = ref(x[e])
        torch.testing.assert_close(out[e], h_n[0], atol=1e-6, rtol=1e-5)
    # nn.GRU's init range U(-1/sqrt(hidden), 1/sqrt(hidden))
    assert egru.weight_hh.abs().max() <= 1 / math.sqrt(hid)


def test_vectorised_members_learn_exactly_like_separate_networks():
    """A TD3 step on E = 2 replicated members with different batches equals two E = 1 steps (the loss is the sum of
    per-member losses and Adam is elementwise): adaptation of all test tasks at once = one task at a time."""
    torch.manual_seed(0)
    args = tiny_args(policy_noise=0.0, policy_freq=1)
    nets = mql.make_nets(2, 2, args, "cpu")

    def batch(E, seed):
        g = torch.Generator().manual_seed(seed)
        r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
        return {"obs": r(E, 6, 2), "actions": r(E, 6, 2).clamp(-1, 1), "rewards": r(E, 6), "next_obs": r(E, 6, 2),
                "terminals": (r(E, 6) > 1).float(), "hist": r(E, 6, 10, 5), "next_hist": r(E, 6, 10, 5)}

    b = [batch(1, 1), batch(1, 2)]
    both = {k: torch.cat([b[0][k], b[1][k]]) for k in b[0]}
    big = {k: mql.replicate(v, 2) for k, v in nets.items()}
    opts = mql.make_opts(big, 1e-2)
    for it in range(2):
        mql.td3_update(big, opts, both, args, it)
    for e in range(2):
        single = {k: mql.replicate(v, 1) for k, v in nets.items()}
        o = mql.make_opts(single, 1e-2)
        for it in range(2):
            mql.td3_update(single, o, b[e], args, it)
        x = both["obs"][e:e + 1]
        torch.testing.assert_close(big["actor"](both["obs"], both["hist"])[e], single["actor"](x, b[e]["hist"])[0],
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(big["critic_targ"](both["obs"], both["actions"], both["hist"])[e],
                                   single["critic_targ"](x, b[e]["actions"], b[e]["hist"])[0], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Histories
# ---------------------------------------------------------------------------------------------


def make_episodes(lengths, obs_dim=1, act_dim=1):
    steps = np.concatenate([np.arange(n) for n in lengths])
    n = len(steps)
    arrays = {"obs": np.arange(n, dtype=np.float32)[:, None].repeat(obs_dim, 1), "actions": (100 + np.arange(n))[:, None].repeat(act_dim, 1),
              "rewards": 1000 + np.arange(n), "next_obs": np.arange(1, n + 1)[:, None].repeat(obs_dim, 1),
              "terminals": np.zeros(n), "step": steps}
    return mql.transitions_from_arrays(arrays, np.zeros(n, np.int64), "cpu")


def test_histories_hold_the_previous_transitions_of_the_same_episode_zero_padded():
    tr = make_episodes([4, 5])  # rows 0-3 episode 1, rows 4-8 episode 2
    pre, nxt = tr.histories(torch.tensor([5, 0, 8]), H=3)
    # entry of row j = (a_j, r_j, s_j) = (100 + j, 1000 + j, j)
    entry = lambda j: [100.0 + j, 1000.0 + j, float(j)]  # noqa: E731
    zero = [0.0, 0.0, 0.0]
    # row 5 is step 1 of episode 2: pre = [0, 0, row 4], next = [0, row 4, row 5] (never rows of episode 1)
    assert pre[0].tolist() == [zero, zero, entry(4)] and nxt[0].tolist() == [zero, entry(4), entry(5)]
    assert pre[1].tolist() == [zero, zero, zero] and nxt[1].tolist() == [zero, zero, entry(0)]
    assert pre[2].tolist() == [entry(5), entry(6), entry(7)] and nxt[2].tolist() == [entry(6), entry(7), entry(8)]


def test_online_pool_drops_whole_oldest_episodes():
    tr = make_episodes([4, 5])
    more = make_episodes([3])
    tr.add({k: getattr(more, k) for k in mql.Transitions.FIELDS}, max_size=9)
    # 12 rows > 9: the first episode (4 rows) goes, histories still start at episode starts
    assert tr.n == 8 and tr.step.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    pre, _ = tr.histories(torch.tensor([0, 5]), H=2)
    assert pre.abs().sum() == 0


# ---------------------------------------------------------------------------------------------
# TD3
# ---------------------------------------------------------------------------------------------


def test_critic_target_uses_min_of_target_critics_and_stops_at_terminals():
    args = tiny_args(policy_noise=0.0, gamma=0.9)
    nets = {"actor_targ": lambda o, h: torch.zeros(*o.shape[:2], 2),
            "critic_targ": lambda o, a, h: torch.stack([torch.tensor([[3.0, 5.0]]), torch.tensor([[4.0, 2.0]])], 1)}
    batch = {"next_obs": torch.zeros(1, 2, 2), "next_hist": torch.zeros(1, 2, 3, 5), "actions": torch.zeros(1, 2, 2),
             "rewards": torch.tensor([[1.0, -1.0]]), "terminals": torch.tensor([[0.0, 1.0]])}
    y = mql.critic_target(nets, batch, args)
    torch.testing.assert_close(y, torch.tensor([[1.0 + 0.9 * 3.0, -1.0]]))


def test_actor_updates_are_delayed_and_leave_the_critic_alone():
    torch.manual_seed(0)
    args = tiny_args(policy_freq=2)
    nets = mql.make_nets(2, 2, args, "cpu")
    opts = mql.make_opts(nets, 1e-2)
    tr = make_episodes([20, 20], obs_dim=2, act_dim=2)
    tr.feat /= 1000.0
    snap = lambda k: [p.detach().clone() for p in nets[k].parameters()]  # noqa: E731
    a0, t0 = snap("actor"), snap("actor_targ")
    mql.td3_update(nets, opts, tr.batch(torch.arange(16)[None], 3), args, it=1)  # not an actor step
    assert all(torch.equal(p, q) for p, q in zip(a0, snap("actor"))) and all(torch.equal(p, q) for p, q in zip(t0, snap("actor_targ")))
    c1 = snap("critic")
    real_step = opts["critic"].step
    opts["critic"].step = lambda: None  # isolate the actor step: the critic must not move during it
    mql.td3_update(nets, opts, tr.batch(torch.arange(16)[None], 3), args, it=2)
    opts["critic"].step = real_step
    assert all(torch.equal(p, q) for p, q in zip(c1, snap("critic")))
    assert not all(torch.equal(p, q) for p, q in zip(a0, snap("actor")))
    # Polyak: target = (1 - tau) target + tau actor
    for p, pt, p_old in zip(nets["actor"].parameters(), nets["actor_targ"].parameters(), t0):
        torch.testing.assert_close(pt, (1 - args.tau) * p_old + args.tau * p)


def test_proximal_term_is_the_squared_distance_per_member():
    lin = mql.ELinear(2, 2, 1)
    anchor = [p.detach().clone() for p in lin.parameters()]
    with torch.no_grad():
        lin.weight[1] += torch.tensor([[1.0], [2.0]])
        lin.bias[0] += 3.0
    torch.testing.assert_close(mql.proximal(lin, anchor, 2), torch.tensor([9.0, 5.0]))


# ---------------------------------------------------------------------------------------------
# Propensity classifier and ESS
# ---------------------------------------------------------------------------------------------


def test_logistic_regression_reaches_the_sklearn_objective_optimum():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 60, 4, generator=g)
    y = torch.where(X[..., 0] + 0.5 * torch.randn(3, 60, generator=g) > 0.3, 1.0, -1.0)
    C = 0.5
    w, b = mql.fit_logistic(X, y, C)
    # stationarity of 0.5 ||w||^2 + C sum log(1 + exp(-y f)): w = C sum y sigmoid(-y f) x, and the intercept
    # (unpenalised) has sum y sigmoid(-y f) = 0
    f = (X * w[:, None]).sum(-1) + b[:, None]
    s = y * torch.sigmoid(-y * f)
    torch.testing.assert_close(w, C * (X * s[..., None]).sum(1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s.sum(1), torch.zeros(3), atol=1e-4, rtol=0)
    # stronger regularisation (smaller C) shrinks w
    w_small, _ = mql.fit_logistic(X, y, 0.01)
    assert (w_small.norm(dim=1) < w.norm(dim=1)).all()


def test_propensity_weights_favour_data_of_a_matching_task():
    """Toy sign check: D_new from task 'a'; the meta data holds task 'a' and a mismatched task 'b'. beta must be
    larger on the matching rows (a sign error would up-weight the least similar data)."""
    g = torch.Generator().manual_seed(1)
    new = torch.randn(1, 40, 2, generator=g) + torch.tensor([1.5, 0.0])
    meta_a = torch.randn(1, 40, 2, generator=g) + torch.tensor([1.5, 0.0])
    meta_b = torch.randn(1, 40, 2, generator=g) + torch.tensor([-1.5, 0.0])
    X = torch.cat([new, meta_a, meta_b], 1)
    y = torch.cat([-torch.ones(1, 40), torch.ones(1, 80)], 1)
    w, b = mql.fit_logistic(X, y, C=1.0)
    beta = mql.propensity((X * w[:, None]).sum(-1) + b[:, None], beta_clip=2.0)
    assert beta[0, 40:80].mean() > 3 * beta[0, 80:].mean()
    assert beta[0, 40:80].mean() > 0.5


def test_propensity_clipping_and_cutoff():
    beta = mql.propensity(torch.tensor([-5.0, 0.0, math.log(2.0), 3.0]), beta_clip=1.0)
    torch.testing.assert_close(beta, torch.tensor([math.e, 1.0, 0.5, 0.0]))  # e^-3 < 0.1 -> 0


def test_effective_sample_size_against_hand_computed_values():
    beta = torch.tensor([[1.0, 2.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    torch.testing.assert_close(mql.effective_sample_size(beta), torch.tensor([16 / 24, 1.0, 0.25]))


# ---------------------------------------------------------------------------------------------
# Adaptation and plumbing
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def point_data():
    fam = make_family("PointRobot")
    ds = ensure_dataset("PointRobot", "default")  # the shared default dataset, built (~3 min) if missing
    rows = np.concatenate([np.arange(ds.task_slice(int(t)).start, ds.task_slice(int(t)).stop) for t in fam.train_idx])
    pool = mql.transitions_from_arrays({k: ds[k][rows] for k in ("obs", "actions", "rewards", "next_obs", "terminals", "step")},
                                       ds["task_id"][rows], "cpu")
    return fam, ds, pool


def test_adaptation_moves_per_task_weights_and_the_proximal_term_holds_them(point_data):
    fam, ds, pool = point_data
    torch.manual_seed(0)
    nets = mql.make_nets(2, 2, tiny_args(), "cpu")
    _, _, d_new = mql.rollout(nets["actor"], fam, fam.test_idx[:3], 1, 1, 10, 0, "cpu", record=True)
    assert d_new.n == 60 and d_new.task.tolist() == [0] * 20 + [1] * 20 + [2] * 20
    index = pool.task_index(40)
    dist = {}
    for coef in (0.0, 1e4):
        args = tiny_args(prox_mode="const", prox_coef=coef, snap_iter_nums=0, main_snap_iter_nums=5)
        actor, st = mql.adapt(nets, d_new, 3, pool, index, 40, args, torch.Generator().manual_seed(0))
        assert actor.l1.weight.shape[0] == 3 and st["ess"].shape == (3,)
        assert ((st["ess"] > 0) & (st["ess"] <= 1)).all() and (st["lambda"] == coef).all()
        dist[coef] = sum((p - p0).pow(2).sum() for p, p0 in zip(actor.parameters(), mql.replicate(nets["actor"], 3).parameters()))
    assert dist[0.0] > 0 and dist[1e4] < 0.1 * dist[0.0]


def test_main_writes_summary_and_resume_continues_identically(tmp_path):
    kw = dict(net_size=16, ctx_dim=4, cuda=False, eval_every=20, print_every=1000, log_every=10, num_evals=1,
              batch_size=32, snap_iter_nums=1, main_snap_iter_nums=2, sample_mult=1)
    mql.main(mql.Args(total_steps=40, run_dir=str(tmp_path / "full"), **kw))
    mql.main(mql.Args(total_steps=20, run_dir=str(tmp_path / "part"), **kw))
    mql.main(mql.Args(total_steps=40, run_dir=str(tmp_path / "part"), resume=True, **kw))
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    part = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert set(full["eval"]) == {"zero_shot", "A", "B"} and full["total_steps"] == 40
    assert len(full["eval"]["A"]["test_per_task"]) == 10
    for m in ("zero_shot", "A", "B"):
        assert part["eval"][m]["test_per_task"] == pytest.approx(full["eval"][m]["test_per_task"])
    with pytest.raises(FileExistsError):
        mql.main(mql.Args(total_steps=40, run_dir=str(tmp_path / "full"), **kw))


def test_online_mode_collects_and_trains(tmp_path):
    kw = dict(net_size=16, ctx_dim=4, cuda=False, eval_every=60, print_every=1000, log_every=10, num_evals=1,
              batch_size=32, adapt=False, online=True, burn_in=100, num_initial_steps=1, num_tasks_sample=2,
              min_buffer_size=200)
    mql.main(mql.Args(total_steps=60, run_dir=str(tmp_path / "on"), **kw))
    s = json.loads((tmp_path / "on" / "summary.json").read_text())
    # cold start: 40 tasks x 5-step episodes (horizon / 4) = 200 >= burn_in; then 2 episodes of 20 steps per
    # iteration (the pool already holds min_buffer_size rows, so num_train_steps updates follow each collection)
    assert s["method"] == "mql-online" and s["extra"]["env_steps"] >= 200 + 2 * 20
    assert set(s["eval"]) == {"zero_shot"}


def test_variant_names_and_discrete_refused(tmp_path):
    assert mql.variant_name(mql.Args()) == "mql"
    assert mql.variant_name(mql.Args(online=True, bc_alpha=2.5)) == "mql-online-bc"
    assert mql.variant_name(mql.resolve_args(mql.Args(env_id="HalfCheetahVel", lr=3e-4, bc_alpha=2.5))) == "mql-bc-lr0.0003"
    assert mql.variant_name(mql.resolve_args(mql.Args(env_id="HalfCheetahVel", lr=1e-3))) == "mql"
    with pytest.raises(SystemExit, match="continuous"):
        mql.main(mql.Args(env_id="GridNavi", cuda=False, run_dir=str(tmp_path / "g")))


def test_relabelled_rows_carry_the_other_tasks_rewards_in_the_transition_and_its_histories(point_data):
    fam, ds, pool = point_data
    from common.envs import relabel_rewards
    r, _ = relabel_rewards(fam, fam.train_idx[:, None], pool.obs.numpy()[None], pool.actions.numpy()[None],
                           pool.next_obs.numpy()[None])
    table = torch.as_tensor(r)
    idx = torch.tensor([[5, 300, 4205]])
    task = torch.tensor([[-1, 7, 0]])
    b = pool.batch(idx, 10, task, table)
    plain = pool.batch(idx, 10)
    A = 2
    assert b["rewards"][0, 0] == plain["rewards"][0, 0]
    assert b["rewards"][0, 1] == table[7, 300] and b["rewards"][0, 2] == table[0, 4205]
    assert not torch.isclose(table[7, 300], pool.rewards[300])  # task 7 differs from the row's own task 0
    # the window of row 300 (step 300 % 20 = 0 -> empty pre-context; next-context = the row itself)
    assert b["hist"][0, 1].abs().sum() == 0 and b["next_hist"][0, 1, -1, A] == table[7, 300]
    # row 4205 (task 1, step 5): the window rows 4195..4204 of its episode carry task 0's rewards where valid
    torch.testing.assert_close(b["hist"][0, 2, -5:, A], table[0, 4200:4205])
    assert b["hist"][0, 2, :5].abs().sum() == 0
    torch.testing.assert_close(b["hist"][0, 2, -5:, :A], plain["hist"][0, 2, -5:, :A])  # actions, states untouched


def test_short_offline_run_learns_on_point_robot(point_data):
    """2k TD3 updates at the paper's sizes on the pooled data: the zero-shot test return (context = own history) must improve
    clearly on the untrained policy (about -20; random about -21, task-agnostic -14.9)."""
    fam, ds, pool = point_data
    torch.manual_seed(0)
    args = tiny_args(net_size=300, ctx_dim=15, batch_size=256, history_length=10)
    nets = mql.make_nets(2, 2, args, "cpu")
    opts = mql.make_opts(nets, args.lr)
    before = mql.rollout(nets["actor"], fam, fam.test_idx, 1, 1, 10, 0, "cpu")[0].mean()
    gen = torch.Generator().manual_seed(0)
    for it in range(2000):
        idx = torch.randint(pool.n, (1, args.batch_size), generator=gen)
        mql.td3_update(nets, opts, pool.batch(idx, 10), args, it, gen)
    after = mql.rollout(nets["actor"], fam, fam.test_idx, 1, 1, 10, 0, "cpu")[0].mean()
    assert before < -18.0
    assert after > before + 4.0, (before, after)


def test_actor_loss_td3_and_td3bc_against_hand_computed_values():
    q1 = torch.tensor([[1.0, -3.0], [2.0, 2.0]])  # (E=2, B=2)
    a = torch.zeros(2, 2, 3)
    pi = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]])
    # plain TD3: -mean_b Q summed over members = -(-1) - 2 = -1
    assert mql.actor_loss(q1, pi, a, 0.0).item() == pytest.approx(-1.0)
    # TD3+BC: lambda_e = alpha / mean|Q_e| = 2.5/2 and 2.5/2; BC = mean_b mean_j (pi - a)^2 = (1/3)/2 and 1/2
    expect = (-1.25 * -1.0 + 1 / 6) + (-1.25 * 2.0 + 0.5)
    assert mql.actor_loss(q1, pi, a, 2.5).item() == pytest.approx(expect)
    # lambda carries no gradient: d loss / d Q = -lambda / B
    q = q1.clone().requires_grad_(True)
    mql.actor_loss(q, pi, a, 2.5).backward()
    assert torch.allclose(q.grad, torch.full((2, 2), -1.25 / 2))
