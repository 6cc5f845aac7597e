"""AttackView: the module attacks see. Its value is the deployed readout, its gradient the estimator's.

forward(x) runs one no-grad solve with the model's deployed solver, computes the readout's logits (the
value) and the estimator's surrogate logits (the gradient), and returns
value + (surrogate - surrogate.detach()): bit-for-bit the readout's logits, so an attack's success is
judged on the real prediction, while its gradient comes from the chosen estimator.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bench.deq.estimators import Estimator, parse_estimator
from bench.deq.readouts import Readout, parse_readout, solve_model
from bench.deq.solvers import SolverSettings
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

    def forward(self, x: Tensor) -> Tensor:
        model = self.model
        model.begin_forward(x.shape[0])
        with model.weights_cached():  # one weight-norm computation for the solve, readout and surrogate
            return self._forward(model, x)

    def _forward(self, model: Any, x: Tensor) -> Tensor:
        with torch.no_grad():
            u_value = model.inject(x)
            traj = solve_model(model, u_value, self.settings, keep=self.keep)
            value = self.readout.logits(model, traj, u_value)
        self.last_trajectory = traj
        self.last_stats = {
            "nsteps": traj.nsteps,
            "residual": traj.residual(),
            "diverged": traj.diverged,
            "f_evals": traj.f_evals,
        }
        if not torch.is_grad_enabled():
            return value
        surrogate = self.estimator.surrogate(model, model.inject(x), traj)
        value, dropped = straight_through(value, surrogate)
        self.nonfinite_rows += dropped
        return value


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
