"""pearl.py: posterior algebra, KL, loss values, shapes, the z-detach gradient pattern, plumbing, and a short
learning run on PointRobot."""

import json
import math

import numpy as np
import pytest
import torch

import pearl
from common import collect
from common.data import TaskBatchSampler, ensure_dataset, load_dataset
from common.envs import make_family



def tiny_args(**kw):
    kw = dict(net_size=32, encoder_size=32, cuda=False, meta_batch=4, batch_size=16, context_size=8) | kw
    return pearl.resolve_args(pearl.Args(**kw))


# ---------------------------------------------------------------------------------------------
# Posterior: product of Gaussians, permutation invariance, shrinking variance, masks
# ---------------------------------------------------------------------------------------------


def test_product_of_gaussians_equals_closed_form():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    var = torch.rand(3, 5, 4, generator=g, dtype=torch.float64) + 0.1
    post_mu, post_var = pearl.product_of_gaussians(mu, var)
    # Closed form by multiplying the factors two at a time: N(m1,v1) N(m2,v2) ∝ N((m1 v2 + m2 v1)/(v1+v2), v1 v2/(v1+v2))
    m, v = mu[:, 0], var[:, 0]
    for n in range(1, 5):
        m, v = (m * var[:, n] + mu[:, n] * v) / (v + var[:, n]), v * var[:, n] / (v + var[:, n])
    torch.testing.assert_close(post_mu, m)
    torch.testing.assert_close(post_var, v)
    # And as densities: log q(z) - Σ_n log N(z; mu_n, var_n) does not depend on z.
    z = torch.randn(7, 3, 4, generator=g, dtype=torch.float64)
    logq = torch.distributions.Normal(post_mu, post_var.sqrt()).log_prob(z)
    logf = torch.distributions.Normal(mu[None], var[None].sqrt()).log_prob(z[:, :, None]).sum(2)
    diff = logq - logf
    torch.testing.assert_close(diff, diff[:1].expand_as(diff))


def test_variance_is_clamped_like_oyster():
    mu, var = torch.zeros(1, 2, 1), torch.tensor([[[0.0], [1.0]]])
    _, post_var = pearl.product_of_gaussians(mu, var)
    assert post_var.item() == pytest.approx(1.0 / (1e7 + 1.0))


def test_posterior_is_permutation_invariant_and_shrinks_with_context():
    torch.manual_seed(0)
    enc = pearl.ContextEncoder(5, 32, 5).double()
    context = torch.randn(2, 30, 5, dtype=torch.float64)
    mu, var = pearl.infer_posterior(enc, context)
    perm = torch.randperm(30)
    mu_p, var_p = pearl.infer_posterior(enc, context[:, perm])
    torch.testing.assert_close(mu_p, mu)
    torch.testing.assert_close(var_p, var)
    variances = torch.stack([pearl.infer_posterior(enc, context[:, :n])[1] for n in (1, 2, 5, 10, 30)])
    assert torch.all(variances[1:] < variances[:-1])
    # A mask equals dropping the masked transitions.
    mask = torch.zeros(2, 30, dtype=torch.float64)
    mask[:, :10] = 1.0
    mu_m, var_m = pearl.infer_posterior(enc, context, mask)
    mu_10, var_10 = pearl.infer_posterior(enc, context[:, :10])
    torch.testing.assert_close(mu_m, mu_10)
    torch.testing.assert_close(var_m, var_10)


def test_kl_is_zero_at_the_prior_and_a_sum_over_tasks_and_dims():
    assert pearl.kl_to_prior(torch.zeros(4, 5), torch.ones(4, 5)).item() == 0.0
    assert pearl.kl_to_prior(torch.ones(1, 1), torch.ones(1, 1)).item() == pytest.approx(0.5)  # mu=1, var=1
    g = torch.Generator().manual_seed(1)
    mu, var = torch.randn(3, 5, generator=g), torch.rand(3, 5, generator=g) + 0.05
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu, var.sqrt()),
                                            torch.distributions.Normal(0.0, 1.0)).sum()
    kl = pearl.kl_to_prior(mu, var)
    torch.testing.assert_close(kl, ref)
    assert kl > 0
    torch.testing.assert_close(pearl.kl_to_prior(mu.repeat(2, 1), var.repeat(2, 1)), 2 * kl)  # scales with tasks


# ---------------------------------------------------------------------------------------------
# Losses and networks
# ---------------------------------------------------------------------------------------------


def test_losses_match_hand_computed_values():
    q = torch.tensor([[[1.0], [2.0]], [[0.0], [4.0]]])  # (2 critics, 2, 1)
    y = torch.tensor([[1.0], [0.0]])
    assert pearl.q_loss(q, y).item() == pytest.approx((0 + 4) / 2 + (1 + 16) / 2)
    v, min_q, log_pi = torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [2.0]]), torch.tensor([[0.5], [-1.0]])
    assert pearl.v_loss(v, min_q, log_pi).item() == pytest.approx(((1 - 1.5) ** 2 + (3 - 3.0) ** 2) / 2)
    mean, log_std = torch.tensor([[1.0, -1.0]]), torch.tensor([[0.0, 2.0]])
    lp = pearl.policy_loss(log_pi, min_q, mean, log_std, 1e-3, 1e-3).item()
    assert lp == pytest.approx(((0.5 - 2) + (-1 - 2)) / 2 + 1e-3 * 1.0 + 1e-3 * 2.0)


def test_policy_log_prob_matches_tanh_normal_and_shapes():
    torch.manual_seed(0)
    pol = pearl.TanhGaussianPolicy(7, 16, 2).double()
    x = torch.randn(3, 4, 7, dtype=torch.float64)
    torch.manual_seed(5)
    a, log_pi, mean, log_std = pol.sample(x)
    assert a.shape == (3, 4, 2) and log_pi.shape == (3, 4, 1) and mean.shape == log_std.shape == (3, 4, 2)
    assert a.abs().max() < 1
    u = torch.atanh(a)
    ref = (torch.distributions.Normal(mean, log_std.exp()).log_prob(u) - torch.log(1 - a ** 2 + 1e-6)).sum(-1, keepdim=True)
    torch.testing.assert_close(log_pi, ref, rtol=1e-6, atol=1e-6)


def test_twin_q_shapes_members_and_frozen_pass():
    torch.manual_seed(0)
    qf = pearl.TwinQ(9, 16)
    x = torch.randn(4, 6, 9, requires_grad=True)
    out = qf(x)
    assert out.shape == (2, 4, 6, 1)
    assert not torch.allclose(out[0], out[1])  # two independently initialised critics
    # Member 0 is an ordinary MLP with the member's weights.
    h = x
    for k in range(4):
        h = h @ qf.weights[k][0] + qf.biases[k][0]
        h = torch.relu(h) if k < 3 else h
    torch.testing.assert_close(out[0], h)
    qf(x, frozen=True).sum().backward()
    assert x.grad is not None and all(w.grad is None for w in qf.weights)


def test_rlkit_init_quirk():
    torch.manual_seed(0)
    mlp = pearl.Mlp(3, 400, 2)
    first = mlp.hidden[0].weight  # (400, 3): bound 1/sqrt(400) = 0.05, not 1/sqrt(3)
    assert first.abs().max() <= 0.05 and first.abs().max() > 0.045
    assert torch.all(mlp.hidden[0].bias == 0.1) and mlp.last.weight.abs().max() <= 3e-3


# ---------------------------------------------------------------------------------------------
# One update: the encoder gets gradients from L_Q + KL only
# ---------------------------------------------------------------------------------------------


def test_encoder_gets_no_gradient_from_v_and_policy_losses():
    torch.manual_seed(0)
    args = tiny_args()
    nets, opts = pearl.make_nets(2, 2, args, "cpu")
    T, B, N = 4, 16, 8
    batch = {"obs": torch.randn(T, B, 2), "actions": torch.rand(T, B, 2) * 2 - 1, "rewards": -torch.rand(T, B),
             "next_obs": torch.randn(T, B, 2), "terminals": torch.zeros(T, B)}
    context = torch.randn(T, N, 5)
    snap = {}

    def snapshot(name, opt):
        step = opt.step

        def wrapped(*a, **k):
            snap[name] = [p.grad.clone() for p in opt.param_groups[0]["params"]]
            return step(*a, **k)
        opt.step = wrapped

    snapshot("encoder", opts["encoder"])
    snapshot("qf", opts["qf"])
    enc_before = [p.detach().clone() for p in nets["encoder"].parameters()]
    stats = pearl.pearl_update(nets, opts, batch, context, args, "rewards")
    # The V/policy backward runs after the encoder step; with z detached it must leave the encoder's (and the
    # frozen critics') gradients exactly as they were when those optimisers stepped.
    for p, g in zip(nets["encoder"].parameters(), snap["encoder"]):
        assert torch.equal(p.grad, g)
    for p, g in zip(nets["qf"].parameters(), snap["qf"]):
        assert torch.equal(p.grad, g)
    assert any(g.abs().sum() > 0 for g in snap["encoder"])  # it did learn from L_Q + KL
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in nets["policy"].parameters())
    assert any(not torch.equal(a, p) for a, p in zip(enc_before, nets["encoder"].parameters()))
    assert stats["loss/kl"] > 0 and torch.isfinite(stats["loss/q"])
    # Target V moved by Polyak toward V.
    assert not all(torch.equal(a, b) for a, b in zip(nets["vf"].parameters(), nets["target_vf"].parameters()))


def test_encoder_gradient_comes_from_q_loss_without_kl():
    torch.manual_seed(0)
    args = tiny_args(kl_lambda=0.0)
    nets, opts = pearl.make_nets(2, 2, args, "cpu")
    grads = {}
    step = opts["encoder"].step
    opts["encoder"].step = lambda *a, **k: (grads.setdefault("g", [p.grad.clone() for p in nets["encoder"].parameters()]),
                                             step(*a, **k))
    batch = {"obs": torch.randn(4, 16, 2), "actions": torch.zeros(4, 16, 2), "rewards": -torch.rand(4, 16),
             "next_obs": torch.randn(4, 16, 2), "terminals": torch.zeros(4, 16)}
    pearl.pearl_update(nets, opts, batch, torch.randn(4, 8, 5), args, "rewards")
    assert sum(g.abs().sum() for g in grads["g"]) > 0


# ---------------------------------------------------------------------------------------------
# Data plumbing
# ---------------------------------------------------------------------------------------------


def test_sample_rows_and_context_shapes():
    fam = make_family("PointRobot")
    ds = ensure_dataset("PointRobot", "default")  # the shared default dataset, built (~3 min) if missing
    src = TaskBatchSampler(ds, fam.train_idx, "cpu")
    tasks = torch.tensor([3, 3, 7])
    b = pearl.sample_rows(src.data, src.counts, tasks, 11, torch.Generator().manual_seed(0))
    assert b["obs"].shape == (3, 11, 2) and b["rewards"].shape == (3, 11)
    c = pearl.context_tensor(b, "rewards", use_next_obs=False)
    assert c.shape == (3, 11, 5)
    assert pearl.context_tensor(b, "rewards", use_next_obs=True).shape == (3, 11, 7)
    # Rows come from the right task: rewards are -||next_obs - goal|| of that task's goal.
    goals = torch.as_tensor(fam.tasks[fam.train_idx[tasks.numpy()]])
    torch.testing.assert_close(b["rewards"], -(b["next_obs"] - goals[:, None]).norm(dim=-1), atol=1e-5, rtol=0)
    tail = pearl.tail_dataset(ds, 100)
    assert np.all(np.diff(tail.task_ptr) == 100)


def test_relabel_pool_contexts_come_from_another_task_with_the_contexts_task_rewards():
    """--context-relabel: a context's (s, a, s') come from one random train task's data, its rewards are the env
    rewards of the context's own task; relabelled for its source task a transition keeps its recorded reward."""
    fam = make_family("PointRobot")
    ds = ensure_dataset("PointRobot", "default")
    pool = pearl.RelabelPool(ds, fam, 4000, "cpu", seed=0)
    n = len(fam.train_idx)
    assert pool.rewards.shape == (n, n, 100) and pool.data["obs"].shape == (n, 100, 2)
    goals = torch.as_tensor(fam.tasks[fam.train_idx])
    torch.testing.assert_close(pool.rewards, -(pool.data["next_obs"][None] - goals[:, None, None]).norm(dim=-1),
                               atol=1e-5, rtol=0)
    own = pool.rewards[torch.arange(n), torch.arange(n)]  # source == target: the dataset's own rewards
    assert own.max() > -0.2  # near-goal data of its own task
    gen = torch.Generator().manual_seed(0)
    tasks = torch.tensor([0] * 200)
    c = pool.sample(tasks, 16, gen)
    # Each context is one source task's data: its 16 states match exactly one source's pool rows.
    src = [[j for j in range(n) if all((pool.data["obs"][j] == o).all(-1).any() for o in c["obs"][i])]
           for i in range(20)]
    assert all(len(s) >= 1 for s in src) and len({s[0] for s in src}) > 5  # several different sources
    torch.testing.assert_close(c["rewards"], -(c["next_obs"] - goals[0]).norm(dim=-1), atol=1e-5, rtol=0)
    # pool mode: the transitions of one context come from many train tasks.
    pool.mode = "pool"
    c = pool.sample(tasks[:3], 32, gen)
    for i in range(3):
        srcs = {j for o in c["obs"][i] for j in range(n) if (pool.data["obs"][j] == o).all(-1).any()}
        assert len(srcs) > 10
    torch.testing.assert_close(c["rewards"], -(c["next_obs"] - goals[0]).norm(dim=-1), atol=1e-5, rtol=0)


def test_online_collection_fills_both_buffers():
    args = tiny_args()
    fam = make_family("PointRobot")
    nets, _ = pearl.make_nets(2, 2, args, "cpu")
    dims = {"obs": (2,), "actions": (2,), "rewards": (), "rewards_dense": (), "next_obs": (2,), "terminals": ()}
    rl, enc = pearl.TaskBuffers(40, dims, "cpu", capacity=16), pearl.TaskBuffers(40, dims, "cpu", capacity=16)
    gen, rng = torch.Generator().manual_seed(0), np.random.RandomState(0)
    rows = np.array([2, 5])
    pearl.collect(nets, fam, rows, 40, False, rl, enc, True, args, "cpu", gen, rng, "rewards")
    pearl.collect(nets, fam, rows, 20, True, rl, enc, False, args, "cpu", gen, rng, "rewards")
    assert rl.counts.tolist()[:6] == [0, 0, 60, 0, 0, 60] and enc.counts[[2, 5]].tolist() == [40, 40]
    goal = torch.as_tensor(fam.tasks[fam.train_idx[5]])
    torch.testing.assert_close(rl.data["rewards"][5, :60], -(rl.data["next_obs"][5, :60] - goal).norm(dim=-1))
    enc.clear(torch.tensor([2]))
    assert enc.counts[[2, 5]].tolist() == [0, 40]


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


def test_main_writes_summary_and_resume_continues_identically(tmp_path):
    kw = dict(net_size=16, encoder_size=16, cuda=False, eval_every=20, print_every=1000, log_every=10,
              eval_context_draws=1, num_evals=1)
    pearl.main(pearl.Args(total_steps=40, run_dir=str(tmp_path / "full"), **kw))
    pearl.main(pearl.Args(total_steps=20, run_dir=str(tmp_path / "part"), **kw))
    pearl.main(pearl.Args(total_steps=40, run_dir=str(tmp_path / "part"), resume=True, **kw))
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    part = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert set(full["eval"]) == {"A", "B"} and full["total_steps"] == 40
    assert len(full["eval"]["A"]["test_per_task"]) == 10
    assert part["eval"]["A"]["test_per_task"] == pytest.approx(full["eval"]["A"]["test_per_task"])
    assert part["eval"]["B"]["test"] == pytest.approx(full["eval"]["B"]["test"])
    with pytest.raises(FileExistsError):
        pearl.main(pearl.Args(total_steps=40, run_dir=str(tmp_path / "full"), **kw))


def test_short_offline_run_learns_task_inference_on_point_robot():
    """~1.5k small updates: the mode-A test return (z inferred from offline context) must improve clearly on the
    untrained policy (≈ -20, random ≈ -21); a broken critic/encoder/policy wiring stays there or gets worse."""
    torch.manual_seed(0)
    args = tiny_args(net_size=64, encoder_size=64, meta_batch=8, batch_size=128, context_size=64,
                     eval_context_draws=1)
    fam = make_family("PointRobot")
    ds = ensure_dataset("PointRobot", "default")  # the shared default dataset, built (~3 min) if missing
    src = TaskBatchSampler(ds, fam.train_idx, "cpu")
    nets, opts = pearl.make_nets(2, 2, args, "cpu")
    before = pearl.eval_mode_a(nets, ds, fam, fam.test_idx, args, "cpu", 123)[0].mean()
    gen = torch.Generator().manual_seed(0)
    rows = torch.arange(len(fam.train_idx))
    for _ in range(1500):
        tasks = rows[torch.randint(len(rows), (args.meta_batch,), generator=gen)]
        batch = pearl.sample_rows(src.data, src.counts, tasks, args.batch_size, gen)
        ctx = pearl.sample_rows(src.data, src.counts, tasks, args.context_size, gen)
        stats = pearl.pearl_update(nets, opts, batch, pearl.context_tensor(ctx, "rewards", False), args, "rewards", gen)
    after = pearl.eval_mode_a(nets, ds, fam, fam.test_idx, args, "cpu", 123)[0].mean()
    assert before < -19.0
    assert after > before + 4.0, (before, after)
    # z did not collapse to the prior: KL well above 0 and posterior variance far below 1.
    assert stats["loss/kl"] / args.meta_batch > 1.0 and stats["z/posterior_var"] < 0.5


def test_mode_b_explores_with_the_prior_then_uses_all_collected_transitions(monkeypatch):
    args = tiny_args(num_evals=2, eval_episodes=4, num_exp_traj_eval=2)
    fam = make_family("PointRobot")
    nets, _ = pearl.make_nets(2, 2, args, "cpu")
    seen = []
    real = pearl.infer_posterior

    def spy(encoder, context, mask=None):
        seen.append((context.shape[:2], mask.sum(1).tolist()))
        return real(encoder, context, mask)

    monkeypatch.setattr(pearl, "infer_posterior", spy)
    ret, succ = pearl.eval_mode_b(nets, fam, fam.test_idx, args, "cpu", seed=0)
    assert ret.shape == (10, 4) and succ.shape == (10, 4)
    # Episodes 0 and 1 use z ~ prior (no inference); before episodes 2 and 3 the posterior sees every transition
    # collected so far in that env: 2 and 3 episodes of H = 20 steps, for all 10 tasks x 2 runs.
    assert seen == [((20, 40), [40.0] * 20), ((20, 60), [60.0] * 20)]


def test_variant_names_and_relabel_refused_online(tmp_path):
    assert pearl.variant_name(pearl.Args()) == "pearl"
    assert pearl.variant_name(pearl.Args(online=True, deterministic_z=True)) == "pearl-online-detz"
    assert pearl.variant_name(pearl.Args(context_relabel=0.5)) == "pearl-relabel"
    assert pearl.variant_name(pearl.Args(context_relabel=1.0, rl_relabel=0.5)) == "pearl-relabel-rlrelabel"
    with pytest.raises(SystemExit, match="offline option"):
        pearl.main(pearl.Args(online=True, context_relabel=1.0, cuda=False, run_dir=str(tmp_path / "r")))
    with pytest.raises(SystemExit, match="offline option"):
        pearl.main(pearl.Args(online=True, rl_relabel=0.5, cuda=False, run_dir=str(tmp_path / "r2")))


def test_rl_relabel_rows_cover_many_tasks_with_the_batch_tasks_dense_reward(tmp_path):
    """--rl-relabel draws RL rows in pool mode whatever --relabel-mode says (states from many train tasks), with the
    batch task's reward -- the dense one in the RL column of a sparse family -- and terminal 0."""
    fam = make_family("PointRobot")
    pool = pearl.RelabelPool(ensure_dataset("PointRobot", "default"), fam, 4000, "cpu", seed=0, mode="task")
    n = len(fam.train_idx)
    b = pool.sample(torch.tensor([3, 3]), 64, torch.Generator().manual_seed(0), mode="pool")
    srcs = {j for o in b["obs"][0] for j in range(n) if (pool.data["obs"][j] == o).all(-1).any()}
    assert len(srcs) > 10 and "rewards_dense" not in b
    assert b["terminals"].shape == (2, 64) and not b["terminals"].any()
    # A sparse family: the sparse column stays sparse (context reward), the dense one is the batch task's distance.
    path = tmp_path / "sparse.npz"
    collect.main(collect.Args(env_id="SparsePointRobot", out=str(path), iterations=1, updates_per_iter=1))
    fam = make_family("SparsePointRobot")
    pool = pearl.RelabelPool(load_dataset(path, "SparsePointRobot"), fam, 400, "cpu", seed=0)
    b = pool.sample(torch.tensor([3, 7]), 64, torch.Generator().manual_seed(0), mode="pool")
    goal = torch.as_tensor(fam.tasks[fam.train_idx[[3, 7]]])
    dist = (b["next_obs"] - goal[:, None]).norm(dim=-1)
    torch.testing.assert_close(b["rewards_dense"], -dist, atol=1e-5, rtol=0)
    torch.testing.assert_close(b["rewards"], torch.where(dist <= fam.config["goal_radius"], 1.0 - dist,
                                                         torch.zeros_like(dist)), atol=1e-5, rtol=0)
