"""Readouts: which solver state(s) make the prediction, and the deployed prediction itself.

    final           the deployed prediction: head of z* refined as model.deploy says (f(z*) and/or
                    `refine_steps` damped steps; the unroll-trained papers' final state)
    state:t         head(z[t]), the early-exit defence at 1-based state t
    ensemble-state  head of the average of the T states and the final state (the papers' evaluated
                    ensemble, which averages hidden states per branch: the same as averaging flat states)
    ensemble-logit  the average of the logits of those T + 1 members (the papers' "es-0" model forward)

Averages are running sums of whole tensors (elementwise), so a row never depends on its batch.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import Tensor

from bench.deq.solvers import SolverSettings, solve
from bench.deq.trajectory import Trajectory
from bench.errors import BenchError

GRAMMAR = "final | state:t | ensemble-state | ensemble-logit (t >= 1)"


def solve_model(
    model: Any,
    u: Any,
    settings: SolverSettings,
    keep: Collection[int] | None = None,
    evaluate_last: bool = True,
) -> Trajectory:
    """Solve a DEQ's fixed point for injection u (no grad; begin_forward must already have been called).

    In eval mode f is per example, so the solver may evaluate it on the still-active rows only; in train
    mode the per-forward dropout masks are drawn for the whole batch, so f always sees the full batch.
    """
    z0 = model.init_state(u)
    common = dict(
        method=settings.method,
        max_iter=settings.max_iter,
        tol=settings.tol,
        stop_mode=settings.stop_mode,
        keep=keep,
        per_example=settings.per_example,
        evaluate_last=evaluate_last,
    )
    if model.training:
        return solve(lambda z: model.f(z, u), z0, **common)
    return solve(model.f, z0, u=u, **common)


def damped_steps(model: Any, y: Tensor, u: Any, steps: int, lam: float) -> Tensor:
    """y <- (1 - lam) y + lam f(y), `steps` times (lam = 1 is plain f, exactly as the papers' F-unroll)."""
    for _ in range(steps):
        y = model.f(y, u) if lam == 1 else (1 - lam) * y + lam * model.f(y, u)
    return y


def refined_final_state(model: Any, traj: Trajectory, u: Any) -> Tensor:
    """The deployed final state: z*, then f once if deploy.refine_apply_f, then refine_steps damped steps."""
    deploy = model.deploy
    y = model.f(traj.result, u) if deploy.refine_apply_f else traj.result
    return damped_steps(model, y, u, deploy.refine_steps, deploy.refine_lambda)


def _mean(tensors: list[Tensor]) -> Tensor:
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t
    return total / len(tensors)


class Readout(ABC):
    @property
    @abstractmethod
    def spec(self) -> str: ...

    def needed_states(self, max_iter: int) -> set[int]:
        """1-based states the readout reads from a trajectory of `max_iter` states."""
        return set()

    def check_steps(self, max_iter: int) -> None:
        need = self.needed_states(max_iter)
        if need and max(need) > max_iter:
            raise BenchError(
                f"readout {self.spec!r} needs state {max(need)} but the solver runs {max_iter} steps"
            )

    @abstractmethod
    def logits(self, model: Any, traj: Trajectory, u: Any) -> Tensor:
        """Logits (B, classes) of this readout; computed without gradient."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Readout) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)


class FinalReadout(Readout):
    spec = "final"

    def logits(self, model: Any, traj: Trajectory, u: Any) -> Tensor:
        with torch.no_grad():
            return model.head(refined_final_state(model, traj, u))


class StateReadout(Readout):
    def __init__(self, t: int) -> None:
        self.t = t

    @property
    def spec(self) -> str:
        return f"state:{self.t}"

    def needed_states(self, max_iter: int) -> set[int]:
        return {self.t}

    def logits(self, model: Any, traj: Trajectory, u: Any) -> Tensor:
        with torch.no_grad():
            return model.head(traj.state(self.t))


class _Ensemble(Readout):
    def needed_states(self, max_iter: int) -> set[int]:
        return set(range(1, max_iter + 1))

    @staticmethod
    def members(model: Any, traj: Trajectory, u: Any) -> list[Tensor]:
        """z[1..T] and the deployed final state."""
        return [traj.state(t) for t in range(1, traj.max_iter + 1)] + [refined_final_state(model, traj, u)]


class EnsembleStateReadout(_Ensemble):
    spec = "ensemble-state"

    def logits(self, model: Any, traj: Trajectory, u: Any) -> Tensor:
        with torch.no_grad():
            return model.head(_mean(self.members(model, traj, u)))


class EnsembleLogitReadout(_Ensemble):
    spec = "ensemble-logit"

    def logits(self, model: Any, traj: Trajectory, u: Any) -> Tensor:
        with torch.no_grad():
            return _mean([model.head(z) for z in self.members(model, traj, u)])


def parse_readout(spec: str) -> Readout:
    """Build the readout a spec string names; BenchError with the grammar if it is invalid."""
    if not isinstance(spec, str):
        raise BenchError(f"readout spec must be a string; grammar: {GRAMMAR}")
    spec = spec.strip()
    fixed: Mapping[str, Readout] = {
        "final": FinalReadout(),
        "ensemble-state": EnsembleStateReadout(),
        "ensemble-logit": EnsembleLogitReadout(),
    }
    if spec in fixed:
        return fixed[spec]
    m = re.fullmatch(r"state:([0-9]+)", spec)
    if m and int(m.group(1)) >= 1:
        return StateReadout(int(m.group(1)))
    raise BenchError(f"unknown readout {spec!r}; grammar: {GRAMMAR}")


FINAL = FinalReadout()


def deployed_logits(model: Any, x: Tensor) -> Tensor:
    """The deployed prediction of a DEQ (model.deploy's solver, final readout), without gradient."""
    with torch.no_grad(), model.weights_cached():
        model.begin_forward(x.shape[0])
        u = model.inject(x)
        traj = solve_model(model, u, SolverSettings.from_deploy(model.deploy), keep=())
        return FINAL.logits(model, traj, u)
