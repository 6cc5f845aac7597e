"""The DEQ protocol: what the solver, estimator and readout layers need from a DEQ classifier.

It lives with the solvers (bench.deq) because it is their contract; architectures (models/) implement it
and import it from here, so the layers stack one way: bench.deq <- models <- bench.registry.

A DEQ classifier is split into an injection u = inject(x), a cell z -> f(z, u) whose fixed point is the
equilibrium state, and a head z -> logits. The harness (bench/deq) owns solving and differentiating, so an
architecture only has to say what one application of each part computes.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

BATCHING_MODES = ("per-example", "papers")


@dataclass(frozen=True)
class DeployConfig:
    """How the deployed model predicts: the forward solver and the refinement of its result.

    Defaults are the papers' unroll-trained MDEQ: Broyden for 8 steps (rel. tol 1e-3), then the final
    state is f(z*) followed by 9 damped steps with lambda 0.5. `refine_steps = 0` with
    `refine_apply_f = False` predicts from z* itself. `train_unroll_steps` / `train_lambda` are the
    phantom gradient the model was trained with (the "ready-made" attacker's gradient).

    `batching` says how the Broyden-type solves treat a batch: "per-example" (default) takes the stop
    rule and the lowest-residual pick per row, so a row's result never depends on its batch; "papers"
    reproduces the papers' code, whose norms run over the whole batch tensor, so one stop and one
    lowest-residual step hold for every row. It drives the forward solve (SolverSettings.from_deploy),
    the backward solve of the `exact` estimator and the entropy-reduction defense (docs/fidelity.md).
    """

    solver: str = "broyden"
    max_iter: int = 8
    tol: float = 1e-3
    stop_mode: str = "rel"
    refine_apply_f: bool = True
    refine_steps: int = 9
    refine_lambda: float = 0.5
    train_unroll_steps: int = 5
    train_lambda: float = 0.5
    batching: str = "per-example"

    def __post_init__(self) -> None:
        if self.batching not in BATCHING_MODES:
            from bench.errors import BenchError

            raise BenchError(
                f"batching must be 'per-example' or 'papers' (the papers' batch-wide solver), "
                f"got {self.batching!r}"
            )

    @property
    def per_example(self) -> bool:
        """True unless the solves follow the papers' batch-wide stop rule and lowest-residual pick."""
        return self.batching == "per-example"

    def to_dict(self) -> dict[str, object]:
        """The fields as a dict; `batching` only when it is not the default.

        Records hash this dict into their run id: leaving the default out keeps the ids (and the reuse)
        of every record made before the field existed, while a papers-batching run gets its own id.
        """
        values = asdict(self)
        if values["batching"] == "per-example":
            del values["batching"]
        return values


class DEQClassifier(nn.Module):
    """Base class of every DEQ classifier (see docs/architecture.md, "The DEQ protocol")."""

    deploy: DeployConfig = DeployConfig()

    def inject(self, x: Tensor) -> Tensor:
        """Input injection u from images x in [0, 1]."""
        raise NotImplementedError

    def init_state(self, u: Tensor) -> Tensor:
        """The solver's starting state z0 (zeros), shape (B, D)."""
        raise NotImplementedError

    def f(self, z: Tensor, u: Tensor) -> Tensor:
        """One application of the equilibrium cell, (B, D) -> (B, D)."""
        raise NotImplementedError

    def head(self, z: Tensor) -> Tensor:
        """Classification head, (B, D) -> logits (B, num_classes)."""
        raise NotImplementedError

    def begin_forward(self, batch_size: int) -> None:
        """Called once per model forward, before the solve: resample per-forward randomness.

        Variational dropout draws one mask here (train mode only) that every solver iteration and unroll
        step of the forward then shares. The default has no per-forward state.
        """

    def weights_cached(self) -> contextlib.AbstractContextManager[Any]:
        """A context in which weights derived from parameters (weight norm) are computed once.

        Wrap one forward at most (solve, readout and estimator surrogate): the cache must not outlive a
        parameter update. The default derives nothing.
        """
        return contextlib.nullcontext()

    def forward(self, x: Tensor) -> Tensor:
        """The deployed prediction (final readout) with no gradient path through the solver.

        Attacks never call this: they use bench.deq.view.AttackView, which adds an estimator's gradient.
        """
        from bench.deq.readouts import deployed_logits  # local: readouts build on this protocol

        return deployed_logits(self, x)


def is_deq(model: nn.Module) -> bool:
    return isinstance(model, DEQClassifier)


def flat_size(shapes: list[torch.Size]) -> int:
    """Total number of elements per example of a list of per-branch (C, H, W) shapes."""
    total = 0
    for s in shapes:
        n = 1
        for d in s:
            n *= int(d)
        total += n
    return total
