"""Gradient estimators against closed forms (linear DEQ) and finite differences (tanh DEQ), in float64."""

from __future__ import annotations

import itertools

import pytest
import torch
from deq_toys import DTYPE, inputs, linear_toy, tanh_toy

from bench.deq.estimators import (
    GRAMMAR,
    ExactImplicit,
    SimultaneousAdjoint,
    from_paper_grammar,
    parse_estimator,
)
from bench.deq.readouts import deployed_logits, solve_model
from bench.deq.solvers import SolverSettings
from bench.errors import BenchError


def _logit_grad(batch: int, classes: int = 4, seed: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, classes, generator=gen, dtype=DTYPE)


def _trajectory(model, x, **overrides):
    settings = SolverSettings.from_deploy(model.deploy, overrides)
    with torch.no_grad():
        return solve_model(model, model.inject(x), settings)


def _grad(model, x, spec, logit_grad, traj=None):
    """d<l, surrogate(x)>/dx for estimator `spec`, the trajectory solved with the model's deploy settings."""
    traj = _trajectory(model, x) if traj is None else traj
    xr = x.clone().requires_grad_(True)
    surrogate = parse_estimator(spec).surrogate(model, model.inject(xr), traj)
    (surrogate * logit_grad).sum().backward()
    return xr.grad


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def test_exact_gradient_equals_the_closed_form_on_a_linear_deq():
    model = linear_toy(rho=0.8)
    x, ell = inputs(3), _logit_grad(3)
    grad = _grad(model, x, "exact:60:1e-13", ell)
    assert torch.allclose(grad, model.input_gradient(ell), rtol=0, atol=1e-10)


def test_papers_exact_backward_is_a_short_broyden_solve():
    """exact = exact:7:0.001: at most 7 adjoint VJPs, close to but not at the implicit gradient."""
    model = linear_toy(dim=24, rho=0.9)
    x, ell = inputs(2), _logit_grad(2)
    est = parse_estimator("exact")
    assert est.spec == "exact:7:0.001" and est.backward_vjps == 7
    traj = _trajectory(model, x)
    xr = x.clone().requires_grad_(True)
    (est.surrogate(model, model.inject(xr), traj) * ell).sum().backward()
    assert est.last_backward is not None and est.last_backward.max_iter == 7
    assert est.last_backward.f_evals == 7  # one VJP per step; at w = 0 the value is the incoming a
    assert 0.01 < _rel_err(xr.grad, model.input_gradient(ell)) < 0.5


@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_unrolled_gradient_converges_to_the_implicit_one(lam):
    model = linear_toy(rho=0.8)
    x, ell = inputs(3), _logit_grad(3)
    exact = model.input_gradient(ell)
    errors = [_rel_err(_grad(model, x, f"unroll:{k}:{lam}", ell), exact) for k in (0, 1, 2, 4, 8, 32, 256)]
    assert all(later < earlier for earlier, later in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-7


def test_intermediate_state_unroll_starts_from_that_state():
    """state:t:K:lam = head of K damped steps after f(z[t]) with z[t] detached (nonlinear: t matters)."""
    model = tanh_toy(max_iter=8, tol=0.0)
    x, ell = inputs(2), _logit_grad(2)
    traj = _trajectory(model, x)
    xr = x.clone().requires_grad_(True)
    u = model.inject(xr)
    y = model.f(traj.states[2], u)  # z[3]
    for _ in range(4):
        y = 0.5 * y + 0.5 * model.f(y, u)
    (expected,) = torch.autograd.grad((model.head(y) * ell).sum(), xr)
    got = _grad(model, x, "state:3:4:0.5", ell, traj)
    assert torch.allclose(got, expected, rtol=0, atol=1e-14)
    assert not torch.allclose(_grad(model, x, "state:2:4:0.5", ell, traj), got, atol=1e-6)
    # on a linear DEQ the start does not matter, and a long unroll from an early state is exact
    lin = linear_toy(rho=0.8, max_iter=8, tol=0.0)
    assert torch.allclose(_grad(lin, x, "state:1:96:1", ell), lin.input_gradient(ell), rtol=0, atol=1e-9)


def test_neumann_is_the_truncated_series_and_converges():
    model = linear_toy(rho=0.8)
    x, ell = inputs(3), _logit_grad(3)
    eye = torch.eye(8, dtype=DTYPE)
    m_t = (0.5 * (eye + model.W)).T.detach()
    a = (ell @ model.H).detach()  # H^T l per row
    series = sum(a @ torch.linalg.matrix_power(m_t, j).T for j in range(4))
    expected = 0.5 * series @ model.U.detach()
    assert torch.allclose(_grad(model, x, "neumann:3", ell), expected, rtol=0, atol=1e-12)
    exact = model.input_gradient(ell)
    errors = [_rel_err(_grad(model, x, f"neumann:{k}", ell), exact) for k in (0, 2, 8, 32, 300)]
    assert all(later < earlier for earlier, later in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-8


def test_simultaneous_adjoint_matches_its_construction_on_a_linear_deq():
    """adjoint:t on f = W z + U x gives U^T sum_{j<t} (W^T)^j H^T l, whatever the forward solver did."""
    model = linear_toy(rho=0.8, max_iter=40, tol=0.0)
    x, ell = inputs(3), _logit_grad(3)
    a = (ell @ model.H).detach()
    w_t = model.W.T.detach()
    for t in (1, 2, 5):
        series = sum(a @ torch.linalg.matrix_power(w_t, j).T for j in range(t))
        assert torch.allclose(
            _grad(model, x, f"adjoint:{t}", ell), series @ model.U.detach(), rtol=0, atol=1e-12
        )
    exact = model.input_gradient(ell)
    errors = [_rel_err(_grad(model, x, f"adjoint:{t}", ell), exact) for t in (1, 4, 16, 40)]
    assert all(later < earlier for earlier, later in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-3  # 0.8^40


def test_simultaneous_adjoint_tends_to_the_implicit_gradient_on_a_nonlinear_deq():
    model = tanh_toy(rho=0.6, solver="fixed_point", max_iter=60, tol=0.0)
    x, ell = inputs(2), _logit_grad(2)
    traj = _trajectory(model, x)
    exact = _grad(model, x, "exact:60:1e-13", ell, traj)
    assert _rel_err(_grad(model, x, "adjoint:60", ell, traj), exact) < 1e-10
    assert _rel_err(_grad(model, x, "adjoint:3", ell, traj), exact) > 1e-3
    assert SimultaneousAdjoint(3).reimplementation and not ExactImplicit().reimplementation


def test_exact_gradient_agrees_with_finite_differences_on_a_tanh_deq():
    model = tanh_toy(rho=0.9)  # deployed prediction = head(z*), z* solved to rel. residual 1e-12
    x, ell = inputs(2), _logit_grad(2)
    grad = _grad(model, x, "exact:60:1e-13", ell)
    h = 1e-5
    fd = torch.zeros_like(x)
    for i in range(x.shape[1]):
        step = torch.zeros_like(x)
        step[:, i] = h
        plus = (deployed_logits(model, x + step) * ell).sum(1)
        minus = (deployed_logits(model, x - step) * ell).sum(1)
        fd[:, i] = (plus - minus) / (2 * h)
    assert torch.allclose(grad, fd, rtol=0, atol=1e-8)
    assert grad.abs().max() > 1e-2


def test_backward_hooks_fire_once_per_backward():
    model = linear_toy(rho=0.8)
    x, ell = inputs(2), _logit_grad(2)
    traj = _trajectory(model, x)
    xr = x.clone().requires_grad_(True)
    surrogate = parse_estimator("exact:60:1e-13").surrogate(model, model.inject(xr), traj)
    loss = (surrogate * ell).sum()
    loss.backward(retain_graph=True)
    first = xr.grad.clone()
    loss.backward()
    assert torch.allclose(xr.grad, 2 * first, rtol=0, atol=1e-12)
    assert torch.allclose(first, model.input_gradient(ell), rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("exact", "exact:7:0.001"),
        ("exact:30:1e-6", "exact:30:1e-06"),
        ("unroll:5:0.5", "unroll:5:0.5"),
        ("unroll:0:1.0", "unroll:0:1"),
        ("state:4:5:0.5", "state:4:5:0.5"),
        ("neumann:8", "neumann:8"),
        ("adjoint:3", "adjoint:3"),
    ],
)
def test_specs_round_trip_to_a_canonical_string(spec, canonical):
    est = parse_estimator(spec)
    assert est.spec == canonical
    assert parse_estimator(canonical) == est


def test_costs_count_the_differentiated_f_applications():
    assert parse_estimator("unroll:5:0.5").f_evals_with_grad == 6
    assert parse_estimator("state:2:9:1").cost() == {
        "f_evals_with_grad": 10,
        "backward_vjps": 0,
        "backward_f_evals": 0,
    }
    # exact and neumann run their VJPs on the surrogate's own f(z*) graph: no extra f is built
    assert parse_estimator("neumann:8").cost() == {
        "f_evals_with_grad": 1,
        "backward_vjps": 8,
        "backward_f_evals": 0,
    }
    assert parse_estimator("exact").cost()["backward_f_evals"] == 0
    assert parse_estimator("adjoint:4").cost() == {
        "f_evals_with_grad": 1,
        "backward_vjps": 3,
        "backward_f_evals": 3,
    }


@pytest.mark.parametrize(
    "bad",
    ["", "exact:7", "exact:0:1e-3", "exact:7:-1", "unroll:5", "unroll:5:0", "unroll:5:1.5", "unroll:-1:0.5",
     "state:0:5:0.5", "state:1:5", "neumann", "neumann:x", "adjoint:0", "adjoint", "phantom:5"],
)  # fmt: skip
def test_invalid_specs_raise_a_bench_error_with_the_grammar(bad):
    with pytest.raises(BenchError) as info:
        parse_estimator(bad)
    assert GRAMMAR in str(info.value)


def test_estimators_that_need_missing_states_refuse_early():
    with pytest.raises(BenchError, match="needs state 9"):
        parse_estimator("state:9:5:0.5").check_steps(8)
    parse_estimator("adjoint:8").check_steps(8)


@pytest.mark.parametrize(
    ("paper", "ours"),
    [
        ("Munroll-3-5", "state:4:5:0.5"),
        ("Funroll-0-1", "state:1:1:1"),
        ("Munroll-7-9", "state:8:9:0.5"),
        ("real", "exact:7:0.001"),
        ("unroll", "unroll:9:0.5"),
        ("neumann", "neumann:8"),
        ("simul-adjoint-2", "adjoint:3"),
    ],
)
def test_paper_grammar_maps_to_our_specs(paper, ours):
    assert from_paper_grammar(paper) == ours
    parse_estimator(ours)


@pytest.mark.parametrize("bad", ["Funroll-es-0", "Xunroll-1-2", "Munroll-10-2", "Munroll-1-"])
def test_unknown_paper_grammar_raises(bad):
    with pytest.raises(BenchError):
        from_paper_grammar(bad)


def test_exact_backward_solve_batches_as_the_forward_solve():
    """Per example each row picks its own lowest-residual adjoint iterate; batch-wide (the papers' "real")
    one step holds for all rows. Rows whose own pick is the batch's get the same gradient either way (rows
    whose picks differ: tests/test_papers_parity.py, on the papers' own outputs)."""
    model, x = tanh_toy(rho=0.95, max_iter=8, tol=1e-12), inputs(6)
    g = _logit_grad(6)
    grads, picks = {}, {}
    for per_example in (True, False):
        traj = _trajectory(model, x, per_example=per_example)
        exact = ExactImplicit(4, 1e-12)
        xr = x.clone().requires_grad_(True)
        (exact.surrogate(model, model.inject(xr), traj) * g).sum().backward()
        assert exact.last_backward is not None and exact.last_backward.per_example is per_example
        grads[per_example], picks[per_example] = xr.grad, exact.last_backward.lowest_index
    assert bool((picks[False] == picks[False][0]).all())
    same = picks[True] == picks[False]
    assert bool(same.any())
    assert torch.allclose(grads[True][same], grads[False][same], rtol=0, atol=1e-12)


@pytest.mark.parametrize("spec", ["exact", "neumann:3", "adjoint:2"])
@pytest.mark.parametrize("run_backward", [True, False])
def test_hooked_surrogates_free_their_graph(spec, run_backward):
    """No reference cycle through the surrogate's graph: once the attack drops it, u (held by the backward
    replacement) is freed, whether or not a backward ran. A cycle leaked every attack step's graph."""
    import gc
    import weakref

    model, x = tanh_toy(), inputs(3)
    traj = _trajectory(model, x)
    xr = x.clone().requires_grad_(True)
    u = model.inject(xr)
    alive = weakref.ref(u)
    out = parse_estimator(spec).surrogate(model, u, traj)
    if run_backward:
        (out * _logit_grad(3)).sum().backward()
    del out, u
    gc.collect()
    assert alive() is None
