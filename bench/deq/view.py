"""AttackView: the module attacks see. Its value is the deployed readout, its gradient the estimator's.

forward(x) runs one no-grad solve with the model's deployed solver, computes the readout's logits (the
value) and the estimator's surrogate logits (the gradient), and returns
value + (surrogate - surrogate.detach()): bit-for-bit the readout's logits, so an attack's success is
judged on the real prediction, while its gradient comes from the chosen estimator. When the estimator's
surrogate runs the deployed refinement's own operations (`Estimator.shares_value`: e.g. `unroll:9:0.5`
under the papers' unroll deploy, `exact` under `fz`), the value is taken from it: the same bits, once.

`surrogate_forward(x)` serves attacks that do not read the value at every step (PGD with
`loss_on="estimator"`): the estimator's logits, and the deployed logits on demand for chosen rows only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from bench.deq.estimators import Estimator, parse_estimator
from bench.deq.readouts import FinalReadout, Readout, parse_readout, solve_model
from bench.deq.solvers import SolverSettings
from bench.deq.solvers import _take_rows as take_rows
from bench.deq.trajectory import Trajectory


class AttackView(nn.Module):
    """Straight-through wrapper of a DEQ classifier for one (readout, estimator) pair.

    `solver_overrides` changes the forward solver's fields (method/solver, max_iter, tol, stop_mode,
    per_example); without it the value equals model(x) exactly for the 'final' readout.
    """

    def __init__(
        self,
        model: nn.Module,
        readout: Readout | str = "final",
        estimator: Estimator | str = "exact",
        solver_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.readout = parse_readout(readout) if isinstance(readout, str) else readout
        self.estimator = parse_estimator(estimator) if isinstance(estimator, str) else estimator
        self.settings = SolverSettings.from_deploy(model.deploy, solver_overrides)
        self.readout.check_steps(self.settings.max_iter)
        self.estimator.check_steps(self.settings.max_iter)
        self.keep = self.readout.needed_states(self.settings.max_iter) | self.estimator.needed_states()
        self.last_trajectory: Trajectory | None = None
        self.last_stats: dict[str, Tensor | int] = {}
        self.nonfinite_rows = 0  # rows whose surrogate was not finite (their gradient is dropped), summed
        # the estimator's surrogate is the deployed prediction's own computation: the value costs nothing
        self.shared = isinstance(self.readout, FinalReadout) and self.estimator.shares_value(model.deploy)

    def forward(self, x: Tensor) -> Tensor:
        model = self.model
        model.begin_forward(x.shape[0])
        with model.weights_cached():  # one weight-norm computation for the solve, readout and surrogate
            return self._forward(model, x)

    def _solve(self, model: Any, x: Tensor, upto: int | None = None) -> tuple[Any, Trajectory]:
        """The no-grad solve (the deployed solver; stopped at state `upto` when given, without f(z[upto]))."""
        settings = self.settings if upto is None else replace(self.settings, max_iter=upto)
        keep = self.keep if upto is None else {t for t in self.keep if t <= upto}
        with torch.no_grad():
            u_value = model.inject(x)
            traj = solve_model(model, u_value, settings, keep=keep, evaluate_last=upto is None)
        self.last_trajectory = traj
        self.last_stats = {
            "nsteps": traj.nsteps,
            "residual": traj.residual(),
            "diverged": traj.diverged,
            "f_evals": traj.f_evals,
        }
        return u_value, traj

    def _forward(self, model: Any, x: Tensor) -> Tensor:
        u_value, traj = self._solve(model, x)
        if not torch.is_grad_enabled():
            with torch.no_grad():
                return self.readout.logits(model, traj, u_value)
        surrogate = self.estimator.surrogate(model, model.inject(x), traj)
        if self.shared:  # the surrogate ran the deployed refinement's own operations: its value is the value
            value = surrogate.detach()
        else:
            with torch.no_grad():
                value = self.readout.logits(model, traj, u_value)
        value, dropped = straight_through(value, surrogate)
        self.nonfinite_rows += dropped
        return value

    def surrogate_forward(self, x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """(the estimator's own logits, with its gradient; deployed(rows) -> the deployed logits of rows).

        For attacks whose own logic does not read the deployed value at every step (our PGD with
        `loss_on="estimator"`): the deployed readout is computed only for the rows asked for, so it costs
        nothing for rows the estimator still classifies correctly. An estimator that reads only states up
        to t (state:t:K:lam, adjoint:t) gets a solve that stops at z[t] (the solver is causal: the same
        states), t f-evaluations instead of max_iter + 1; its deployed rows are then solved again in full,
        alone, which per-example solving makes the same prediction. Rows whose surrogate is not finite get
        logits 0 without gradient (counted as `forward` counts them).
        """
        model = self.model
        model.begin_forward(x.shape[0])
        upto = None if self.estimator.reads_result else max(self.estimator.needed_states())
        with model.weights_cached():
            u_value, traj = self._solve(model, x, upto)
            surrogate = self.estimator.surrogate(model, model.inject(x), traj)
        finite = torch.isfinite(surrogate)
        if not bool(finite.all()):
            self.nonfinite_rows += int((~finite).flatten(1).any(1).sum())
            surrogate = torch.where(finite, surrogate, torch.zeros_like(surrogate).detach())
        if self.shared:
            value = surrogate.detach()
            return surrogate, lambda rows: value[rows]
        if upto is not None:
            inputs = x.detach()
            return surrogate, lambda rows: self._value(model, inputs[rows])

        def deployed(rows: Tensor) -> Tensor:
            with torch.no_grad(), model.weights_cached():
                return self.readout.logits(model, traj.rows(rows), take_rows(u_value, rows))

        return surrogate, deployed

    def _value(self, model: Any, x: Tensor) -> Tensor:
        """The readout's logits of x from a full solve of its own (no gradient)."""
        model.begin_forward(x.shape[0])
        with torch.no_grad(), model.weights_cached():
            u_value = model.inject(x)
            traj = solve_model(model, u_value, self.settings, keep=self.keep)
            return self.readout.logits(model, traj, u_value)


def straight_through(value: Tensor, surrogate: Tensor) -> tuple[Tensor, int]:
    """value + (surrogate - surrogate.detach()): the value's numbers with the surrogate's gradient.

    A non-finite surrogate would turn value + 0 into NaN: its entries keep the value and lose their
    gradient. Returns the output and how many rows lost (part of) their gradient, so callers can count it.
    """
    delta = surrogate - surrogate.detach()
    finite = torch.isfinite(surrogate)
    dropped = int((~finite).flatten(1).any(1).sum()) if surrogate.numel() else 0
    return value + torch.where(finite, delta, torch.zeros_like(delta)), dropped


@dataclass
class FCounter:
    """f applications counted by `count_f_evals`: batched calls and examples (rows) processed."""

    calls: int = 0
    rows: int = 0


@contextmanager
def count_f_evals(model: nn.Module) -> Iterator[FCounter]:
    """Count every call of model.f (solver, readout, estimator, backward hooks) inside the block."""
    counter = FCounter()
    original = model.f

    def counted(z: Tensor, u: Any) -> Tensor:
        counter.calls += 1
        counter.rows += z.shape[0]
        return original(z, u)

    had_own = "f" in vars(model)
    model.f = counted
    try:
        yield counter
    finally:
        if had_own:
            model.f = original
        else:
            del model.f
