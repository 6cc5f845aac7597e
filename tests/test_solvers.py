"""Solver correctness: closed-form fixed points, independent dense references, per-example semantics."""

from __future__ import annotations

import pytest
import torch
from deq_toys import DTYPE, LinearDEQ, contraction, inputs, linear_toy, tanh_toy

from bench.deq.solvers import METHODS, SolverSettings, rowsum, solve
from bench.errors import BenchError
from models.deq import DeployConfig

SOLVER_KW = {"anderson": {"anderson_lam": 1e-12}}


def _solve_toy(model, x, method, **kw):
    u = model.inject(x)
    kw = {**SOLVER_KW.get(method, {}), **kw}
    return solve(model.f, model.init_state(u), method, u=u, **kw)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_reaches_the_closed_form_fixed_point(method):
    model = linear_toy(rho=0.7)
    x = inputs(4)
    traj = _solve_toy(model, x, method, max_iter=250, tol=1e-10)
    assert (traj.nsteps < 250).all(), "did not converge"
    assert (traj.residual() < 1e-10).all()
    assert torch.allclose(traj.result, model.fixed_point(x), rtol=0, atol=1e-8)


@pytest.mark.parametrize("method", ["broyden", "anderson", "fixed_point"])
def test_first_state_is_f_of_z0(method):
    model = linear_toy()
    x = inputs(3)
    u = model.inject(x)
    traj = _solve_toy(model, x, method, max_iter=4, tol=0.0)
    assert torch.equal(traj.states[0], model.f(model.init_state(u), u))
    assert traj.f_evals == 5  # f(z0) + one per step


def _dense_broyden_global(f, z0, steps, tol):
    """Reference written independently: explicit (B, D, D) inverse-Jacobian estimates, batch-global norms."""
    b, d = z0.shape
    inv = -torch.eye(d, dtype=z0.dtype).repeat(b, 1, 1)
    z, g = z0, f(z0) - z0
    states, lowest, best = [], float("inf"), None
    for _ in range(steps):
        z_new = z - torch.einsum("bij,bj->bi", inv, g)
        g_new = f(z_new) - z_new
        states.append(z_new)
        rel = (g_new.norm() / (g_new + z_new).norm()).item()
        if rel < lowest:
            lowest, best = rel, z_new
        if rel < tol:
            break
        dz, dg = z_new - z, g_new - g
        vt = torch.einsum("bi,bij->bj", dz, inv)
        u = (dz - torch.einsum("bij,bj->bi", inv, dg)) / (vt * dg).sum(1, keepdim=True)
        inv = inv + u[:, :, None] * vt[:, None, :]
        z, g = z_new, g_new
    return states, best


def test_broyden_matches_a_dense_reference_in_batch_global_mode():
    model = _tanh_like()
    x = inputs(3)
    u = model.inject(x)
    traj = solve(
        lambda z: model.f(z, u), model.init_state(u), "broyden", max_iter=12, tol=1e-9, per_example=False
    )
    ref_states, ref_best = _dense_broyden_global(lambda z: model.f(z, u), model.init_state(u), 12, 1e-9)
    n = len(ref_states)
    assert int(traj.nsteps[0]) == n and (traj.nsteps == n).all()
    for t in range(n):
        assert torch.allclose(traj.states[t], ref_states[t], rtol=0, atol=1e-11)
    assert torch.allclose(traj.result, ref_best, rtol=0, atol=1e-11)
    assert (traj.lowest_index == traj.lowest_index[0]).all()


def _tanh_like():
    from deq_toys import tanh_toy

    return tanh_toy(rho=0.9)


def test_anderson_matches_a_least_squares_reference():
    """Per example: z[t] = sum_j alpha_j f(x_j) over the last m iterates, alpha from the regularised LS."""
    model = _tanh_like()
    x = inputs(2)
    u = model.inject(x)
    m, lam = 3, 1e-6
    traj = solve(model.f, model.init_state(u), "anderson", 7, 0.0, u=u, anderson_m=m, anderson_lam=lam)
    for b in range(2):
        xs = [model.init_state(u)[b]]
        fs = [model.f(xs[0][None], u[b : b + 1])[0]]
        xs.append(fs[0])
        fs.append(model.f(xs[1][None], u[b : b + 1])[0])
        for _ in range(2, 8):
            gx = torch.stack([fv - xv for fv, xv in zip(fs[-m:], xs[-m:], strict=True)])
            n = gx.shape[0]
            h = torch.zeros(n + 1, n + 1, dtype=DTYPE)
            h[0, 1:] = h[1:, 0] = 1
            h[1:, 1:] = gx @ gx.T + lam * torch.eye(n, dtype=DTYPE)
            rhs = torch.zeros(n + 1, dtype=DTYPE)
            rhs[0] = 1
            alpha = torch.linalg.solve(h, rhs)[1:]
            xs.append(alpha @ torch.stack(fs[-m:]))
            fs.append(model.f(xs[-1][None], u[b : b + 1])[0])
        for t in range(1, 8):
            assert torch.allclose(traj.states[t - 1][b], xs[t], rtol=0, atol=1e-10)


def _mixed_batch():
    """Examples that converge at different steps, one of them (x = 0) already at its fixed point z0 = 0."""
    x = inputs(5)
    x[1] = 0.0
    x[3] *= 8.0
    return x


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("with_rows", [True, False])
def test_an_example_gives_identical_results_alone_and_in_a_batch(method, with_rows):
    model = linear_toy(rho=0.9)
    x = _mixed_batch()
    u = model.inject(x)
    kw = {**SOLVER_KW.get(method, {}), "max_iter": 40, "tol": 1e-5}

    def run(rows):
        uu = u[rows]
        if with_rows:
            return solve(model.f, model.init_state(uu), method, u=uu, **kw)
        return solve(lambda z: model.f(z, uu), model.init_state(uu), method, **kw)

    batch = run(slice(None))
    assert len(set(batch.nsteps.tolist())) > 1, "the test needs examples that stop at different steps"
    assert int(batch.nsteps[1]) == 1
    for i in range(x.shape[0]):
        alone = run(slice(i, i + 1))
        for t in range(40):
            assert torch.equal(alone.states[t], batch.states[t][i : i + 1])
        for name in ("abs_residual", "rel_residual", "nsteps", "lowest_index", "result", "diverged"):
            assert torch.equal(getattr(alone, name), getattr(batch, name)[i : i + 1]), name


@pytest.mark.parametrize("method", METHODS)
def test_trajectories_have_full_length_and_frozen_examples_keep_their_state(method):
    model = linear_toy(rho=0.9)
    x = _mixed_batch()
    steps = 250
    traj = _solve_toy(model, x, method, max_iter=steps, tol=1e-5)
    assert len(traj.states) == steps and traj.abs_residual.shape == (5, steps)
    assert torch.equal(traj.states[-1][1], torch.zeros(8, dtype=DTYPE))  # started at its fixed point
    for b in range(5):
        n = int(traj.nsteps[b])
        assert n < steps and traj.residual()[b] < 1e-5
        for t in range(n, steps + 1):
            assert torch.equal(traj.states[t - 1][b], traj.states[n - 1][b])
            assert traj.rel_residual[b, t - 1] == traj.rel_residual[b, n - 1]
        assert torch.equal(traj.result[b], traj.states[int(traj.lowest_index[b])][b])
    assert traj.f_evals == 1 + int(traj.nsteps.max())
    assert len(set(traj.nsteps.tolist())) > 2


@pytest.mark.parametrize("method", METHODS)
def test_result_is_the_lowest_residual_iterate_not_the_last(method):
    """A diverging map (spectral radius 1.3): for plain iteration the residual only grows, so z* = z[1]."""
    dim = 6
    w = contraction(dim, torch.linspace(0.2, 1.3, dim), seed=5)
    model = LinearDEQ(w, 5, 3, 0, DeployConfig())
    x = inputs(2)
    traj = _solve_toy(model, x, method, max_iter=10, tol=1e-12, stop_mode="abs")
    for b in range(2):
        n = int(traj.nsteps[b])
        objective = traj.abs_residual[b, :n]
        assert int(traj.lowest_index[b]) == int(objective.argmin())
        assert torch.equal(traj.result[b], traj.states[int(traj.lowest_index[b])][b])
    if method == "fixed_point":
        assert (traj.lowest_index == 0).all()
    if method in ("fixed_point", "damped"):
        assert (traj.nsteps == 10).all() and (traj.lowest_index < 9).all()


def _eigen_problem():
    """f(z, u) = W z + u with u along W's eigenvectors of eigenvalue 0.1 (easy) and 0.95 (hard)."""
    dim = 6
    eigs = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 0.95], dtype=DTYPE)
    gen = torch.Generator().manual_seed(11)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=DTYPE))
    w = q @ torch.diag(eigs) @ q.T
    u = torch.stack([q[:, 0], q[:, 5]])  # easy, hard
    return (lambda z, uu: z @ w.T + uu), u


def test_batch_global_mode_couples_examples_and_per_example_mode_does_not():
    f, u = _eigen_problem()
    kw = {"max_iter": 300, "tol": 1e-6}
    easy_alone = solve(f, torch.zeros(1, 6, dtype=DTYPE), "fixed_point", u=u[:1], **kw)
    per_ex = solve(f, torch.zeros(2, 6, dtype=DTYPE), "fixed_point", u=u, **kw)
    coupled = solve(f, torch.zeros(2, 6, dtype=DTYPE), "fixed_point", u=u, per_example=False, **kw)
    assert int(per_ex.nsteps[0]) == int(easy_alone.nsteps[0]) < int(per_ex.nsteps[1])
    assert int(coupled.nsteps[0]) == int(coupled.nsteps[1]) > int(easy_alone.nsteps[0])
    assert int(coupled.lowest_index[0]) == int(coupled.lowest_index[1])
    # the global stop is the first step where ||g|| / ||f(z)|| over the whole batch is below tol
    n = int(coupled.nsteps[0])
    fz_norm = torch.stack([f(z, u).norm(dim=1) for z in coupled.states], dim=1)
    global_rel = coupled.abs_residual.norm(dim=0) / fz_norm.norm(dim=0)
    assert global_rel[n - 1] < 1e-6 <= global_rel[n - 2]


class _Breaking:
    """f(z) = 0.5 z + c on row 0; row 1 turns to `bad` from the `after`-th call on."""

    def __init__(self, bad: float, after: int) -> None:
        self.bad, self.after, self.calls = bad, after, 0

    def __call__(self, z):
        self.calls += 1
        out = 0.5 * z + torch.linspace(1, 2, z.shape[1], dtype=z.dtype)
        if self.calls >= self.after and z.shape[0] > 1:
            out = out.clone()
            out[1] = z[1] + self.bad
        return out


@pytest.mark.parametrize(
    ("bad", "method"), [(1e12, "broyden"), (float("nan"), "broyden"), (float("nan"), "anderson")]
)
def test_diverging_example_is_flagged_and_frozen_without_touching_the_others(bad, method):
    z0 = torch.zeros(2, 4, dtype=DTYPE)
    kw = {"max_iter": 20, "tol": 1e-9, "stop_mode": "abs"}
    traj = solve(_Breaking(bad, 3), z0, method, **kw)
    alone = solve(_Breaking(bad, 3), z0[:1], method, **kw)
    assert traj.diverged.tolist() == [False, True]
    assert int(traj.nsteps[1]) == 2  # calls: f(z0), f(z1), f(z2) <- breaks
    assert int(traj.lowest_index[1]) == 0
    for t in range(2, 21):
        assert torch.equal(traj.states[t - 1][1], traj.states[1][1])
    assert torch.equal(traj.result[:1], alone.result) and torch.equal(traj.nsteps[:1], alone.nsteps)


def test_keep_stores_only_requested_states():
    model = linear_toy()
    traj = _solve_toy(model, inputs(2), "broyden", max_iter=6, tol=0.0, keep={2, 5})
    assert [s is not None for s in traj.states] == [False, True, False, False, True, False]
    assert torch.equal(traj.state(0), torch.zeros(2, 8, dtype=DTYPE))
    with pytest.raises(BenchError, match="not kept"):
        traj.state(3)
    with pytest.raises(BenchError, match="does not exist"):
        traj.state(7)


def test_invalid_settings_raise_bench_errors():
    z0 = torch.zeros(1, 3)
    with pytest.raises(BenchError, match="did you mean"):
        solve(lambda z: z, z0, "broydn")
    with pytest.raises(BenchError, match="stop mode"):
        solve(lambda z: z, z0, stop_mode="max")
    with pytest.raises(BenchError, match="kept states"):
        solve(lambda z: z, z0, max_iter=3, keep={4})
    with pytest.raises(BenchError, match="unknown solver setting"):
        SolverSettings.from_deploy(DeployConfig(), {"maxiter": 3})
    s = SolverSettings.from_deploy(DeployConfig(), {"solver": "anderson", "max_iter": 30})
    assert (s.method, s.max_iter, s.tol, s.per_example) == ("anderson", 30, 1e-3, True)


def test_rowsum_is_a_sum_and_batch_invariant():
    gen = torch.Generator().manual_seed(0)
    for d in (1, 2, 7, 64, 1001):
        x = torch.randn(3, d, generator=gen, dtype=DTYPE)
        assert torch.allclose(rowsum(x), x.sum(1), rtol=1e-12, atol=1e-12)
    big = torch.randn(5, 70001, generator=gen)
    full = rowsum(big)
    assert all(torch.equal(rowsum(big[i : i + 1]), full[i : i + 1]) for i in range(5))


def test_in_place_row_sums_match_rowsum_bit_for_bit():
    from bench.deq.solvers import _rowsum_consuming

    gen = torch.Generator().manual_seed(1)
    for d in (1, 2, 3, 7, 64, 1001):
        x = torch.randn(2, 3, d, generator=gen)
        assert torch.equal(_rowsum_consuming(x.clone()), rowsum(x))


def test_deploy_batching_sets_the_solver_s_batch_mode_and_the_trajectory_records_it():
    assert SolverSettings.from_deploy(DeployConfig()).per_example
    papers = SolverSettings.from_deploy(DeployConfig(batching="papers"))
    assert not papers.per_example
    model = linear_toy()
    u = model.inject(inputs(3))
    for per_example in (True, False):
        traj = solve(model.f, model.init_state(u), "broyden", max_iter=4, u=u, per_example=per_example)
        assert traj.per_example is per_example


class _WideCell:
    """An elementwise contraction on a wide state (MDEQ-sized D), per example."""

    def __init__(self, dim: int) -> None:
        gen = torch.Generator().manual_seed(5)
        self.w = 0.9 * (2 * torch.rand(dim, generator=gen) - 1)

    def __call__(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z * self.w + u)


@pytest.mark.parametrize("method", ["broyden", "anderson"])
def test_batch_independence_holds_to_the_documented_tolerance_on_a_wide_state(method):
    """Low-rank products are batched matrix products: a row's result may depend on its batch only within
    1e-6 relative (docs/architecture.md, Trajectory); rows that stop at different steps included."""
    cell = _WideCell(30000)
    u = torch.randn(5, 30000, generator=torch.Generator().manual_seed(6))
    u[2] *= 4.0
    batch = solve(cell, torch.zeros_like(u), method, max_iter=30, tol=1e-4, u=u)
    for i in range(5):
        alone = solve(cell, torch.zeros_like(u[i : i + 1]), method, max_iter=30, tol=1e-4, u=u[i : i + 1])
        assert torch.equal(alone.nsteps, batch.nsteps[i : i + 1])
        scale = batch.result[i].abs().max()
        assert (alone.result[0] - batch.result[i]).abs().max() <= 1e-6 * scale


@pytest.mark.parametrize("method", METHODS)
def test_a_solve_without_the_last_evaluation_has_the_same_states_for_one_f_less(method):
    model = tanh_toy(rho=0.9)
    u = model.inject(_mixed_batch())
    kw = {**SOLVER_KW.get(method, {}), "max_iter": 6, "tol": 1e-5, "u": u}
    full = solve(model.f, model.init_state(u), method, **kw)
    short = solve(model.f, model.init_state(u), method, evaluate_last=False, **kw)
    assert short.f_evals == 6 and full.f_evals <= 7
    assert all(torch.equal(a, b) for a, b in zip(short.states, full.states, strict=True))
