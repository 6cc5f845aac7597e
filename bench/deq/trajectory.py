"""The record of one fixed-point solve: every iterate the estimators and readouts may need, plus statistics.

Kept separate from the solvers so that estimators, readouts and records depend on the data, not on how it
was produced.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from bench.errors import BenchError


@dataclass
class Trajectory:
    """States z[1..T] of a solve (T = max_iter) and per-example statistics.

    `states[t-1]` holds z[t] as a detached (B, D) tensor, or None when the solve was asked not to keep it.
    An example that stopped early is frozen: its later states and residuals repeat the stopped ones, so
    every list and column has the promised length T whatever the convergence.
    """

    states: list[Tensor | None]  # index t-1 <-> z[t]
    abs_residual: Tensor  # (B, T) ||f(z[t]) - z[t]|| per example
    rel_residual: Tensor  # (B, T) ||f(z[t]) - z[t]|| / (||f(z[t])|| + 1e-9)
    nsteps: Tensor  # (B,) int64: steps an example took before it stopped (T when it never stopped)
    lowest_index: Tensor  # (B,) int64: 0-based index into states of the lowest-residual iterate
    result: Tensor  # (B, D) the lowest-residual iterate per example (z*)
    diverged: Tensor  # (B,) bool: a non-finite residual or a protective break
    f_evals: int  # batched f calls spent, the initial f(z0) included
    initial: Tensor  # (B, D) z[0], the starting state
    stop_mode: str = "rel"
    per_example: bool = True  # False: the papers' batch-wide stop and pick (a backward solve follows suit)

    @property
    def max_iter(self) -> int:
        return len(self.states)

    def state(self, t: int) -> Tensor:
        """z[t] for t in 0..T (z[0] is the starting state)."""
        if t == 0:
            return self.initial
        if not 1 <= t <= self.max_iter:
            raise BenchError(
                f"state {t} does not exist: the solve ran {self.max_iter} steps (states 1..{self.max_iter})"
            )
        z = self.states[t - 1]
        if z is None:
            raise BenchError(f"state {t} was not kept by the solve; pass it in `keep`")
        return z

    def rows(self, index: Tensor) -> Trajectory:
        """The trajectory of the examples `index` (a 1-D index tensor), as if they had been solved alone."""
        return Trajectory(
            states=[None if z is None else z[index] for z in self.states],
            abs_residual=self.abs_residual[index],
            rel_residual=self.rel_residual[index],
            nsteps=self.nsteps[index],
            lowest_index=self.lowest_index[index],
            result=self.result[index],
            diverged=self.diverged[index],
            f_evals=self.f_evals,
            initial=self.initial[index],
            stop_mode=self.stop_mode,
        )

    def residual(self, mode: str | None = None) -> Tensor:
        """(B,) residual of the returned iterate `result` (stop mode unless `mode` says 'abs' or 'rel')."""
        table = self.rel_residual if (mode or self.stop_mode) == "rel" else self.abs_residual
        return table.gather(1, self.lowest_index[:, None])[:, 0]

    def stats(self) -> dict[str, list]:
        """Per-example statistics as plain lists, for records."""
        return {
            "nsteps": self.nsteps.tolist(),
            "lowest_index": self.lowest_index.tolist(),
            "abs_residual": self.residual("abs").tolist(),
            "rel_residual": self.residual("rel").tolist(),
            "diverged": self.diverged.tolist(),
        }
