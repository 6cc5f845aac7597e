"""Gradient estimators: how an attack differentiates a DEQ whose forward solve ran without gradient.

Each estimator turns (model, u, trajectory) into *surrogate logits*: a tensor whose value is unimportant
(AttackView replaces it by the readout's) and whose gradient w.r.t. x, reached through the injection
u = model.inject(x) computed with grad, is the estimator's gradient. Solver states are detached, so the
gradient only flows through the f applications recomputed here. Spec strings:

    exact | exact:T:tol     implicit gradient. Surrogate head(y), y = f(z*). A hook on y replaces the
                            incoming gradient a by w solving w = J^T w + a (J = df/dz at z*), found by
                            Broyden (T steps, rel. tol, lowest residual, from w = 0) with VJPs on y's own
                            graph (y = f(z*_leaf, u), z*_leaf a detached leaf, differentiated w.r.t. z*_leaf
                            only); w then flows through the single f(z*) to x. T VJPs: the value at w = 0
                            is a itself, where the papers' solver pays a VJP with the zero vector (the same
                            bits). `exact` is the papers' backward solver, exact:7:0.001 (B_THRES = 7,
                            eps 1e-3). The backward solve batches as the forward one did
                            (Trajectory.per_example, from DeployConfig.batching): per example, each row's w
                            is its own lowest-residual Broyden iterate, independent of the batch; with
                            batching "papers" one stop and one lowest-residual step hold for the whole
                            batch, exactly the papers' "real" (a row's w, hence its gradient, then depends
                            on the other rows).
    unroll:K:lam            phantom gradient: y = f(z*), then K damped steps y <- (1-lam) y + lam f(y);
                            autograd through these K+1 f's.
    state:t:K:lam           the same from the intermediate state z[t] (1-based) instead of z*.
    neumann:K               surrogate head(f(z*)); the hook returns 0.5 sum_{m=0..K} (M^T)^m a with
                            M = (I + J)/2, i.e. K recursions g <- a + M^T g then x0.5. Since
                            (I - J)^-1 = 0.5 (I - M)^-1 this tends to the implicit gradient as K grows.
                            The papers' fallback branch is neumann:8.
    adjoint:t               simultaneous adjoint (Sec. 4.1), see `SimultaneousAdjoint`: a re-implementation,
                            not the authors' code, which was never released.

The papers' AttackGrad grammar `[M|F]unroll-i-K` (i = 0-based index into the solver's results_list, K the
number of unroll steps, M: lambda 0.5, F: lambda 1) maps to `state:{i+1}:K:{0.5|1}`; `from_paper_grammar`
does this and the other names (real, unroll, neumann, simul-adjoint-k).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bench.deq.readouts import damped_steps
from bench.deq.solvers import solve
from bench.deq.trajectory import Trajectory
from bench.errors import BenchError
from bench.numbers import format_number

GRAMMAR = (
    "exact | exact:T:tol | unroll:K:lam | state:t:K:lam | neumann:K | adjoint:t "
    "(T, t >= 1 and K >= 0 integers, tol >= 0, 0 < lam <= 1)"
)
PAPER_BACKWARD_STEPS = 7  # B_THRES of the papers' configs
PAPER_BACKWARD_TOL = 1e-3


def _detach(u: Any) -> Any:
    if isinstance(u, Tensor):
        return u.detach()
    return type(u)(_detach(part) for part in u)


def _copy_graph(model: Any, z: Tensor, u: Any) -> tuple[Tensor, Tensor]:
    """(z_copy, f(z_copy)) on a detached copy, so VJPs with J at z never touch the attack's graph."""
    with torch.enable_grad():
        zc = z.detach().requires_grad_(True)
        return zc, model.f(zc, _detach(u))


def _vjp(zc: Tensor, fc: Tensor) -> Callable[[Tensor], Tensor]:
    def apply(w: Tensor) -> Tensor:
        (out,) = torch.autograd.grad(fc, zc, w, retain_graph=True)
        return out

    return apply


class Estimator(ABC):
    """A gradient estimator. `surrogate` returns logits whose x-gradient is this estimator's gradient."""

    reimplementation: bool = False  # True where the construction is ours, not the papers' released code
    f_evals_with_grad: int = 1  # f applications autograd differentiates through
    backward_vjps: int = 0  # vector-Jacobian products a backward pass spends (at most)
    backward_f_evals: int = 0  # extra f applications a backward pass builds for those VJPs

    @property
    @abstractmethod
    def spec(self) -> str:
        """The canonical spec string (parse_estimator(spec) rebuilds an equal estimator)."""

    def needed_states(self) -> set[int]:
        """1-based solver states this estimator reads (must be kept in the trajectory)."""
        return set()

    @property
    def reads_result(self) -> bool:
        """False when only intermediate states are read: a solve may then stop at max(needed_states())."""
        return True

    def check_steps(self, max_iter: int) -> None:
        """Raise BenchError when the solve will not produce the states this estimator needs."""
        need = self.needed_states()
        if need and max(need) > max_iter:
            raise BenchError(
                f"estimator {self.spec!r} needs state {max(need)} but the solver runs {max_iter} steps"
            )

    def shares_value(self, deploy: Any) -> bool:
        """True when head(surrogate state) is computed by exactly the deployed refinement's operations
        (same start, same f applications): the surrogate's value is then the deployed prediction."""
        return False

    def cost(self) -> dict[str, int]:
        return {
            "f_evals_with_grad": self.f_evals_with_grad,
            "backward_vjps": self.backward_vjps,
            "backward_f_evals": self.backward_f_evals,
        }

    @abstractmethod
    def surrogate(self, model: Any, u: Any, traj: Trajectory) -> Tensor:
        """Surrogate logits (B, classes); u = model.inject(x) computed with grad."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Estimator) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)


class _HookedEstimator(Estimator):
    """head(y) with y = f(z_anchor, u), whose incoming gradient a is replaced by backward(a)."""

    vjp_at_anchor: bool = True  # backward uses jt (J^T at the anchor); else the anchor needs no grad

    def anchor(self, traj: Trajectory) -> Tensor:
        return traj.result

    def shares_value(self, deploy: Any) -> bool:
        """head(f(z*)): the deployed prediction when it is f(z*) alone (the papers' "real" readout)."""
        return (
            type(self).anchor is _HookedEstimator.anchor and deploy.refine_apply_f and not deploy.refine_steps
        )

    @abstractmethod
    def backward(
        self, jt: Callable[[Tensor], Tensor], model: Any, u: Any, traj: Trajectory, a: Tensor
    ) -> Tensor:
        """The gradient to send into y = f(z_anchor, u) in place of a; jt(w) = J^T w at the anchor."""

    def surrogate(self, model: Any, u: Any, traj: Trajectory) -> Tensor:
        """head(y), y = f(z_leaf, u) on a detached leaf copy of the anchor state, a replaced by backward(a).

        The VJPs with J at the anchor reuse this same graph, differentiated w.r.t. z_leaf only (as the
        papers' hook does), so no second f(z_anchor) is built for them; z_leaf requires grad only when
        they are wanted (vjp_at_anchor), else an attack's .backward() would also pay for dL/dz_leaf. The
        replacement is a custom autograd function rather than a tensor hook on y: the VJP through y inside
        y's own hook re-enters that hook without end, and a hook holding y forms a reference cycle
        through y's graph that Python's collector cannot see.
        """
        z = self.anchor(traj).detach().requires_grad_(self.vjp_at_anchor)
        y = model.f(z, u)
        if not y.requires_grad:
            return model.head(y)
        return model.head(_ReplaceGrad.apply(y, z, lambda jt, a: self.backward(jt, model, u, traj, a)))


class _ReplaceGrad(torch.autograd.Function):
    """Identity on y = f(z, u) whose backward sends replace(jt, a) into y, jt(w) = (dy/dz)^T w."""

    @staticmethod
    def forward(ctx: Any, y: Tensor, z: Tensor, replace: Callable[..., Tensor]) -> Tensor:
        ctx.save_for_backward(y, z)  # saved inputs hold y's graph without a cycle back to this node
        ctx.replace = replace
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, a: Tensor) -> tuple[Tensor, None, None]:
        y, z = ctx.saved_tensors
        with torch.enable_grad():
            return ctx.replace(_vjp(z, y), a), None, None


class ExactImplicit(_HookedEstimator):
    """Implicit-function-theorem gradient with an iterative backward solve (the papers' "real").

    The backward Broyden solve is per example or batch-wide as the forward solve was (traj.per_example):
    with few steps its lowest-residual pick decides the gradient, so only the batch-wide solve reproduces
    the papers' "real" on rows whose own pick differs from the batch's.
    """

    def __init__(self, max_iter: int = PAPER_BACKWARD_STEPS, tol: float = PAPER_BACKWARD_TOL) -> None:
        self.max_iter, self.tol = max_iter, tol
        self.backward_vjps = max_iter  # one per step: at w0 = 0 the solver's first value is a itself
        self.last_backward: Trajectory | None = None  # the backward solve's trajectory, for diagnostics

    @property
    def spec(self) -> str:
        return f"exact:{self.max_iter}:{format_number(self.tol)}"

    def backward(
        self, jt: Callable[[Tensor], Tensor], model: Any, u: Any, traj: Trajectory, a: Tensor
    ) -> Tensor:
        back = solve(
            lambda w: jt(w) + a,
            torch.zeros_like(a),
            "broyden",
            self.max_iter,
            self.tol,
            "rel",
            keep=(),
            per_example=traj.per_example,
            f0=a,  # J^T 0 + a
        )
        self.last_backward = back
        return back.result


class Neumann(_HookedEstimator):
    """Neumann-series phantom gradient at z*: 0.5 sum_{m<=K} (M^T)^m a, M = (I + J)/2."""

    def __init__(self, terms: int) -> None:
        self.terms = terms
        self.backward_vjps = terms

    @property
    def spec(self) -> str:
        return f"neumann:{self.terms}"

    def backward(
        self, jt: Callable[[Tensor], Tensor], model: Any, u: Any, traj: Trajectory, a: Tensor
    ) -> Tensor:
        acc = a
        for _ in range(self.terms):
            acc = a + 0.5 * (acc + jt(acc))
        return 0.5 * acc


class SimultaneousAdjoint(_HookedEstimator):
    """Simultaneous adjoint of Yang et al. 2022, Sec. 4.1, at state t.

    Re-implementation, not the authors' code: their model code for it was never released. Construction:
    the adjoint fixed point w = J^T w + a is iterated in lockstep with the forward solver, the n-th
    adjoint step using the Jacobian at the n-th forward iterate z[n] instead of at z*:

        w_1 = a,   w_{n+1} = a + J(z[n])^T w_n   for n = 1..t-1,

    where a is the gradient the attack loss sends into y = f(z[t], u) through the head (any attack loss
    works; the papers' driver passed labels to a CE inside the forward instead). The x-gradient is
    (df(z[t], u)/dx)^T w_t. For a linear cell f = W z + U x this is U^T sum_{j<t} (W^T)^j a exactly, the
    gradient of t Picard steps from z0; as z[n] -> z* it tends to the implicit gradient. Costs t-1 VJPs,
    each on a detached copy f(z[n]).
    """

    reimplementation = True
    vjp_at_anchor = False  # its VJPs are at the earlier states z[n], n < t, never at z[t]

    def __init__(self, t: int) -> None:
        self.t = t
        self.backward_vjps = t - 1
        self.backward_f_evals = t - 1

    @property
    def spec(self) -> str:
        return f"adjoint:{self.t}"

    def needed_states(self) -> set[int]:
        return set(range(1, self.t + 1))

    @property
    def reads_result(self) -> bool:
        return False

    def anchor(self, traj: Trajectory) -> Tensor:
        return traj.state(self.t)

    def backward(
        self, jt: Callable[[Tensor], Tensor], model: Any, u: Any, traj: Trajectory, a: Tensor
    ) -> Tensor:
        w = a
        for n in range(1, self.t):
            w = a + _vjp(*_copy_graph(model, traj.state(n), u))(w)
        return w


class Unroll(Estimator):
    """Phantom gradient: K damped steps after f(z_start), differentiated by autograd (z_start detached).

    `t = None` starts from the solver's result z* (`unroll:K:lam`), else from state z[t] (`state:t:K:lam`).
    """

    def __init__(self, steps: int, lam: float, t: int | None = None) -> None:
        self.steps, self.lam, self.t = steps, lam, t
        self.f_evals_with_grad = steps + 1

    @property
    def spec(self) -> str:
        tail = f"{self.steps}:{format_number(self.lam)}"
        return f"unroll:{tail}" if self.t is None else f"state:{self.t}:{tail}"

    def needed_states(self) -> set[int]:
        return set() if self.t is None else {self.t}

    @property
    def reads_result(self) -> bool:
        return self.t is None

    def shares_value(self, deploy: Any) -> bool:
        """From z*, f then the deployed number of damped steps with the deployed lambda."""
        if self.t is not None or not deploy.refine_apply_f or self.steps != deploy.refine_steps:
            return False
        return self.steps == 0 or self.lam == deploy.refine_lambda

    def surrogate(self, model: Any, u: Any, traj: Trajectory) -> Tensor:
        start = traj.result if self.t is None else traj.state(self.t)
        y = model.f(start.detach(), u)
        return model.head(damped_steps(model, y, u, self.steps, self.lam))


# ----- spec strings ---------------------------------------------------------------------------------


def _int(text: str, low: int, what: str, spec: str) -> int:
    if not re.fullmatch(r"[0-9]+", text) or int(text) < low:
        raise BenchError(f"bad estimator {spec!r}: {what} must be an integer >= {low}; grammar: {GRAMMAR}")
    return int(text)


def _float(text: str, what: str, spec: str, low: float, high: float, open_low: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    inside = (value > low if open_low else value >= low) and value <= high
    if not inside:
        bounds = f"{'(' if open_low else '['}{format_number(low)}, {format_number(high)}]"
        raise BenchError(f"bad estimator {spec!r}: {what} must be in {bounds}; grammar: {GRAMMAR}")
    return value


def parse_estimator(spec: str) -> Estimator:
    """Build the estimator a spec string names (see the module docstring); BenchError if it is invalid."""
    if not isinstance(spec, str):
        raise BenchError(f"estimator spec must be a string; grammar: {GRAMMAR}")
    name, *args = spec.strip().split(":")
    arity = {"exact": (0, 2), "unroll": (2,), "state": (3,), "neumann": (1,), "adjoint": (1,)}
    if name not in arity:
        raise BenchError(f"unknown estimator {spec!r}; grammar: {GRAMMAR}")
    if len(args) not in arity[name]:
        raise BenchError(f"bad estimator {spec!r}: wrong number of fields; grammar: {GRAMMAR}")
    inf = float("inf")
    if name == "exact":
        if not args:
            return ExactImplicit()
        return ExactImplicit(_int(args[0], 1, "T", spec), _float(args[1], "tol", spec, 0.0, inf, False))
    if name == "unroll":
        return Unroll(_int(args[0], 0, "K", spec), _float(args[1], "lam", spec, 0.0, 1.0, True))
    if name == "state":
        t = _int(args[0], 1, "t", spec)
        return Unroll(_int(args[1], 0, "K", spec), _float(args[2], "lam", spec, 0.0, 1.0, True), t=t)
    if name == "neumann":
        return Neumann(_int(args[0], 0, "K", spec))
    return SimultaneousAdjoint(_int(args[0], 1, "t", spec))


def from_paper_grammar(name: str) -> str:
    """Our spec for one of the papers' AttackGrad names.

    `Munroll-i-K` -> `state:{i+1}:K:0.5`, `Funroll-i-K` -> `state:{i+1}:K:1` (i, K single digits as the
    papers' parser reads them), `real` -> `exact:7:0.001`, `unroll` (their evaluation forward) ->
    `unroll:9:0.5`, `neumann` -> `neumann:8`, `simul-adjoint-k` -> `adjoint:{k+1}` (our reconstruction).
    The `-es-0` names sum gradients over several surrogates and have no single-estimator equivalent.
    """
    m = re.fullmatch(r"([MF])unroll-([0-9])-([0-9])", name)
    if m:
        lam = "0.5" if m.group(1) == "M" else "1"
        return f"state:{int(m.group(2)) + 1}:{m.group(3)}:{lam}"
    m = re.fullmatch(r"simul-adjoint-([0-9])", name)
    if m:
        return f"adjoint:{int(m.group(1)) + 1}"
    fixed = {"real": "exact:7:0.001", "unroll": "unroll:9:0.5", "neumann": "neumann:8"}
    if name in fixed:
        return fixed[name]
    if name.endswith("es-0"):
        raise BenchError(f"{name!r} sums gradients over several surrogates; it is not a single estimator")
    expected = "[M|F]unroll-i-K, real, unroll, neumann or simul-adjoint-k"
    raise BenchError(f"unknown paper AttackGrad {name!r}; expected {expected}")
