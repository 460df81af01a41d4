"""corro.py: InfoNCE against hand-computed values and on a toy two-task problem, negatives that share the query's
(s, a), the aggregator, the frozen encoder and critic-only aggregator gradients, the linear probe, plumbing."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import corro
from common.data import Dataset, ensure_dataset
from common.envs import make_family


def tiny_args(**kw):
    kw = dict(cuda=False, hidden=16, encoder_hidden=16, cvae_hidden=16) | kw
    return corro.resolve_args(corro.Args(**kw))


def toy_dataset(n_tasks=2, n_eps=40, H=5, seed=0):
    """Shared dynamics s' = s + a (1-d), task i's reward +1 (even i) or -1 (odd i) at every step."""
    rng = np.random.RandomState(seed)
    N = n_tasks * n_eps * H
    obs = rng.uniform(-1, 1, (N, 1)).astype(np.float32)
    act = rng.uniform(-1, 1, (N, 1)).astype(np.float32)
    task = np.repeat(np.arange(n_tasks), n_eps * H).astype(np.int32)
    arrays = {"obs": obs, "actions": act, "next_obs": obs + act, "rewards": np.where(task % 2 == 0, 1.0, -1.0).astype(np.float32),
              "terminals": np.zeros(N, bool), "task_id": task,
              "episode_id": np.tile(np.repeat(np.arange(n_eps), H), n_tasks).astype(np.int32),
              "step": np.tile(np.arange(H), n_tasks * n_eps).astype(np.int32)}
    return Dataset(path="toy", meta={}, arrays=arrays, tasks=np.arange(n_tasks, dtype=np.float32)[:, None],
                   train_tasks=np.arange(n_tasks), test_tasks=np.arange(0), task_ptr=np.arange(n_tasks + 1) * n_eps * H)


# ---------------------------------------------------------------------------------------------
# InfoNCE
# ---------------------------------------------------------------------------------------------


def test_infonce_matches_hand_computed_value_and_chance_level():
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    k = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    neg = torch.tensor([[[0.0, 1.0], [-1.0, 0.0]]], dtype=torch.float64)
    logits = [0.6 / 0.1, 0.0 / 0.1, -1.0 / 0.1]
    expected = -(logits[0] - math.log(sum(math.exp(x) for x in logits)))
    assert corro.infonce_loss(q, k, neg, 0.1).item() == pytest.approx(expected, rel=1e-5)
    # All embeddings equal: the positive is one of N + 1 equal logits -> ln(1 + N).
    z = torch.nn.functional.normalize(torch.randn(4, 5), dim=-1)
    loss = corro.infonce_loss(z, z, z[:, None].expand(-1, 16, -1), 0.1)
    assert loss.item() == pytest.approx(math.log(17), rel=1e-5)


def test_negatives_share_the_querys_state_and_action():
    args = tiny_args(n_negatives=6)
    ds = toy_dataset()
    data = corro.TaskData(ds, [0, 1], "cpu")
    cvae = corro.CVAE(1, 1, 16, 3)
    gen = torch.Generator().manual_seed(0)
    q = {k: v[:, 0] for k, v in data.rows(torch.tensor([0, 1, 1]), 1, gen).items()}
    for kind in ("cvae", "reward_noise"):
        neg = corro.negatives(q, corro.resolve_args(corro.Args(negatives=kind, n_negatives=6)), cvae, data, gen)
        assert neg["obs"].shape == (3, 6, 1) and neg["rewards"].shape == (3, 6) and neg["next_obs"].shape == (3, 6, 1)
        torch.testing.assert_close(neg["obs"], q["obs"][:, None].expand(-1, 6, -1))
        torch.testing.assert_close(neg["actions"], q["actions"][:, None].expand(-1, 6, -1))
        assert neg["rewards"].std() > 0  # the task-dependent part varies
    neg = corro.negatives(q, corro.resolve_args(corro.Args(negatives="reward_noise", n_negatives=6)), cvae, data, gen)
    torch.testing.assert_close(neg["next_obs"], q["next_obs"][:, None].expand(-1, 6, -1))
    # the CVAE's prior samples: (B, N) rows of (s', r)
    s2, r = cvae.sample(neg["obs"], neg["actions"], gen)
    assert s2.shape == (3, 6, 1) and r.shape == (3, 6)


def test_infonce_falls_below_chance_on_a_toy_two_task_problem():
    """Two tasks that differ only in their reward (+1 / -1) under shared dynamics. A CVAE of p(r, s' | s, a) fitted
    on both learns the two rewards; with its samples as negatives, an encoder that tells the tasks apart reaches
    ln(1 + N/2) = 2.20 (half the negatives look like the positive's task), well below chance ln(1 + N) = 2.83."""
    torch.manual_seed(0)
    args = tiny_args(cvae_epochs=200, cvae_batch=64, cvae_lr=3e-3, cvae_latent=2, infonce_batch=64, n_negatives=16)
    data = corro.TaskData(toy_dataset(), [0, 1], "cpu")
    nets, opts = corro.make_nets(1, 1, args, "cpu")
    gen = torch.Generator().manual_seed(0)

    class NoLog:
        def log_scalars(self, *a):
            pass

    corro.fit_cvae(nets["cvae"], data, args, gen, NoLog())
    with torch.no_grad():  # the CVAE's prior samples carry both rewards
        _, r = nets["cvae"].sample(torch.zeros(2000, 1), torch.zeros(2000, 1), gen)
    assert (r > 0.5).float().mean() > 0.2 and (r < -0.5).float().mean() > 0.2
    losses = [corro.encoder_update(nets["e1"], opts["e1"], data, nets["cvae"], args, gen) for _ in range(400)]
    assert np.mean(losses[:10]) > math.log(17) - 0.3
    assert np.mean(losses[-50:]) < math.log(17) - 0.4, np.mean(losses[-50:])


# ---------------------------------------------------------------------------------------------
# Aggregator, frozen encoder, gradients
# ---------------------------------------------------------------------------------------------


def test_aggregator_is_permutation_invariant_masked_and_the_mean_at_zero_scores():
    torch.manual_seed(0)
    e2 = corro.AttentionAggregator(5)
    z_i = torch.nn.functional.normalize(torch.randn(3, 7, 5), dim=-1)
    perm = torch.randperm(7)
    torch.testing.assert_close(e2(z_i[:, perm]), e2(z_i))
    with torch.no_grad():
        e2.score.weight.zero_()
        e2.score.bias.zero_()
    torch.testing.assert_close(e2(z_i), z_i.mean(1))
    mask = torch.ones(3, 7)
    mask[:, 4:] = 0
    torch.testing.assert_close(e2(z_i, mask), z_i[:, :4].mean(1))


def test_sac_stage_freezes_e1_and_trains_e2_through_the_critic_only():
    torch.manual_seed(0)
    args = tiny_args()
    data = corro.TaskData(toy_dataset(), [0, 1], "cpu")
    nets, opts = corro.make_nets(1, 1, args, "cpu")
    for p in nets["e1"].parameters():
        p.requires_grad_(False)
    e1_before = [p.clone() for p in nets["e1"].parameters()]
    e2_before = [p.clone() for p in nets["e2"].parameters()]
    gen = torch.Generator().manual_seed(0)
    tasks = torch.tensor([0, 1, 1])
    batch, (ctx, mask) = data.rows(tasks, 8, gen), data.episodes(tasks, gen)
    # The critic-loss gradient of E2, computed by hand with the same sampled next actions.
    g_state = gen.get_state()
    z = corro.context_z(nets["e1"], nets["e2"], ctx, mask)[:, None].expand(-1, 8, -1)
    with torch.no_grad():
        ns_z = torch.cat([batch["next_obs"], z], -1)
        a2, logp2 = nets["pi"](ns_z, generator=gen)
        y = batch["rewards"][..., None] + args.gamma * (nets["qf_targ"](torch.cat([ns_z, a2], -1)).min(0).values - args.alpha * logp2)
    loss = corro.critic_loss(nets["qf"](torch.cat([batch["obs"], z, batch["actions"]], -1)), y)
    g_e2 = torch.autograd.grad(loss, list(nets["e2"].parameters()))
    gen.set_state(g_state)
    corro.sac_update(nets, opts, batch, ctx, mask, args, gen)
    for p, p0 in zip(nets["e1"].parameters(), e1_before):
        assert torch.equal(p, p0)
    for p, p0 in zip(nets["e2"].parameters(), e2_before):
        assert not torch.equal(p, p0)
    for p, g in zip(nets["e2"].parameters(), g_e2):  # exactly the critic loss's gradient: none from the actor
        torch.testing.assert_close(p.grad, g)


def test_linear_probe_r2():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 3, generator=g)
    y = z @ torch.tensor([[1.0, 0.5], [2.0, -1.0], [0.0, 0.3]]) + 0.2
    assert corro.linear_probe_r2(z[:30], y[:30], z[30:], y[30:]) == pytest.approx(1.0)
    assert corro.linear_probe_r2(z[:30], torch.randn(30, 2, generator=g), z[30:], y[30:]) < 0.3


def test_episode_contexts_are_whole_episodes_of_the_task():
    ds = toy_dataset(n_eps=4, H=5)
    data = corro.TaskData(ds, [0, 1], "cpu")
    gen = torch.Generator().manual_seed(0)
    ctx, mask = data.episodes(torch.tensor([1, 0, 1]), gen)
    assert ctx["obs"].shape == (3, 5, 1) and mask.sum().item() == 15
    assert torch.all(ctx["rewards"][0] == -1) and torch.all(ctx["rewards"][1] == 1)  # task 1 / task 0's rewards
    # the 5 rows are one episode of the task: consecutive dataset rows starting at a step-0 row
    rows = [int(np.flatnonzero((ds["obs"][:, 0] == o) & (ds["task_id"] == 1))[0]) for o in ctx["obs"][0, :, 0].tolist()]
    assert ds["step"][rows[0]] == 0 and rows == list(range(rows[0], rows[0] + 5))


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


def test_main_runs_stages_writes_iid_and_ood_and_resumes_identically(tmp_path, monkeypatch):
    kw = dict(cuda=False, hidden=16, encoder_hidden=16, cvae_hidden=16, cvae_epochs=0.02, encoder_steps=40,
              meta_batch=4, batch_size=32, eval_every=20, print_every=1000, log_every=10, eval_draws=1,
              n_train_eval_tasks=2)
    seen = []
    real_fit = corro.fit_cvae
    monkeypatch.setattr(corro, "fit_cvae", lambda cvae, data, *a, **k: seen.append(data.task_ids.copy()) or real_fit(cvae, data, *a, **k))
    corro.main(corro.Args(total_steps=40, run_dir=str(tmp_path / "full"), **kw))
    np.testing.assert_array_equal(seen[0], np.arange(40))  # the CVAE sees the 40 train tasks only
    corro.main(corro.Args(total_steps=20, run_dir=str(tmp_path / "part"), **kw))
    corro.main(corro.Args(total_steps=40, run_dir=str(tmp_path / "part"), resume=True, **kw))
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    part = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert full["method"] == "corro" and set(full["eval"]) == {"iid", "ood_random", "ood_other_task"}
    assert len(full["eval"]["iid"]["test_per_task"]) == 10 and -1 <= full["extra"]["probe_r2"] <= 1
    for mode in full["eval"]:
        assert part["eval"][mode]["test_per_task"] == pytest.approx(full["eval"][mode]["test_per_task"])
    with pytest.raises(FileExistsError):
        corro.main(corro.Args(total_steps=40, run_dir=str(tmp_path / "full"), **kw))
    with pytest.raises(SystemExit, match="discrete"):
        corro.main(corro.Args(env_id="GridNavi", preset="borel", run_dir=str(tmp_path / "grid"), **kw))
    with pytest.raises(SystemExit, match="relabel"):  # MuJoCo rewards cannot be recomputed from (s, a, s')
        corro.main(corro.Args(env_id="HalfCheetahVel", preset="cpu", negatives="relabel", run_dir=str(tmp_path / "hc"), **kw))
    corro.main(corro.Args(total_steps=0, run_dir=str(tmp_path / "leak"), cvae_include_test_tasks=True, **kw))
    np.testing.assert_array_equal(seen[-1], np.arange(50))
    assert corro.variant_name(corro.Args(negatives="reward_noise")) == "corro-rewnoise"
    assert corro.variant_name(corro.Args(negatives="relabel", relabel_queries=True)) == "corro-relabel-rq"


def test_relabel_negatives_are_the_query_transition_in_other_train_tasks():
    from common.data import ensure_dataset
    from common.envs import make_family, relabel_rewards
    fam = make_family("PointRobot")
    data = corro.TaskData(ensure_dataset("PointRobot", "default"), fam.train_idx, "cpu")
    gen = torch.Generator().manual_seed(0)
    q = {k: v[:, 0] for k, v in data.rows(torch.tensor([0, 5, 9]), 1, gen).items()}
    neg = corro.negatives(q, corro.resolve_args(corro.Args(negatives="relabel", n_negatives=8)), None, data, gen, fam)
    torch.testing.assert_close(neg["next_obs"], q["next_obs"][:, None].expand(-1, 8, -1))
    s, a, s2 = (neg[k].numpy() for k in ("obs", "actions", "next_obs"))
    per_task = np.stack([relabel_rewards(fam, np.full((3, 8), t), s, a, s2)[0] for t in fam.train_idx], -1)
    # every negative's reward is the reward of the query's (s, a, s') in one of the train tasks, and they vary
    assert np.abs(per_task - neg["rewards"].numpy()[..., None]).min(-1).max() < 1e-6
    assert neg["rewards"].std(1).min() > 0


def test_relabelled_queries_carry_the_query_tasks_reward_on_other_tasks_transitions():
    from common.data import ensure_dataset
    from common.envs import make_family, relabel_rewards
    fam = make_family("PointRobot")
    data = corro.TaskData(ensure_dataset("PointRobot", "default"), fam.train_idx, "cpu")
    args = corro.resolve_args(corro.Args(negatives="relabel", relabel_queries=True, infonce_batch=256))
    tasks, q, k = corro.contrastive_pairs(data, args, torch.Generator().manual_seed(0), fam)
    for b in (q, k):
        r = relabel_rewards(fam, data.task_ids[tasks.numpy()], b["obs"].numpy(), b["actions"].numpy(), b["next_obs"].numpy())[0]
        np.testing.assert_allclose(b["rewards"].numpy(), r, atol=1e-6)
    # the transitions come from many tasks' data, not only the query task's (whose data end near its goal)
    goals = fam.tasks[data.task_ids[tasks.numpy()]]
    dist_to_own_goal = np.linalg.norm(q["next_obs"].numpy() - goals, axis=-1)
    assert np.median(dist_to_own_goal) > 0.3  # own-task data would end near the goal


def test_relabelled_contexts_are_other_episodes_with_the_context_tasks_rewards():
    from common.data import ensure_dataset
    from common.envs import make_family, relabel_rewards
    fam = make_family("PointRobot")
    data = corro.TaskData(ensure_dataset("PointRobot", "default"), fam.train_idx, "cpu")
    gen = torch.Generator().manual_seed(0)
    tasks = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    ctx, mask = data.episodes(tasks, gen)
    new, new_mask = corro.relabel_contexts(ctx, mask, tasks, data, fam, 1.0, gen)
    assert not torch.equal(new["obs"], ctx["obs"]) and new_mask.shape == mask.shape
    r = relabel_rewards(fam, np.repeat(fam.train_idx[:8, None], new["obs"].shape[1], 1), new["obs"].numpy(),
                        new["actions"].numpy(), new["next_obs"].numpy())[0]
    np.testing.assert_allclose(new["rewards"].numpy(), r, atol=1e-6)
    same, _ = corro.relabel_contexts(ctx, mask, tasks, data, fam, 0.0, gen)
    assert all(torch.equal(same[k], ctx[k]) for k in ctx)


def test_relabelled_rl_rows_are_other_tasks_transitions_with_the_batch_tasks_rewards():
    from common.envs import relabel_rewards
    fam = make_family("PointRobot")
    data = corro.TaskData(ensure_dataset("PointRobot", "default"), fam.train_idx, "cpu")
    gen = torch.Generator().manual_seed(0)
    tasks = torch.tensor([0, 3, 3, 7])
    batch = data.rows(tasks, 512, gen)
    new = corro.relabel_rl_batch(batch, tasks, data, fam, 0.5, gen)
    moved = (new["obs"] != batch["obs"]).any(-1)
    assert 0.4 < moved.float().mean() < 0.6  # about the asked share of rows is replaced, per task
    # every row (kept or replaced) carries the reward of its batch task for its (s, a, s')
    r = relabel_rewards(fam, np.repeat(data.task_ids[tasks.numpy()][:, None], 512, 1), new["obs"].numpy(),
                        new["actions"].numpy(), new["next_obs"].numpy())[0]
    np.testing.assert_allclose(new["rewards"].numpy(), r, atol=1e-6)
    # replaced rows come from many tasks' data: far from the batch task's goal more often than its own rows
    goals = torch.as_tensor(fam.tasks[data.task_ids[tasks.numpy()]])[:, None]
    dist = (new["next_obs"] - goals).norm(dim=-1)
    assert dist[moved].median() > dist[~moved].median() + 0.2
    same = corro.relabel_rl_batch(batch, tasks, data, fam, 0.0, gen)
    assert all(torch.equal(same[k], batch[k]) for k in batch)
    assert corro.variant_name(corro.Args(negatives="relabel", relabel_queries=True, rl_relabel=0.5)) == "corro-relabel-rq-rlrel"


def test_cql_penalty_matches_its_importance_sampled_formula_and_pushes_unseen_actions_down():
    torch.manual_seed(0)
    args = tiny_args()
    nets, _ = corro.make_nets(1, 1, args, "cpu")
    qf, pi = nets["qf"], nets["pi"]
    s_z = torch.randn(3, 4, 1 + args.latent_dim)
    a_data = torch.full((3, 4, 1), 0.5)
    q_pred = qf(torch.cat([s_z, a_data], -1))
    n, gen = 5, torch.Generator().manual_seed(1)
    pen = corro.cql_penalty(qf, pi, s_z, q_pred, n, gen)
    # By hand, replaying the same draws: log of the mean over 2n of exp(Q(a) - log density(a)), minus Q(a_data).
    gen = torch.Generator().manual_seed(1)
    s_rep = s_z[..., None, :].expand(3, 4, n, -1)
    with torch.no_grad():
        a_pi, logp = pi(s_rep, generator=gen)
    a_u = torch.rand(a_pi.shape, generator=gen) * 2 - 1
    w_u = (qf(torch.cat([s_rep, a_u], -1)) + math.log(2.0)).double().exp()  # uniform density 1/2 on [-1, 1]
    w_pi = (qf(torch.cat([s_rep, a_pi], -1)) - logp).double().exp()
    lse = torch.log((w_u.sum(-2) + w_pi.sum(-2)) / (2 * n))
    expect = (lse - q_pred.double()).mean(dim=(1, 2, 3)).sum()
    torch.testing.assert_close(pen.double(), expect, rtol=1e-5, atol=1e-5)
    # Minimising it alone lowers Q on actions away from the data's relative to Q on the data's action.
    opt = torch.optim.Adam(qf.parameters(), lr=1e-2)
    probe = torch.cat([s_z, torch.full((3, 4, 1), -0.9)], -1)
    gap0 = (q_pred - qf(probe)).mean().item()
    for _ in range(200):
        loss = corro.cql_penalty(qf, pi, s_z, qf(torch.cat([s_z, a_data], -1)), n, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    gap = (qf(torch.cat([s_z, a_data], -1)) - qf(probe)).mean().item()
    assert gap > gap0 + 0.5, (gap0, gap)


def test_cql_weight_zero_leaves_the_critic_loss_unchanged_and_names_the_variant():
    assert corro.variant_name(tiny_args(negatives="relabel", cql_weight=1.0)) == "corro-relabel-cql"
    torch.manual_seed(0)
    data = corro.TaskData(toy_dataset(), [0, 1], "cpu")
    tasks, losses = torch.tensor([0, 1]), []
    for w in (0.0, 1.0):
        torch.manual_seed(0)
        nets, opts = corro.make_nets(1, 1, tiny_args(cql_weight=w), "cpu")
        for p in nets["e1"].parameters():
            p.requires_grad_(False)
        gen = torch.Generator().manual_seed(0)
        batch, (ctx, mask) = data.rows(tasks, 8, gen), data.episodes(tasks, gen)
        stats = corro.sac_update(nets, opts, batch, ctx, mask, tiny_args(cql_weight=w), gen)
        losses.append(stats)
    assert "loss/cql" not in losses[0] and losses[1]["loss/cql"] > 0
    # the TD part is logged apart from the penalty: same nets, batch and draws give the same TD loss
    assert losses[1]["loss/critic"] == losses[0]["loss/critic"] > 0


def test_cql_lagrange_weight_rises_above_the_target_gap_and_falls_below_it():
    assert corro.variant_name(tiny_args(cql_weight=1.0, cql_target_gap=0.5)) == "corro-cqlgap"
    data = corro.TaskData(toy_dataset(), [0, 1], "cpu")
    tasks, weights = torch.tensor([0, 1]), {}
    for tau in (-5.0, 5.0):  # far below / far above any gap a fresh critic has (about log 2 here)
        torch.manual_seed(0)
        args = tiny_args(cql_weight=1.0, cql_target_gap=tau)
        nets, opts = corro.make_nets(1, 1, args, "cpu")
        gen = torch.Generator().manual_seed(0)
        for _ in range(5):
            batch, (ctx, mask) = data.rows(tasks, 8, gen), data.episodes(tasks, gen)
            stats = corro.sac_update(nets, opts, batch, ctx, mask, args, gen)
        weights[tau] = stats["cql/weight"]
    assert weights[-5.0] > 1.0 > weights[5.0], weights
    # without a target gap the weight is fixed and no multiplier exists
    nets, opts = corro.make_nets(1, 1, tiny_args(cql_weight=1.0), "cpu")
    assert "cql_w" not in nets and "cql_w" not in opts
    with pytest.raises(SystemExit, match="--cql-target-gap needs --cql-weight"):
        tiny_args(cql_target_gap=0.5)


def test_normalized_inputs_standardise_s_and_s_prime_by_the_train_rows_and_survive_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    e1 = corro.TransitionEncoder(obs_dim=3, act_dim=2, hidden=16, latent_dim=4)
    x = torch.randn(7, 3 + 2 + 1 + 3) * 5
    plain = e1(x)  # unset statistics (0 / 1) leave the input as it is
    assert torch.allclose(plain, F.normalize(e1.mlp(x), dim=-1))
    mean, std = torch.tensor([10.0, -2.0, 0.5]), torch.tensor([4.0, 0.1, 2.0])
    e1.obs_mean.copy_(mean)
    e1.obs_std.copy_(std)
    by_hand = torch.cat([(x[:, :3] - mean) / std, x[:, 3:6], (x[:, 6:] - mean) / std], 1)  # a and r untouched
    assert torch.allclose(e1(x), F.normalize(e1.mlp(by_hand), dim=-1), atol=1e-6)
    assert not torch.allclose(e1(x), plain)
    e2 = corro.TransitionEncoder(obs_dim=3, act_dim=2, hidden=16, latent_dim=4)
    e2.load_state_dict(e1.state_dict())  # the statistics are buffers: they travel with the weights
    assert torch.equal(e2(x), e1(x))
    # in main: the mean / std of the real (unpadded) rows of the train tasks, fixed before the CVAE and InfoNCE stages
    kw = dict(cuda=False, hidden=16, encoder_hidden=16, cvae_hidden=16, cvae_epochs=0.02, encoder_steps=20,
              meta_batch=4, batch_size=32, eval_every=10, print_every=1000, log_every=10, eval_draws=1,
              n_train_eval_tasks=2, total_steps=0, normalize_inputs=True, run_dir=str(tmp_path / "norm"))
    corro.main(corro.Args(**kw))
    state = torch.load(tmp_path / "norm" / "checkpoint.pt", weights_only=False)
    fam = make_family("PointRobot", "default")
    ds = ensure_dataset("PointRobot", "default", family=fam)
    rows = np.concatenate([np.arange(ds.task_ptr[t], ds.task_ptr[t + 1]) for t in fam.train_idx])
    obs = torch.as_tensor(ds["obs"][rows], dtype=torch.float32)
    assert torch.allclose(state["nets"]["e1"]["obs_mean"], obs.mean(0), atol=1e-5)
    assert torch.allclose(state["nets"]["e1"]["obs_std"], obs.std(0), atol=1e-5)
    assert json.loads((tmp_path / "norm" / "summary.json").read_text())["method"] == "corro-norm"
    with pytest.raises(ValueError, match="normalize_inputs"):  # resuming without the flag would drop the statistics
        corro.main(corro.Args(**(kw | dict(normalize_inputs=False, resume=True, total_steps=10))))


def test_resume_refuses_a_changed_learning_flag_and_oracle_z_ignores_the_context(tmp_path):
    kw = dict(cuda=False, hidden=16, encoder_hidden=16, negatives="relabel", relabel_queries=True, encoder_steps=20,
              meta_batch=4, batch_size=32, eval_every=10, print_every=1000, log_every=10, eval_draws=1,
              n_train_eval_tasks=2, run_dir=str(tmp_path / "r"))
    corro.main(corro.Args(total_steps=10, **kw))
    with pytest.raises(ValueError, match="rl_relabel=0.0 in the checkpoint, 0.5 here"):
        corro.main(corro.Args(total_steps=20, resume=True, rl_relabel=0.5, **kw))
    corro.main(corro.Args(total_steps=20, resume=True, **(kw | dict(eval_every=5))))  # lengths may change
    fam = make_family("PointRobot", "default")
    z = corro.oracle_z(fam, [3, 41], 5, "cpu")
    assert z.shape == (2, 5) and torch.equal(z[:, 2:], torch.zeros(2, 3))
    assert torch.allclose(z[:, :2], torch.as_tensor(fam.tasks[[3, 41]], dtype=torch.float32))
    # with the true task as z every protocol acts alike: the context (offline, random or another task's) is unused
    corro.main(corro.Args(total_steps=10, oracle_z=True, **(kw | dict(run_dir=str(tmp_path / "oz")))))
    ev = json.loads((tmp_path / "oz" / "summary.json").read_text())["eval"]
    assert ev["iid"]["test_per_task"] == pytest.approx(ev["ood_random"]["test_per_task"])
    assert ev["iid"]["test_per_task"] == pytest.approx(ev["ood_other_task"]["test_per_task"])
    iid = json.loads((tmp_path / "r" / "summary.json").read_text())["eval"]
    assert iid["iid"]["test_per_task"] != pytest.approx(iid["ood_random"]["test_per_task"])
