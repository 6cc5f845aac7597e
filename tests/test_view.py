"""AttackView and readouts: the value is the deployed readout bit for bit, the gradient the estimator's."""

from __future__ import annotations

import pytest
import torch
from deq_toys import DTYPE, inputs, linear_toy, tanh_toy

from bench.deq.estimators import parse_estimator
from bench.deq.readouts import GRAMMAR, parse_readout, solve_model
from bench.deq.solvers import SolverSettings
from bench.deq.view import AttackView, count_f_evals
from bench.errors import BenchError

PAPER_DEPLOY = dict(
    solver="broyden", max_iter=8, tol=1e-3, refine_apply_f=True, refine_steps=9, refine_lambda=0.5
)
ESTIMATORS = ["exact", "exact:20:1e-8", "unroll:5:0.5", "state:3:2:1", "neumann:4", "adjoint:4"]


def _paper_toy(**changes):
    return tanh_toy(rho=0.9, **{**PAPER_DEPLOY, **changes}).eval()


def _logit_grad(batch: int) -> torch.Tensor:
    return torch.randn(batch, 4, generator=torch.Generator().manual_seed(1), dtype=DTYPE)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_forward_equals_the_deployed_prediction_bit_for_bit(estimator):
    model = _paper_toy()
    x = inputs(5)
    view = AttackView(model, "final", estimator)
    out = view(x.clone().requires_grad_(True))
    assert out.requires_grad
    assert torch.equal(out.detach(), model(x))


def test_final_readout_is_the_refined_state_the_deploy_config_describes():
    model = _paper_toy()
    x = inputs(3)
    with torch.no_grad():
        u = model.inject(x)
        traj = solve_model(model, u, SolverSettings.from_deploy(model.deploy))
        y = model.f(traj.result, u)
        for _ in range(9):
            y = 0.5 * y + 0.5 * model.f(y, u)
        assert torch.equal(model(x), model.head(y))
        plain = tanh_toy(rho=0.9, **{**PAPER_DEPLOY, "refine_apply_f": False, "refine_steps": 0})
        assert torch.equal(plain(x), plain.head(traj.result))


@pytest.mark.parametrize("readout", ["state:1", "state:8", "ensemble-state", "ensemble-logit"])
def test_forward_equals_the_readout_for_every_readout(readout):
    model = _paper_toy(tol=0.0)  # no early stop: the 8 states differ
    x = inputs(4)
    out = AttackView(model, readout, "unroll:2:0.5")(x.clone().requires_grad_(True))
    with torch.no_grad():
        u = model.inject(x)
        traj = solve_model(model, u, SolverSettings.from_deploy(model.deploy))
        y = model.f(traj.result, u)
        for _ in range(9):
            y = 0.5 * y + 0.5 * model.f(y, u)
        members = [*traj.states, y]
        expected = {
            "state:1": model.head(traj.states[0]),
            "state:8": model.head(traj.states[7]),
            "ensemble-state": model.head(torch.stack(members).mean(0)),
            "ensemble-logit": torch.stack([model.head(z) for z in members]).mean(0),
        }[readout]
        assert torch.equal(out.detach(), parse_readout(readout).logits(model, traj, u))
    assert torch.allclose(out.detach(), expected, rtol=0, atol=1e-13)
    # (the two ensembles coincide here: the toy's head is linear)
    others = {"state:1", "state:8", "ensemble-state" if readout != "ensemble-logit" else "state:8"} - {
        readout
    }
    assert all(
        not torch.allclose(out.detach(), AttackView(model, o, "unroll:2:0.5")(x).detach()) for o in others
    )


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gradient_is_the_estimators_surrogate_gradient(estimator):
    model = _paper_toy()
    x, ell = inputs(3), _logit_grad(3)
    xa = x.clone().requires_grad_(True)
    (AttackView(model, "final", estimator)(xa) * ell).sum().backward()
    with torch.no_grad():
        traj = solve_model(model, model.inject(x), SolverSettings.from_deploy(model.deploy))
    xb = x.clone().requires_grad_(True)
    (parse_estimator(estimator).surrogate(model, model.inject(xb), traj) * ell).sum().backward()
    assert torch.equal(xa.grad, xb.grad)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_single_example_gives_finite_nonzero_gradients_and_matches_its_batch_row(estimator):
    model = _paper_toy()
    x = inputs(4)
    x[2] *= 5.0
    view = AttackView(model, "ensemble-state", estimator)
    batch_out = view(x)
    assert len(set(view.last_stats["nsteps"].tolist())) > 1, "rows should stop at different steps"
    for i in range(4):
        xi = x[i : i + 1].clone().requires_grad_(True)
        out = view(xi)
        assert torch.equal(out.detach(), batch_out[i : i + 1].detach())
        out[0, 0].backward()
        assert torch.isfinite(xi.grad).all() and xi.grad.abs().sum() > 0


def test_deployed_prediction_is_per_example():
    model = linear_toy(**PAPER_DEPLOY).eval()
    x = inputs(6)
    x[1] = 0.0
    full = model(x)
    assert all(torch.equal(model(x[i : i + 1]), full[i : i + 1]) for i in range(6))


def test_f_evaluation_counts_for_forward_and_backward():
    model = _paper_toy(tol=0.0)  # 8 Broyden steps for everyone
    x = inputs(2).requires_grad_(True)
    with count_f_evals(model) as count:
        out = AttackView(model, "final", "unroll:5:0.5")(x)
        assert (count.calls, count.rows) == (9 + 10 + 6, 2 * 25)  # solve, refinement, 6 differentiated
        out.sum().backward()
        assert count.calls == 25
    with count_f_evals(model) as count:
        out = AttackView(model, "final", "exact")(x)
        assert count.calls == 9 + 10 + 1
        out.sum().backward()
        assert count.calls == 20  # the VJPs reuse the surrogate's own f(z*) graph: no extra f
    with count_f_evals(model) as count, torch.no_grad():
        AttackView(model, "final", "exact")(x)
        assert count.calls == 19  # no gradient wanted: no surrogate
    assert "f" not in vars(model)


def test_frozen_rows_are_not_evaluated_in_eval_mode_but_are_in_train_mode():
    x = inputs(4)
    x[1] = 0.0  # at its fixed point from the start
    for train in (False, True):
        model = _paper_toy().train(train)
        with count_f_evals(model) as count, torch.no_grad():
            view = AttackView(model, "state:1", "unroll:0:1")
            view(x)
        solve_calls = view.last_stats["f_evals"]
        assert model.begin_calls == 1
        expected_rows = 4 * solve_calls if train else int(view.last_stats["nsteps"].sum()) + 4
        assert count.rows == expected_rows


def test_last_stats_report_per_example_convergence():
    model = _paper_toy()
    view = AttackView(model, "final", "exact")
    view(inputs(3))
    stats = view.last_stats
    assert stats["nsteps"].shape == (3,) and stats["residual"].shape == (3,)
    assert (stats["residual"] < 1e-3).all() == (stats["nsteps"] < 8).all()
    assert stats["diverged"].dtype == torch.bool and stats["f_evals"] == 1 + int(stats["nsteps"].max())


def test_solver_overrides_change_the_solve_and_are_validated():
    model = _paper_toy()
    view = AttackView(model, "state:12", "adjoint:12", solver_overrides={"max_iter": 12, "tol": 0.0})
    view(inputs(2))
    assert view.last_trajectory.max_iter == 12 and (view.last_stats["nsteps"] == 12).all()
    with pytest.raises(BenchError, match="needs state 9"):
        AttackView(model, "state:9", "exact")
    with pytest.raises(BenchError, match="needs state 9"):
        AttackView(model, "final", "adjoint:9")
    with pytest.raises(BenchError, match="unknown solver setting"):
        AttackView(model, "final", "exact", solver_overrides={"iters": 3})


@pytest.mark.parametrize("bad", ["", "state", "state:0", "ensemble", "final:1", "logits"])
def test_invalid_readouts_raise_with_the_grammar(bad):
    with pytest.raises(BenchError) as info:
        parse_readout(bad)
    assert GRAMMAR in str(info.value)
    assert parse_readout("state:3").spec == "state:3"


@pytest.mark.parametrize(("estimator", "deploy"), [("unroll:9:0.5", {}), ("exact", {"refine_steps": 0})])
def test_a_surrogate_that_runs_the_deployed_refinement_gives_the_value_once(estimator, deploy):
    model = _paper_toy(tol=0.0, **deploy)
    x = inputs(5)
    view = AttackView(model, "final", estimator)
    assert view.shared
    with count_f_evals(model) as count:
        out = view(x.clone().requires_grad_(True))
    assert torch.equal(out.detach(), model(x))
    assert count.calls == 9 + 1 + deploy.get("refine_steps", 9)  # solve + the surrogate, no second refinement
    unshared = AttackView(model, "final", estimator)
    unshared.shared = False
    xg, xs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    g = _logit_grad(5)
    (out_u := unshared(xg)).backward(g)
    view(xs).backward(g)
    assert torch.equal(out_u.detach(), out.detach()) and torch.equal(xg.grad, xs.grad)
    assert not AttackView(model, "final", "state:8:9:0.5").shared
    assert not AttackView(model, "state:8", estimator).shared


@pytest.mark.parametrize("estimator", ["state:3:2:1", "exact", "unroll:9:0.5"])
def test_surrogate_forward_gives_the_estimators_logits_and_the_deployed_rows_on_demand(estimator):
    model = _paper_toy(tol=0.0)  # 8 steps for everyone: exact counts
    x = inputs(6)
    view = AttackView(model, "final", estimator)
    logits, deployed = view.surrogate_forward(x.clone().requires_grad_(True))
    assert logits.requires_grad
    with torch.no_grad():
        u = model.inject(x)
        traj = solve_model(model, u, SolverSettings.from_deploy(model.deploy), keep=view.keep)
        assert torch.equal(logits.detach(), parse_estimator(estimator).surrogate(model, u, traj))
    rows = torch.tensor([4, 1])
    with count_f_evals(model) as count:
        assert torch.equal(deployed(rows), model(x)[rows])
    # the rows asked for (re-solved in full after a solve stopped at the estimator's state), then model(x)
    assert count.rows == {"state:3:2:1": 2 * 19, "exact": 2 * 10, "unroll:9:0.5": 0}[estimator] + 6 * 19
