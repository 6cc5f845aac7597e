"""The interface every attack shares: `Attack`, `AttackResult` and small helpers.

Attacks never know about DEQs. They see an `nn.Module` mapping x in [0,1] (B,C,H,W) to logits; for a DEQ
that module is an `AttackView`, whose forward value is the deployed prediction, so "broken" decided from
its forward output is truthful. The submodules are:

* `bench.attacks.pgd`: L-inf PGD written here (per-example seeding, early stop on the active subset);
* `bench.attacks.autoattack`: APGD-CE/-DLR, APGD-T, FAB-T and Square from pyautoattack's classes;
* `bench.attacks.specs`: spec strings (`pgd:20:dlr`, `apgd-t:20:3`, `square:500`) -> attacks;
* `bench.attacks.orchestrator`: `run_attacks`, the AutoAttack-style suite with a verified record.

This module imports none of them, so they can all import it without cycles.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from bench.seeds import mix_seed


@dataclass
class AttackResult:
    """What one attack did to a batch, one entry per example.

    Returned by `Attack.perturb` (then `broken` is what the attack claims) and, per suite member, by
    `run_attacks` (then `broken` is re-decided by one forward of the model on the clipped `x_adv`).
    """

    # (B, ...) the adversarial example: a misclassified iterate where broken (PGD: the first); elsewhere the
    # last iterate (PGD) or the clean input (pyautoattack's attacks, and examples that were not attacked)
    x_adv: Tensor
    broken: Tensor  # (B,) bool: the model misclassifies x_adv
    attacked: Tensor  # (B,) bool: the attack ran on this example
    linf: Tensor  # (B,) float: ||x_adv - x||_inf
    seconds: float  # wall time of the attack itself
    warnings: list[str] = field(default_factory=list)
    forwards: int = 0  # example-forwards: rows that went through the model
    backwards: int = 0  # example-backwards: rows whose logits received a gradient
    # the attack left its last iterate's success to the caller's re-check (it claims only earlier
    # iterates): not claiming a row that the re-check finds broken is then no discrepancy
    last_iterate_unjudged: bool = False


class Attack(ABC):
    """An L-inf attack with a fixed budget `eps`; `name` is unique within a suite and names it in records."""

    eps: float
    family: str  # 'pgd', 'apgd-ce', 'apgd-dlr', 'apgd-t', 'fab-t', 'square'
    # False for score-based attacks (Square): they query forward values only, so two models with the same
    # forward are one problem to them, whatever gradient each would give
    uses_gradient: bool = True

    @property
    @abstractmethod
    def name(self) -> str:
        """The canonical spec string, e.g. 'pgd', 'pgd:20:dlr', 'apgd-t:20:3'."""

    @abstractmethod
    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, seeds: Tensor) -> AttackResult:
        """Attack every row of x (labels y, per-example int64 seeds) and return one result row per example."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, eps={self.eps:.6g})"


class CallCounter(nn.Module):
    """Wraps a model to count example-forwards and example-backwards, the cost measure of an attack."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.forwards = 0
        self.backwards = 0

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        self.forwards += int(x.shape[0])
        if out.requires_grad:
            out.register_hook(self._count_backward)
        return out

    @property
    def has_surrogate(self) -> bool:
        """True when the model offers `surrogate_forward` (a DEQ's AttackView)."""
        return callable(getattr(self.model, "surrogate_forward", None))

    def surrogate_forward(self, x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """The model's (estimator logits, deployed(rows)) pair, counted like a forward."""
        logits, deployed = self.model.surrogate_forward(x)
        self.forwards += int(x.shape[0])
        if logits.requires_grad:
            logits.register_hook(self._count_backward)
        return logits, deployed

    def _count_backward(self, g: Tensor) -> None:
        self.backwards += int(g.shape[0])


def batch_seed(seeds: Tensor) -> int:
    """One 31-bit seed, from the rows' seeds, for attacks that draw randomness per batch (pyautoattack's)."""
    return mix_seed(len(seeds), *seeds.reshape(-1).tolist()) & 0x7FFFFFFF


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Stop parameters from requiring grad while attacking: only input gradients are needed, and attacks
    that call `.backward()` (FAB) would otherwise compute and accumulate parameter gradients."""
    flipped = [p for p in model.parameters() if p.requires_grad]
    for p in flipped:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in flipped:
            p.requires_grad_(True)


@contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Restore the global CPU (and this CUDA device's) RNG afterwards: pyautoattack reseeds it globally."""
    devices: list[int] = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        yield


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so wall times measure the attack, not the launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def linf_distance(x_adv: Tensor, x: Tensor) -> Tensor:
    """(B,) L-inf norm of the perturbation."""
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float32, device=x.device)
    return (x_adv - x).flatten(1).abs().amax(1).float()


__all__ = [
    "Attack",
    "AttackResult",
    "CallCounter",
    "batch_seed",
    "frozen_parameters",
    "linf_distance",
    "mix_seed",
    "preserved_rng",
    "synchronize",
]
