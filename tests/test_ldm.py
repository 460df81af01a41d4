"""ldm.py: the mixture weights' distribution, n = 1 returns the latent, dropout when imagining, the ELBO against a loop
over its terms (and its subsampled estimate), imaginary rollouts, the online policy GRU equals the batched one, the
double-DQN target, plumbing (resume, bad input), and a short run that learns."""

import json

import numpy as np
import pytest
import torch

import ldm
from common import collect
from common.data import load_dataset
from common.envs import make_family


@pytest.fixture(scope="module")
def grid_ds(tmp_path_factory):
    """A small GridNavi/ldm dataset: 10 random + 6 x 5 learning episodes per task (40 episodes = 10 rollouts)."""
    path = tmp_path_factory.mktemp("grid") / "grid.npz"
    collect.main(collect.Args(env_id="GridNavi", preset="ldm", out=str(path), iterations=6, threads=1))
    return load_dataset(path, "GridNavi", "ldm")


def tiny_args(**kw):
    return ldm.resolve_args(ldm.Args(**(dict(cuda=False) | kw)))


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_mixture_weights_follow_the_scaled_dirichlet(beta):
    n, g = 5, torch.Generator().manual_seed(0)
    alpha = ldm.mixture_weights(4000, 8, n, beta, g).double()  # (seq, dim, n)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(4000, 8, dtype=torch.float64), atol=1e-6, rtol=0)
    # marginal of Dirichlet(1_n) is Beta(1, n - 1): mean 1/n, variance (n - 1) / (n^2 (n + 1)); scaled by beta
    flat = alpha.reshape(-1, n)
    assert flat.mean(0).sub(1 / n).abs().max() < 0.01
    var = beta ** 2 * (n - 1) / (n ** 2 * (n + 1))
    assert flat.var(0).div(var).sub(1).abs().max() < 0.05
    lo = -(beta - 1) / n
    assert flat.min() >= lo - 1e-9 and (flat.min() < lo + 0.01)  # beta > 1 reaches below 0: extrapolation
    # independent per latent dimension: weights of two dims of one sequence are uncorrelated
    c = np.corrcoef(alpha[:, 0, 0].numpy(), alpha[:, 1, 0].numpy())[0, 1]
    assert abs(c) < 0.05


def test_mixture_of_one_latent_is_that_latent_and_mixes_per_dimension():
    z = torch.randn(3, 1, 7, 4)
    alpha = ldm.mixture_weights(3, 4, 1, 2.0)
    torch.testing.assert_close(alpha, torch.ones(3, 4, 1))
    torch.testing.assert_close(ldm.mix_latents(alpha, z), z[:, 0])
    z2 = torch.randn(1, 2, 1, 2)
    alpha2 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # dim 0 from latent 0, dim 1 from latent 1
    torch.testing.assert_close(ldm.mix_latents(alpha2, z2)[0, 0], torch.stack([z2[0, 0, 0, 0], z2[0, 1, 0, 1]]))


def test_decoder_dropout_is_active_when_imagining_and_the_mode_is_restored():
    torch.manual_seed(0)
    fam = make_family("GridNavi", "ldm")
    vae = ldm.LatentDynamics(fam, tiny_args(), done_bit=True)
    vae.eval()
    m = torch.randn(6, 30, 32)
    nobs = torch.randint(0, 7, (6, 30, 2)).float()
    r1 = ldm.imaginary_rewards(vae, m, None, None, nobs, dropout=True)
    r2 = ldm.imaginary_rewards(vae, m, None, None, nobs, dropout=True)
    r0 = ldm.imaginary_rewards(vae, m, None, None, nobs, dropout=False)
    assert not vae.training  # restored
    assert (r1 != r2).float().mean() > 0.9  # a fresh mask per row and call
    torch.testing.assert_close(r0, ldm.imaginary_rewards(vae, m, None, None, nobs, dropout=False))
    with torch.no_grad():
        torch.testing.assert_close(r0, 1.1 * torch.sigmoid(vae.decode(m, None, None, nobs)) - 0.1)
    assert r1.min() >= -0.1 and r1.max() <= 1.0  # the expected reward of {-0.1, +1}


@pytest.mark.parametrize("env", ["GridNavi", "PointRobot"])
def test_elbo_equals_a_loop_over_every_latent_and_every_reward(env):
    torch.manual_seed(0)
    fam = make_family(env, "ldm" if env == "GridNavi" else None)
    args = tiny_args(env_id=env, decoder_dropout=0.0)
    vae = ldm.LatentDynamics(fam, args, done_bit=True).double()
    B, T = 3, 6
    if env == "GridNavi":
        nobs, obs = torch.randint(0, 7, (B, T, 2)).double(), torch.randint(0, 7, (B, T, 2)).double()
        acts, rew = torch.randint(0, 5, (B, T)), (torch.rand(B, T) < 0.4).double() * 1.1 - 0.1
    else:
        nobs, obs, acts, rew = (torch.randn(B, T, 2).double(), torch.randn(B, T, 2).double(),
                                torch.rand(B, T, 2).double() * 2 - 1, torch.randn(B, T).double())
    batch = {"obs": obs, "next_obs": nobs, "actions": acts, "rewards": rew}
    bits = ldm.done_bits(3, 2, "cpu").double()
    loss, rec, kl = ldm.elbo_loss(vae, batch, bits, 0.5, torch.Generator().manual_seed(3))
    # the same noise, then the ELBO term by term
    mu, logvar, _ = vae.encode(acts.transpose(0, 1), nobs.transpose(0, 1), rew.T, bits[:, None, None].expand(-1, B, 1))
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(3), dtype=mu.dtype)
    z = mu + (0.5 * logvar).exp() * eps
    rec_ref, kl_ref = 0.0, 0.0
    for b in range(B):
        for t in range(T + 1):
            for j in range(T):
                p = vae.decode(z[t, b], obs[b, j], acts[b, j] if env != "GridNavi" else None, nobs[b, j])
                if env == "GridNavi":
                    rec_ref += torch.nn.functional.binary_cross_entropy_with_logits(p, (rew[b, j] == 1.0).double())
                else:
                    rec_ref += (p - rew[b, j]) ** 2
            prev_mu = mu[t - 1, b] if t else torch.zeros_like(mu[0, b])
            prev_lv = logvar[t - 1, b] if t else torch.zeros_like(mu[0, b])
            var_q, var_p = logvar[t, b].exp(), prev_lv.exp()
            kl_ref += 0.5 * (prev_lv - logvar[t, b] + (var_q + (mu[t, b] - prev_mu) ** 2) / var_p - 1).sum()
    torch.testing.assert_close(rec, rec_ref / B)
    torch.testing.assert_close(kl, kl_ref / B)
    torch.testing.assert_close(loss, rec + 0.5 * kl)
    # the subsampled reconstruction is an unbiased estimate of the full one
    est = torch.stack([ldm.elbo_loss(vae, batch, bits, 0.5, torch.Generator().manual_seed(3 + 1000 * i), 2)[1]
                       for i in range(400)])
    full = torch.stack([ldm.elbo_loss(vae, batch, bits, 0.5, torch.Generator().manual_seed(3 + 1000 * i))[1]
                        for i in range(400)])
    assert abs(est.mean() - full.mean()) < 4 * est.std() / 20 + 1e-9


def test_imaginary_rollouts_mix_distinct_tasks_and_keep_the_host_transitions(grid_ds):
    fam = make_family("GridNavi", "ldm")
    roll = ldm.to_tensors(ldm.build_rollouts(grid_ds, fam, fam.train_idx, 4), True, "cpu")
    R, T = roll["rewards"].shape
    assert T == 120 and R == 18 * (len(grid_ds["step"][grid_ds.task_slice(0)]) // 120)
    bits = ldm.done_bits(30, 4, "cpu")
    vae = ldm.LatentDynamics(fam, tiny_args(), done_bit=True)
    mu, logvar = ldm.posteriors(vae, roll, bits)
    assert mu.shape == (R, T + 1, 32)
    # the belief before any step is the prior of a zero hidden state, the same for every rollout
    torch.testing.assert_close(mu[:, 0], mu[:1, 0].expand(R, -1))
    mixer = ldm.Mixer(vae, roll, mu, logvar, n=14, beta=1.0, dropout=True)
    g = torch.Generator().manual_seed(0)
    b = mixer.sample(64, g)
    assert b["rewards"].shape == (64, T) and b["obs"].shape == (64, T, 2)
    assert b["rewards"].min() >= -0.1 and b["rewards"].max() <= 1.0
    # every host rollout is a stored one (transitions unchanged), only rewards are new
    stored = {tuple(map(tuple, [o.flatten().tolist(), a.tolist()])) for o, a in zip(roll["obs"], roll["actions"])}
    for o, a in zip(b["obs"], b["actions"]):
        assert (tuple(o.flatten().tolist()), tuple(a.tolist())) in stored
    # the n mixed rollouts come from n distinct tasks, and every task is used
    tasks = roll["task"][mixer.pick(500, g)]
    assert all(len(set(r.tolist())) == 14 for r in tasks)
    assert set(tasks.flatten().tolist()) == set(fam.train_idx.tolist())
    with pytest.raises(SystemExit, match="distinct training tasks"):
        ldm.Mixer(vae, roll, mu, logvar, n=19, beta=1.0, dropout=True)


def test_relabel_pool_scores_other_tasks_rollouts_with_the_targets_reward(grid_ds):
    fam = make_family("GridNavi", "ldm")
    roll = ldm.build_rollouts(grid_ds, fam, fam.train_idx, 4)
    pool = ldm.relabel_pool(roll, fam, 2000, np.random.RandomState(0))
    host, target = pool["host"], pool["target"]
    assert np.all(target != roll["task"][host]) and set(target.tolist()) == set(fam.train_idx.tolist())
    goal = fam.tasks[target][:, None]  # (P, 1, 2): the target's goal cell against each next state
    want = np.where(np.all(roll["next_obs"][host] == goal, -1), 1.0, -0.1)
    np.testing.assert_allclose(pool["rewards"], want, atol=1e-6)
    # same transitions, different task: the relabelled rewards differ from the stored ones in many rollouts
    assert np.mean(np.any(np.abs(pool["rewards"] - roll["rewards"][host]) > 1e-6, 1)) > 0.3


def test_online_policy_gru_equals_the_batched_pass_and_dqn_target():
    torch.manual_seed(0)
    fam = make_family("GridNavi", "ldm")
    args = tiny_args()
    nets, opts = ldm.make_policy(fam, args, True, "cpu")
    B, T = 4, 8
    b = {"obs": torch.randint(0, 7, (B, T, 2)).float(), "next_obs": torch.randint(0, 7, (B, T, 2)).float(),
         "actions": torch.randint(0, 5, (B, T)), "rewards": torch.rand(B, T), "terminals": torch.zeros(B, T)}
    bits = ldm.done_bits(4, 2, "cpu")
    with torch.no_grad():
        f = ldm.policy_inputs(nets["enc"], b, bits, False)  # (T+1, B, F)
    h = torch.zeros(1, B, args.policy_gru)
    torch.testing.assert_close(nets["enc"].heads(h[0]), f[0])
    for t in range(T):
        h = ldm.encoder_step(nets["enc"], h, b["actions"][:, t], b["next_obs"][:, t], b["rewards"][:, t], float(bits[t]))
        torch.testing.assert_close(nets["enc"].heads(h[0]), f[t + 1], atol=1e-5, rtol=1e-5)
    # the double-DQN target, by hand: online argmax at t+1, target net's value, no bootstrap after the last step
    nets["q_targ"].weights[-1].data.add_(0.3)  # make target and online nets differ
    with torch.no_grad():
        q_on = nets["q"](f)[0]
        q_tg = nets["q_targ"](ldm.policy_inputs(nets["enc_targ"], b, bits, False))[0]
        a_star = q_on[1:].argmax(-1)
        y = b["rewards"].T + 0.95 * q_tg[1:].gather(-1, a_star[..., None]).squeeze(-1)
        y[-1] = b["rewards"][:, -1]
        q = q_on[:-1].gather(-1, b["actions"].T[..., None]).squeeze(-1)
    loss = ldm.dqn_update(nets, opts, b, bits, args, bootstrap_end=False)["loss/q"]
    torch.testing.assert_close(loss, ((q - y) ** 2).mean())
    d = ldm.dones(b | {"terminals": torch.eye(B, T)}, bootstrap_end=True)
    torch.testing.assert_close(d, torch.eye(B, T).T)


def test_grid_probe_counts_test_cells(grid_ds):
    torch.manual_seed(0)
    fam = make_family("GridNavi", "ldm")
    roll = ldm.to_tensors(ldm.build_rollouts(grid_ds, fam, fam.train_idx, 4), True, "cpu")
    vae = ldm.LatentDynamics(fam, tiny_args(), done_bit=True)
    # a decoder whose logit is the cell's x coordinate through ONE embedding unit (dropped with p = 0.7)
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        vae.dec_s.weight[0, 0] = 1.0
        vae.dec_in_x.weight[0, 0] = 1.0
        for layer in vae.dec_rest:
            if isinstance(layer, torch.nn.Linear):
                layer.weight[0, 0] = 1.0
    mu, logvar = ldm.posteriors(vae, roll, ldm.done_bits(30, 4, "cpu"))
    mixer = ldm.Mixer(vae, roll, mu, logvar, n=14, beta=1.0, dropout=True)
    out = ldm.grid_probe(vae, mixer, fam, n_latents=200, generator=torch.Generator().manual_seed(0))
    # without dropout every argmax is cell (6, 0) (first of the x = 6 column): a training goal
    assert out["mix_argmax_test_no_dropout"] == 0.0
    # with dropout 0.7 all seven x = 6 cells are masked w.p. 0.7^7 = 0.08; then an unmasked x = 5 cell, (5, y <= 5) a
    # test cell, wins most of the time
    assert 0.02 < out["mix_argmax_test_dropout"] < 0.2
    assert 0.0 <= out["own_goal_argmax"] <= 1.0


def test_main_writes_bamdp_episodes_and_resumes_identically(grid_ds, tmp_path):
    kw = dict(cuda=False, dataset=str(grid_ds.path), vae_steps=30, elbo_latents=8, batch_size=16, eval_every=20,
              print_every=1000, log_every=10, policy_gru=32)
    ldm.main(ldm.Args(total_steps=40, run_dir=str(tmp_path / "full"), **kw))
    ldm.main(ldm.Args(total_steps=20, run_dir=str(tmp_path / "part"), **kw))
    ldm.main(ldm.Args(total_steps=40, run_dir=str(tmp_path / "part"), resume=True, **kw))
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    part = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert full["method"] == "ldm" and set(full["eval"]) == {"B_sum", "B_ep1", "B_ep2", "B_ep3", "B_ep4", "A"}
    assert len(full["eval"]["B_sum"]["test_per_task"]) == 27 and full["eval"]["B_sum"]["train"] is not None
    assert full["extra"]["imaginary_per_batch"] == 2 and set(full["extra"]["probe"]) >= {"mix_argmax_test_dropout"}
    ep = [np.array(full["eval"][f"B_ep{e}"]["test_per_task"]) for e in range(1, 5)]
    np.testing.assert_allclose(sum(ep), full["eval"]["B_sum"]["test_per_task"], atol=1e-9)
    assert np.all(np.abs(ep[0]) <= 30 + 1e-6)  # one 30-step episode: rewards in {-0.1, 1}
    for mode in full["eval"]:
        assert part["eval"][mode]["test_per_task"] == pytest.approx(full["eval"][mode]["test_per_task"])
    with pytest.raises(FileExistsError):
        ldm.main(ldm.Args(total_steps=40, run_dir=str(tmp_path / "full"), **kw))
    for n_mix, name in ((0, "ldm-nomix"), (4, "ldm-mix4")):  # ablations get their own rows in the results table
        ldm.main(ldm.Args(total_steps=0, n_mix=n_mix, run_dir=str(tmp_path / name), **kw))
        assert json.loads((tmp_path / name / "summary.json").read_text())["method"] == name
    with pytest.raises(SystemExit, match="n-mix"):
        ldm.main(ldm.Args(total_steps=40, run_dir=str(tmp_path / "bad"), **(kw | {"n_mix": 16})))
    ldm.main(ldm.Args(total_steps=20, relabel_share=0.5, run_dir=str(tmp_path / "rel"), **kw))
    rel = json.loads((tmp_path / "rel" / "summary.json").read_text())
    assert rel["method"] == "ldm-relabel" and rel["extra"]["relabelled_per_batch"] == 7  # round(0.5 x 14 real)
    with pytest.raises(Exception, match="relabel_share"):  # a plain checkpoint does not resume as the variant
        ldm.main(ldm.Args(total_steps=60, relabel_share=0.5, resume=True, run_dir=str(tmp_path / "part"), **kw))
    with pytest.raises(SystemExit, match="relabel-share"):
        ldm.main(ldm.Args(total_steps=20, relabel_share=1.5, run_dir=str(tmp_path / "bad2"), **kw))
    with pytest.raises(SystemExit, match="relabel"):  # MuJoCo rewards cannot be recomputed, refused before any data
        ldm.main(ldm.Args(env_id="HalfCheetahVel", preset="cpu", relabel_share=0.5, run_dir=str(tmp_path / "hc"),
                          cuda=False))
    with pytest.raises(Exception, match="GridNavi"):  # a dataset of another family
        ldm.main(ldm.Args(env_id="PointRobot", dataset=str(grid_ds.path), run_dir=str(tmp_path / "pr"), cuda=False))


def test_short_run_learns_to_find_training_goals(grid_ds, tmp_path):
    """600 updates on the small dataset (with 2 of 16 rollouts imaginary): the 4-episode return on the 18 training goals
    goes from -12 (the untrained net stands still) above the best task-agnostic policy's -4.9 (measured: +0.9)."""
    ldm.main(ldm.Args(cuda=False, dataset=str(grid_ds.path), vae_steps=50, elbo_latents=8, total_steps=600, eval_every=600,
                      batch_size=16, policy_gru=32, print_every=10**6, run_dir=str(tmp_path / "learn")))
    s = json.loads((tmp_path / "learn" / "summary.json").read_text())
    first = s["extra"]["first_eval"]
    assert first["B_train_sum"] < -9
    assert s["eval"]["B_sum"]["train"] > -3.0
