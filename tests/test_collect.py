"""The collector's batched learners: T stacked networks behave exactly like T independent ones."""

import copy

import numpy as np
import pytest
import torch

from common.collect import BatchedLinear, TanhGaussianActor, TwinQ, batched_mlp, learner_features, sac_update
from common.envs import make_family


def test_batched_mlp_members_are_independent_networks():
    torch.manual_seed(0)
    net = batched_mlp(3, 4, 2, hidden=8, layers=2)
    x = torch.randn(3, 5, 4)
    out = net(x)
    for t in range(3):  # member t equals a plain MLP with member t's weights
        h = x[t]
        for m in net:
            h = h @ m.weight[t] + m.bias[t] if isinstance(m, BatchedLinear) else m(h)
        assert torch.allclose(out[t], h, atol=1e-6)
    # The summed loss gives each member the gradient of its own loss alone.
    loss = (out ** 2).mean(dim=(1, 2))
    loss.sum().backward()
    g_sum = net[0].weight.grad.clone()
    net.zero_grad()
    loss_1 = (net(x)[1] ** 2).mean()
    loss_1.backward()
    assert torch.allclose(g_sum[1], net[0].weight.grad[1], atol=1e-7)
    assert net[0].weight.grad[0].abs().sum() == 0 and net[0].weight.grad[2].abs().sum() == 0


def test_twin_q_layout_and_tanh_gaussian_log_prob():
    torch.manual_seed(0)
    q = TwinQ(2, 3, 2, hidden=8, layers=1)
    obs, act = torch.randn(2, 4, 3), torch.rand(2, 4, 2)
    out = q(obs, act)
    assert out.shape == (2, 2, 4)  # (twin, task, batch)
    x = torch.cat([obs, act], -1)
    w0, b0, w1, b1 = q.net[0].weight, q.net[0].bias, q.net[2].weight, q.net[2].bias
    member = lambda m, t: (torch.relu(x[t] @ w0[m] + b0[m]) @ w1[m] + b1[m]).squeeze(-1)
    assert torch.allclose(out[1, 0], member(2, 0), atol=1e-6)  # Q2 of task 0 is member T + 0
    # log-prob of tanh(u), u ~ N(mean, std), against the change-of-variables formula
    actor = TanhGaussianActor(1, 3, 2, hidden=8, layers=1)
    torch.manual_seed(1)
    a, logp = actor(torch.randn(1, 1000, 3))
    assert a.abs().max() < 1 and torch.isfinite(logp).all()
    u = torch.atanh(a.clamp(-0.999999, 0.999999))
    torch.manual_seed(1)
    obs = torch.randn(1, 1000, 3)
    m, ls = actor.net(obs).chunk(2, -1)
    ref = (torch.distributions.Normal(m, ls.clamp(-20, 2).exp()).log_prob(u) - torch.log(1 - a ** 2 + 1e-12)).sum(-1)
    ok = (a.abs() < 0.999).all(-1)  # away from the saturated tails where atanh loses precision
    assert torch.allclose(logp[ok], ref[ok], atol=1e-3)


def test_auto_alpha_moves_toward_the_target_entropy():
    torch.manual_seed(0)
    T, obs_dim, act_dim = 2, 3, 2
    actor, critic = TanhGaussianActor(T, obs_dim, act_dim, 16, 2), TwinQ(T, obs_dim, act_dim, 16, 2)
    critic_targ = copy.deepcopy(critic)
    log_alpha = torch.nn.Parameter(torch.zeros(T, 1))
    opt_a = torch.optim.Adam([log_alpha], lr=0.1)
    batch = {"obs": torch.randn(T, 64, obs_dim), "actions": torch.rand(T, 64, act_dim) * 2 - 1,
             "rewards": torch.randn(T, 64), "next_obs": torch.randn(T, 64, obs_dim), "terminals": torch.zeros(T, 64)}
    with torch.no_grad():
        entropy = -actor(batch["obs"])[1].mean(-1)
    sac_update(actor, critic, critic_targ, torch.optim.Adam(critic.parameters()), torch.optim.Adam(actor.parameters()),
               batch, None, 0.99, 0.005, log_alpha, opt_a)
    # entropy above the target -act_dim -> alpha must shrink (and grow where it is below)
    assert torch.equal((log_alpha.detach().squeeze(1) < 0), entropy > -act_dim)


def test_learner_features_drop_the_cheetah_x_position():
    pytest.importorskip("mujoco")
    fam = make_family("HalfCheetahVel", "cpu")
    feat, n = learner_features(fam, {"drop_obs": [17]})
    obs = torch.arange(20.0).expand(2, 3, 20)
    assert n == 19 and feat(obs).shape == (2, 3, 19) and 17.0 not in feat(obs)[0, 0]


def test_learner_features_one_hot_grid_and_identity():
    grid = make_family("GridNavi", "borel")
    feat, n = learner_features(grid, {})
    one_hot = feat(torch.tensor([[[2.0, 3.0]]]))
    assert n == 25 and one_hot[0, 0].argmax() == 2 * 5 + 3 and one_hot.sum() == 1
    assert np.isclose(float(learner_features(make_family("PointRobot"), {})[0](torch.ones(2)).sum()), 2.0)
