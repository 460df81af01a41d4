"""macaw.py: the closed-form inner step against a hand-rolled autograd step, second-order meta-gradients against
a per-task loop, AWR weights and losses against hand-computed values, the Monte-Carlo fields, batch sampling,
plumbing, and a short learning run on PointRobot."""

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from torch.func import functional_call

import macaw
from common.data import Dataset
from common.envs import make_family


def tiny_args(**kw):
    kw = dict(net_width=8, net_depth=2, cuda=False) | kw
    return macaw.resolve_args(macaw.Args(**kw))


def tiny_nets(wlinear=True, head=True, obs_dim=3, act_dim=2, seed=0, **kw):
    torch.manual_seed(seed)
    args = tiny_args(wlinear=wlinear, advantage_head=head, **kw)
    policy, value, meta, opts = macaw.make_nets(obs_dim, act_dim, args, "cpu")
    for m in (policy, value, meta):
        m.double()
    with torch.no_grad():  # lrs of different sizes per tensor, so a mix-up of the lr order shows
        meta["value_lrs"].copy_(torch.linspace(-3, -1, len(meta["value_lrs"])))
        meta["policy_lrs"].copy_(torch.linspace(-4, -1.5, len(meta["policy_lrs"])))
        meta["adv_coef"].fill_(math.log(0.3))
    return policy, value, meta, args


def fake_batch(n=32, obs_dim=3, act_dim=2, tasks=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    lead = (n,) if tasks is None else (tasks, n)
    return {"obs": torch.randn(*lead, obs_dim, generator=g, dtype=torch.float64),
            "actions": torch.rand(*lead, act_dim, generator=g, dtype=torch.float64) * 2 - 1,
            "mc_return": torch.randn(*lead, generator=g, dtype=torch.float64) * 3,
            "term_obs": torch.randn(*lead, obs_dim, generator=g, dtype=torch.float64),
            "term_discount": torch.rand(*lead, generator=g, dtype=torch.float64)}


def handrolled_step(module, params, loss_of_params, raw_lrs, create_graph):
    """theta_k - softplus(alpha_k) * dL/dtheta_k for every parameter tensor, with plain torch.autograd.grad."""
    names = list(params)
    grads = torch.autograd.grad(loss_of_params(params), [params[k] for k in names], create_graph=create_graph)
    lrs = torch.nn.functional.softplus(raw_lrs)
    return {k: params[k] - lrs[i] * g for i, (k, g) in enumerate(zip(names, grads))}


def generated(module, params):
    """The (W, b) a module generates from explicit parameter tensors."""
    clone = copy.deepcopy(module)
    with torch.no_grad():
        for k, v in clone.named_parameters():
            v.copy_(params[k])
    return clone.weights()


def handrolled_adapt(policy, value, meta, batch, args, create_graph=False):
    """The official inner loop with stepped parameters (higher-style): value step, then policy step."""
    pv = dict(value.named_parameters())
    pv1 = handrolled_step(value, pv, lambda p: ((functional_call(value, p, (batch["obs"],)).squeeze(-1)
                                                 - batch["mc_return"]) ** 2).mean(), meta["value_lrs"], create_graph)
    v = lambda x: functional_call(value, pv1, (x,)).squeeze(-1)
    with torch.no_grad():
        adv = batch["mc_return"] + batch["term_discount"] * v(batch["term_obs"]) - v(batch["obs"])
        norm = (adv - adv.mean()) / (adv.std() * args.adaptation_temp)
        w = norm.clamp(max=math.log(args.exp_advantage_clip)).exp()
    coef = torch.nn.functional.softplus(meta["adv_coef"])

    def policy_loss(p):
        if args.advantage_head:
            mean, adv_hat = functional_call(policy, p, (batch["obs"], batch["actions"]))
            extra = coef * (adv_hat.squeeze(-1) - adv) ** 2
        else:
            mean, extra = functional_call(policy, p, (batch["obs"],)), 0.0
        logp = torch.distributions.Normal(mean, args.action_sigma).log_prob(batch["actions"]).sum(-1)
        return (-w * logp + extra).mean()

    pp1 = handrolled_step(policy, dict(policy.named_parameters()), policy_loss, meta["policy_lrs"], create_graph)
    return pv1, pp1, adv, w


# ---------------------------------------------------------------------------------------------
# Inner step and meta-gradient
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wlinear,head", [(True, True), (False, True), (True, False)])
def test_inner_step_equals_a_handrolled_autograd_step(wlinear, head):
    policy, value, meta, args = tiny_nets(wlinear, head)
    batch = fake_batch()
    w_v1, target_v, w_pi1, adv, w = macaw.adapt(policy, value, value.weights(), policy.weights(), meta, batch, args)
    pv1, pp1, adv_ref, w_ref = handrolled_adapt(policy, value, meta, batch, args)
    for (a, b), (c, d) in zip(w_v1, generated(value, pv1)):
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, d)
    for (a, b), (c, d) in zip(w_pi1, generated(policy, pp1)):
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, d)
    torch.testing.assert_close(adv, adv_ref)
    torch.testing.assert_close(w, w_ref)
    # The step moved the weights, and the value target is phi soft-updated once toward phi' (alpha = 0.9).
    pv = dict(value.named_parameters())
    soft = {k: 0.9 * pv[k] + 0.1 * pv1[k] for k in pv}
    for (a, b), (c, d), (e, f) in zip(target_v, generated(value, soft), value.weights()):
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, d)
        assert not torch.allclose(a, e)


def meta_grads(policy, value, meta, inner, outer, args):
    for p in [*policy.parameters(), *value.parameters(), *meta.parameters()]:
        p.grad = None
    l_v, l_pi, _ = macaw.meta_losses(policy, value, meta, inner, outer, args)
    (l_v.sum() + l_pi.sum()).backward()
    return {f"{n}.{k}": torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, m in (("pi", policy), ("v", value), ("meta", meta))
            for k, p in m.named_parameters()}


def test_vmapped_meta_gradient_is_second_order_and_equals_a_per_task_loop():
    policy, value, meta, args = tiny_nets()
    inner, outer = fake_batch(tasks=3, seed=2), fake_batch(tasks=3, seed=3)
    g2 = meta_grads(policy, value, meta, inner, outer, args)
    # Reference: a Python loop over tasks, create_graph=True through hand-rolled steps (what ``higher`` does).
    for p in [*policy.parameters(), *value.parameters(), *meta.parameters()]:
        p.grad = None
    total = 0.0
    for i in range(3):
        b_in = {k: v[i] for k, v in inner.items()}
        b_out = {k: v[i] for k, v in outer.items()}
        pv1, pp1, _, _ = handrolled_adapt(policy, value, meta, b_in, args, create_graph=True)
        pv = dict(value.named_parameters())
        target = {k: (0.9 * pv[k] + 0.1 * pv1[k]).detach() for k in pv}
        v = lambda p, x: functional_call(value, p, (x,)).squeeze(-1)
        y = b_out["mc_return"] + b_out["term_discount"] * v(target, b_out["term_obs"])
        total = total + ((v(pv1, b_out["obs"]) - y) ** 2).mean()
        with torch.no_grad():
            adv = b_out["mc_return"] + b_out["term_discount"] * v(pv1, b_out["term_obs"]) - v(pv1, b_out["obs"])
            w = ((adv - adv.mean()) / adv.std()).clamp(max=math.log(20)).exp()
        mean = functional_call(policy, pp1, (b_out["obs"],))
        total = total - (w * torch.distributions.Normal(mean, 0.2).log_prob(b_out["actions"]).sum(-1)).mean()
    total.backward()
    for n, m in (("pi", policy), ("v", value), ("meta", meta)):
        for k, p in m.named_parameters():
            torch.testing.assert_close(g2[f"{n}.{k}"], p.grad, msg=f"{n}.{k}")
    # First order differs: the inner gradient's own dependence on the parameters is dropped.
    g1 = meta_grads(policy, value, meta, inner, outer, dataclasses.replace(args, first_order=True))
    diff = {k: (g1[k] - g2[k]).norm() / g2[k].norm().clamp(min=1e-12) for k in g2}
    assert diff["pi.layers.0.fc.weight"] > 1e-3 and diff["v.layers.0.fc.weight"] > 1e-3
    assert g1["meta.adv_coef"] == 0  # c acts only through the inner gradient, which first order treats as constant
    # Gradients reach every lr of the value net and of the policy trunk (9 tensors), the coefficient c and the head's
    # initialisation -- those two only through the inner step. The head's own lrs get none: the outer loss does not
    # read the adapted head (as in the official code).
    assert g2["meta.value_lrs"].abs().min() > 0 and g2["meta.policy_lrs"][:9].abs().min() > 0
    assert torch.all(g2["meta.policy_lrs"][9:] == 0)
    assert g2["meta.adv_coef"].abs() > 0 and g2["pi.layers.3.fc.weight"].abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Losses and weights against hand-computed values
# ---------------------------------------------------------------------------------------------


def test_awr_weights_match_hand_computed_values():
    adv = torch.tensor([1.0, 2.0, 3.0, 4.0])
    std = math.sqrt(5 / 3)  # unbiased std of 1..4
    expected = torch.tensor([math.exp((a - 2.5) / std) for a in (1, 2, 3, 4)])
    torch.testing.assert_close(macaw.awr_weights(adv, 1.0, 20.0), expected)
    # Temperature 0.1: the largest normalised advantage 1.5/0.1 = 15 > log 20 is clamped to 20; no lower clamp.
    w = macaw.awr_weights(torch.tensor([0.0, 0.0, 0.0, 10.0]), 0.1, 20.0)
    torch.testing.assert_close(w, torch.tensor([math.exp(-5.0)] * 3 + [20.0]))
    # An all-equal batch gives weights 1, not NaN (the eps guard).
    assert torch.equal(macaw.awr_weights(torch.full((5,), 3.0), 1.0, 20.0), torch.ones(5))


def test_losses_match_hand_computed_values():
    policy, value, meta, args = tiny_nets(obs_dim=1, act_dim=1)
    batch = {"obs": torch.zeros(2, 1, dtype=torch.float64), "actions": torch.tensor([[0.5], [-0.5]], dtype=torch.float64),
             "mc_return": torch.tensor([1.0, 3.0], dtype=torch.float64),
             "term_obs": torch.zeros(2, 1, dtype=torch.float64), "term_discount": torch.tensor([0.5, 0.0], dtype=torch.float64)}
    wv, wp = value.weights(), policy.weights()
    v0 = value(torch.zeros(1, 1, dtype=torch.float64)).item()
    mu = policy(torch.zeros(1, 1, dtype=torch.float64)).item()
    # inner: (v0 - 1)^2, (v0 - 3)^2; outer with target = the same net: y = R + gamma^k V(s_T)
    assert macaw.value_loss(value, wv, batch).item() == pytest.approx(((v0 - 1) ** 2 + (v0 - 3) ** 2) / 2)
    y = [1 + 0.5 * v0, 3.0]
    assert macaw.value_loss(value, wv, batch, wv).item() == pytest.approx(((v0 - y[0]) ** 2 + (v0 - y[1]) ** 2) / 2)
    torch.testing.assert_close(macaw.advantages(value, wv, batch),
                               torch.tensor([1 + 0.5 * v0 - v0, 3 - v0], dtype=torch.float64))
    logp = [-0.5 * ((a - mu) / 0.2) ** 2 - math.log(0.2) - 0.5 * math.log(2 * math.pi) for a in (0.5, -0.5)]
    w = torch.tensor([2.0, 0.5], dtype=torch.float64)
    assert macaw.awr_loss(policy, wp, batch, w, 0.2).item() == pytest.approx(-(2 * logp[0] + 0.5 * logp[1]) / 2)
    # The inner loss adds c (A_hat - A)^2 with the head's prediction.
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    _, adv_hat = policy.run(wp, batch["obs"], batch["actions"])
    extra = 0.3 * ((adv_hat.squeeze(-1) - adv) ** 2).mean().item()
    got = macaw.inner_policy_loss(policy, wp, batch, adv, w, 0.3, 0.2).item()
    assert got == pytest.approx(-(2 * logp[0] + 0.5 * logp[1]) / 2 + extra)


def test_architecture_matches_the_official_layout():
    torch.manual_seed(0)
    args = macaw.resolve_args(macaw.Args(cuda=False))
    policy, value, meta, _ = macaw.make_nets(20, 6, args, "cpu")
    # 4 trunk + 2 head WLinear layers (3 tensors each), value 4 layers; lrs start at softplus(log 1e-3) ~ 1e-3.
    assert len(list(policy.parameters())) == 18 and len(list(value.parameters())) == 12
    assert meta["policy_lrs"].shape == (18,) and meta["value_lrs"].shape == (12,)
    assert torch.nn.functional.softplus(meta["value_lrs"][0]).item() == pytest.approx(1e-3, rel=1e-3)
    assert policy.layers[1].fc.weight.shape == (100 * 100 + 100, 100)
    assert policy.layers[4].fc.weight.shape == (32 * (100 + 6) + 32, 100)  # head input: [h (100), a (6)]
    x, a = torch.randn(7, 20), torch.randn(7, 6)
    mean, adv = policy(x, a)
    assert mean.shape == (7, 6) and adv.shape == (7, 1) and mean.abs().max() < 1
    # Negative action components are zeroed by the head's ReLU (official quirk).
    torch.testing.assert_close(policy(x, a)[1], policy(x, a.clamp(min=0))[1])
    assert 2.3e6 < sum(p.numel() for p in policy.parameters()) < 3e6


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def toy_dataset(terminal_last: bool):
    """Task 0: episode 0 (3 steps, timeout), episode 1 (2 steps, terminal or cut). Task 1: one 2-step episode."""
    r = np.array([1.0, 2.0, 3.0, 10.0, 20.0, 5.0, 6.0], np.float32)
    nobs = np.arange(7, dtype=np.float32)[:, None] + 100
    arrays = {"rewards": r, "next_obs": nobs, "obs": nobs - 100, "actions": np.zeros((7, 1), np.float32),
              "episode_id": np.array([0, 0, 0, 1, 1, 0, 0], np.int32), "task_id": np.array([0, 0, 0, 0, 0, 1, 1], np.int32),
              "step": np.array([0, 1, 2, 0, 1, 0, 1], np.int32),
              "terminals": np.array([0, 0, 0, 0, terminal_last, 0, 0], bool)}
    return Dataset(path="toy", meta={}, arrays=arrays, tasks=np.zeros((2, 1), np.float32),
                   train_tasks=np.array([0]), test_tasks=np.array([1]), task_ptr=np.array([0, 5, 7]))


def test_monte_carlo_fields_follow_episode_boundaries_and_terminals():
    g = 0.9
    mc = macaw.monte_carlo_fields(toy_dataset(terminal_last=True), g)
    np.testing.assert_allclose(mc["mc_return"], [1 + g * 2 + g * g * 3, 2 + g * 3, 3, 10 + g * 20, 20, 5 + g * 6, 6], rtol=1e-6)
    np.testing.assert_array_equal(mc["term_obs"][:, 0], [102, 102, 102, 104, 104, 106, 106])
    # gamma^k with k = steps to the end; a true termination has no tail to bootstrap.
    np.testing.assert_allclose(mc["term_discount"], [g ** 3, g ** 2, g, 0, 0, g ** 2, g], rtol=1e-6)
    mc = macaw.monte_carlo_fields(toy_dataset(terminal_last=False), g)
    np.testing.assert_allclose(mc["term_discount"][3:5], [g ** 2, g], rtol=1e-6)


def test_batch_rows_are_distinct_random_or_one_contiguous_window():
    ds = toy_dataset(False)
    ds = Dataset(**{**ds.__dict__, "arrays": ds.arrays | macaw.monte_carlo_fields(ds, 0.9)})
    sampler = macaw.task_sampler(ds, [0, 1], "cpu")  # 5 and 2 rows
    gen = torch.Generator().manual_seed(0)
    rows = torch.tensor([0, 1, 0])
    for _ in range(20):
        idx = macaw.random_rows(sampler, rows, 2, gen)
        assert all(len(set(r.tolist())) == 2 for r in idx)
        assert idx[1].max() < 2 and idx[0].max() < 5
        win = macaw.contiguous_rows(sampler, torch.tensor([0]), 3, gen)
        assert win[0, 0] in (0, 1) and torch.equal(win[0], win[0, 0] + torch.arange(3))
    b = macaw.gather(sampler, torch.tensor([1]), torch.tensor([[1, 0]]))
    np.testing.assert_array_equal(b["obs"][0, :, 0].numpy(), [6, 5])


def test_buffer_skip_keeps_every_kth_row_per_task():
    ds = toy_dataset(False)
    sk = macaw.skip_rows(ds, 2)
    np.testing.assert_array_equal(sk["obs"][:, 0], [0, 2, 4, 5])
    np.testing.assert_array_equal(sk.task_ptr, [0, 3, 4])


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


def test_main_writes_summary_resumes_identically_and_refuses_bad_input(tmp_path):
    kw = dict(net_width=16, cuda=False, eval_every=10, print_every=1000, log_every=5, eval_draws=1,
              n_train_eval_tasks=2)
    macaw.main(macaw.Args(total_steps=20, run_dir=str(tmp_path / "full"), **kw))
    macaw.main(macaw.Args(total_steps=10, run_dir=str(tmp_path / "part"), **kw))
    macaw.main(macaw.Args(total_steps=20, run_dir=str(tmp_path / "part"), resume=True, **kw))
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    part = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert full["method"] == "macaw" and set(full["eval"]) == {"A", "pre"} and full["total_steps"] == 20
    assert len(full["eval"]["A"]["test_per_task"]) == 10
    assert part["eval"]["A"]["test_per_task"] == pytest.approx(full["eval"]["A"]["test_per_task"])
    assert part["eval"]["pre"]["test"] == pytest.approx(full["eval"]["pre"]["test"])
    with pytest.raises(FileExistsError):
        macaw.main(macaw.Args(total_steps=20, run_dir=str(tmp_path / "full"), **kw))
    with pytest.raises(Exception, match="checkpoint"):  # another architecture cannot resume this run
        macaw.main(macaw.Args(total_steps=30, run_dir=str(tmp_path / "full"), resume=True, **(kw | {"net_width": 8})))
    with pytest.raises(Exception, match="variant"):  # nor can the same nets trained on other inner batches
        macaw.main(macaw.Args(total_steps=30, run_dir=str(tmp_path / "full"), resume=True, **(kw | {"contiguous": False})))
    with pytest.raises(SystemExit, match="discrete"):
        macaw.main(macaw.Args(env_id="GridNavi", preset="borel", run_dir=str(tmp_path / "grid"), **kw))
    with pytest.raises(SystemExit, match="rows"):  # windows longer than a task's data
        macaw.main(macaw.Args(total_steps=1, buffer_skip=20, run_dir=str(tmp_path / "skip"), **kw))
    assert macaw.variant_name(macaw.Args(wlinear=False, first_order=True)) == "macaw-nowt-fo"
    cheetah = macaw.resolve_args(macaw.Args(env_id="HalfCheetahVel", preset="cpu"))
    assert macaw.variant_name(cheetah) == "macaw"  # the env's own buffer skip (7) is not a variant
    assert macaw.variant_name(dataclasses.replace(cheetah, contiguous=False, buffer_skip=1)) == "macaw-randinner-skip1"
    assert macaw.variant_name(dataclasses.replace(cheetah, outer_value_lr=1e-4)) == "macaw-vlr0.0001"
    assert macaw.variant_name(dataclasses.replace(cheetah, contiguous=False, adaptation_temp=0.5)) == "macaw-randinner-T0.5"


def test_reeval_reproduces_the_runs_own_final_evaluation(tmp_path):
    """benchmark/macaw_reeval.py rebuilds the nets from a run's checkpoint: with the run's own evaluation seed and
    draws it must give the run's final per-task returns (a missed net, lr or buffer setting would not)."""
    from benchmark import macaw_reeval
    kw = dict(net_width=16, cuda=False, eval_every=10, print_every=1000, log_every=5, eval_draws=1,
              n_train_eval_tasks=2, contiguous=False, seed=3)
    macaw.main(macaw.Args(total_steps=10, run_dir=str(tmp_path / "run"), **kw))
    own = json.loads((tmp_path / "run" / "summary.json").read_text())["eval"]["A"]["test_per_task"]
    row = macaw_reeval.reevaluate(tmp_path / "run", draws=1, chunk=1, seed=0, first_seed=10_000 * 3 + 10)
    assert row["method"] == "macaw-randinner" and row["step"] == 10
    assert [float(x) for x in row["per_task"].split()] == pytest.approx(own, abs=0.051)
    rows = macaw_reeval.main([str(tmp_path / "run"), "--draws", "4", "--chunk", "2", "--out", str(tmp_path / "r.csv")])
    assert rows[0]["adapted_se"] > 0 and (tmp_path / "r.csv").read_text().count("\n") == 2  # header + one row
    with pytest.raises(SystemExit, match="multiple"):
        macaw_reeval.main([str(tmp_path / "run"), "--draws", "3", "--chunk", "2", "--out", str(tmp_path / "r.csv")])


def test_short_run_adapts_on_point_robot():
    """200 meta-steps at width 32: the adapted test return must beat both the step-0 adapted return and the
    unadapted policy clearly (the one inner step carries the task); a broken inner step or meta-gradient
    does neither."""
    torch.manual_seed(0)
    args = tiny_args(net_width=32, net_depth=3, eval_draws=2)
    fam = make_family("PointRobot")
    _, samplers = macaw.load_buffers(args, fam, "cpu")  # the shared default dataset, built (~3 min) if missing
    policy, value, meta, opts = macaw.make_nets(fam.obs_dim, fam.act_dim, args, "cpu")
    train = samplers["train"]

    def test_returns():
        out = macaw.evaluate_split(policy, value, meta, samplers["test"], fam, fam.test_idx, args, "cpu", 7)
        return out["A"][0].mean(), out["pre"][0].mean()

    before, _ = test_returns()
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        rows = torch.randperm(len(fam.train_idx), generator=gen)[:5]
        inner = macaw.gather(train, rows, macaw.contiguous_rows(train, rows, 256, gen))
        outer = macaw.gather(train, rows, macaw.random_rows(train, rows, 256, gen))
        l_v, l_pi, _ = macaw.meta_losses(policy, value, meta, inner, outer, args)
        for o in opts.values():
            o.zero_grad()
        ((l_v.sum() + l_pi.sum()) / len(fam.train_idx)).backward()
        for o in opts.values():
            o.step()
    after, unadapted = test_returns()
    assert after > before + 2.0, (before, after)
    assert after > unadapted + 3.0, (after, unadapted)
