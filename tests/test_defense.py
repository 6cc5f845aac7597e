"""Input entropy reduction and the views that attack it.

The toy DEQs (float64, batch-invariant products) check the algorithm exactly: per-example independence, the
f count, the end-to-end gradient against finite differences. The trained micro MDEQ on real Fashion-MNIST
images checks what the defense is for: it lowers the prediction entropy, and every attack view's value is
the defended prediction bit for bit.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
import torch
from deq_toys import DTYPE, inputs, linear_toy, tanh_toy
from micro_models import DEQ_CONFIG, DEQ_DEPLOY, FIXTURES

from bench.checkpoints import load_into, load_state_dict
from bench.data import load_dataset
from bench.defenses import (
    AdaptiveView,
    BPDAView,
    EntropyReduction,
    defended_logits,
    judge,
    parse_defense,
    prediction_entropy,
)
from bench.deq.view import count_f_evals
from bench.errors import BenchError
from models.deq import DeployConfig
from models.factory import build_architecture

PAPER = "entropy-reduction:stages=4,steps=10,alpha=2/255,eps=8/255,solver_steps=2,tol=0.001,stop=rel"
SMALL = EntropyReduction(stages=3, steps=4, alpha=0.02, eps=0.1)  # for the toys (inputs in [0, 1]^5)
FROZEN = EntropyReduction(stages=2, steps=2, alpha=0.02, eps=0.1, solver_steps=3, tol=0.0125)


@pytest.fixture(scope="module")
def micro():
    """The trained micro MDEQ, 8 real Fashion-MNIST test images and their paper-default defended run."""
    model = build_architecture("mdeq", DEQ_CONFIG)
    model.deploy = DeployConfig(**{**model.deploy.to_dict(), **DEQ_DEPLOY})
    state_dict, _ = load_state_dict(FIXTURES / "deq-micro.safetensors", None)
    load_into(model, state_dict)
    model.eval()
    data = load_dataset("fashion-mnist-builtin", n_examples=8)
    return model, data.x, data.y, EntropyReduction().run(model, data.x)


def _toy():
    return tanh_toy(rho=0.9, solver="broyden", max_iter=8, tol=1e-3).eval()


# ----- spec strings ---------------------------------------------------------------------------------------


def test_default_spec_is_the_papers_configuration_and_round_trips():
    d = EntropyReduction.parse("entropy-reduction")
    assert d == EntropyReduction() and d.spec == PAPER
    assert (d.stages, d.steps, d.alpha, d.eps, d.solver_steps) == (4, 10, 2 / 255, 8 / 255, 2)
    custom = EntropyReduction.parse(" entropy-reduction: steps=3 ,eps=0.05,alpha=1/255,stop=abs,tol=1e-4 ")
    assert (custom.steps, custom.eps, custom.alpha, custom.stop_mode, custom.tol) == (
        3,
        0.05,
        1 / 255,
        "abs",
        1e-4,
    )
    assert EntropyReduction.parse(custom.spec) == custom
    assert parse_defense("none") is None and parse_defense(PAPER) == d


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("entropy-reductin", "unknown defense"),
        ("entropy-reduction:stage=4", "did you mean 'stages'"),
        ("entropy-reduction:stages=0", "stages must be an integer >= 1"),
        ("entropy-reduction:steps=-1", "steps must be an integer >= 0"),
        ("entropy-reduction:steps=2.5", "steps must be an integer"),
        ("entropy-reduction:alpha=2/0", "alpha must be a number"),
        ("entropy-reduction:eps=-0.1", "eps must be a number"),
        ("entropy-reduction:eps=nan", "eps must be a number"),
        ("entropy-reduction:stop=max", "stop must be 'rel' or 'abs'"),
        ("entropy-reduction:steps=1,steps=2", "given twice"),
        ("entropy-reduction:steps", "expected key=value"),
        ("entropy-reduction:", "expected key=value"),
    ],
)
def test_bad_specs_raise_one_readable_error(spec, message):
    with pytest.raises(BenchError, match=message):
        parse_defense(spec)


def test_bad_parameters_and_train_mode_are_refused():
    with pytest.raises(BenchError, match="solver_steps"):
        EntropyReduction(solver_steps=0)
    model = _toy().train()
    with pytest.raises(BenchError, match="eval mode"):
        SMALL.run(model, inputs(2))


# ----- the algorithm, exactly, on toys --------------------------------------------------------------------


@pytest.mark.parametrize(("stages", "steps", "solver_steps"), [(4, 10, 2), (3, 4, 3), (1, 5, 2), (3, 0, 1)])
def test_f_evaluations_are_counted_and_match_the_cost_formula(stages, steps, solver_steps):
    # every stage: its initial f (the lift's f for s >= 1) + T_f Broyden steps; every later stage: R input
    # steps with one f forward + backward each. Paper defaults: 4 * 3 + 3 * 10 = 42 f's, 30 backwards.
    d = EntropyReduction(stages=stages, steps=steps, solver_steps=solver_steps, alpha=0.02, eps=0.1)
    model = _toy()
    with count_f_evals(model) as counter:
        result = d.run(model, inputs(3))
    expected = stages * (1 + solver_steps) + (stages - 1) * steps
    assert counter.calls == result.f_evals == d.cost()["f_forward"] == expected
    assert result.f_backward == d.cost()["f_backward"] == (stages - 1) * steps
    assert len(result.states) == d.n_states == stages * solver_steps
    assert result.entropy_before.shape == result.entropy_after.shape == (3, stages - 1)


def test_one_examples_result_does_not_depend_on_its_batch():
    model, x = _toy(), inputs(6)
    batch = SMALL.run(model, x)
    for i in range(x.shape[0]):
        alone = SMALL.run(model, x[i : i + 1])
        assert all(torch.equal(a[i : i + 1], b) for a, b in zip(batch.states, alone.states, strict=True))
        assert torch.equal(batch.x_purified[i : i + 1], alone.x_purified)
        assert torch.equal(batch.signs[:, i : i + 1], alone.signs)


def test_first_stage_is_plain_broyden_and_input_moves_only_between_stages():
    from bench.deq.solvers import solve

    model, x = _toy(), inputs(4)
    result = SMALL.run(model, x)
    with torch.no_grad():
        u = model.inject(x)
        plain = solve(model.f, model.init_state(u), "broyden", SMALL.solver_steps, SMALL.tol, u=u)
    first = result.states[: SMALL.solver_steps]
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(first, plain.states, strict=True))
    assert torch.equal(result.stage_inputs[0], x) and not torch.equal(result.stage_inputs[1], x)
    replayed = SMALL.replay(x, result.signs)
    assert all(torch.equal(a, b) for a, b in zip(replayed, result.stage_inputs, strict=True))


def _good_broyden(b: torch.Tensor, dz: torch.Tensor, dg: torch.Tensor) -> torch.Tensor:
    """Dense rank-one update of an inverse-Jacobian estimate b so that b_new dg = dz."""
    v = b.T @ dz
    return b + torch.outer((dz - b @ dg) / (v @ dg), v)


def test_second_stage_starts_with_the_lifted_memory_then_uses_fresh_memory():
    # dense re-derivation, row by row: stage 0 builds B = -I + two columns; the lift recomputes the second
    # from dg + g_new(z_s) - g_old(z_s); stage 1's first step is z_s - B_lift g_new(z_s), its second a
    # Broyden step whose memory starts again from -I.
    model, x = _toy(), inputs(3)
    d = EntropyReduction(stages=2, steps=3, alpha=0.02, eps=0.1, solver_steps=2, tol=0.0)
    result = d.run(model, x)
    eye = torch.eye(8, dtype=DTYPE)
    with torch.no_grad():
        u_old, u_new = model.inject(result.stage_inputs[0]), model.inject(result.stage_inputs[1])
        for i in range(3):

            def g(z, u, i=i):
                return model.f(z[None], u[i : i + 1])[0] - z

            z0 = torch.zeros(8, dtype=DTYPE)
            z1, z2 = result.states[0][i], result.states[1][i]
            b0 = _good_broyden(-eye, z1 - z0, g(z1, u_old) - g(z0, u_old))
            zs = z1 if result.rel_residual[i, 0] < result.rel_residual[i, 1] else z2
            dg_lift = g(z2, u_old) - g(z1, u_old) + g(zs, u_new) - g(zs, u_old)
            z3 = zs - _good_broyden(b0, z2 - z1, dg_lift) @ g(zs, u_new)
            assert torch.allclose(result.states[2][i], z3, rtol=0, atol=1e-12)
            b1 = _good_broyden(-eye, z3 - zs, g(z3, u_new) - g(zs, u_new))
            assert torch.allclose(result.states[3][i], z3 - b1 @ g(z3, u_new), rtol=0, atol=1e-12)


def test_a_row_that_converges_inside_a_stage_is_frozen():
    model, d = linear_toy(rho=0.3).eval(), FROZEN  # rel. residuals after 2 steps: 0.0092 .. 0.0136
    result = d.run(model, inputs(4))
    stopped = result.rel_residual[:, 1] < d.tol
    assert 0 < int(stopped.sum()) < 4
    for i in range(4):
        assert torch.equal(result.states[1][i], result.states[2][i]) == bool(stopped[i])
    assert torch.equal(result.nsteps < d.n_states, stopped | (result.rel_residual[:, 4] < d.tol))
    assert torch.equal(result.rel_residual[stopped, 2], result.rel_residual[stopped, 1])


@pytest.mark.parametrize("case", ["tanh", "frozen-rows"])
def test_adaptive_bptt_gradient_is_the_defended_prediction_s_derivative(case):
    model, defense = (_toy(), SMALL) if case == "tanh" else (linear_toy(rho=0.3).eval(), FROZEN)
    x = inputs(4)
    weights = torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    xa = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((AdaptiveView(model, defense)(xa) * weights).sum(), xa)
    h, fd = 1e-6, torch.zeros_like(x)
    for j in range(x.shape[1]):
        e = torch.zeros_like(x)
        e[:, j] = h
        diff = defended_logits(model, defense, x + e) - defended_logits(model, defense, x - e)
        fd[:, j] = (diff * weights).sum(1) / (2 * h)
    assert torch.allclose(grad, fd, rtol=0, atol=1e-7)


# ----- the trained micro MDEQ on real images ----------------------------------------------------------


def test_defense_lowers_the_prediction_entropy_on_real_images(micro):
    model, x, _, result = micro
    undefended = EntropyReduction(steps=0).run(model, x)  # same staged solver, input never updated
    assert torch.equal(undefended.x_purified, x)
    with torch.no_grad():
        h_defended = prediction_entropy(model.head(result.states[-1]))
        h_plain = prediction_entropy(model.head(undefended.states[-1]))
    assert h_defended.mean() < 0.9 * h_plain.mean()
    assert (h_defended < h_plain).float().mean() >= 0.75
    # each stage's objective H(head(f(z_s; x~))) goes down with its R steps
    assert (result.entropy_after < result.entropy_before).float().mean() >= 0.75


def test_purified_input_stays_in_the_eps_ball_and_the_image_range(micro):
    _, x, _, result = micro
    for xt in result.stage_inputs:
        assert (xt - x).abs().max() <= 8 / 255 + 1e-6
        assert xt.min() >= 0 and xt.max() <= 1
    assert (result.x_purified - x).abs().max() > 4 / 255  # it did move


@pytest.mark.parametrize("readout", ["final", "ensemble-logit"])
def test_every_view_s_value_is_the_defended_prediction_and_gradients_differ(micro, readout):
    model, x, y, _ = micro
    x, y = x[:4], y[:4]
    defense = EntropyReduction(stages=3, steps=4)  # 6 states; cheaper than the paper's, same code paths
    expected = defended_logits(model, defense, x, readout)
    grads = {}
    for name, view in (
        ("bpda", BPDAView(model, defense, readout, "unroll:5:0.5")),
        ("adaptive-bptt", AdaptiveView(model, defense, readout)),
        ("adaptive-state", AdaptiveView(model, defense, readout, "state:5:2:1")),
    ):
        xa = x.clone().requires_grad_(True)
        out = view(xa)
        assert torch.equal(out.detach(), expected), name
        assert view.last_stats["f_evals"] == defense.cost()["f_forward"]
        (grads[name],) = torch.autograd.grad(torch.nn.functional.cross_entropy(out, y), xa)
        assert torch.isfinite(grads[name]).all() and grads[name].abs().sum() > 0, name
        with torch.no_grad():
            assert torch.equal(view(x), expected), name
    assert not torch.allclose(grads["bpda"], grads["adaptive-bptt"])
    assert not torch.allclose(grads["adaptive-state"], grads["adaptive-bptt"])
    assert torch.equal(judge(model, defense, x, y, readout), expected.argmax(1) != y)


def test_defended_views_compute_weight_norm_once_per_forward_with_identical_results(micro):
    """The defense runs about 40 f per forward; each weight-normed weight is computed once per view
    forward, and values, input gradients and the bptt view's parameter gradients equal the uncached run's."""
    model, x, y, _ = micro
    x, y = x[:3], y[:3]
    defense = EntropyReduction(stages=3, steps=3)
    convs = model.fullstage.weight_normed_convs()
    calls = [0]
    hooks = [
        c.parametrizations.weight[0].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        for c in convs
    ]
    v = convs[0].parametrizations.weight.original1

    def run(view):
        xg = x.clone().requires_grad_(True)
        v.grad, calls[0] = None, 0
        out = view(xg)
        torch.nn.functional.cross_entropy(out, y).backward()
        return calls[0], out.detach(), xg.grad, None if v.grad is None else v.grad.clone()

    views = (BPDAView(model, defense, "final", "state:5:2:1"), AdaptiveView(model, defense, "final"))
    try:
        cached = [run(view) for view in views]
        model.weights_cached = contextlib.nullcontext  # type: ignore[method-assign]
        plain = [run(view) for view in views]
    finally:
        del model.weights_cached
        for h in hooks:
            h.remove()
    for (n_cached, *got), (n_plain, *want) in zip(cached, plain, strict=True):
        assert n_cached == len(convs) < n_plain
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])  # value, input gradient
        assert (got[2] is None) == (want[2] is None)
        if got[2] is not None:  # one shared weight sums its gradient in another order than 40 copies
            torch.testing.assert_close(got[2], want[2])
    assert cached[1][3] is not None and cached[1][3].abs().sum() > 0  # bptt reaches the parameters


def test_views_refuse_states_the_defense_does_not_have(micro):
    model = micro[0]
    with pytest.raises(BenchError, match="needs state 9"):
        BPDAView(model, "entropy-reduction", "state:9")
    with pytest.raises(BenchError, match="needs state 9"):
        AdaptiveView(model, "entropy-reduction", "final", "state:9:1:1")
    with pytest.raises(BenchError, match="injection"):
        BPDAView(model, "entropy-reduction", injection="clean")
    assert AdaptiveView(model, "entropy-reduction").memory_cost()["f_in_graph"] == 12
    assert BPDAView(model, "entropy-reduction", estimator="unroll:5:0.5").memory_cost()["f_in_graph"] == 6


def test_papers_batching_takes_one_stop_and_one_pick_per_stage_for_the_whole_batch():
    model = linear_toy(rho=0.3).eval()
    model.deploy = replace(model.deploy, batching="papers")
    result = FROZEN.run(model, inputs(4))  # per example some rows stop inside a stage (test above)
    assert not result.per_example and not result.trajectory().per_example
    assert bool((result.stage_picks == result.stage_picks[:1]).all())
    assert bool((result.nsteps == result.nsteps[0]).all())


def test_a_batch_that_stops_a_stage_ends_it_there_in_papers_batching():
    """As the papers' Broyden breaks: no further f evaluation; the stopped iterate fills the stage."""
    model = linear_toy(rho=0.3).eval()
    d = EntropyReduction(stages=2, steps=2, alpha=0.02, eps=0.1, solver_steps=3, tol=0.5)
    calls = {}
    for batching in ("per-example", "papers"):
        model.deploy = replace(model.deploy, batching=batching)
        with count_f_evals(model) as counter:
            result = d.run(model, inputs(4))
        calls[batching] = counter.calls
        assert len(result.states) == d.n_states
        assert torch.equal(result.states[0], result.states[2])  # every row stops after one step
    assert calls == {"per-example": 2 * (1 + 3) + 2, "papers": 2 * (1 + 1) + 2}
