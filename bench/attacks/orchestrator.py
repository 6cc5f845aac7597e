"""Run a suite of attacks on one batch and keep a per-example record that does not trust the attacks.

Sequential mode (AutoAttack's semantics, the default): each attack runs only on the examples that are
classified correctly and still unbroken after the attacks before it, so robust accuracy after the last
attack is the per-example worst case. Independent mode: every attack runs on every clean-correct example,
which gives each attack's own robust accuracy (for per-attack columns and the 'All' intersection).

Whatever an attack returns, the record is decided here: x_adv must lie in the eps-ball and [0,1] (within
1e-6, then clipped exactly), and "broken" is one final forward of the model on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bench.attacks import Attack, AttackResult, frozen_parameters, linf_distance
from bench.attacks.autoattack import model_check_warnings, square_check_warnings
from bench.errors import BenchError

TOLERANCE = 1e-6  # floating slack allowed outside the eps-ball and [0,1] before clipping
# An example the attacked model misclassifies before any perturbation, though `clean_correct` said otherwise:
# expected when the caller selected the examples with another model (a defense's transfer mode); with the
# same model, a clean prediction that changed with the batch's composition (a near-tie)
UNPERTURBED_MISCLASSIFIED = "example(s) left unperturbed are misclassified on re-check by the attacked model"


@dataclass(frozen=True)
class AttackRun:
    """One attack on one module, a step of a sequence; `name` is unique within the sequence.

    `judge(x_adv, y) -> broken` decides success when another function than the attacked module is the one
    deployed (a defense attacked in transfer mode); the attacked module still re-checks the attack's claims.
    """

    name: str
    attack: Attack
    model: nn.Module
    seeds: Tensor
    judge: Callable[[Tensor, Tensor], Tensor] | None = None


@dataclass
class SuiteResult:
    """The record of one batch: the clean decision, one verified `AttackResult` per attack, and warnings."""

    clean_correct: Tensor  # (B,) bool
    results: dict[str, AttackResult]  # in the order the attacks ran
    warnings: list[str]  # AutoAttack's model-level checks and the Square check
    independent: bool

    def robust(self) -> Tensor:
        """(B,) bool: clean-correct and broken by no attack (the 'All' / worst case)."""
        robust = self.clean_correct.clone()
        for result in self.results.values():
            robust &= ~result.broken
        return robust

    def accuracies(self) -> dict[str, float]:
        """{'clean': ..., <attack>: ..., 'all': ...} as fractions of the batch.

        Independent mode: each attack's own robust accuracy. Sequential mode: the cumulative robust
        accuracy after each attack (what AutoAttack logs).
        """
        n = max(int(self.clean_correct.numel()), 1)
        out = {"clean": self.clean_correct.sum().item() / n}
        cumulative = self.clean_correct.clone()
        for name, result in self.results.items():
            cumulative &= ~result.broken
            own = cumulative if not self.independent else self.clean_correct & ~result.broken
            out[name] = own.sum().item() / n
        out["all"] = self.robust().sum().item() / n
        return out


def _predict(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def project_checked(x: Tensor, x_adv: Tensor, eps: float, attack: str) -> Tensor:
    """x_adv clipped exactly into the eps-ball around x and [0,1]; a violation beyond TOLERANCE (or a
    non-finite value) is a bug in the attack and raises."""
    if x_adv.shape != x.shape:
        raise RuntimeError(f"{attack} returned x_adv of shape {tuple(x_adv.shape)} for x of {tuple(x.shape)}")
    if not torch.isfinite(x_adv).all():
        raise RuntimeError(f"{attack} returned non-finite adversarial examples")
    if x.numel():
        over_ball = ((x_adv - x).abs() - eps).max().item()
        over_box = torch.maximum(-x_adv, x_adv - 1).max().item()
        if over_ball > TOLERANCE or over_box > TOLERANCE:
            raise RuntimeError(
                f"{attack} left the threat model: {over_ball:.3g} outside the eps-ball, "
                f"{over_box:.3g} outside [0,1]"
            )
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def _run_one(
    model: nn.Module, attack: Attack, x: Tensor, y: Tensor, seeds: Tensor, todo: Tensor
) -> AttackResult:
    """Run `attack` on the rows in `todo`, verify its output, and scatter it into a full-batch record."""
    record = AttackResult(
        x_adv=x.clone(),
        broken=torch.zeros_like(todo),
        attacked=todo.clone(),
        linf=torch.zeros(x.shape[0], dtype=torch.float32, device=x.device),
        seconds=0.0,
    )
    idx = todo.nonzero().squeeze(1)
    if idx.numel() == 0:
        return record
    xs, ys = x[idx], y[idx]
    res = attack.perturb(model, xs, ys, seeds[idx.cpu()])
    record.seconds = res.seconds
    x_adv = project_checked(xs, res.x_adv.to(xs.dtype), attack.eps, attack.name)
    broken = _predict(model, x_adv) != ys
    claimed = res.broken.to(broken.device)
    record.warnings = list(res.warnings)
    if (n := int((claimed & ~broken).sum())) > 0:
        record.warnings.append(
            f"{attack.name}: {n} example(s) the attack reported broken are classified correctly on re-check"
        )
    unperturbed = (x_adv == xs).flatten(1).all(1)
    if (n := int((broken & ~claimed & ~unperturbed).sum())) > 0 and not res.last_iterate_unjudged:
        record.warnings.append(
            f"{attack.name}: {n} example(s) the attack reported robust are misclassified on re-check"
        )
    if (n := int((broken & ~claimed & unperturbed).sum())) > 0:
        record.warnings.append(f"{attack.name}: {n} {UNPERTURBED_MISCLASSIFIED}")
    record.x_adv[idx] = x_adv
    record.broken[idx] = broken
    record.linf[idx] = linf_distance(x_adv, xs)
    record.forwards, record.backwards = res.forwards, res.backwards
    return record


def _square_warnings(suite: SuiteResult, runs: Sequence[AttackRun]) -> list[str]:
    """AutoAttack's 'Square beat the white-box attacks' check, fed with this suite's accuracies."""
    accs = suite.accuracies()
    squares = [accs[r.name] for r in runs if r.attack.family == "square"]
    others = {r.name: accs[r.name] for r in runs if r.attack.family != "square"}
    if not squares or not others:
        return []
    return square_check_warnings({"clean": accs["clean"], **others, "square": min(squares)})


def run_sequence(
    runs: Sequence[AttackRun],
    x: Tensor,
    y: Tensor,
    clean_correct: Tensor,
    *,
    independent: bool = False,
    checks: bool = True,
    check_rows: int = 64,
    square_check: bool = True,
    after_each: Callable[[str], None] | None = None,
) -> SuiteResult:
    """Run each attack on its module in order and return the verified per-example record.

    Sequential (default): a run attacks only the clean-correct examples no earlier run broke, so the
    robust set after the last run is the per-example worst case. clean_correct: (B,) bool, the deployed
    prediction's; misclassified examples are never attacked. checks: AutoAttack's model checks on the first
    run's module (first `check_rows` examples). square_check: AutoAttack's Square-vs-gradient check.
    after_each(name): called when a run is done (callers read their modules' counters per run).
    """
    names = [r.name for r in runs]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise BenchError(f"attack(s) listed twice in one suite: {', '.join(dupes)}")
    x = x.detach()
    y = y.detach().to(x.device)
    clean_correct = clean_correct.to(device=x.device, dtype=torch.bool)
    warnings: list[str] = []
    if checks and len(x) and runs:
        with frozen_parameters(runs[0].model):
            warnings = model_check_warnings(runs[0].model, x[:check_rows], y[:check_rows])
    broken_any = torch.zeros_like(clean_correct)
    results: dict[str, AttackResult] = {}
    for run in runs:
        seeds = run.seeds.detach().to("cpu", torch.int64)
        if not (x.shape[0] == y.shape[0] == seeds.shape[0]):
            raise ValueError(f"batch sizes differ: x {x.shape[0]}, y {y.shape[0]}, seeds {seeds.shape[0]}")
        todo = clean_correct if independent else clean_correct & ~broken_any
        with frozen_parameters(run.model):
            result = _run_one(run.model, run.attack, x, y, seeds, todo)
        if run.judge is not None:
            # rows the judge selected that the attacked module already gets wrong are expected here
            result.warnings = [w for w in result.warnings if UNPERTURBED_MISCLASSIFIED not in w]
            with torch.no_grad():
                result.broken = run.judge(result.x_adv, y) & result.attacked
        results[run.name] = result
        broken_any |= result.broken
        if after_each is not None:
            after_each(run.name)
    suite = SuiteResult(
        clean_correct=clean_correct, results=results, warnings=warnings, independent=independent
    )
    if square_check:
        suite.warnings += _square_warnings(suite, runs)
    return suite


def run_attacks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attacks: Sequence[Attack],
    seeds: Tensor,
    clean_correct: Tensor | None = None,
    *,
    independent: bool = False,
    checks: bool = True,
    check_rows: int = 64,
) -> SuiteResult:
    """Attack one batch of one module with every attack in order (see `run_sequence`).

    model: x in [0,1] (B,C,H,W) -> logits; its mode (eval) is the caller's. seeds: (B,) int64, one per
    example. clean_correct: (B,) bool, computed with one forward when None.
    """
    if clean_correct is None:
        with frozen_parameters(model):
            clean_correct = _predict(model, x.detach()) == y.detach().to(x.device)
    runs = [AttackRun(a.name, a, model, seeds) for a in attacks]
    return run_sequence(
        runs, x, y, clean_correct, independent=independent, checks=checks, check_rows=check_rows
    )
