"""One batch of a run: a clean pass, then each protocol's groups on the survivors -> typed batch columns.

Inside a group the orchestrator runs the attacks in order, each once per view (`Views.runs_of`), on the
examples still robust (bench.attacks.orchestrator.run_sequence); what this module adds is the record's
shape: per-(attack, view) columns, the worst-case inputs, their re-solve, structured warnings and timings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bench.attacks.orchestrator import AttackRun, run_sequence
from bench.attacks.specs import parse_attack
from bench.evaluate.plan import Plan
from bench.evaluate.views import Views, rounded, tolist
from bench.progress import Reporter
from bench.records.schema import nest, timing, warning
from bench.seeds import derive_seed
from bench.spec import AttackMode, ViewSpec

Selection = dict[str, dict[str, list[ViewSpec]]]  # protocol -> readout -> views attacked


def example_seeds(base: int, key: str, indices: Tensor) -> Tensor:
    """One seed per example, keyed by what attacks it: a batch's rows get the streams they get alone."""
    return torch.tensor([derive_seed(base, key, int(i)) for i in indices], dtype=torch.int64)


@dataclass
class GroupResult:
    columns: list[dict[str, Any]]
    robust: Tensor  # (B,) clean-correct and broken by no attack of the group
    worst: Tensor  # the input that broke each example, else the first attack's last iterate
    timings: list[dict[str, Any]]
    warnings: list[dict[str, Any]]


@dataclass(frozen=True)
class Batch:
    x: Tensor
    y: Tensor
    indices: Tensor
    first: bool  # the run's first batch: model checks and sanity checks run here


def run_group(
    views: Views,
    protocol: str,
    group: str,
    attacks: tuple[str, ...],
    group_views: list[ViewSpec],
    batch: Batch,
    clean_correct: Tensor,
    seed: int,
    reporter: Reporter,
    checks: bool = False,
) -> GroupResult:
    """Run one group's attacks in order, each once per view, on the examples still robust."""
    runs: list[AttackRun] = []
    labels: dict[str, tuple[str, ViewSpec]] = {}
    for spec in attacks:
        attack = parse_attack(spec, views.eps)
        for view in views.runs_of(attack, group_views):
            key = f"{protocol}|{group}|{attack.name}|{view.label}|{view.readout}"  # the seed stream's name
            judge = views.judge(view.readout) if view.mode is AttackMode.TRANSFER else None
            runs.append(
                AttackRun(key, attack, views.module(view), example_seeds(seed, key, batch.indices), judge)
            )
            labels[key] = (attack.name, view)
    dropped: dict[str, int] = {}  # rows whose estimator gradient was not finite, per run
    modules = {run.name: run.model for run in runs}
    seen = {name: getattr(m, "nonfinite_rows", 0) for name, m in modules.items()}

    def count_dropped(name: str) -> None:
        now = getattr(modules[name], "nonfinite_rows", 0)
        dropped[name] = now - seen[name]
        for other, module in modules.items():  # a module shared by later runs starts from here
            if module is modules[name]:
                seen[other] = now

    suite = run_sequence(
        runs,
        batch.x,
        batch.y,
        clean_correct,
        checks=checks,
        square_check=False,  # the record's own Square check covers it (bench.sanity.square_check)
        after_each=count_dropped,
    )
    first_name, first_view = labels[runs[0].name]
    found = [warning(w, first_name, first_view) for w in suite.warnings]
    worst = batch.x.clone()
    have_worst = torch.zeros_like(clean_correct)
    robust = clean_correct.clone()
    columns, timings = [], []
    for key, res in suite.results.items():
        name, view = labels[key]
        found += [warning(w, name, view) for w in res.warnings]
        newly_worst = res.broken | (res.attacked & ~have_worst)
        worst[newly_worst] = res.x_adv[newly_worst]
        have_worst |= res.attacked
        robust &= ~res.broken
        columns.append(
            {
                "protocol": protocol,
                "group": group,
                "attack": name,
                "estimator": view.label,
                "readout": view.readout,
                "attacked": tolist(res.attacked),
                "broken": tolist(res.broken),
                "linf": [round(v, 7) for v in tolist(res.linf)],
                "nonfinite_grad_rows": dropped.get(key, 0),  # summed over the attack's forwards
            }
        )
        timings.append(timing(protocol, group, name, view, res.seconds))
        reporter.advance(f"{protocol}/{name} [{view.label}] {view.readout}", int(robust.sum()), len(robust))
    return GroupResult(columns, robust, worst, timings, found)


def _adversarial_entry(views: Views, worst: Tensor, readout: str) -> dict[str, Any]:
    """The worst-case inputs re-solved: the deployed prediction, every state's, and solver stats."""
    post = views.clean_pass(worst, (readout,))
    entry: dict[str, Any] = {"pred": tolist(post["readouts"][readout])}
    if post["states"] is not None:
        entry["states_pred"] = tolist(post["states"])
        entry["states_entropy"] = rounded(post["entropy"])
        entry["solver"] = post["solver"]
    return entry


def run_batch(
    views: Views, plan: Plan, selection: Selection, batch: Batch, seed: int, reporter: Reporter
) -> dict[str, Any]:
    """Everything one batch contributes to the record (columns) and to provenance (timings, warnings)."""
    x, y = batch.x, batch.y
    clean = views.clean_pass(x, plan.readouts)
    out: dict[str, Any] = {
        "index": tolist(batch.indices),
        "label": tolist(y),
        "clean": {r: {"pred": tolist(p)} for r, p in clean["readouts"].items()},
    }
    if clean["states"] is not None:
        # (B, T): every state's prediction and prediction entropy (nats), per example
        out["clean_states"] = {"pred": tolist(clean["states"]), "entropy": rounded(clean["entropy"])}
        out["clean_solver"] = clean["solver"]
    columns: list[dict[str, Any]] = []
    adversarial: dict[str, Any] = {}
    timings: list[dict[str, Any]] = []
    warnings: list[dict[str, Any]] = []
    worst_all = {r: x.clone() for r in plan.readouts}
    broken_all = {r: torch.zeros(len(x), dtype=torch.bool, device=x.device) for r in plan.readouts}
    checked: set[str] = set()  # AutoAttack's model checks concern the deployed function: once per readout
    for protocol in plan.protocols:
        for readout in plan.readouts:
            clean_correct = clean["readouts"][readout] == y
            for group, attacks in protocol.groups.items():
                res = run_group(
                    views,
                    protocol.name,
                    group,
                    attacks,
                    selection[protocol.name][readout],
                    batch,
                    clean_correct,
                    seed,
                    reporter,
                    checks=batch.first and readout not in checked,
                )
                checked.add(readout)
                columns += res.columns
                timings += res.timings
                warnings += res.warnings
                broken_here = clean_correct & ~res.robust
                take = broken_here & ~broken_all[readout]
                worst_all[readout][take] = res.worst[take]
                broken_all[readout] |= broken_here
                entry = _adversarial_entry(views, res.worst, readout)
                nest(adversarial, (protocol.name, group, readout), entry)
    out["attacks"] = columns
    out["adversarial"] = adversarial
    result = {"columns": out, "timings": timings, "warnings": warnings, "worst": worst_all}
    if batch.first:
        result["sanity"] = batch_sanity(views, plan, selection, batch, clean)
    return result


def batch_sanity(views: Views, plan: Plan, selection: Selection, batch: Batch, clean: dict) -> dict[str, Any]:
    """The first batch's checks: gradients of every attacked view, and an eps = 0 attack breaks nothing."""
    from bench.sanity import eps_zero_check, gradient_check

    rows = slice(0, min(len(batch.x), 16))
    x, y = batch.x[rows], batch.y[rows]
    gradients: dict[str, Any] = {}
    for protocol in plan.protocols:
        for readout in plan.readouts:
            for view in selection[protocol.name][readout]:
                key = f"{view.label} | {readout}"  # a display label; never split again
                if key not in gradients:
                    gradients[key] = gradient_check(views.module(view), x, y)
    first = plan.protocols[0]
    readout = plan.readouts[0]
    view = next(v for v in selection[first.name][readout] if v.mode is not AttackMode.TRANSFER)
    clean_correct = clean["readouts"][readout][rows] == y
    spec = next(iter(first.groups.values()))[0]
    breaks = eps_zero_check(views.module(view), spec, x, y, clean_correct)
    return {
        "gradients": gradients,
        "eps_zero_breaks": breaks,
        "eps_zero_attack": f"{spec} [{view.label}, {readout}]",
    }
