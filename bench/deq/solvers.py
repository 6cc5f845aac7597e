"""Fixed-point solvers for z = f(z): Broyden, Anderson, fixed-point and damped fixed-point iteration.

Every solver runs batched, without gradient, and returns a `Trajectory` of exactly `max_iter` states.
All share one schedule: z[0] = z0 and f(z0) are evaluated first; step t proposes z[t] from the history,
evaluates f(z[t]) and records the residual ||f(z[t]) - z[t]||. Cost: 1 + (steps run) batched f calls.

Per example (the default) every decision is taken per row: the residual norms, the stopping test, the
lowest-residual pick and Broyden's protective break. A row that stops is frozen (its state and residual
repeat) and, when `u` is given, f is evaluated on the still-active rows only. Norms and the per-step
scalars are pairwise sums built from elementwise adds (`rowsum`); the low-rank products of Broyden and
Anderson (n history vectors against one vector) are batched matrix products (`_bmm`, a batch of one padded
to two, since torch takes another kernel path for a single matrix). A row's numbers are then the same
whether it is solved alone or in any batch up to a tested tolerance of 1e-6 relative (bit-identical in
our CPU tests, but not promised: BLAS may block a batched product differently), provided f itself is per
example. `per_example=False`
reproduces the papers' batch-global solver: norms over the whole batch tensor, one stop and one
lowest-residual step for all (DeployConfig.batching = "papers", which also switches the `exact`
estimator's backward solve and the entropy-reduction defense; docs/fidelity.md). The first iterate
counts as the lowest so far (the papers start from z0 with a residual of 1e8, which only differs when
every residual is >= 1e8 or NaN). When the whole batch stops early the papers' list of iterates is
shorter; here the last iterate repeats, so the trajectory keeps its `max_iter` states either way.

Broyden follows the papers' code (locuslab/deq, as forked by Yang et al.): no line search, inverse
Jacobian estimate B = -I + U V^T kept as low-rank factors, first step z[1] = z0 + g(z0) (= f(z0) from
z0 = 0), "good Broyden" rank-one updates, non-finite factor entries zeroed (the papers zero NaNs only; an
infinite entry would poison every later step), the lowest-residual iterate returned, a stop after 30
steps of stagnation under 3 tol, and the protective break when the residual exceeds 1e3 (rel) or 1e6
(abs) times the first one (the two products with B per step are arranged as `_Broyden` explains).
Anderson follows the same code (m = 6, lam = 1e-4, beta = 1; bordered
least-squares system solved with torch.linalg.solve); its relative residual uses the common +1e-9
denominator of the Trajectory rather than the papers' 1e-5.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from bench.deq.trajectory import Trajectory
from bench.errors import BenchError, did_you_mean

METHODS = ("broyden", "anderson", "fixed_point", "damped")
STOP_MODES = ("rel", "abs")
REL_EPS = 1e-9  # denominator guard of the relative residual
PROTECT = {"rel": 1e3, "abs": 1e6}  # Broyden's protective-break factor over the first residual
STAGNATION_WINDOW = 30  # Broyden stops when the last 30 residuals vary by < 1.3x and are < 3 tol


# ----- batch-invariant reductions ------------------------------------------------------------------


def rowsum(x: Tensor) -> Tensor:
    """Sum over the last dimension by pairwise halving.

    Built from elementwise adds only, so each row's sum has the same bits whatever the other dimensions,
    the thread count or the device: the property per-example solving needs.
    """
    while x.shape[-1] > 1:
        n = x.shape[-1]
        half = n // 2
        folded = x[..., :half] + x[..., half : 2 * half]
        if n % 2:
            folded = torch.cat([folded[..., :1] + x[..., -1:], folded[..., 1:]], dim=-1)
        x = folded
    return x[..., 0]


def _rowsum_consuming(x: Tensor) -> Tensor:
    """`rowsum` in place in x's own storage (same pairs, same bits); x must be a private temporary."""
    n = x.shape[-1]
    while n > 1:
        half = n // 2
        x[..., :half].add_(x[..., half : 2 * half])
        if n % 2:
            x[..., :1].add_(x[..., n - 1 : n])
        x, n = x[..., :half], half
    return x[..., 0]


def _bmm(a: Tensor, b: Tensor) -> Tensor:
    """torch.bmm, with a batch of one padded to two: torch takes another kernel path for a single matrix,
    whose rounding differs from the batched one; from two on, a row's product does not depend on the batch
    in our tests (CPU), and the solvers' batch independence is tested to 1e-6 relative (docs)."""
    if a.shape[0] == 1:
        return torch.bmm(a.expand(2, -1, -1), b.expand(2, -1, -1))[:1]
    return torch.bmm(a, b)


def rowdot(a: Tensor, b: Tensor) -> Tensor:
    """(B,) dot products of the rows of a and b (B, D): one batched matrix product (see `_bmm`)."""
    return _bmm(a[:, None, :], b[:, :, None])[:, 0, 0]


def rownorm(x: Tensor) -> Tensor:
    return rowdot(x, x).sqrt()


def _dots(vectors: Tensor, x: Tensor) -> Tensor:
    """(B, n) dot products of vectors (B, n, D) with x (B, D), as one batched matrix product."""
    return _bmm(vectors, x[:, :, None])[:, :, 0]


def _combine(coef: Tensor, vectors: Tensor) -> Tensor:
    """sum_j coef[b, j] * vectors[b, j] for coef (B, n) and vectors (B, n, D), one batched product."""
    return _bmm(coef[:, None, :], vectors)[:, 0]


def _zero_nonfinite(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


# ----- settings ---------------------------------------------------------------------------------


def per_example_of(deploy: Any) -> bool:
    """Whether a DeployConfig asks for per-example solves (batching "per-example", also the default of a
    deploy object without the field) rather than the papers' batch-wide ones (batching "papers")."""
    return getattr(deploy, "batching", "per-example") == "per-example"


@dataclass(frozen=True)
class SolverSettings:
    """The forward solver of one solve: a DeployConfig's solver fields plus per-example mode."""

    method: str = "broyden"
    max_iter: int = 8
    tol: float = 1e-3
    stop_mode: str = "rel"
    per_example: bool = True

    @classmethod
    def from_deploy(cls, deploy: Any, overrides: Mapping[str, Any] | None = None) -> SolverSettings:
        """The deployed model's solver (DeployConfig, its `batching` included), with `overrides` applied by
        field name."""
        base = cls(
            method=deploy.solver,
            max_iter=deploy.max_iter,
            tol=deploy.tol,
            stop_mode=deploy.stop_mode,
            per_example=per_example_of(deploy),
        )
        if not overrides:
            return base
        names = [f.name for f in fields(cls)]
        changes = dict(overrides)
        if "solver" in changes:  # accept the DeployConfig spelling too
            changes["method"] = changes.pop("solver")
        for key in changes:
            if key not in names:
                raise BenchError(f"unknown solver setting {key!r}{did_you_mean(key, names)}")
        return replace(base, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _validate(method: str, max_iter: int, tol: float, stop_mode: str, damping: float, m: int) -> None:
    if method not in METHODS:
        raise BenchError(f"unknown solver {method!r}{did_you_mean(method, METHODS)}")
    if stop_mode not in STOP_MODES:
        raise BenchError(f"stop mode must be 'rel' or 'abs', got {stop_mode!r}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise BenchError(f"solver max_iter must be an integer >= 1, got {max_iter!r}")
    if not tol >= 0:
        raise BenchError(f"solver tolerance must be >= 0, got {tol!r}")
    if method == "damped" and not 0 < damping <= 1:
        raise BenchError(f"damping must be in (0, 1], got {damping!r}")
    if method == "anderson" and m < 1:
        raise BenchError(f"Anderson memory m must be >= 1, got {m!r}")


# ----- steppers: propose z[t] from z[t-1] and f(z[t-1]) -----------------------------------------


class _FixedPoint:
    def step(self, z: Tensor, fz: Tensor, active: Tensor) -> Tensor:
        return fz


class _Damped:
    def __init__(self, lam: float) -> None:
        self.lam = lam

    def step(self, z: Tensor, fz: Tensor, active: Tensor) -> Tensor:
        return (1 - self.lam) * z + self.lam * fz


class _Broyden:
    """Good-Broyden root finding of g(z) = f(z) - z with B = -I + sum_j U_j V_j^T ~ (dg/dz)^-1.

    Per step the papers' code takes three products with B (x^T B for v, B dg for u, B g for the next
    update). Two suffice: B g[t-1] is known from the previous update (it was -update with the same B), so
    B dg = B g[t] - B g[t-1], and B_new g[t] = B g[t] + u (v . g[t]). Algebraically identical; the
    rounding differs at the last bits.
    """

    def __init__(self, z0: Tensor, max_updates: int) -> None:
        b, d = z0.shape
        self.us = z0.new_zeros(b, max_updates, d)
        self.vs = z0.new_zeros(b, max_updates, d)
        self.n = 0
        self.prev: tuple[Tensor, Tensor, Tensor] | None = None  # z, g and B g of the previous step

    def _matvec(self, x: Tensor) -> Tensor:  # B x
        if self.n == 0:
            return -x
        return -x + _combine(_dots(self.vs[:, : self.n], x), self.us[:, : self.n])

    def _rmatvec(self, x: Tensor) -> Tensor:  # x^T B
        if self.n == 0:
            return -x
        return -x + _combine(_dots(self.us[:, : self.n], x), self.vs[:, : self.n])

    def step(self, z: Tensor, fz: Tensor, active: Tensor) -> Tensor:
        g = fz - z
        bg = self._matvec(g)
        if self.prev is not None:
            z_prev, g_prev, bg_prev = self.prev
            dz, dg = z - z_prev, g - g_prev
            vt = self._rmatvec(dz)
            u = (dz - (bg - bg_prev)) / rowdot(vt, dg)[:, None]
            u, vt = _zero_nonfinite(u), _zero_nonfinite(vt)
            self.us[:, self.n] = u
            self.vs[:, self.n] = vt
            self.n += 1
            bg = bg + u * rowdot(vt, g)[:, None]
        self.prev = (z, g, bg)
        return z - bg


class _Anderson:
    """Anderson acceleration over the last m (z, f(z)) pairs, slots reused cyclically as in the papers."""

    def __init__(self, z0: Tensor, m: int, lam: float, beta: float) -> None:
        b, d = z0.shape
        self.m, self.lam, self.beta = m, lam, beta
        self.xs = z0.new_zeros(b, m, d)
        self.fs = z0.new_zeros(b, m, d)
        self.gs = z0.new_zeros(b, m, d)
        self.gram = z0.new_zeros(b, m, m)
        self.k = 0

    def step(self, z: Tensor, fz: Tensor, active: Tensor) -> Tensor:
        slot = self.k % self.m
        self.xs[:, slot], self.fs[:, slot], self.gs[:, slot] = z, fz, fz - z
        dots = _dots(self.gs, self.gs[:, slot])
        self.gram[:, slot, :] = dots
        self.gram[:, :, slot] = dots
        self.k += 1
        if self.k == 1:
            return fz  # z[1] = f(z0)
        n = min(self.k, self.m)
        alpha = self._coefficients(n, slot, active)
        mix = self._mix(alpha, self.fs, n)
        if self.beta != 1:
            mix = self.beta * mix + (1 - self.beta) * self._mix(alpha, self.xs, n)
        return mix

    def _coefficients(self, n: int, latest: int, active: Tensor) -> Tensor:
        """Weights alpha (B, n) summing to 1 that minimise ||sum alpha_j g_j||^2 + lam ||alpha||^2.

        Solved on the active rows only (frozen rows keep degenerate histories); a row whose bordered
        system is singular or non-finite falls back to the plain step alpha = e_latest.
        """
        b = self.gram.shape[0]
        alpha = torch.zeros(b, n, dtype=self.gram.dtype, device=self.gram.device)
        alpha[:, latest] = 1
        rows = active.nonzero()[:, 0]
        if rows.numel() == 0:
            return alpha
        h = self.gram.new_zeros(rows.numel(), n + 1, n + 1)
        h[:, 0, 1:] = 1
        h[:, 1:, 0] = 1
        eye = torch.eye(n, dtype=h.dtype, device=h.device)
        h[:, 1:, 1:] = self.gram[rows, :n, :n] + self.lam * eye
        rhs = h.new_zeros(rows.numel(), n + 1, 1)
        rhs[:, 0] = 1
        sol, info = torch.linalg.solve_ex(h, rhs)
        a = sol[:, 1:, 0]
        ok = (info == 0) & torch.isfinite(a).all(dim=1)
        alpha[rows] = torch.where(ok[:, None], a, alpha[rows])
        return alpha

    @staticmethod
    def _mix(alpha: Tensor, vectors: Tensor, n: int) -> Tensor:
        out = alpha[:, 0, None] * vectors[:, 0]
        for j in range(1, n):
            out = out + alpha[:, j, None] * vectors[:, j]
        return out


# ----- evaluation of f on the active rows -----------------------------------------------------------


def _take_rows(u: Any, rows: Tensor) -> Any:
    if isinstance(u, Tensor):
        return u[rows]
    if isinstance(u, (list, tuple)):
        return type(u)(_take_rows(part, rows) for part in u)
    raise BenchError(f"injection must be a tensor or a list of tensors, got {type(u).__name__}")


class _Evaluator:
    """f on the rows still active; frozen rows keep their previous f value."""

    def __init__(self, f: Callable[..., Tensor], u: Any) -> None:
        self.f, self.u, self.calls = f, u, 0

    def __call__(self, z: Tensor, previous: Tensor | None, active: Tensor) -> Tensor:
        self.calls += 1
        if previous is None or bool(active.all()):
            return self.f(z) if self.u is None else self.f(z, self.u)
        if self.u is None:
            return torch.where(active[:, None], self.f(z), previous)
        rows = active.nonzero()[:, 0]
        out = previous.clone()
        out[rows] = self.f(z[rows], _take_rows(self.u, rows))
        return out


# ----- the solve loop ---------------------------------------------------------------------------


def solve(
    f: Callable[..., Tensor],
    z0: Tensor,
    method: str = "broyden",
    max_iter: int = 8,
    tol: float = 1e-3,
    stop_mode: str = "rel",
    keep: Collection[int] | None = None,
    per_example: bool = True,
    u: Any = None,
    damping: float = 0.5,
    anderson_m: int = 6,
    anderson_lam: float = 1e-4,
    anderson_beta: float = 1.0,
    evaluate_last: bool = True,
    f0: Tensor | None = None,
) -> Trajectory:
    """Solve z = f(z) from z0 (B, D) and return the full Trajectory of `max_iter` states.

    f is called as f(z) when `u` is None, else as f(z, u) with u's rows matching z's: then f is evaluated
    on the active rows only (pass u only when f is per example, e.g. a DEQ in eval mode). `keep` lists the
    1-based states to store (None: all). `damping` is the lambda of z <- (1-lambda) z + lambda f(z).
    `evaluate_last=False` (for callers that read states only, max_iter >= 2) skips f(z[T]): z[T] needs
    only f(z[T-1]), so it costs one f less; z[T]'s residuals then repeat z[T-1]'s and it is never `result`.
    `f0`, when the caller knows f(z0) (the exact backward solve from w = 0: J^T 0 + a = a), is taken as
    it is instead of calling f on z0; f_evals then counts one call fewer.
    """
    _validate(method, max_iter, tol, stop_mode, damping, anderson_m)
    if z0.dim() != 2:
        raise BenchError(f"solver state must be (batch, features), got shape {tuple(z0.shape)}")
    kept = set(range(1, max_iter + 1)) if keep is None else set(keep)
    if any(not 1 <= t <= max_iter for t in kept):
        raise BenchError(f"kept states must lie in 1..{max_iter}, got {sorted(kept)}")
    z0 = z0.detach()
    if method == "broyden":
        stepper = _Broyden(z0, max_iter - 1)
    elif method == "anderson":
        stepper = _Anderson(z0, anderson_m, anderson_lam, anderson_beta)
    elif method == "damped":
        stepper = _Damped(damping)
    else:
        stepper = _FixedPoint()
    rule = StopRule(tol, stop_mode, per_example, broyden_guards=method == "broyden")
    with torch.no_grad():
        return _iterate(
            _Evaluator(f, u), stepper, rule, z0, max_iter, kept, evaluate_last or max_iter < 2, f0
        )


class StopRule:
    """Which rows stop after a step, and which rows' iterate is their lowest-residual one so far.

    Per example each row is judged on its own residual; batch-global (the papers' code) on the norm over
    the whole batch tensor, the same decision for every row. Broyden adds the papers' protective break
    and the 30-step stagnation stop.
    """

    def __init__(self, tol: float, stop_mode: str, per_example: bool, broyden_guards: bool) -> None:
        self.tol, self.mode, self.per_example, self.guards = tol, stop_mode, per_example, broyden_guards
        self.lowest: Tensor | None = None  # per row: the lowest finite objective so far
        self.global_trace: list[float] = []

    def __call__(
        self, trace: Tensor, abs_t: Tensor, fz_norm: Tensor, active: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(stop, improve, protective break) per active row, from the objective trace (B, t) so far.

        The first iterate always counts as the lowest so far, even with a non-finite residual.
        """
        if self.per_example:
            stop, improve, protect = self._per_row(trace)
        else:
            stop, improve, protect = self._whole_batch(trace, abs_t, fz_norm)
        return stop & active, improve & active, protect & active

    def _per_row(self, trace: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        obj = trace[:, -1]
        finite = torch.isfinite(obj)
        if self.lowest is None:
            improve = torch.ones_like(finite)
            self.lowest = torch.where(finite, obj, math.inf)
        else:
            improve = obj < self.lowest
            self.lowest = torch.where(improve, obj, self.lowest)
        stop = (obj < self.tol) | ~finite
        protect = torch.zeros_like(stop)
        if self.guards:
            protect = obj > trace[:, 0] * PROTECT[self.mode]
            stop = stop | protect | self._stagnated(trace)
        return stop, improve, protect

    def _whole_batch(self, trace: Tensor, abs_t: Tensor, fz_norm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        g_obj = math.sqrt(float(abs_t.square().sum()))
        if self.mode == "rel":
            g_obj /= math.sqrt(float(fz_norm.square().sum())) + REL_EPS
        improve = not self.global_trace or g_obj < min(self.global_trace)
        self.global_trace.append(g_obj)
        halt = g_obj < self.tol
        broke = False
        if self.guards:
            broke = g_obj > self.global_trace[0] * PROTECT[self.mode]
            halt = halt or broke or self._stagnated_global()
        every = torch.ones(trace.shape[0], dtype=torch.bool, device=trace.device)
        return every & halt, every & improve, every & broke

    def _stagnated(self, trace: Tensor) -> Tensor:
        """Per row: more than 30 steps, residual < 3 tol, and the last 30 residuals within a factor 1.3."""
        if trace.shape[1] <= STAGNATION_WINDOW:
            return torch.zeros(trace.shape[0], dtype=torch.bool, device=trace.device)
        window = trace[:, -STAGNATION_WINDOW:]
        return (trace[:, -1] < 3 * self.tol) & (window.amax(dim=1) / window.amin(dim=1) < 1.3)

    def _stagnated_global(self) -> bool:
        trace = self.global_trace
        if len(trace) <= STAGNATION_WINDOW:
            return False
        window = trace[-STAGNATION_WINDOW:]
        return trace[-1] < 3 * self.tol and max(window) / min(window) < 1.3


def _iterate(
    evaluate: _Evaluator,
    stepper: Any,
    rule: StopRule,
    z0: Tensor,
    max_iter: int,
    kept: set[int],
    evaluate_last: bool = True,
    f0: Tensor | None = None,
) -> Trajectory:
    """The shared schedule: propose z[t], evaluate f on active rows, record, decide, freeze."""
    batch, device = z0.shape[0], z0.device
    abs_res = z0.new_zeros(batch, max_iter)
    rel_res = z0.new_zeros(batch, max_iter)
    objective = rel_res if rule.mode == "rel" else abs_res
    nsteps = torch.full((batch,), max_iter, dtype=torch.long, device=device)
    lowest_index = torch.zeros(batch, dtype=torch.long, device=device)
    diverged = torch.zeros(batch, dtype=torch.bool, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    states: list[Tensor | None] = []
    z, result = z0, z0
    if f0 is not None and f0.shape != z0.shape:
        raise BenchError(f"f(z0) must have z0's shape {tuple(z0.shape)}, got {tuple(f0.shape)}")
    fz = evaluate(z0, None, active) if f0 is None else f0.detach()
    for t in range(1, max_iter + 1):
        z = torch.where(active[:, None], stepper.step(z, fz, active), z)
        if t == max_iter and not evaluate_last:  # only z[T] is wanted, not its residual
            abs_res[:, t - 1], rel_res[:, t - 1] = abs_res[:, t - 2], rel_res[:, t - 2]
            states.append(z if t in kept else None)
            break
        fz = evaluate(z, fz, active)
        abs_t, fz_norm = rownorm(fz - z), rownorm(fz)
        abs_res[:, t - 1] = abs_t
        rel_res[:, t - 1] = abs_t / (fz_norm + REL_EPS)
        stop, improve, protect = rule(objective[:, :t], abs_t, fz_norm, active)
        lowest_index = torch.where(improve, t - 1, lowest_index)
        result = torch.where(improve[:, None], z, result)
        diverged |= active & (protect | ~torch.isfinite(objective[:, t - 1]))
        nsteps = torch.where(active & stop, t, nsteps)
        active = active & ~stop
        states.append(z if t in kept else None)
        if not bool(active.any()):  # everyone is frozen: repeat the last state and residuals
            for s in range(t + 1, max_iter + 1):
                abs_res[:, s - 1] = abs_t
                rel_res[:, s - 1] = rel_res[:, t - 1]
                states.append(z if s in kept else None)
            break
    return Trajectory(
        states=states,
        abs_residual=abs_res,
        rel_residual=rel_res,
        nsteps=nsteps,
        lowest_index=lowest_index,
        result=result,
        diverged=diverged,
        f_evals=evaluate.calls,
        initial=z0,
        stop_mode=rule.mode,
        per_example=rule.per_example,
    )
