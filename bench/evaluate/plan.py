"""Attack suites: which attacks run, with which gradient estimators, on which readouts.

A suite expands into *protocols* (`ready-made`, `white-box`), each with attack *groups* (`pgd`, `aa`).
Inside a group the attacks run in order on the examples still robust (AutoAttack's semantics); groups are
independent of each other, so each reports its own robust accuracy (the papers' PGD and AA columns), and
"All" is the per-example AND over every group of every protocol.

    ready-made  PGD-10 and AutoAttack-standard with the model's own gradient at the final state
                (what earlier work reported; for a DEQ the gradient it was trained with)
    white-box   the papers' protocol made automatic: a cheap PGD sweep over estimators on a development
                subset picks the strongest per readout; PGD and the AutoAttack components then use them
                (`--sweep halving`: every candidate with PGD-2 first, the best third with the sweep's PGD)
    quick       a small white-box configuration for CI and smoke runs
    full        ready-made and white-box together
    lite        full at CPU budgets: PGD-10, and APGD-CE 20, APGD-T 20 x 3 targets, FAB-T 20 x 3 targets,
                Square 300 queries; the quick sweep. For CPU-sized models and the shipped results only: its
                numbers are upper bounds on what `full` reports
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.attacks.specs import STANDARD_AA
from bench.defenses.view import BPTT
from bench.errors import BenchError
from bench.spec import AUTOGRAD, DEFENSE_MODES, AttackMode, RunSpec, ViewSpec, default_n_dev


@dataclass(frozen=True)
class SweepConfig:
    """The development-set PGD sweep that picks estimators (white-box protocol)."""

    attack: str
    n_dev: int
    top_k: int
    candidates: tuple[str, ...]
    # "full": every candidate attacked with `attack`; "halving": every candidate with HALVING_SHORT first,
    # then the best third (at least 2 top_k) with `attack`, and the choice made among those
    schedule: str = "full"


HALVING_SHORT = "pgd:2"  # the first round of the successive-halving sweep


def halving_keep(n_candidates: int, top_k: int) -> int:
    """How many candidates the halving sweep's first round passes on to the full attack."""
    return min(n_candidates, max(2 * top_k, -(-n_candidates // 3)))


@dataclass(frozen=True)
class Protocol:
    name: str
    groups: dict[str, tuple[str, ...]]  # group -> attack specs, run in order on the survivors
    estimators: tuple[str, ...] = ()  # fixed estimators (ready-made); empty = chosen by the sweep
    sweep: SweepConfig | None = None


@dataclass(frozen=True)
class Plan:
    suite: str
    protocols: tuple[Protocol, ...]
    readouts: tuple[str, ...]


def white_box_candidates(max_iter: int, level: str) -> tuple[str, ...]:
    """Estimators the sweep tries: intermediate states t with K unroll steps and lambda, exact, adjoint.

    `full` follows the papers' grid (every state, K in {1, 5, 9}, lambda in {0.5, 1}) plus the final-state
    unroll, the exact gradient, Neumann and the simultaneous adjoint; `quick` keeps a handful of them.
    """
    if level == "quick":
        states = sorted({max(1, max_iter // 2), max_iter})
        out = [f"state:{t}:1:1" for t in states]
        return (*out, "exact", f"adjoint:{max_iter}")
    out = [f"state:{t}:{k}:{lam}" for t in range(1, max_iter + 1) for k in (1, 5, 9) for lam in ("0.5", "1")]
    out += ["unroll:5:0.5", "unroll:9:0.5", "exact", "exact:30:1e-06", "neumann:8"]
    out += [f"adjoint:{t}" for t in sorted({max(1, max_iter // 2), max_iter})]
    return tuple(out)


LITE_AA = ("apgd-ce:20", "apgd-t:20:3", "fab-t:20:3", "square:300")


def build_plan(spec: RunSpec, *, is_deq: bool, max_iter: int, ready_made_estimator: str) -> Plan:
    """Expand the spec's suite and overrides into a Plan.

    `attacks` replaces every protocol's attacks (each in its own group, so each gets its own number);
    `grads` fixes the white-box estimators (no sweep); `readouts` replaces the default ['final'].
    """
    suite, attacks, grads, readouts = spec.suite, spec.attacks, spec.grads, spec.readouts
    readouts_t = tuple(readouts) if readouts else ("final",)
    if not is_deq:
        if readouts and readouts_t != ("final",):
            raise BenchError("readouts other than 'final' need a DEQ model")
        if grads and tuple(grads) != (AUTOGRAD,):
            raise BenchError(f"gradient estimators need a DEQ model; a plain network uses {AUTOGRAD!r}")
    quick = suite == "quick"
    pgd_group = ("pgd:5",) if quick else ("pgd-10",)
    aa_group = ("apgd-ce:10", "square:100") if quick else LITE_AA if suite == "lite" else STANDARD_AA
    groups = {"pgd": pgd_group, "aa": aa_group}
    if attacks:
        groups = {a: (a,) for a in attacks}

    protocols: list[Protocol] = []
    if suite in ("ready-made", "full", "lite"):
        protocols.append(
            Protocol("ready-made", groups, estimators=(ready_made_estimator if is_deq else AUTOGRAD,))
        )
    if suite in ("white-box", "full", "quick", "lite"):
        if not is_deq:
            if suite not in ("full", "lite"):  # a plain network has one gradient: white-box = ready-made
                protocols.append(Protocol("white-box", groups, estimators=(AUTOGRAD,)))
        elif grads:
            protocols.append(Protocol("white-box", groups, estimators=tuple(grads)))
        else:
            level = "quick" if suite in ("quick", "lite") else "full"
            candidates = white_box_candidates(max_iter, level)
            if ready_made_estimator not in candidates:  # never weaker than the ready-made protocol's choice
                candidates = (*candidates, ready_made_estimator)
            sweep = SweepConfig(
                attack="pgd:5" if quick else "pgd-10",
                n_dev=spec.n_dev if spec.n_dev is not None else default_n_dev(suite),
                top_k=1 if quick else 2,
                candidates=candidates,
                schedule=spec.sweep,
            )
            protocols.append(Protocol("white-box", groups, sweep=sweep))
    return Plan(suite=suite, protocols=tuple(protocols), readouts=readouts_t)


def protocol_dict(p: Protocol) -> dict[str, object]:
    sweep: dict[str, object] | None = None
    if p.sweep is not None:
        sweep = {
            "attack": p.sweep.attack,
            "n_dev": p.sweep.n_dev,
            "top_k": p.sweep.top_k,
            "candidates": list(p.sweep.candidates),
        }
        if p.sweep.schedule != "full":  # only then: the full sweep's run ids stay what they were
            keep = halving_keep(len(p.sweep.candidates), p.sweep.top_k)
            sweep["schedule"] = {"name": p.sweep.schedule, "first_round": HALVING_SHORT, "keep": keep}
    return {
        "name": p.name,
        "groups": {g: list(a) for g, a in p.groups.items()},
        "estimators": list(p.estimators),
        "sweep": sweep,
    }


def plan_to_dict(plan: Plan) -> dict[str, object]:
    return {
        "suite": plan.suite,
        "readouts": list(plan.readouts),
        "protocols": [protocol_dict(p) for p in plan.protocols],
    }


def views_of(estimators: list[str] | tuple[str, ...], readout: str, defended: bool) -> list[ViewSpec]:
    """Every view a protocol attacks a readout through, for the estimators chosen on the undefended model.

    Undefended: one view per estimator. Defended: transfer@e (crafted on the undefended model, as the
    paper's code does), bpda@e (forward through the defense, backward through e) and adaptive@bptt (end
    to end through the defense's input updates); the reported number is their per-example worst case.
    """
    if not defended:
        return [ViewSpec(readout, e) for e in estimators]
    modes = [ViewSpec(readout, e, mode) for mode in DEFENSE_MODES[:2] for e in estimators]
    return [*modes, ViewSpec(readout, BPTT, AttackMode.ADAPTIVE)]
