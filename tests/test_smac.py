"""smac.py: loss values, the AWR weighting, gradient routing (encoder only through the reward decoder, frozen in
Phase 2), Phase-2 collection and labelling, plumbing and resume."""

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import smac
from common import runs
from common.data import ensure_dataset
from common.envs import make_family


def tiny_args(**kw):
    kw = dict(net_size=32, encoder_size=32, decoder_size=16, cuda=False, meta_batch=4, batch_size=16,
              online_batch_size=16, context_size=8, label_context_size=16) | kw
    return smac.resolve_args(smac.Args(**kw))


# ---------------------------------------------------------------------------------------------
# Losses against hand-computed values
# ---------------------------------------------------------------------------------------------


def test_reward_decoder_loss_with_kl_matches_hand_computed_values():
    r_pred = torch.tensor([[[0.5], [-1.0]], [[0.0], [2.0]]])  # (T=2, B=2, 1)
    r = torch.tensor([[[1.0], [-1.0]], [[1.0], [0.0]]])
    mu = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # (T=2, L=2)
    var = torch.tensor([[1.0, 0.5], [2.0, 1.0]])
    total, mse, kl = smac.reward_decoder_loss(r_pred, r, mu, var, kl_lambda=0.1)
    mse_ref = (0.25 + 0.0 + 1.0 + 4.0) / 4
    # KL(N(m, v) || N(0, 1)) = (v + m^2 - 1 - ln v) / 2 per dim, summed over dims, MEAN over tasks (SMAC)
    kl_t1 = (1 + 1 - 1 - 0) / 2 + (0.5 + 0 - 1 - math.log(0.5)) / 2
    kl_t2 = (2 + 0 - 1 - math.log(2)) / 2 + (1 + 4 - 1 - 0) / 2
    assert mse.item() == pytest.approx(mse_ref)
    assert kl.item() == pytest.approx((kl_t1 + kl_t2) / 2, rel=1e-6)
    assert total.item() == pytest.approx(mse_ref + 0.1 * (kl_t1 + kl_t2) / 2, rel=1e-6)
    assert smac.kl_to_prior(torch.zeros(3, 5), torch.ones(3, 5)).item() == 0.0


def test_critic_target_scales_rewards_and_stops_at_terminals():
    r = torch.tensor([[1.0], [-2.0]])
    d = torch.tensor([[0.0], [1.0]])
    q = torch.tensor([[10.0], [10.0]])
    y = smac.critic_target(r, d, q, reward_scale=5.0, gamma=0.9)
    torch.testing.assert_close(y, torch.tensor([[5.0 + 9.0], [-10.0]]))


def test_awr_weights_are_a_softmax_over_the_whole_meta_batch_times_n():
    q = torch.tensor([[[1.0], [3.0]], [[0.0], [2.0]]])  # (T=2, B=2, 1): min Q at the buffer actions
    v = torch.tensor([[[1.0], [1.0]], [[1.0], [1.0]]])
    w = smac.awr_weights(q, v, beta=2.0)
    adv = torch.tensor([0.0, 2.0, -1.0, 1.0]) / 2.0
    ref = 4 * adv.exp() / adv.exp().sum()
    torch.testing.assert_close(w.flatten(), ref)
    assert w.sum().item() == pytest.approx(4.0)
    # One softmax across tasks, not per task: task 2's weights are not normalised on their own.
    assert w[1].sum().item() != pytest.approx(2.0)
    # beta -> infinity is plain behaviour cloning (all weights 1).
    torch.testing.assert_close(smac.awr_weights(q, v, beta=1e9), torch.ones_like(q))


def test_tanh_gaussian_log_prob_matches_torch_and_sample_agrees():
    torch.manual_seed(0)
    pi = smac.TanhGaussianPolicy(3, 16, 2).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    a = torch.rand(5, 2, dtype=torch.float64) * 1.8 - 0.9
    mean, log_std = pi(x)
    dist = torch.distributions.TransformedDistribution(torch.distributions.Normal(mean, log_std.exp()),
                                                       [torch.distributions.TanhTransform()])
    torch.testing.assert_close(pi.log_prob(x, a)[..., 0], dist.log_prob(a).sum(-1))
    g = torch.Generator().manual_seed(3)
    a_s, lp = pi.sample(x, g)
    torch.testing.assert_close(lp, pi.log_prob(x, a_s), rtol=1e-6, atol=1e-6)
    assert a_s.shape == (5, 2) and a_s.abs().max() < 1


# ---------------------------------------------------------------------------------------------
# Gradient routing: the encoder learns only from the reward decoder + KL; Phase 2 freezes it
# ---------------------------------------------------------------------------------------------


def _batch(T=4, B=16, N=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {"obs": torch.randn(T, B, 2, generator=g), "actions": torch.rand(T, B, 2, generator=g) * 2 - 1,
             "rewards": -torch.rand(T, B, generator=g), "next_obs": torch.randn(T, B, 2, generator=g),
             "terminals": torch.zeros(T, B)}
    context = torch.randn(T, N, 5, generator=g)
    return batch, context


def test_encoder_gets_no_gradient_from_critic_and_actor_losses(monkeypatch):
    args = tiny_args()
    nets, opts = smac.make_nets(2, 2, args, "cpu")
    batch, context = _batch()
    real = smac.reward_decoder_loss

    def zero_weight(r_pred, r, mu, var, kl_lambda):  # keep the graph, drop the decoder's contribution
        total, mse, kl = real(r_pred, r, mu, var, kl_lambda)
        return 0.0 * total, mse, kl

    monkeypatch.setattr(smac, "reward_decoder_loss", zero_weight)
    grads = {}
    monkeypatch.setattr(opts["context"], "step", lambda: grads.update(
        enc=[p.grad.clone() for p in nets["encoder"].parameters()]))
    q_before = [p.clone() for p in nets["qf"].parameters()]
    smac.smac_update(nets, opts, batch, context, args, online=False, generator=torch.Generator().manual_seed(0))
    assert all(torch.all(g == 0) for g in grads["enc"])
    assert any(not torch.equal(a, b) for a, b in zip(q_before, nets["qf"].parameters()))
    # With the decoder loss weighted normally the encoder does get a gradient.
    monkeypatch.setattr(smac, "reward_decoder_loss", real)
    smac.smac_update(nets, opts, batch, context, args, online=False, generator=torch.Generator().manual_seed(0))
    assert any(torch.any(g != 0) for g in grads["enc"])


def test_decoder_batch_relabelled_reconstructs_its_own_batch_and_leaves_the_rl_losses_alone(monkeypatch):
    """--decoder-batch relabelled: the reward decoder's targets are dec_batch's rewards (a batch of a different
    size here), while the critic and actor losses are those of the RL batch, exactly as without it."""
    args = tiny_args(decoder_batch="relabelled")
    torch.manual_seed(0)
    nets, opts = smac.make_nets(2, 2, args, "cpu")
    torch.manual_seed(0)
    n2, o2 = smac.make_nets(2, 2, args, "cpu")
    batch, context = _batch()
    dec, _ = _batch(B=24, seed=1)
    seen = []
    real = smac.reward_decoder_loss
    monkeypatch.setattr(smac, "reward_decoder_loss", lambda r_pred, r, *a: seen.append((r_pred, r)) or real(r_pred, r, *a))
    with_dec = smac.smac_update(nets, opts, batch, context, args, False, torch.Generator().manual_seed(0), dec)
    without = smac.smac_update(n2, o2, batch, context, args, False, torch.Generator().manual_seed(0))
    assert seen[0][0].shape == (4, 24, 1) and torch.equal(seen[0][1], dec["rewards"][..., None])
    assert seen[1][0].shape == (4, 16, 1) and torch.equal(seen[1][1], batch["rewards"][..., None])
    for k in ("loss/q", "loss/policy", "q/mean"):
        torch.testing.assert_close(with_dec[k], without[k])
    assert smac.variant_name(args) == "smac-relabeldec"
    assert smac.variant_name(tiny_args(decoder_batch="relabelled", relabel_offline="context",
                                       relabel_context_source="task")) == "smac-relabelctx-task-relabeldec"


def test_phase2_freezes_encoder_and_decoder_and_adds_the_reparameterised_actor_term():
    args = tiny_args()
    nets, opts = smac.make_nets(2, 2, args, "cpu")
    batch, context = _batch()
    frozen = {k: [p.clone() for p in nets[k].parameters()] for k in ("encoder", "decoder")}
    pol = [p.clone() for p in nets["policy"].parameters()]
    stats = smac.smac_update(nets, opts, batch, context, args, online=True, generator=torch.Generator().manual_seed(0))
    for k, ps in frozen.items():
        assert all(torch.equal(a, b) for a, b in zip(ps, nets[k].parameters())), k
    assert any(not torch.equal(a, b) for a, b in zip(pol, nets["policy"].parameters()))
    assert "loss/reward_mse" not in stats
    # The online actor loss is the offline (AWR) one minus mean min-Q at the reparameterised action: replay the
    # update's random draws (z, a', a~) on copies of the same networks and compare.
    copies = []
    for _ in range(2):
        n2, o2 = smac.make_nets(2, 2, args, "cpu")
        for k in nets:
            n2[k].load_state_dict(nets[k].state_dict())
        copies.append((n2, o2))
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        mu, var = smac.infer_posterior(nets["encoder"], context)
        z = smac.sample_z(mu, var, g)[:, None].expand(4, 16, -1)
        nets["policy"].sample(torch.cat([batch["next_obs"], z], -1), g)
        a_new, _ = nets["policy"].sample(torch.cat([batch["obs"], z], -1), g)
        q_new = nets["qf"](torch.cat([batch["obs"], a_new, z], -1)).min(dim=0).values.mean()
    s_on = smac.smac_update(*copies[0], batch, context, args, online=True, generator=torch.Generator().manual_seed(5))
    s_off = smac.smac_update(*copies[1], batch, context, args, online=False, generator=torch.Generator().manual_seed(5))
    assert s_on["loss/policy"].item() == pytest.approx(s_off["loss/policy"].item() - q_new.item(), rel=1e-5)
    assert abs(q_new.item()) > 1e-4  # the term is not trivially zero


def test_target_qs_follow_by_polyak():
    args = tiny_args(tau=0.5)
    nets, opts = smac.make_nets(2, 2, args, "cpu")
    before_t = [p.clone() for p in nets["target_qf"].parameters()]
    batch, context = _batch()
    smac.smac_update(nets, opts, batch, context, args, online=False, generator=torch.Generator().manual_seed(0))
    for t0, t1, q in zip(before_t, nets["target_qf"].parameters(), nets["qf"].parameters()):
        torch.testing.assert_close(t1, 0.5 * t0 + 0.5 * q.detach())


# ---------------------------------------------------------------------------------------------
# Data, Phase-2 collection and labels
# ---------------------------------------------------------------------------------------------


def test_data_tail_keeps_each_tasks_last_transitions():
    fam = make_family("PointRobot")
    ds = ensure_dataset("PointRobot", "default")
    full, n_full, _ = smac.offline_data(ds, fam, tiny_args(), "cpu")
    tail, n_tail, rel = smac.offline_data(ds, fam, tiny_args(data_tail=100), "cpu")
    assert rel is None and n_tail.tolist() == [100] * len(fam.train_idx)
    for t in (0, 7):
        n = int(n_full[t])
        torch.testing.assert_close(tail["obs"][t, :100], full["obs"][t, n - 100:n])


def test_task_data_samples_offline_rows_then_appended_rows_in_proportion():
    data = {"obs": torch.arange(12.0).reshape(2, 3, 2), "actions": torch.zeros(2, 3, 2), "rewards": torch.zeros(2, 3),
            "next_obs": torch.zeros(2, 3, 2), "terminals": torch.zeros(2, 3)}
    buf = smac.TaskData(data, torch.tensor([3, 2]))
    new = {k: torch.ones(6, *v.shape[2:]) * -1 for k, v in data.items()}
    buf.add(1, new)
    assert buf.new_counts.tolist() == [0, 6]
    g = torch.Generator().manual_seed(0)
    s = buf.sample(torch.tensor([0, 1]), 3000, g)
    assert set(s["obs"][0, :, 0].tolist()) == {0.0, 2.0, 4.0}  # task 0: its 3 offline rows only
    o1 = s["obs"][1, :, 0]
    assert set(o1.tolist()) == {6.0, 8.0, -1.0}  # task 1: its 2 offline rows (not the padding row) + new rows
    assert (o1 == -1).float().mean().item() == pytest.approx(6 / 8, abs=0.03)
    off = buf.sample(torch.tensor([1]), 500, g, offline_only=True)  # the frozen offline part
    assert set(off["obs"][0, :, 0].tolist()) == {6.0, 8.0}
    assert data["obs"][1, 2].tolist() == [10.0, 11.0]  # the shared offline tensors are never written


def test_relabelled_buffers_hold_every_train_tasks_rows_with_this_tasks_rewards():
    fam = make_family("PointRobot")
    ds = ensure_dataset("PointRobot", "default")
    data, counts, rel = smac.offline_data(ds, fam, tiny_args(relabel_offline="all"), "cpu")
    assert rel.shape == (len(fam.train_idx), len(fam.train_idx), data["obs"].shape[1])
    # --decoder-batch relabelled needs the same table (for the decoder's batch only); the default builds none.
    torch.testing.assert_close(smac.offline_data(ds, fam, tiny_args(decoder_batch="relabelled"), "cpu")[2], rel)
    assert smac.offline_data(ds, fam, tiny_args(), "cpu")[2] is None
    buf = smac.TaskData(data, counts, rel)
    rows = torch.tensor([0, 5])
    s = buf.sample(rows, 4000, torch.Generator().manual_seed(1))
    goals = torch.as_tensor(fam.tasks[fam.train_idx[rows.numpy()]])
    torch.testing.assert_close(s["rewards"], -(s["next_obs"] - goals[:, None]).norm(dim=-1), atol=1e-5, rtol=0)
    # The rows come from all train tasks' data: far more distinct goal directions than one task's own rows.
    ang = torch.atan2(s["next_obs"][0, :, 1], s["next_obs"][0, :, 0])
    far = s["next_obs"][0].norm(dim=-1) > 0.7
    assert ang[far].std() > 0.6
    # --relabel-context-source task: each row's context is one source task's rows, still with this task's rewards.
    c = buf.sample(torch.tensor([0] * 20 + [5]), 32, torch.Generator().manual_seed(2), one_source=True)
    def sources(o):  # the train tasks whose offline rows contain state o
        return {j for j in range(len(counts)) if (data["obs"][j, :counts[j]] == o).all(-1).any()}
    common = [set.intersection(*[sources(o) for o in c["obs"][i]]) for i in range(21)]
    assert all(len(x) >= 1 for x in common)  # every row's 32 states share one source task
    assert len({min(x) for x in common}) > 5  # and different rows use different sources
    torch.testing.assert_close(c["rewards"][:20], -(c["next_obs"][:20] - goals[0]).norm(dim=-1), atol=1e-5, rtol=0)
    # Families whose reward needs simulator state (MuJoCo) are refused with a clear message.
    cheetah_like = copy.copy(fam)
    cheetah_like.env_id = "HalfCheetahVel"
    with pytest.raises(SystemExit, match="--relabel-offline / --decoder-batch relabelled: reward relabelling is not available for HalfCheetahVel"):
        smac.offline_data(ds, cheetah_like, tiny_args(relabel_offline="all"), "cpu")


def test_labels_track_true_rewards_after_a_short_fit_and_oracle_labels_are_exact():
    """Phase 1 for 1000 small steps (relabelled buffers, so the decoder sees every region), then Phase-2
    collection with prior z on train tasks: the decoder's labels (z from the task's offline context) have a squared
    error far below the variance of the true rewards; --oracle-rewards stores the true rewards."""
    torch.manual_seed(0)
    args = tiny_args(net_size=64, encoder_size=64, decoder_size=64, batch_size=64, context_size=32,
                     label_context_size=64, lr=1e-3, relabel_offline="all", kl_lambda=0.001)
    fam = make_family("PointRobot")
    ds = ensure_dataset("PointRobot", "default")
    off = smac.TaskData(*smac.offline_data(ds, fam, args, "cpu"))
    nets, opts = smac.make_nets(2, 2, args, "cpu")
    gen = torch.Generator().manual_seed(0)
    rows = torch.arange(len(fam.train_idx))
    for _ in range(1000):
        tasks = rows[torch.randint(len(rows), (args.meta_batch,), generator=gen)]
        batch = off.sample(tasks, args.batch_size, gen)
        ctx = smac.context_tensor(off.sample(tasks, args.context_size, gen))
        smac.smac_update(nets, opts, batch, ctx, args, online=False, generator=gen)
    sel = np.array([0, 3, 9, 20, 33])
    new, err = smac.collect(nets, fam, sel, 40, False, off, args, "cpu", gen, np.random.RandomState(0))
    goals = torch.as_tensor(fam.tasks[fam.train_idx[sel]])
    true = torch.cat([-(d["next_obs"] - g).norm(dim=-1) for d, g in zip(new, goals)])
    assert len(new) == 5 and all(len(d["obs"]) == 40 for d in new)
    labels = torch.cat([d["rewards"] for d in new])
    assert (labels - true).abs().mean().item() == pytest.approx(err, rel=1e-5)
    assert (labels - true).pow(2).mean() < 0.3 * true.var(), ((labels - true).pow(2).mean(), true.var())
    new_o, _ = smac.collect(nets, fam, sel, 40, False, off, dataclasses.replace(args, oracle_rewards=True), "cpu",
                            gen, np.random.RandomState(0))
    true_o = torch.cat([-(d["next_obs"] - g).norm(dim=-1) for d, g in zip(new_o, goals)])
    torch.testing.assert_close(torch.cat([d["rewards"] for d in new_o]), true_o, atol=1e-5, rtol=0)


def test_mode_b_explores_with_the_prior_then_infers_from_every_collected_transition(monkeypatch):
    args = tiny_args(num_evals=2, eval_episodes=4, num_exp_traj_eval=2)
    fam = make_family("PointRobot")
    nets, _ = smac.make_nets(2, 2, args, "cpu")
    seen = []
    real = smac.infer_posterior

    def spy(encoder, context, mask=None):
        seen.append((tuple(context.shape[:2]), mask.sum(1).tolist()))
        return real(encoder, context, mask)

    monkeypatch.setattr(smac, "infer_posterior", spy)
    ret, succ = smac.eval_mode_b(nets, fam, fam.test_idx, args, "cpu", seed=0)
    assert ret.shape == (10, 4) and succ.shape == (10, 4)
    assert seen == [((20, 40), [40.0] * 20), ((20, 60), [60.0] * 20)]


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


def test_main_runs_both_phases_writes_summary_and_resume_continues_identically(tmp_path):
    kw = dict(net_size=16, encoder_size=16, decoder_size=8, cuda=False, total_steps=20, eval_every=10,
              online_updates=10, print_every=1000, log_every=10, eval_context_draws=1, num_evals=1,
              num_tasks_sample=3, context_buffer="separate")
    smac.main(smac.Args(online_iterations=2, run_dir=str(tmp_path / "full"), **kw))
    smac.main(smac.Args(online_iterations=1, run_dir=str(tmp_path / "part"), **kw))
    smac.main(smac.Args(online_iterations=2, run_dir=str(tmp_path / "part"), resume=True, **kw))
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    part = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert set(full["eval"]) == {"A", "B", "A_offline", "B_offline"} and full["total_steps"] == 40
    # 3 tasks x (2 prior episodes + 3 posterior episodes) x 20 steps per iteration
    assert full["extra"]["reward_free_env_steps"] == 2 * 3 * 100
    assert part["eval"]["A"]["test_per_task"] == pytest.approx(full["eval"]["A"]["test_per_task"])
    assert part["eval"]["B"]["test"] == pytest.approx(full["eval"]["B"]["test"])
    assert part["eval"]["A_offline"] == full["eval"]["A_offline"]
    with pytest.raises(FileExistsError):
        smac.main(smac.Args(online_iterations=2, run_dir=str(tmp_path / "full"), **kw))


def test_a_shared_buffer_checkpoint_resumes_with_a_separate_context_buffer(tmp_path):
    """Phase-2 flags are not in the checkpoint's meta, so a shared-buffer run may continue with --context-buffer
    separate: its context buffer then starts as a copy of the appended rows."""
    kw = dict(net_size=16, encoder_size=16, decoder_size=8, cuda=False, total_steps=10, eval_every=10,
              online_updates=5, print_every=1000, log_every=10, eval_context_draws=1, num_evals=1,
              num_tasks_sample=2, run_dir=str(tmp_path / "r"))
    smac.main(smac.Args(online_iterations=1, context_buffer="shared", **kw))
    shared = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    assert shared["ctx_buf"] is None and int(shared["rl_buf"]["new_counts"].sum()) == 2 * 100
    smac.main(smac.Args(online_iterations=2, context_buffer="separate", resume=True, **kw))
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    # iteration 2 added 2 tasks x 100 rows to the RL buffer and only their 2 x 40 prior-z rows to the context one
    assert int(state["rl_buf"]["new_counts"].sum()) == 400
    assert int(state["ctx_buf"]["new_counts"].sum()) == 200 + 80
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["extra"]["online_iterations"] == 2 and summary["extra"]["reward_free_env_steps"] == 400


def test_a_checkpoint_from_before_decoder_batch_resumes_as_the_official_batch_only(tmp_path):
    """A checkpoint whose meta predates --decoder-batch ran with the RL batch as the decoder's: it resumes with the
    default and is refused with --decoder-batch relabelled."""
    kw = dict(net_size=16, encoder_size=16, decoder_size=8, cuda=False, eval_every=10, online_iterations=0,
              print_every=1000, log_every=10, eval_context_draws=1, num_evals=1, run_dir=str(tmp_path / "r"))
    smac.main(smac.Args(total_steps=10, **kw))
    path = tmp_path / "r" / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    del state["meta"]["decoder_batch"]
    runs.save_checkpoint(path, state)
    with pytest.raises(ValueError, match="built for decoder_batch='own', this run has decoder_batch='relabelled'"):
        smac.main(smac.Args(total_steps=20, resume=True, decoder_batch="relabelled", **kw))
    smac.main(smac.Args(total_steps=20, resume=True, **kw))
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["total_steps"] == 20


def test_discrete_families_are_refused_and_variant_names(tmp_path):
    with pytest.raises(SystemExit, match="continuous actions only"):
        smac.main(smac.Args(env_id="GridNavi", cuda=False, run_dir=str(tmp_path / "g")))
    assert smac.variant_name(smac.Args()) == "smac" and smac.variant_name(smac.Args(oracle_rewards=True)) == "smac-oracle"
    assert smac.variant_name(smac.Args(relabel_offline="context")) == "smac-relabelctx"
    assert smac.variant_name(smac.Args(data_tail=10_000)) == "smac-tail"
    assert smac.variant_name(smac.Args(beta=10.0)) == "smac-beta10"
    assert smac.variant_name(smac.Args(relabel_offline="all", beta=1.0)) == "smac-relabel-beta1"
    with pytest.raises(SystemExit, match="separate"):
        smac.resolve_args(smac.Args(relabel_offline="context", context_buffer="shared"))
    assert smac.variant_name(smac.Args(relabel_offline="all", relabel_context_source="task")) == "smac-relabel-task"
    with pytest.raises(SystemExit, match="needs --relabel-offline"):
        smac.resolve_args(smac.Args(relabel_context_source="task"))
