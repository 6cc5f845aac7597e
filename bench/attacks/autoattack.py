"""AutoAttack's components, driven one by one from pyautoattack's attack classes (not its wrapper).

Hyperparameters default to AutoAttack's 'standard' version (Linf): APGD-CE 100 iterations, 1 restart,
rho .75; APGD-T 100 iterations, 9 target classes; FAB-T 100 iterations, 9 targets, alpha_max .1,
eta 1.05, beta .9; Square 5000 queries, p_init .8, no schedule rescaling. Each is configurable for quick
suites. pyautoattack reseeds the global torch RNG inside every `perturb`; we restore it afterwards, and
seed each call from the rows' own seeds so a run is reproducible. Its sanity checks only log warnings on
the 'auto-attack' logger; `capture_autoattack_warnings` collects them so they end up in the records.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from pyautoattack import checks
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
from pyautoattack.fab_pt import FABAttack_PT
from pyautoattack.square import SquareAttack
from torch import Tensor, nn

from bench.attacks import (
    Attack,
    AttackResult,
    CallCounter,
    batch_seed,
    frozen_parameters,
    linf_distance,
    preserved_rng,
    synchronize,
)
from bench.errors import BenchError

LOGGER_NAME = "auto-attack"  # the logger pyautoattack (and its checks) write to
_LOGGER = logging.getLogger(LOGGER_NAME)


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def capture_autoattack_warnings() -> Iterator[list[str]]:
    """Collect the warnings pyautoattack logs while the block runs (the list fills as they arrive)."""
    handler = _ListHandler()
    _LOGGER.addHandler(handler)
    try:
        yield handler.messages
    finally:
        _LOGGER.removeHandler(handler)


def _check_dynamic(model: nn.Module, x: Tensor) -> None:
    """pyautoattack's dynamic-defence check, with its never-reset global counters zeroed first (so one
    dynamic model does not flag every later one) and any tracer already installed (coverage) put back."""
    for key in checks.funcs:
        checks.funcs[key] = 0
    previous = sys.gettrace()
    try:
        checks.check_dynamic(model, x, logger=_LOGGER)
    finally:
        sys.settrace(previous)


def model_check_warnings(model: nn.Module, x: Tensor, y: Tensor) -> list[str]:
    """AutoAttack's model-level checks (randomized, probability outputs, dynamic) on one batch.

    They run forwards, so the global RNG is restored afterwards: whether checks ran must not change
    later results.
    """
    with capture_autoattack_warnings() as messages, preserved_rng(x.device), frozen_parameters(model):
        checks.check_randomized(model, x, y, logger=_LOGGER)
        checks.check_range_output(model, x, logger=_LOGGER)
        _check_dynamic(model, x)
    return list(messages)


def square_check_warnings(accuracies: dict[str, float]) -> list[str]:
    """AutoAttack's 'Square beats the white-box attacks' check on {'clean': a, attack: robust acc, ...};
    the key 'square' must hold Square's robust accuracy."""
    with capture_autoattack_warnings() as messages:
        checks.check_square_sr(accuracies, logger=_LOGGER)
    return list(messages)


def _num_classes(model: nn.Module, x: Tensor) -> int:
    with torch.no_grad():
        return int(model(x[:1]).shape[1])


def _capped_targets(family: str, targets: int, n_classes: int) -> int:
    """Targets beyond n_classes - 1 do not exist: warn as AutoAttack does, then use them all."""
    checks.check_n_classes(n_classes, [family], targets, targets, logger=_LOGGER)
    return min(targets, n_classes - 1)


class _InDtype(nn.Module):
    """pyautoattack computes in float32 (it calls `.float()` on its inputs): the model gets its input back
    in its own dtype, and pyautoattack gets float32 logits. Used only for models that are not float32."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.to(self.dtype)).float()


class _PyAutoAttack(Attack):
    """Runs one pyautoattack attack object per call, under the RNG, grad and logging discipline above."""

    def _run(self, model: CallCounter, x: Tensor, y: Tensor, seed: int) -> Tensor:
        """Attack x with the counted model and return x_adv (the clean row wherever the attack failed)."""
        raise NotImplementedError

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, seeds: Tensor) -> AttackResult:
        counter = CallCounter(model if x.dtype == torch.float32 else _InDtype(model, x.dtype))
        x, y = x.detach(), y.detach().to(x.device)
        seed = batch_seed(seeds.detach().to("cpu", torch.int64))
        start = time.perf_counter()
        with (
            capture_autoattack_warnings() as messages,
            preserved_rng(x.device),
            frozen_parameters(model),
            torch.no_grad(),
        ):
            x_adv = self._run(counter, x.float(), y, seed).detach().to(x.dtype)  # .float(): as it computes
        synchronize(x.device)
        seconds = time.perf_counter() - start
        # pyautoattack returns the clean input wherever it failed, so "changed" is its claim of success
        claimed = (x_adv != x).flatten(1).any(1)
        return AttackResult(
            x_adv=x_adv,
            broken=claimed,
            attacked=torch.ones_like(claimed),
            linf=linf_distance(x_adv, x),
            seconds=seconds,
            warnings=list(messages),
            forwards=counter.forwards,
            backwards=counter.backwards,
        )


def _check_eps(eps: float) -> float:
    if not 0.0 <= eps <= 1.0:
        raise BenchError(f"eps must lie in [0, 1] (pixel units), got {eps}")
    return float(eps)


def _positive(what: str, value: int) -> int:
    if value < 1:
        raise BenchError(f"{what} must be at least 1, got {value}")
    return int(value)


def _spec(base: str, fields: list[int], defaults: list[int]) -> str:
    """'base:f1:f2' with trailing fields that equal their defaults left out."""
    while fields and fields[-1] == defaults[len(fields) - 1]:
        fields = fields[:-1]
    return ":".join([base, *map(str, fields)])


def _apgd_settings(attack: APGD | APGDT, seed: int, x: Tensor) -> dict[str, Any]:
    """The keyword arguments APGD and APGD-T share: AutoAttack-standard L-inf settings, no EOT."""
    return {
        "n_iter": attack.n_iter,
        "norm": "Linf",
        "n_restarts": attack.restarts,
        "eps": attack.eps,
        "seed": seed,
        "eot_iter": 1,
        "rho": attack.rho,
        "device": x.device,
        "logger": _LOGGER,
    }


class APGD(_PyAutoAttack):
    """Untargeted APGD on the cross-entropy ('apgd-ce') or DLR ('apgd-dlr') loss."""

    def __init__(self, eps: float, n_iter: int = 100, restarts: int = 1, loss: str = "ce", rho: float = 0.75):
        if loss not in ("ce", "dlr"):
            raise BenchError(f"APGD loss must be 'ce' or 'dlr', got {loss!r}")
        self.eps = _check_eps(eps)
        self.n_iter = _positive("APGD iterations", n_iter)
        self.restarts = _positive("APGD restarts", restarts)
        self.loss = loss
        self.rho = rho
        self.family = f"apgd-{loss}"

    @property
    def name(self) -> str:
        return _spec(self.family, [self.n_iter, self.restarts], [100, 1])

    def _run(self, model: CallCounter, x: Tensor, y: Tensor, seed: int) -> Tensor:
        if self.loss == "dlr" and (n := _num_classes(model.model, x)) < 3:
            raise BenchError(f"apgd-dlr needs at least 3 classes; the model has {n}")
        attack = APGDAttack(model, loss=self.loss, **_apgd_settings(self, seed, x))
        return attack.perturb(x, y)


class APGDT(_PyAutoAttack):
    """APGD on the targeted DLR loss, one run per target class (the 2nd, 3rd, ... highest logit)."""

    family = "apgd-t"

    def __init__(self, eps: float, n_iter: int = 100, targets: int = 9, restarts: int = 1, rho: float = 0.75):
        self.eps = _check_eps(eps)
        self.n_iter = _positive("APGD-T iterations", n_iter)
        self.targets = _positive("APGD-T target classes", targets)
        self.restarts = _positive("APGD-T restarts", restarts)
        self.rho = rho

    @property
    def name(self) -> str:
        return _spec(self.family, [self.n_iter, self.targets, self.restarts], [100, 9, 1])

    def _run(self, model: CallCounter, x: Tensor, y: Tensor, seed: int) -> Tensor:
        n_classes = _num_classes(model.model, x)
        if n_classes < 4:
            raise BenchError(
                f"apgd-t (targeted DLR loss) needs at least 4 classes; the model has {n_classes}"
            )
        targets = _capped_targets(self.family, self.targets, n_classes)
        attack = APGDAttack_targeted(model, n_target_classes=targets, **_apgd_settings(self, seed, x))
        return attack.perturb(x, y)


class FABT(_PyAutoAttack):
    """Targeted FAB (minimum-norm; counted as broken only within eps), one run per target class."""

    family = "fab-t"

    def __init__(self, eps: float, n_iter: int = 100, targets: int = 9):
        self.eps = _check_eps(eps)
        self.n_iter = _positive("FAB-T iterations", n_iter)
        self.targets = _positive("FAB-T target classes", targets)

    @property
    def name(self) -> str:
        return _spec(self.family, [self.n_iter, self.targets], [100, 9])

    def _run(self, model: CallCounter, x: Tensor, y: Tensor, seed: int) -> Tensor:
        n_classes = _num_classes(model.model, x)
        if n_classes < 2:
            raise BenchError(f"fab-t needs at least 2 classes; the model has {n_classes}")
        attack = FABAttack_PT(
            model,
            norm="Linf",
            n_restarts=1,
            n_iter=self.n_iter,
            eps=self.eps,
            alpha_max=0.1,
            eta=1.05,
            beta=0.9,
            seed=seed,
            targeted=True,
            device=x.device,
            n_target_classes=_capped_targets(self.family, self.targets, n_classes),
        )
        return attack.perturb(x, y)


class Square(_PyAutoAttack):
    """Square Attack: score-based black box on the margin loss, a check against gradient masking."""

    family = "square"
    uses_gradient = False

    def __init__(self, eps: float, queries: int = 5000, p_init: float = 0.8, restarts: int = 1):
        self.eps = _check_eps(eps)
        self.queries = _positive("Square queries", queries)
        self.p_init = p_init
        self.restarts = _positive("Square restarts", restarts)

    @property
    def name(self) -> str:
        return _spec(self.family, [self.queries, self.restarts], [5000, 1])

    def _run(self, model: CallCounter, x: Tensor, y: Tensor, seed: int) -> Tensor:
        if x.dim() != 4:
            raise BenchError(f"square needs image inputs (B,C,H,W); got shape {tuple(x.shape)}")
        attack = SquareAttack(
            model,
            norm="Linf",
            n_queries=self.queries,
            eps=self.eps,
            p_init=self.p_init,
            n_restarts=self.restarts,
            seed=seed,
            loss="margin",
            resc_schedule=False,
            device=x.device,
        )
        return attack.perturb(x, y)
