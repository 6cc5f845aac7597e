"""The stages before the batches: the dev set's early state and the white-box estimator sweep.

Each stage is computed once per run (rank 0 of a sharded run; the others wait for its file) and saved in
the run's `.partial/`; the sweep is also cached across runs (`SweepCache`): runs that differ only in their
reported examples, attacks or defense share one sweep.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bench.attacks import Attack
from bench.attacks.orchestrator import run_attacks
from bench.attacks.specs import parse_attack
from bench.data import ExampleSet
from bench.distributed import Shard, wait_for
from bench.evaluate.execute import Selection, example_seeds
from bench.evaluate.plan import HALVING_SHORT, Plan, Protocol, halving_keep, protocol_dict, views_of
from bench.evaluate.views import Views
from bench.progress import Reporter
from bench.records.store import RunStore, SweepCache, set_aside
from bench.records.validate import Malformed, check_early_state, check_sweep
from bench.spec import EARLY, RunOptions, RunSpec, ViewSpec

# the run-spec fields a white-box sweep depends on (with the sweep's settings and the readouts): runs that
# share them share one sweep through SweepCache, whatever their reported examples, attacks or defense
SWEEP_INPUTS = (
    "schema",
    "model",
    "checkpoint_sha256",
    "random_weights",
    "dataset",
    "dev",
    "eps",
    "batch_size",
    "seed",
    "device",
    "deploy",
    "batching",
    "code",
)
EARLY_STAGE = "early-state"


def _valid_stage(store: RunStore, name: str, check: Callable[[Any, Path], Any]) -> dict[str, Any] | None:
    """A stage file that passes its check; a corrupt one is moved aside (and so recomputed)."""
    stage = store.load_stage(name)
    path = store.stage_path(name)
    if stage is None and not path.is_file():
        return None
    try:
        if stage is None:
            raise Malformed(f"stage file {path} is malformed: not valid JSON")
        return check(stage, path)
    except Malformed as exc:
        print(f"warning: {exc}; moved aside to {set_aside(path).name}, recomputing it", file=sys.stderr)
        return None


def _staged(
    store: RunStore,
    name: str,
    what: str,
    shard: Shard,
    timeout: float,
    compute: Callable[[], dict[str, Any]],
    check: Callable[[Any, Path], Any],
) -> dict[str, Any]:
    """A run's stage: from its file, from rank 0 (other ranks wait for it), or computed and saved."""
    stage = _valid_stage(store, name, check)
    if stage is None and shard.rank != 0:
        stage = wait_for(
            lambda: _valid_stage(store, name, check), f"rank 0's {what} ({store.stage_path(name)})", timeout
        )
    if stage is None:
        stage = compute()
        store.save_stage(name, stage)
    return stage


def select_early_state(
    views: Views, dev: ExampleSet, estimator: str, spec: RunSpec, reporter: Reporter
) -> dict[str, Any]:
    """The papers' early-exit selection: the state z[t] most robust on the dev set under ready-made PGD-10.

    PGD-10 is crafted through the final readout with the model's own (ready-made) gradient; every state's
    accuracy on those examples is measured and the best t is chosen (ties: the earliest state).
    """
    attack = parse_attack("pgd-10", views.eps)
    module = views.module(ViewSpec("final", estimator))
    correct_per_state = None
    size = spec.batch_size
    reporter.start("early-state selection", (len(dev) + size - 1) // size)
    for start in range(0, len(dev), size):
        x = views.inputs(dev.x[start : start + size])
        y = dev.y[start : start + size].to(views.device)
        seeds = example_seeds(spec.seed, "early-state", dev.indices[start : start + size])
        everyone = torch.ones(len(x), dtype=torch.bool, device=x.device)
        res = run_attacks(module, x, y, [attack], seeds, clean_correct=everyone, checks=False)
        states = views.clean_pass(res.results[attack.name].x_adv, ("final",))["states"]
        ok = (states == y[:, None]).sum(0)
        correct_per_state = ok if correct_per_state is None else correct_per_state + ok
        reporter.advance("early-state selection", int(ok.max()), len(x))
    curve = [100.0 * int(c) / len(dev) for c in correct_per_state]
    best = max(range(len(curve)), key=lambda i: (curve[i], -i))
    return {"t": best + 1, "readout": f"state:{best + 1}", "pgd10_acc_per_state": curve, "n_dev": len(dev)}


def margins(logits: Tensor, y: Tensor) -> Tensor:
    """(B,) logit of the true class minus the largest other logit: below 0 means misclassified."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return true - others.max(1).values


def rank_candidates(rows: list[dict[str, Any]], top_k: int) -> tuple[list[int], str]:
    """The `top_k` strongest candidates: lowest dev robust accuracy, then lowest mean margin on the
    attacked dev set (a tie on accuracy is common on a small dev set), then the candidate order.
    Returns their indices and what decided the last chosen place: 'accuracy', 'margin' or 'order'."""
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["robust_acc"], rows[i]["mean_margin"], i))
    chosen = order[:top_k]
    if len(order) <= top_k:
        return chosen, "accuracy"
    last, runner_up = rows[order[top_k - 1]], rows[order[top_k]]
    if last["robust_acc"] != runner_up["robust_acc"]:
        return chosen, "accuracy"
    return chosen, "margin" if last["mean_margin"] != runner_up["mean_margin"] else "order"


def _sweep_row(
    views: Views, attack: Attack, est: str, readout: str, dev: ExampleSet, spec: RunSpec, key: str
) -> dict[str, Any]:
    """One candidate's dev robust accuracy and mean margin (deployed prediction, after `attack`)."""
    module = views.module(ViewSpec(readout, est))
    x_all, y_all = views.inputs(dev.x), dev.y.to(views.device)
    robust_total, margin_total = 0, 0.0
    for start in range(0, len(dev), spec.batch_size):
        sl = slice(start, start + spec.batch_size)
        x, y = x_all[sl], y_all[sl]
        with torch.no_grad():
            correct = module(x).argmax(1) == y
        seeds = example_seeds(spec.seed, key, dev.indices[sl])
        res = run_attacks(module, x, y, [attack], seeds, clean_correct=correct, checks=False)
        result = res.results[attack.name]
        robust_total += int((correct & ~result.broken).sum())
        with torch.no_grad():
            margin_total += float(margins(module(result.x_adv), y).sum())
    return {
        "estimator": est,
        "robust_acc": 100.0 * robust_total / len(dev),
        "mean_margin": round(margin_total / len(dev), 6),
    }


def select_estimators(
    views: Views,
    protocol: Protocol,
    readouts: tuple[str, ...],
    dev: ExampleSet,
    spec: RunSpec,
    reporter: Reporter,
) -> tuple[dict[str, list[str]], dict[str, Any], dict[str, str]]:
    """The white-box sweep: PGD on the development set with every candidate estimator, per readout.

    Each candidate's dev robust accuracy and mean margin (deployed prediction, after the attack; every dev
    example counts) are kept; `rank_candidates` picks the `top_k` and says what decided the choice. With
    the `halving` schedule every candidate first meets HALVING_SHORT; the best `halving_keep` of them
    (ranked the same way) meet the sweep's attack, and the choice is made among those (rows say `round`).
    """
    sweep = protocol.sweep
    assert sweep is not None
    attack = parse_attack(sweep.attack, views.eps)
    chosen: dict[str, list[str]] = {}
    table: dict[str, Any] = {}
    decided: dict[str, str] = {}
    for readout in readouts:
        candidates = list(sweep.candidates)
        first: list[dict[str, Any]] = []
        if sweep.schedule == "halving":
            short = parse_attack(HALVING_SHORT, views.eps)
            for est in candidates:
                first.append(
                    {
                        **_sweep_row(views, short, est, readout, dev, spec, f"sweep-1|{est}|{readout}"),
                        "round": 1,
                    }
                )
                reporter.advance(f"sweep {est} {readout} (round 1)", 0, len(dev))
            kept, _ = rank_candidates(first, halving_keep(len(candidates), sweep.top_k))
            candidates = [candidates[i] for i in sorted(kept)]  # candidate order kept: it breaks last ties
        rows = []
        for est in candidates:
            row = _sweep_row(views, attack, est, readout, dev, spec, f"sweep|{est}|{readout}")
            rows.append({**row, "round": 2} if first else row)
            reporter.advance(f"sweep {est} {readout}", round(row["robust_acc"] * len(dev) / 100), len(dev))
        picked, decided[readout] = rank_candidates(rows, sweep.top_k)
        chosen[readout] = [rows[i]["estimator"] for i in picked]
        table[readout] = first + rows
    return chosen, table, decided


def cached_sweep(
    views: Views,
    protocol: Protocol,
    readouts: tuple[str, ...],
    dev: ExampleSet,
    spec: RunSpec,
    force: bool,
    reporter: Reporter,
    identity: dict[str, Any],
    sweeps: SweepCache,
) -> dict[str, Any]:
    """The protocol's sweep from the cross-run cache, or computed and cached (--force recomputes)."""
    key = SweepCache.key(
        {
            **{k: identity[k] for k in SWEEP_INPUTS},
            **({"user_model": identity["user_model"]} if "user_model" in identity else {}),  # the weights
            "sweep": protocol_dict(protocol)["sweep"],
            "readouts": [[r, views.resolve(r)] for r in readouts],
        }
    )
    stage = None if force else sweeps.load(key)
    if stage is not None:
        try:
            check_sweep(stage, sweeps.dir / f"{key}.json", readouts)
        except Malformed as exc:  # a damaged cache entry is recomputed and overwritten
            print(f"warning: {exc}; recomputing the sweep", file=sys.stderr)
            stage = None
    if stage is None:
        assert protocol.sweep is not None
        n = len(protocol.sweep.candidates)
        if protocol.sweep.schedule == "halving":
            n += halving_keep(n, protocol.sweep.top_k)
        reporter.start("white-box sweep", n * len(readouts))
        chosen, table, decided = select_estimators(views, protocol, readouts, dev, spec, reporter)
        stage = {"chosen": chosen, "table": table, "decided_by": decided, "key": key}
        sweeps.save(key, stage)
    return stage


def run_stages(
    views: Views,
    plan: Plan,
    spec: RunSpec,
    options: RunOptions,
    dev: ExampleSet | None,
    ready_made: str,
    identity: dict[str, Any],
    store: RunStore,
    shard: Shard,
    reporter: Reporter,
) -> tuple[Views, Selection]:
    """Resolve the early state, then pick each protocol's estimators: the views every batch attacks."""
    timeout = options.shard_timeout
    if EARLY in plan.readouts:
        assert dev is not None
        early = _staged(
            store,
            EARLY_STAGE,
            "early-state selection",
            shard,
            timeout,
            lambda: select_early_state(views, dev, ready_made, spec, reporter),
            check_early_state,
        )
        views = views.with_states({EARLY: early["readout"]})
    sweeps = SweepCache(options.results_dir)
    selection: Selection = {}
    defended = views.defense is not None
    for protocol in plan.protocols:
        if protocol.sweep is None:
            chosen = {r: list(protocol.estimators) for r in plan.readouts}
        else:
            assert dev is not None
            stage = _staged(
                store,
                f"sweep-{protocol.name}",
                f"{protocol.name} sweep",
                shard,
                timeout,
                lambda p=protocol: cached_sweep(
                    views, p, plan.readouts, dev, spec, options.force, reporter, identity, sweeps
                ),
                lambda stage, path: check_sweep(stage, path, plan.readouts),
            )
            chosen = stage["chosen"]
        selection[protocol.name] = {r: views_of(es, r, defended) for r, es in chosen.items()}
        views.validate(v for vs in selection[protocol.name].values() for v in vs)
    return views, selection
