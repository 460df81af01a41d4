"""borel.py: reward relabelling replays to the env's own rewards, the ELBO against a loop over its terms, online and
offline beliefs agree, hyper-state transitions, the grid belief finds the goal, plumbing (resume, bad input)."""

import json

import numpy as np
import pytest
import torch

import borel
from common import collect
from common.data import load_dataset
from common.envs import GridNaviEnv, make_family


@pytest.fixture(scope="module")
def grid_ds(tmp_path_factory):
    """A small GridNavi/borel dataset: 10 random + 6 x 5 learning episodes per task (34 episodes)."""
    path = tmp_path_factory.mktemp("grid") / "grid.npz"
    collect.main(collect.Args(env_id="GridNavi", preset="borel", out=str(path), iterations=6, threads=1))
    return load_dataset(path, "GridNavi", "borel")


def tiny_args(**kw):
    kw = dict(cuda=False, gru_hidden=16, hidden=16) | kw
    return borel.resolve_args(borel.Args(**kw))


def test_relabelled_episodes_earn_the_same_rewards_when_replayed_in_the_task(grid_ds):
    fam = make_family("GridNavi", "borel")
    roll = borel.build_rollouts(grid_ds, fam, fam.train_idx, 4)
    mixed = borel.mix_rollouts(roll, fam, 4, np.random.RandomState(0))
    H = fam.horizon
    changed = np.any(mixed["obs"] != roll["obs"], axis=-1)  # (R, H+)
    assert not changed[:, 2 * H:].any()  # k = 4: only episodes 1 and 2 are swapped
    frac = changed[:, :H].any(1).mean()
    assert 0.4 < frac < 0.8  # R draws with replacement touch about 63% of the rollouts
    checked = 0
    for r in np.flatnonzero(changed[:, :H].any(1))[:20]:
        env = GridNaviEnv(fam.tasks[roll["task"][r]], **fam.config)
        env.reset()
        for t in range(H):  # the foreign actions, replayed in this rollout's own task from the start cell
            obs, rew, *_ = env.step(mixed["actions"][r, t])
            np.testing.assert_array_equal(obs, mixed["next_obs"][r, t])
            assert rew == pytest.approx(mixed["rewards"][r, t])
            checked += 1
    assert checked >= 10 * H
    # A swapped episode came from another task: with the original agent's goal it would score differently somewhere.
    assert np.any(mixed["rewards"][:, :H] != roll["rewards"][:, :H])
    # --relabel-episodes 3: episodes 1-3 of a touched rollout are foreign, episode 4 stays its own
    mixed3 = borel.mix_rollouts(roll, fam, 4, np.random.RandomState(0), n_swap=3)
    changed3 = np.any(mixed3["obs"] != roll["obs"], axis=-1)
    assert not changed3[:, 3 * H:].any() and changed3[:, 2 * H: 3 * H].any(1).mean() > 0.4


@pytest.mark.parametrize("kind", ["grid", "point", "mujoco"])
def test_elbo_equals_a_loop_over_every_latent_and_every_reward(kind):
    torch.manual_seed(0)
    obs_dim, act_dim, n_actions = (2, 0, 5) if kind == "grid" else (2, 3, 0)
    args = tiny_args(env_id="GridNavi" if kind == "grid" else "PointRobot", action_embed=4 if kind != "grid" else 0)
    vae = borel.VAE(obs_dim, act_dim, n_actions, kind, args, done_bit=True, n_cells=25, grid_size=5).double()
    B, T = 3, 6
    if kind == "grid":
        nobs = torch.randint(0, 5, (B, T, 2)).double()
        batch = {"obs": torch.zeros(B, T, 2).double(), "next_obs": nobs, "actions": torch.randint(0, 5, (B, T)),
                 "rewards": torch.where(torch.rand(B, T) < 0.3, 1.0, -0.1).double()}
    else:
        batch = {"obs": torch.randn(B, T, 2).double(), "next_obs": torch.randn(B, T, 2).double(),
                 "actions": torch.rand(B, T, act_dim).double() * 2 - 1, "rewards": torch.randn(B, T).double()}
    bits = borel.done_bits(3, 2, "cpu").double()
    loss, rec, kl = borel.elbo_loss(vae, batch, bits, 0.05, torch.Generator().manual_seed(5))
    # the same eps, then every (latent t, target j) pair and every KL term one at a time
    mu, logvar, _ = vae.encode(*(batch[k].transpose(0, 1) for k in ("actions", "next_obs", "rewards")),
                               bits[:, None, None].expand(-1, B, 1))
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(5), dtype=mu.dtype)
    z = mu + (0.5 * logvar).exp() * eps
    rec_loop, kl_loop = 0.0, 0.0
    for b in range(B):
        for t in range(T + 1):
            for j in range(T):
                if kind == "grid":
                    x, y = batch["next_obs"][b, j].long()
                    p = torch.sigmoid(vae.dec(z[t, b])[5 * x + y])
                    target = float(batch["rewards"][b, j] == 1.0)
                    rec_loop += -(target * torch.log(p) + (1 - target) * torch.log(1 - p))
                else:  # the split first layer equals one Linear on the concatenation [m, x]
                    feats = [torch.relu(vae.dec_s_emb(batch["next_obs"][b, j]))]
                    if kind == "mujoco":
                        feats += [torch.relu(vae.dec_a_emb(batch["actions"][b, j])), torch.relu(vae.dec_s_emb(batch["obs"][b, j]))]
                    W = torch.cat([vae.dec_in_m.weight, vae.dec_in_x.weight], 1)
                    h = torch.cat([z[t, b], *feats]) @ W.T + vae.dec_in_m.bias
                    rec_loop += (vae.dec_rest(h)[0] - batch["rewards"][b, j]) ** 2
            prior = torch.distributions.Normal(torch.zeros(5, dtype=mu.dtype), torch.ones(5, dtype=mu.dtype)) if t == 0 else \
                torch.distributions.Normal(mu[t - 1, b], (0.5 * logvar[t - 1, b]).exp())
            post = torch.distributions.Normal(mu[t, b], (0.5 * logvar[t, b]).exp())
            kl_loop += torch.distributions.kl_divergence(post, prior).sum()
    assert rec.item() == pytest.approx(rec_loop.item() / B, rel=1e-9)
    assert kl.item() == pytest.approx(kl_loop.item() / B, rel=1e-9)
    assert loss.item() == pytest.approx((rec_loop + 0.05 * kl_loop).item() / B, rel=1e-9)


def test_subsampled_elbo_keeps_the_kl_and_is_an_unbiased_estimate_of_the_reconstruction():
    torch.manual_seed(0)
    args = tiny_args(env_id="PointRobot", action_embed=4)
    vae = borel.VAE(2, 3, 0, "mujoco", args, done_bit=False).double()
    B, T = 4, 9
    batch = {"obs": torch.randn(B, T, 2).double(), "next_obs": torch.randn(B, T, 2).double(),
             "actions": torch.rand(B, T, 3).double() * 2 - 1, "rewards": torch.randn(B, T).double()}
    bits = torch.zeros(T).double()
    n = 300
    full = [borel.elbo_loss(vae, batch, bits, 0.05, torch.Generator().manual_seed(s)) for s in range(n)]
    sub = [borel.elbo_loss(vae, batch, bits, 0.05, torch.Generator().manual_seed(s), n_latents=3) for s in range(n)]
    # the same eps draw: the KL terms do not depend on the subsample
    for (_, _, kl_f), (_, _, kl_s) in zip(full, sub):
        assert kl_s.item() == pytest.approx(kl_f.item(), rel=1e-12)
    diff = np.array([s[1].item() - f[1].item() for f, s in zip(full, sub)])
    assert diff.std() > 1e-3 * abs(np.mean([f[1].item() for f in full]))  # 3 of 10 latents: a real subsample
    assert abs(diff.mean()) < 4 * diff.std() / np.sqrt(n)  # rescaled by 10 / 3: no bias
    # all latents (or more): the full sum
    _, rec_all, _ = borel.elbo_loss(vae, batch, bits, 0.05, torch.Generator().manual_seed(0), n_latents=T + 1)
    assert rec_all.item() == pytest.approx(full[0][1].item(), rel=1e-12)


def test_online_belief_updates_equal_the_offline_relabelling_and_start_at_the_prior():
    torch.manual_seed(1)
    args = tiny_args(env_id="PointRobot", action_embed=4)
    vae = borel.VAE(2, 2, 0, "point", args, done_bit=True)
    T, B = 8, 3
    roll = {"actions": torch.rand(B, T, 2), "next_obs": torch.randn(B, T, 2), "rewards": torch.randn(B, T)}
    bits = borel.done_bits(4, 2, "cpu")
    offline = borel.beliefs(vae, roll, bits)  # (B, T+1, 2m)
    h = torch.zeros(1, B, args.gru_hidden)
    prior = torch.cat(vae.heads(h[0]), -1)
    torch.testing.assert_close(offline[:, 0], prior)  # index 0: before any step
    for t in range(T):  # one step at a time, as the evaluation feeds the env's transitions
        _, _, h = vae.encode(roll["actions"][:, t][None], roll["next_obs"][:, t][None], roll["rewards"][:, t][None],
                             bits[t].expand(1, B, 1), h)
        torch.testing.assert_close(offline[:, t + 1], torch.cat(vae.heads(h[0]), -1), rtol=1e-5, atol=1e-6)
    # the belief reads the reward: changing one reward changes every later belief, not the earlier ones
    roll2 = dict(roll, rewards=roll["rewards"].clone())
    roll2["rewards"][:, 3] += 1.0
    other = borel.beliefs(vae, roll2, bits)
    torch.testing.assert_close(other[:, :4], offline[:, :4])
    assert (other[:, 4:] - offline[:, 4:]).abs().amax() > 1e-4


def test_hyper_state_transitions_cross_episode_boundaries_and_stop_at_the_goal(grid_ds):
    fam = make_family("GridNavi", "borel")
    roll = borel.to_tensors(borel.build_rollouts(grid_ds, fam, fam.train_idx[:3], 4), True, "cpu")
    R, T = roll["rewards"].shape
    belief = torch.randn(R, T + 1, 10)
    data = borel.HyperData(roll, belief, goal_terminal=True)
    H = fam.horizon
    per_task = data.counts[0] // T
    row = data.packed[0].reshape(int(per_task), T, -1)  # task 0's rollouts in order
    x, x2 = row[..., data.slices["x"]], row[..., data.slices["x2"]]
    torch.testing.assert_close(x[:, 1:], x2[:, :-1])  # s+_{t+1} is the next row's hyper-state ...
    torch.testing.assert_close(x2[:, H - 1, :2], torch.zeros(int(per_task), 2))  # ... the next episode's start cell
    torch.testing.assert_close(x2[:, -1, :2], roll["next_obs"][:per_task, -1])  # the true s' at the rollout's end
    torch.testing.assert_close(x[:, :, 2:], belief[:per_task, :-1])
    d = row[..., data.slices["d"]][..., 0]
    goal = torch.as_tensor(fam.tasks[fam.train_idx[0]])
    at_goal = (roll["next_obs"][:per_task] == goal).all(-1)
    assert at_goal.any() and torch.equal(d.bool(), at_goal)
    b = data.sample(torch.tensor([0, 2, 2]), 50, torch.Generator().manual_seed(0))
    assert b["x"].shape == (3, 50, 12) and b["a"].dtype == torch.long and b["r"].shape == (3, 50)
    assert torch.all((b["r"] == 1.0) | ((b["r"] + 0.1).abs() < 1e-6))


def test_grid_belief_moves_to_the_goal_when_it_is_observed(grid_ds):
    """After a short VAE fit on the relabelled rollouts, the decoded reward probability of a rollout's goal cell
    jumps when the rollout first stands on it (read 5 steps later), in almost every rollout."""
    torch.manual_seed(0)
    fam = make_family("GridNavi", "borel")
    args = tiny_args(gru_hidden=32)
    roll_np = borel.build_rollouts(grid_ds, fam, fam.train_idx, 4)
    mixed = borel.to_tensors(borel.mix_rollouts(roll_np, fam, 4, np.random.RandomState(0)), True, "cpu")
    vae = borel.VAE(2, 0, 5, "grid", args, done_bit=True, n_cells=25, grid_size=5)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
    bits = borel.done_bits(fam.horizon, 4, "cpu")
    gen = torch.Generator().manual_seed(0)
    for _ in range(600):
        idx = torch.randint(len(mixed["task"]), (32,), generator=gen)
        loss, _, _ = borel.elbo_loss(vae, {k: mixed[k][idx] for k in ("obs", "next_obs", "actions", "rewards")}, bits, 0.05, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    roll = borel.to_tensors(roll_np, True, "cpu")
    bel = borel.beliefs(vae, roll, bits)
    goal = torch.as_tensor(fam.tasks[roll["task"]])
    goal_cell = (goal[:, 0] * 5 + goal[:, 1]).long()
    hit = roll["rewards"] == 1.0
    first = hit.float().argmax(1)
    r = torch.nonzero(hit.any(1) & (first < 4 * fam.horizon - 6)).squeeze(1)
    assert len(r) > 30
    p_before = torch.sigmoid(vae.dec(bel[r, first[r], :5])).gather(1, goal_cell[r, None])[:, 0]
    p_after = torch.sigmoid(vae.dec(bel[r, first[r] + 6, :5])).gather(1, goal_cell[r, None])[:, 0]
    assert (p_after > p_before).float().mean() > 0.85
    assert p_after.mean() > 0.35 and p_after.mean() > 3 * p_before.mean()


def test_main_runs_writes_bamdp_episodes_and_resumes_identically(grid_ds, tmp_path):
    kw = dict(cuda=False, dataset=str(grid_ds.path), gru_hidden=16, hidden=16, vae_epochs=0.5, meta_batch=4,
              batch_size=32, updates_per_iter=10, eval_every=20, print_every=1000, log_every=10)
    borel.main(borel.Args(total_steps=40, run_dir=str(tmp_path / "full"), **kw))
    borel.main(borel.Args(total_steps=20, run_dir=str(tmp_path / "part"), **kw))
    borel.main(borel.Args(total_steps=40, run_dir=str(tmp_path / "part"), resume=True, **kw))
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    part = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert full["method"] == "borel" and set(full["eval"]) == {"B_sum", "B_ep1", "B_ep2", "B_ep3", "B_ep4", "A"}
    assert len(full["eval"]["B_sum"]["test_per_task"]) == 21
    ep = [np.array(full["eval"][f"B_ep{e}"]["test_per_task"]) for e in range(1, 5)]
    np.testing.assert_allclose(sum(ep), full["eval"]["B_sum"]["test_per_task"], atol=1e-9)
    assert np.all(np.abs(ep[0]) <= 15 + 1e-6)  # one 15-step episode: rewards in {-0.1, 1}
    for mode in full["eval"]:
        assert part["eval"][mode]["test_per_task"] == pytest.approx(full["eval"][mode]["test_per_task"])
    with pytest.raises(FileExistsError):
        borel.main(borel.Args(total_steps=40, run_dir=str(tmp_path / "full"), **kw))
    with pytest.raises(SystemExit, match="relabel"):  # MuJoCo rewards cannot be recomputed from (s, a, s')
        borel.main(borel.Args(env_id="HalfCheetahVel", preset="cpu", run_dir=str(tmp_path / "hc"), cuda=False))
    with pytest.raises(Exception, match="GridNavi"):  # a dataset of another family
        borel.main(borel.Args(env_id="PointRobot", dataset=str(grid_ds.path), run_dir=str(tmp_path / "pr"), cuda=False,
                              relabel=False))


def test_rl_relabel_is_its_own_variant_needs_relabelling_and_refuses_a_plain_checkpoint(grid_ds, tmp_path):
    kw = dict(cuda=False, dataset=str(grid_ds.path), gru_hidden=16, hidden=16, vae_epochs=0.5, meta_batch=4,
              batch_size=32, updates_per_iter=10, eval_every=20, print_every=1000, log_every=10)
    with pytest.raises(SystemExit, match="--rl-relabel"):
        borel.main(borel.Args(total_steps=20, run_dir=str(tmp_path / "bad"), relabel=False, rl_relabel=True, **kw))
    borel.main(borel.Args(total_steps=20, run_dir=str(tmp_path / "rl"), rl_relabel=True, **kw))
    summary = json.loads((tmp_path / "rl" / "summary.json").read_text())
    assert summary["method"] == "borel-rlrelabel" and summary["total_steps"] == 20
    borel.main(borel.Args(total_steps=10, run_dir=str(tmp_path / "plain"), **kw))
    with pytest.raises(Exception, match="rl_relabel"):  # a plain run's checkpoint must not resume as the variant
        borel.main(borel.Args(total_steps=20, run_dir=str(tmp_path / "plain"), resume=True, rl_relabel=True, **kw))


def test_relabelled_rl_rows_carry_the_rows_task_reward_and_beliefs_of_those_rewards():
    """--rl-relabel's RL rows: a task's rows hold other tasks' states whose rewards are this task's reward function,
    and their beliefs are the encoder's on the relabelled reward sequence (not the original one)."""
    torch.manual_seed(0)
    fam = make_family("PointRobot", "default")
    rng = np.random.RandomState(0)
    R, H = 24, fam.horizon
    task = np.repeat(fam.train_idx[:6], 4)
    obs = rng.uniform(-1, 1, (R, H, 2)).astype(np.float32)
    act = rng.uniform(-1, 1, (R, H, 2)).astype(np.float32)
    nobs = (obs + 0.1 * act).astype(np.float32)
    rew = borel.relabel_rewards(fam, task[:, None], obs, act, nobs)[0].astype(np.float32)
    roll = {"obs": obs, "next_obs": nobs, "actions": act, "rewards": rew, "terminals": np.zeros((R, H), bool),
            "success": np.zeros((R, H), bool), "task": task}
    mixed = borel.mix_rollouts(roll, fam, 1, np.random.RandomState(1))
    moved = np.any(mixed["obs"] != roll["obs"], axis=(1, 2))
    assert 0.3 < moved.mean() < 0.9
    want = borel.relabel_rewards(fam, mixed["task"][:, None], mixed["obs"], mixed["actions"], mixed["next_obs"])[0]
    np.testing.assert_allclose(mixed["rewards"], want, rtol=1e-5, atol=1e-5)
    assert np.any(np.abs(mixed["rewards"][moved] - rew[moved]) > 1e-3)  # same rows as before would score differently
    args = tiny_args(env_id="PointRobot")
    vae = borel.VAE(2, 2, 0, "point", args, done_bit=False)
    bits = borel.done_bits(H, 1, "cpu")
    t = borel.to_tensors(mixed, False, "cpu")
    bel = borel.beliefs(vae, t, bits)
    data = borel.HyperData(t, bel, goal_terminal=True)
    row = data.packed[0].reshape(4, H, -1)  # task 0's four (possibly relabelled) rollouts in order
    torch.testing.assert_close(row[..., data.slices["r"]][..., 0], t["rewards"][:4])
    torch.testing.assert_close(row[..., data.slices["x"]][..., 2:], bel[:4, :-1])
    orig = borel.beliefs(vae, borel.to_tensors(roll, False, "cpu"), bits)
    assert (bel[moved] - orig[moved]).abs().amax() > 1e-4


def test_vae_from_reuses_a_finished_vae_and_refuses_other_vae_settings(grid_ds, tmp_path):
    kw = dict(cuda=False, dataset=str(grid_ds.path), gru_hidden=16, hidden=16, vae_epochs=0.5, meta_batch=4,
              batch_size=32, updates_per_iter=10, eval_every=20, print_every=1000, log_every=10)
    borel.main(borel.Args(total_steps=0, run_dir=str(tmp_path / "vae"), **kw))
    borel.main(borel.Args(total_steps=20, run_dir=str(tmp_path / "rl"), vae_from=str(tmp_path / "vae"), vae_lr=1.0, **kw))
    src = torch.load(tmp_path / "vae" / "checkpoint.pt", weights_only=False)
    dst = torch.load(tmp_path / "rl" / "checkpoint.pt", weights_only=False)
    assert all(torch.equal(src["vae"][key], dst["vae"][key]) for key in src["vae"])  # no VAE update (lr 1 would show)
    summary = json.loads((tmp_path / "rl" / "summary.json").read_text())
    assert summary["total_steps"] == 20 and summary["extra"]["vae_source"]["vae_lr"] == 3e-4
    assert summary["method"] == "borel"  # named by the lr that trained the VAE, not this run's unused --vae-lr
    borel.main(borel.Args(total_steps=0, run_dir=str(tmp_path / "vae2"), **(kw | {"vae_lr": 1e-3})))
    assert json.loads((tmp_path / "vae2" / "summary.json").read_text())["method"] == "borel-vaelr0.001"
    with pytest.raises(Exception, match="gru_hidden"):
        borel.main(borel.Args(total_steps=20, run_dir=str(tmp_path / "bad"), vae_from=str(tmp_path / "vae"),
                              **(kw | {"gru_hidden": 8})))
    with pytest.raises(Exception, match="relabel"):
        borel.main(borel.Args(total_steps=20, run_dir=str(tmp_path / "bad2"), vae_from=str(tmp_path / "vae"),
                              relabel=False, **kw))
    with pytest.raises(Exception, match="relabel_episodes"):  # a VAE fitted on other relabelled rollouts
        borel.main(borel.Args(total_steps=20, run_dir=str(tmp_path / "bad3"), vae_from=str(tmp_path / "vae"),
                              relabel_episodes=3, **kw))
    with pytest.raises(SystemExit, match="drop --no-relabel"):
        borel.main(borel.Args(total_steps=20, run_dir=str(tmp_path / "bad5"), relabel=False, relabel_episodes=3, **kw))
    with pytest.raises(SystemExit, match="between 1 and k = 4"):
        borel.main(borel.Args(total_steps=20, run_dir=str(tmp_path / "bad4"), relabel_episodes=5, **kw))


def test_dqn_cql_term_is_the_log_sum_exp_gap_and_is_refused_for_sac():
    torch.manual_seed(0)
    args = tiny_args(env_id="GridNavi", cql_weight=2.0)
    nets = {"q": borel.EnsembleMlp(1, 12, 16, 5), "q_targ": borel.EnsembleMlp(1, 12, 16, 5)}
    b = {"x": torch.randn(3, 7, 12), "x2": torch.randn(3, 7, 12), "a": torch.randint(5, (3, 7)), "r": torch.randn(3, 7),
         "d": torch.zeros(3, 7)}
    q_all = nets["q"](b["x"])[0].detach()
    gap = (torch.logsumexp(q_all, -1) - q_all.gather(-1, b["a"][..., None]).squeeze(-1)).mean()
    opts = {"q": torch.optim.SGD(nets["q"].parameters(), lr=0.0)}
    stats = borel.dqn_update(nets, opts, b, args)
    assert float(stats["loss/cql_gap"]) == pytest.approx(float(gap), rel=1e-5) and float(gap) > 0
    # a step on the CQL term alone raises the data action's Q against the others
    args0 = tiny_args(env_id="GridNavi", cql_weight=1e6)
    opts = {"q": torch.optim.SGD(nets["q"].parameters(), lr=1e-7)}
    borel.dqn_update(nets, opts, b, args0)
    q_new = nets["q"](b["x"])[0].detach()
    gap_new = (torch.logsumexp(q_new, -1) - q_new.gather(-1, b["a"][..., None]).squeeze(-1)).mean()
    assert float(gap_new) < float(gap)
    with pytest.raises(SystemExit, match="DQN"):
        borel.main(borel.Args(env_id="PointRobot", cql_weight=1.0, relabel=False, cuda=False, run_dir="/nonexistent/x"))


def test_cells_belief_input_feeds_the_decoded_goal_probabilities_and_is_grid_only(grid_ds, tmp_path):
    kw = dict(cuda=False, dataset=str(grid_ds.path), gru_hidden=16, hidden=16, vae_epochs=0.5, meta_batch=4,
              batch_size=32, updates_per_iter=10, eval_every=10, print_every=1000, log_every=10)
    torch.manual_seed(0)
    args = tiny_args()
    vae = borel.VAE(2, 0, 5, "grid", args, done_bit=True, n_cells=25, grid_size=5)
    b = torch.randn(3, 7, 10)
    p = borel.policy_belief(vae, b, "cells")
    torch.testing.assert_close(p, torch.sigmoid(vae.dec(b[..., :5])))
    assert p.shape == (3, 7, 25) and borel.policy_belief(vae, b, "latent") is b
    borel.main(borel.Args(total_steps=10, run_dir=str(tmp_path / "cells"), belief_input="cells", **kw))
    summary = json.loads((tmp_path / "cells" / "summary.json").read_text())
    assert summary["method"] == "borel-cells" and summary["total_steps"] == 10
    state = torch.load(tmp_path / "cells" / "checkpoint.pt", weights_only=False)
    assert state["nets"]["q"]["weights.0"].shape == (1, 2 + 25, 16)  # the state and one probability per cell
    with pytest.raises(Exception, match="belief_input"):  # a cells checkpoint does not resume as the official input
        borel.main(borel.Args(total_steps=20, run_dir=str(tmp_path / "cells"), resume=True, **kw))
    with pytest.raises(SystemExit, match="GridNavi only"):
        borel.main(borel.Args(env_id="PointRobot", belief_input="cells", relabel=False, cuda=False, run_dir="/nonexistent/x"))
    with pytest.raises(SystemExit, match="latent or cells"):
        borel.main(borel.Args(belief_input="probs", cuda=False, run_dir="/nonexistent/x"))
    with pytest.raises(SystemExit, match="--elbo-latents must be"):
        borel.main(borel.Args(elbo_latents=-1, cuda=False, run_dir="/nonexistent/x"))


def test_double_dqn_target_scores_the_online_argmax_with_the_target_net():
    torch.manual_seed(0)
    nets = {"q": borel.EnsembleMlp(1, 12, 16, 5), "q_targ": borel.EnsembleMlp(1, 12, 16, 5)}  # independent inits
    b = {"x": torch.randn(3, 7, 12), "x2": torch.randn(3, 7, 12), "a": torch.randint(5, (3, 7)), "r": torch.randn(3, 7),
         "d": (torch.rand(3, 7) < 0.3).float()}
    q = nets["q"](b["x"])[0].detach().gather(-1, b["a"][..., None]).squeeze(-1)
    q2, qt2 = nets["q"](b["x2"])[0].detach(), nets["q_targ"](b["x2"])[0].detach()
    y_double = b["r"] + 0.99 * (1 - b["d"]) * qt2.gather(-1, q2.argmax(-1, keepdim=True)).squeeze(-1)
    y_plain = b["r"] + 0.99 * (1 - b["d"]) * qt2.max(-1).values
    assert not torch.allclose(y_double, y_plain)  # the two nets disagree on a' somewhere
    targ0 = {k: v.clone() for k, v in nets["q_targ"].state_dict().items()}
    for double, y in ((True, y_double), (False, y_plain)):
        nets["q_targ"].load_state_dict(targ0)  # undo the previous update's Polyak step
        opts = {"q": torch.optim.SGD(nets["q"].parameters(), lr=0.0)}
        stats = borel.dqn_update(nets, opts, b, tiny_args(env_id="GridNavi", double_q=double))
        assert float(stats["loss/q"]) == pytest.approx(float(((q - y) ** 2).mean()), rel=1e-5)
    with pytest.raises(SystemExit, match="DQN"):
        borel.main(borel.Args(env_id="PointRobot", double_q=True, relabel=False, cuda=False, run_dir="/nonexistent/x"))
