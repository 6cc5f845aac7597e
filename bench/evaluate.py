"""`bench evaluate`: the white-box attack suite through DEQ states, per-example records, worst case, resume.

Flow per run: load model and data -> expand the suite into a Plan -> (white-box) pick estimators with a
PGD sweep on a disjoint development set -> per batch: one clean solve feeds every readout, then every
attack group runs its attacks in order on the survivors, each attack once per chosen estimator (a
score-based one once per distinct forward) ->
one JSON document with per-example columns. Each finished batch is saved, so a killed run resumes.

Sharding (torchrun, SLURM arrays, --shard R/W; see bench/distributed.py and docs/distributed.md): each
process runs its strided share of the same batch plan into the same stage files, and the record is always
assembled from those files (bench/merge.py), so a sharded record's results equal a single-process one's.
"""

from __future__ import annotations

import io
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bench import __version__
from bench.attacks import Attack
from bench.attacks.orchestrator import UNPERTURBED_MISCLASSIFIED, run_attacks
from bench.attacks.specs import parse_attack
from bench.data import ExampleSet, dataset_info, load_dataset, load_dev_set
from bench.distributed import (
    DEFAULT_TIMEOUT_S,
    announce,
    barrier,
    batch_plan,
    describe_batches,
    process_group,
    resolve_shard,
    shard_batches,
    shard_device,
    wait_for,
)
from bench.errors import BenchError
from bench.io import atomic_write_bytes
from bench.merge import assemble, batch_stage, missing_batches, record_session, save_manifest
from bench.progress import Reporter
from bench.records import SCHEMA_VERSION, RunStore, SweepCache, concat_columns, derive_seed, run_id_of
from bench.registry import LoadedModel, load_model, parse_eps
from bench.suites import AUTOGRAD, Plan, Protocol, build_plan, plan_to_dict, protocol_dict


@dataclass
class EvalConfig:
    model: str
    checkpoint: str | None = None
    dataset: str | None = None
    data_dir: str | None = None
    download: bool = False
    n_examples: int = 100
    eps: str | None = None
    suite: str = "quick"
    attacks: list[str] | None = None
    grads: list[str] | None = None
    readouts: list[str] | None = None
    defense: str = "none"
    batch_size: int = 50
    device: str = "auto"
    seed: int = 0
    results_dir: str = "results"
    n_dev: int | None = None
    force: bool = False
    save_adversarial: bool = False
    quiet: bool = False
    random_weights: bool = False  # benchmarks only: evaluate an untrained architecture
    stop_after_batches: int | None = None  # tests only: simulate a crash after this many new batches
    # sharding: not part of the run spec, so every shard of a run shares its run id (bench/distributed.py)
    shard: str | None = None  # "RANK/WORLD" or "slurm"; None: torchrun's RANK/WORLD_SIZE if set, else all
    shard_timeout: float = DEFAULT_TIMEOUT_S  # seconds a shard waits for rank 0's sweep or for its peers
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise BenchError(f"unknown device {name!r}: use auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


def _is_deq(model: nn.Module) -> bool:
    from models.deq import is_deq

    return is_deq(model)


def ready_made_estimator(loaded: LoadedModel) -> str:
    """The model's own gradient at the final state: what a ready-made attack differentiates."""
    model = loaded.model
    if not _is_deq(model):
        return AUTOGRAD
    grad = str(loaded.entry.recipe.get("grad", "")) if loaded.entry.recipe else ""
    if grad.startswith("exact"):
        return grad
    deploy = model.deploy
    from bench.deq.estimators import format_number

    return f"unroll:{deploy.refine_steps}:{format_number(deploy.refine_lambda)}"


class Evaluator:
    """Builds the attacked views of one model and runs batches; holds nothing batch-specific."""

    def __init__(self, model: nn.Module, eps: float, device: torch.device, defense: Any = None) -> None:
        self.model = model
        self.eps = eps
        self.device = device
        self.defense = defense  # an EntropyReduction, or None
        self.is_deq = _is_deq(model)
        self._views: dict[tuple[str, str], nn.Module] = {}
        self._checked: set[str] = set()
        self.aliases: dict[str, str] = {}  # readout names resolved at run time ("early" -> "state:t")

    def resolve(self, readout: str) -> str:
        return self.aliases.get(readout, readout)

    def claim_checks(self, readout: str) -> bool:
        """True the first time a readout is attacked: AutoAttack's model checks (randomness, output range,
        dynamic forward) are about the deployed function, so once per readout and run is enough."""
        if readout in self._checked:
            return False
        self._checked.add(readout)
        return True

    def view(self, readout: str, estimator: str) -> nn.Module:
        """The module an attack sees for (readout, estimator): value = readout, gradient = estimator.

        With a defense, `mode@estimator` names an attack mode on it (see DEFENSE_MODES): `bpda@e` and
        `adaptive@e` are views of the defended prediction; `transfer@e` crafts on the undefended model
        (this view) and run_group judges the result with the defended prediction. A plain estimator is
        the undefended model, as the white-box sweep uses it.
        """
        if not self.is_deq:
            return self.model
        readout = self.resolve(readout)
        key = (readout, estimator)
        if key not in self._views:
            mode, _, est = estimator.rpartition("@")
            if mode and self.defense is None:
                raise BenchError(f"estimator {estimator!r} names a defense attack mode but --defense is none")
            if mode == "bpda":
                from bench.defenses import BPDAView

                self._views[key] = BPDAView(self.model, self.defense, readout, est)
            elif mode == "adaptive":
                from bench.defenses import AdaptiveView

                self._views[key] = AdaptiveView(self.model, self.defense, readout, est)
            elif mode in ("", "transfer"):
                from bench.deq.view import AttackView

                self._views[key] = AttackView(self.model, readout=readout, estimator=est)
            else:
                raise BenchError(
                    f"unknown defense attack mode {mode!r} in {estimator!r}; use {DEFENSE_MODES}"
                )
        return self._views[key]

    @staticmethod
    def runs_of(attack: Attack, estimators: list[str]) -> list[str]:
        """The estimators `attack` runs with: every one, or for a score-based attack (Square) the first of
        each distinct forward. Its queries see forward values only, and every estimator's view of a readout
        has the deployed prediction as its value (`bpda@` and `adaptive@` views the defended one), so a
        second run would repeat the same attack with another seed: extra restarts, not another estimator.
        """
        if attack.uses_gradient:
            return list(estimators)
        first: dict[bool, str] = {}
        for est in estimators:
            first.setdefault(est.rpartition("@")[0] in DEFENDED_FORWARD_MODES, est)
        return list(first.values())

    def validate(self, readouts: tuple[str, ...], estimators: list[str]) -> None:
        """Parse every readout and estimator up front so a typo fails before any work is done."""
        if not self.is_deq:
            return
        for r in readouts:
            for e in estimators:
                self.view(r, e)

    @torch.no_grad()
    def clean_pass(self, x: Tensor, y: Tensor, readouts: tuple[str, ...]) -> dict[str, Any]:
        """One solve feeds every readout: predictions per readout, per solver state, and solver stats."""
        if not self.is_deq:
            pred = self.model(x).argmax(1)
            return {"readouts": {"final": pred}, "states": None, "solver": None}
        return self._deq_pass(x, readouts)

    def _deq_pass(self, x: Tensor, readouts: tuple[str, ...]) -> dict[str, Any]:
        """One solve (or one defended forward): every readout, every state's prediction and entropy."""
        from bench.defenses import prediction_entropy

        model = self.model
        if self.defense is not None:
            from bench.defenses import defended_readout, readout_logits

            with torch.enable_grad():  # the defense's input steps need autograd
                result = self.defense.run(model, x)
            states_z = result.states
            preds = {
                r: readout_logits(model, states_z, defended_readout(self.resolve(r), self.defense)).argmax(1)
                for r in readouts
            }
            stats = result.stats()
            stats.pop("f_evals"), stats.pop("f_backward")
            rel, abs_ = result.rel_residual, result.abs_residual
        else:
            from bench.deq.readouts import parse_readout, solve_model
            from bench.deq.solvers import SolverSettings

            model.begin_forward(x.shape[0])
            u = model.inject(x)
            traj = solve_model(model, u, SolverSettings.from_deploy(model.deploy), keep=None)
            states_z = [traj.state(t) for t in range(1, traj.max_iter + 1)]
            preds = {r: parse_readout(self.resolve(r)).logits(model, traj, u).argmax(1) for r in readouts}
            stats = traj.stats()
            rel, abs_ = traj.rel_residual, traj.abs_residual
        logits = [model.head(z) for z in states_z]
        stats["rel_trace"] = _rounded(rel)  # (B, T): the residual along the dynamics, per example
        stats["abs_trace"] = _rounded(abs_)
        return {
            "readouts": preds,
            "states": torch.stack([lg.argmax(1) for lg in logits], 1),
            "entropy": torch.stack([prediction_entropy(lg) for lg in logits], 1),
            "solver": stats,
        }

    @torch.no_grad()
    def adversarial_pass(self, x_adv: Tensor, readouts: tuple[str, ...]) -> dict[str, Any]:
        if not self.is_deq:
            return {"readouts": {"final": self.model(x_adv).argmax(1)}, "states": None, "solver": None}
        return self._deq_pass(x_adv, readouts)


DEFENDED_FORWARD_MODES = ("bpda", "adaptive")  # views whose value is the defended prediction
DEFENSE_MODES = ("transfer", *DEFENDED_FORWARD_MODES)
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
    "code",
)


def _rounded(t: Tensor, digits: int = 5) -> list[Any]:
    """Floats for records, rounded to keep them small (per-step traces are diagnostics, not results)."""
    return [[float(f"{v:.{digits}g}") for v in row] for row in t.detach().cpu().tolist()]


def _tolist(t: Tensor) -> list[Any]:
    return t.detach().cpu().tolist()


def _example_seeds(base: int, key: str, indices: Tensor) -> Tensor:
    return torch.tensor([derive_seed(base, key, int(i)) for i in indices], dtype=torch.int64)


def run_group(
    ev: Evaluator,
    protocol: str,
    group: str,
    attacks: tuple[str, ...],
    estimators: list[str],
    readout: str,
    x: Tensor,
    y: Tensor,
    indices: Tensor,
    clean_correct: Tensor,
    seed: int,
    first_batch: bool,
    reporter: Reporter,
) -> tuple[list[dict[str, Any]], Tensor, Tensor, dict[str, float], list[str]]:
    """Run one group's attacks in order, each once per estimator (`Evaluator.runs_of`), on the examples
    still robust.

    Returns the per-(attack, estimator) columns, the robust mask, the worst-case inputs (the adversarial
    example that broke each example, else the first attack's last iterate), wall times and warnings.
    """
    robust = clean_correct.clone()
    worst = x.clone()
    have_worst = torch.zeros_like(robust)
    columns: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    warnings: list[str] = []
    for spec in attacks:
        attack = parse_attack(spec, ev.eps)
        for est in ev.runs_of(attack, estimators):
            key = f"{protocol}|{group}|{attack.name}|{est}|{readout}"
            seeds = _example_seeds(seed, key, indices)
            todo = robust.clone()
            check = first_batch and ev.claim_checks(readout)
            suite = run_attacks(
                ev.view(readout, est), x, y, [attack], seeds, clean_correct=todo, checks=check
            )
            res = suite.results[attack.name]
            found = suite.warnings + res.warnings
            if est.startswith("transfer@"):  # crafted on the undefended model, judged by the defended one
                from bench.defenses import judge

                # rows picked by the defended prediction that the undefended one already gets wrong
                found = [w for w in found if UNPERTURBED_MISCLASSIFIED not in w]
                res.broken = judge(ev.model, ev.defense, res.x_adv, y, readout) & res.attacked
            warnings += [f"{attack.name} [{est}, {readout}]: {w}" for w in found]
            broken = res.broken & todo
            newly_worst = broken | (res.attacked & ~have_worst)
            worst[newly_worst] = res.x_adv[newly_worst]
            have_worst |= res.attacked
            robust &= ~broken
            columns.append(
                {
                    "protocol": protocol,
                    "group": group,
                    "attack": attack.name,
                    "estimator": est,
                    "readout": readout,
                    "attacked": _tolist(res.attacked & todo),
                    "broken": _tolist(broken),
                    "linf": [round(v, 7) for v in _tolist(res.linf)],
                }
            )
            seconds[key] = res.seconds
            reporter.advance(f"{protocol}/{attack.name} [{est}] {readout}", int(robust.sum()), len(robust))
    return columns, robust, worst, seconds, warnings


def run_batch(
    ev: Evaluator,
    plan: Plan,
    selection: dict[str, dict[str, list[str]]],
    x: Tensor,
    y: Tensor,
    indices: Tensor,
    seed: int,
    first_batch: bool,
    reporter: Reporter,
) -> dict[str, Any]:
    """Everything one batch contributes to the record (columns) and to provenance (seconds, warnings)."""
    clean = ev.clean_pass(x, y, plan.readouts)
    out: dict[str, Any] = {
        "index": _tolist(indices),
        "label": _tolist(y),
        "clean": {r: {"pred": _tolist(p)} for r, p in clean["readouts"].items()},
    }
    if clean["states"] is not None:
        # (B, T): every state's prediction and prediction entropy (nats), per example
        out["clean_states"] = {"pred": _tolist(clean["states"]), "entropy": _rounded(clean["entropy"])}
        out["clean_solver"] = clean["solver"]
    attacks_cols: list[dict[str, Any]] = []
    adv: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    warnings: list[str] = []
    worst_all = {r: x.clone() for r in plan.readouts}
    broken_all = {r: torch.zeros(len(x), dtype=torch.bool, device=x.device) for r in plan.readouts}
    for protocol in plan.protocols:
        for readout in plan.readouts:
            estimators = selection[protocol.name][readout]
            clean_correct = clean["readouts"][readout] == y
            for group, attacks in protocol.groups.items():
                cols, robust, worst, secs, warns = run_group(
                    ev,
                    protocol.name,
                    group,
                    attacks,
                    estimators,
                    readout,
                    x,
                    y,
                    indices,
                    clean_correct,
                    seed,
                    first_batch,
                    reporter,
                )
                attacks_cols += cols
                seconds.update(secs)
                warnings += warns
                broken_here = clean_correct & ~robust
                take = broken_here & ~broken_all[readout]
                worst_all[readout][take] = worst[take]
                broken_all[readout] |= broken_here
                post = ev.adversarial_pass(worst, (readout,))
                entry: dict[str, Any] = {"pred": _tolist(post["readouts"][readout])}
                if post["states"] is not None:
                    entry["states_pred"] = _tolist(post["states"])
                    entry["states_entropy"] = _rounded(post["entropy"])
                    entry["solver"] = post["solver"]
                adv[f"{protocol.name}|{group}|{readout}"] = entry
    out["attacks"] = attacks_cols
    out["adversarial"] = adv
    result = {"columns": out, "seconds": seconds, "warnings": warnings, "worst": worst_all}
    if first_batch:
        result["sanity"] = batch_sanity(ev, plan, selection, x, y, clean)
    return result


def batch_sanity(
    ev: Evaluator, plan: Plan, selection: dict[str, dict[str, list[str]]], x: Tensor, y: Tensor, clean: dict
) -> dict[str, Any]:
    """The first batch's checks: gradients of every attacked view, and an eps = 0 attack breaks nothing."""
    from bench.sanity import eps_zero_check, gradient_check

    rows = slice(0, min(len(x), 16))
    gradients: dict[str, Any] = {}
    for protocol in plan.protocols:
        for readout in plan.readouts:
            for est in selection[protocol.name][readout]:
                key = f"{est} | {readout}"
                if key not in gradients:
                    gradients[key] = gradient_check(ev.view(readout, est), x[rows], y[rows])
    first = plan.protocols[0]
    readout = plan.readouts[0]
    est = next(e for e in selection[first.name][readout] if not e.startswith("transfer@"))
    clean_correct = clean["readouts"][readout][rows] == y[rows]
    spec = next(iter(first.groups.values()))[0]
    breaks = eps_zero_check(ev.view(readout, est), spec, x[rows], y[rows], clean_correct)
    return {
        "gradients": gradients,
        "eps_zero_breaks": breaks,
        "eps_zero_attack": f"{spec} [{est}, {readout}]",
    }


def _merge_batches(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate batch columns; attack columns are matched by their identity, in the plan's order."""
    base = [{k: v for k, v in p.items() if k != "attacks"} for p in parts]
    merged = concat_columns(base)
    ids = [
        (c["protocol"], c["group"], c["attack"], c["estimator"], c["readout"]) for c in parts[0]["attacks"]
    ]
    cols = []
    for i, ident in enumerate(ids):
        rows = [p["attacks"][i] for p in parts]
        if any((r["protocol"], r["group"], r["attack"], r["estimator"], r["readout"]) != ident for r in rows):
            raise BenchError("cannot merge batches: their attack columns differ")
        col = dict(zip(("protocol", "group", "attack", "estimator", "readout"), ident, strict=True))
        for key in ("attacked", "broken", "linf"):
            col[key] = [v for r in rows for v in r[key]]
        cols.append(col)
    merged["attacks"] = cols
    return merged


def summarize(columns: dict[str, Any], plan_dict: dict[str, Any]) -> dict[str, Any]:
    """Percent accuracies from the per-example columns: clean, per group, per attack (cumulative), All."""
    labels = torch.tensor(columns["label"])
    n = len(labels)
    out: dict[str, Any] = {"n_examples": n, "readouts": {}}
    for readout in plan_dict["readouts"]:
        clean_ok = torch.tensor(columns["clean"][readout]["pred"]) == labels
        all_ok = clean_ok.clone()
        groups: dict[str, Any] = {}
        for col in columns["attacks"]:
            if col["readout"] != readout:
                continue
            gkey = f"{col['protocol']}|{col['group']}"
            g = groups.setdefault(gkey, {"robust": clean_ok.clone(), "attacks": {}})
            g["robust"] &= ~torch.tensor(col["broken"], dtype=torch.bool)
            g["attacks"][f"{col['attack']} [{col['estimator']}]"] = 100.0 * g["robust"].sum().item() / n
            all_ok &= ~torch.tensor(col["broken"], dtype=torch.bool)
        protocols: dict[str, Any] = {}
        for gkey, g in groups.items():
            protocol, group = gkey.split("|")
            p = protocols.setdefault(protocol, {"groups": {}, "robust": clean_ok.clone()})
            p["groups"][group] = {
                "robust_acc": 100.0 * g["robust"].sum().item() / n,
                "cumulative": g["attacks"],
            }
            p["robust"] &= g["robust"]
        out["readouts"][readout] = {
            "clean_acc": 100.0 * clean_ok.sum().item() / n,
            "all_acc": 100.0 * all_ok.sum().item() / n,
            "protocols": {
                name: {"groups": p["groups"], "all_acc": 100.0 * p["robust"].sum().item() / n}
                for name, p in protocols.items()
            },
        }
    return out


def select_estimators(
    ev: Evaluator,
    protocol: Protocol,
    readouts: tuple[str, ...],
    dev: ExampleSet,
    cfg: EvalConfig,
    reporter: Reporter,
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """The white-box sweep: PGD on the development set with every candidate estimator, per readout.

    The strongest `top_k` (lowest dev robust accuracy; ties keep the candidate order) are chosen.
    """
    sweep = protocol.sweep
    assert sweep is not None
    attack = parse_attack(sweep.attack, ev.eps)
    x_all, y_all = dev.x.to(ev.device), dev.y.to(ev.device)
    chosen: dict[str, list[str]] = {}
    table: dict[str, Any] = {}
    for readout in readouts:
        rows = []
        for est in sweep.candidates:
            view = ev.view(readout, est)
            robust_total = 0
            for start in range(0, len(dev), cfg.batch_size):
                sl = slice(start, start + cfg.batch_size)
                x, y = x_all[sl], y_all[sl]
                with torch.no_grad():
                    correct = view(x).argmax(1) == y
                seeds = _example_seeds(cfg.seed, f"sweep|{est}|{readout}", dev.indices[sl])
                res = run_attacks(view, x, y, [attack], seeds, clean_correct=correct, checks=False)
                robust_total += int((correct & ~res.results[attack.name].broken).sum())
            rows.append({"estimator": est, "robust_acc": 100.0 * robust_total / len(dev)})
            reporter.advance(f"sweep {est} {readout}", robust_total, len(dev))
        ranked = sorted(range(len(rows)), key=lambda i: (rows[i]["robust_acc"], i))
        chosen[readout] = [rows[i]["estimator"] for i in ranked[: sweep.top_k]]
        table[readout] = rows
    return chosen, table


def cached_sweep(
    ev: Evaluator,
    protocol: Protocol,
    readouts: tuple[str, ...],
    dev: ExampleSet,
    cfg: EvalConfig,
    reporter: Reporter,
    spec: dict[str, Any],
    sweeps: SweepCache,
) -> dict[str, Any]:
    """The protocol's sweep stage from the cross-run cache, or computed and cached (--force recomputes)."""
    key = SweepCache.key(
        {
            **{k: spec[k] for k in SWEEP_INPUTS},
            **({"user_model": spec["user_model"]} if "user_model" in spec else {}),  # the user's weights
            "sweep": protocol_dict(protocol)["sweep"],
            "readouts": [[r, ev.resolve(r)] for r in readouts],
        }
    )
    stage = None if cfg.force else sweeps.load(key)
    if stage is None:
        assert protocol.sweep is not None
        reporter.start("white-box sweep", len(protocol.sweep.candidates) * len(readouts))
        chosen, table = select_estimators(ev, protocol, readouts, dev, cfg, reporter)
        stage = {"chosen": chosen, "table": table, "key": key}
        sweeps.save(key, stage)
    return stage


def _save_tensor(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"deq-bench": __version__, "python": platform.python_version()}
    for pkg in ("torch", "torchvision", "pyautoattack", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def _dev_source(dataset: str, n_report: int, n_dev: int) -> str:
    """Fashion-MNIST dev examples come from the built-in subset whenever they fit there.

    The built-in images equal the full test set's first 1000, so a machine with and one without the full
    data set choose estimators on the same examples and produce the same record.
    """
    if dataset == "fashion-mnist" and n_report + n_dev <= 1000:
        return "fashion-mnist-builtin"
    return dataset


EARLY = "early"  # the readout whose state is chosen on the dev set (the papers' early-exit defense)


def select_early_state(
    ev: Evaluator, dev: ExampleSet, estimator: str, cfg: EvalConfig, reporter: Reporter
) -> dict[str, Any]:
    """The papers' early-exit selection: the state z[t] most robust on the dev set under ready-made PGD-10.

    PGD-10 is crafted through the final readout with the model's own (ready-made) gradient; every state's
    accuracy on those examples is measured and the best t is chosen (ties: the earliest state).
    """
    attack = parse_attack("pgd-10", ev.eps)
    view = ev.view("final", estimator)
    correct_per_state = None
    reporter.start("early-state selection", (len(dev) + cfg.batch_size - 1) // cfg.batch_size)
    for start in range(0, len(dev), cfg.batch_size):
        x = dev.x[start : start + cfg.batch_size].to(ev.device)
        y = dev.y[start : start + cfg.batch_size].to(ev.device)
        seeds = _example_seeds(cfg.seed, "early-state", dev.indices[start : start + cfg.batch_size])
        everyone = torch.ones(len(x), dtype=torch.bool, device=x.device)
        res = run_attacks(view, x, y, [attack], seeds, clean_correct=everyone, checks=False)
        states = ev.adversarial_pass(res.results[attack.name].x_adv, ("final",))["states"]
        ok = (states == y[:, None]).sum(0)
        correct_per_state = ok if correct_per_state is None else correct_per_state + ok
        reporter.advance("early-state selection", int(ok.max()), len(x))
    curve = [100.0 * int(c) / len(dev) for c in correct_per_state]
    best = max(range(len(curve)), key=lambda i: (curve[i], -i))
    return {"t": best + 1, "readout": f"state:{best + 1}", "pgd10_acc_per_state": curve, "n_dev": len(dev)}


def with_defense_modes(estimators: list[str]) -> list[str]:
    """Every way the suite attacks a defended model, for the estimators chosen on the undefended one.

    transfer@e (crafted on the undefended model, as the paper's code does), bpda@e (forward through the
    defense, backward through e) and adaptive@bptt (end to end through the defense's input updates). The
    reported number is their per-example worst case. Estimators that already name a mode are kept.
    """
    if any("@" in e for e in estimators):
        return list(estimators)
    modes = [f"{mode}@{e}" for mode in ("transfer", "bpda") for e in estimators]
    return [*modes, "adaptive@bptt"]


def evaluate(cfg: EvalConfig) -> tuple[dict[str, Any] | None, Path, bool]:
    """Run (or resume, or reuse) one evaluation, or this process's shard of it.

    Returns (document, path, reused); document is None for a shard that did its batches while another
    process (rank 0, the last shard to finish, or `bench merge`) writes the record at `path`.
    """
    shard = resolve_shard(cfg.shard)
    device = resolve_device(shard_device(cfg.device, shard))
    if cfg.n_examples < 1:
        raise BenchError("--n-examples must be at least 1")
    if cfg.batch_size < 1:
        raise BenchError("--batch-size must be at least 1")
    if cfg.force and shard.sharded:  # one shard's --force would delete the other shards' batches
        raise BenchError("--force cannot be used with shards: delete the run's record and .partial first")
    from bench.defenses import parse_defense

    defense = parse_defense(cfg.defense)
    loaded = load_model(cfg.model, cfg.checkpoint, random_weights=cfg.random_weights, dataset=cfg.dataset)
    entry = loaded.entry
    dataset = cfg.dataset or entry.dataset
    info = dataset_info(dataset)
    base_dataset = dataset.replace("-builtin", "")
    if base_dataset != entry.dataset.replace("-builtin", ""):
        raise BenchError(f"model {entry.name!r} is for {entry.dataset}, not {dataset}")
    eps = parse_eps(cfg.eps) if cfg.eps is not None else info.eps
    data = load_dataset(dataset, "test", cfg.data_dir, cfg.download, cfg.n_examples)
    if tuple(data.x.shape[1:]) != tuple(entry.input_shape):
        raise BenchError(
            f"input shape {tuple(data.x.shape[1:])} of {dataset} does not match "
            f"{entry.name}'s {entry.input_shape}"
        )
    model = loaded.model.to(device).eval()
    ev = Evaluator(model, eps, device, defense)
    if defense is not None and not ev.is_deq:
        raise BenchError(f"--defense {cfg.defense} needs a DEQ model; {entry.name} is a {entry.family}")
    max_iter = model.deploy.max_iter if ev.is_deq else 0
    plan = build_plan(
        cfg.suite,
        is_deq=ev.is_deq,
        max_iter=max_iter,
        ready_made_estimator=ready_made_estimator(loaded),
        attacks=cfg.attacks,
        grads=cfg.grads,
        readouts=cfg.readouts,
        n_dev=cfg.n_dev,
    )
    if EARLY in plan.readouts:
        if not ev.is_deq:
            raise BenchError("the early-state readout needs a DEQ model")
        ev.aliases[EARLY] = "final"  # a stand-in until the dev set has chosen the state
    for protocol in plan.protocols:  # fail on a bad spec before any work
        for group in protocol.groups.values():
            for spec in group:
                parse_attack(spec, eps)
        ev.validate(plan.readouts, list(protocol.estimators) or list(protocol.sweep.candidates))
    plan_dict = plan_to_dict(plan)
    dev: ExampleSet | None = None
    sweep_n = max((p.sweep.n_dev for p in plan.protocols if p.sweep), default=0)
    if EARLY in plan.readouts:
        sweep_n = max(sweep_n, cfg.n_dev or (16 if cfg.suite == "quick" else 100))
    if sweep_n:
        dev = load_dev_set(
            _dev_source(dataset, len(data), sweep_n), sweep_n, len(data), cfg.data_dir, cfg.download
        )
    spec = {
        "schema": SCHEMA_VERSION,
        "model": entry.name,
        "checkpoint_sha256": loaded.checkpoint_sha256,
        "random_weights": cfg.random_weights,
        "dataset": dataset,
        "data_sha256": data.sha256(),
        "n_examples": len(data),
        "dev": None
        if dev is None
        else {
            "split": dev.split,
            "indices": [int(dev.indices[0]), int(dev.indices[-1])],
            "sha256": dev.sha256(),
        },
        "eps": eps,
        "plan": plan_dict,
        "defense": defense.spec if defense is not None else "none",
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "save_adversarial": cfg.save_adversarial,
        "device": device.type,
        "deploy": model.deploy.to_dict() if ev.is_deq else None,
        "code": __version__,
    }
    if loaded.user_model is not None:  # a user's model: import path, factory arguments, weights' sha256
        spec["user_model"] = loaded.user_model
    run_id = run_id_of(spec)
    run_name = entry.name.replace(":", "_").replace("/", "_")
    store = RunStore(cfg.results_dir, run_name, run_id)
    sweeps = SweepCache(cfg.results_dir)
    if cfg.force:
        store.clear()
    elif (done := store.finished()) is not None:
        return done, store.final_path, True

    reporter = Reporter(quiet=cfg.quiet)
    t_start = time.time()
    batches = batch_plan(len(data), cfg.batch_size)  # fixed by the spec, whatever the number of processes
    n_batches = len(batches)
    mine = shard_batches(n_batches, shard.rank, shard.world)  # every batch when not sharded
    manifest_provenance = {
        "checkpoint_path": loaded.checkpoint_path,
        "checkpoint_metadata": loaded.checkpoint_metadata,
        "data_source": data.source,
        "versions": _versions(),
        "git_commit": _git_commit(),
        "defense_cost_per_example": defense.cost() if defense is not None else None,
    }
    save_manifest(store, run_name, spec, n_batches, manifest_provenance)  # what `bench merge` reads
    with process_group(shard, cfg.shard_timeout) as collective, reporter:
        if EARLY in plan.readouts:
            stage = store.load_stage("early-state")
            if stage is None and shard.rank != 0:
                stage = wait_for(
                    lambda: store.load_stage("early-state"),
                    "rank 0's early-state selection",
                    cfg.shard_timeout,
                )
            if stage is None:
                stage = select_early_state(ev, dev, ready_made_estimator(loaded), cfg, reporter)
                store.save_stage("early-state", stage)
            ev.aliases[EARLY] = stage["readout"]
        selection: dict[str, dict[str, list[str]]] = {}
        for protocol in plan.protocols:
            if protocol.sweep is None:
                selection[protocol.name] = {r: list(protocol.estimators) for r in plan.readouts}
                continue
            sweep_stage = f"sweep-{protocol.name}"
            stage = store.load_stage(sweep_stage)
            if stage is None and shard.rank != 0:  # one sweep per run: every shard attacks with its choice
                stage = wait_for(
                    lambda name=sweep_stage: store.load_stage(name),
                    f"rank 0's white-box sweep ({store.stage_path(sweep_stage)})",
                    cfg.shard_timeout,
                )
            if stage is None:
                stage = cached_sweep(ev, protocol, plan.readouts, dev, cfg, reporter, spec, sweeps)
                store.save_stage(sweep_stage, stage)
            selection[protocol.name] = stage["chosen"]
        if defense is not None:
            selection = {
                p: {r: with_defense_modes(es) for r, es in sel.items()} for p, sel in selection.items()
            }
            for sel in selection.values():
                ev.validate(plan.readouts, [e for es in sel.values() for e in es])

        units = sum(
            len(Evaluator.runs_of(parse_attack(spec, eps), selection[p.name][r]))
            for p in plan.protocols
            for r in plan.readouts
            for g in p.groups.values()
            for spec in g
        )
        reporter.start("attacks", len(mine) * units)
        ran: list[int] = []
        reused: list[int] = []
        for b in mine:
            sl = slice(batches[b].start, batches[b].stop)
            if store.stage_path(batch_stage(b)).is_file():
                reporter.skip(units)
                reused.append(b)
                continue
            if cfg.stop_after_batches is not None and len(ran) >= cfg.stop_after_batches:
                raise BenchError(f"stopped after {len(ran)} batches (as asked)")
            x, y = data.x[sl].to(device), data.y[sl].to(device)
            result = run_batch(ev, plan, selection, x, y, data.indices[sl], cfg.seed, b == 0, reporter)
            stage = {
                "columns": result["columns"],
                "seconds": result["seconds"],
                "warnings": result["warnings"],
                "sanity": result.get("sanity"),
            }
            if cfg.save_adversarial:
                _save_tensor(
                    store.partial_dir / f"adv-{b:05d}.pt",
                    {r: t.cpu() for r, t in result["worst"].items()},
                )
            store.save_stage(batch_stage(b), stage)
            ran.append(b)
        session = {
            "rank": shard.rank,
            "world": shard.world,
            "source": shard.source,
            "host": platform.node(),
            "device": str(device),
            "batches_run": ran,
            "batches_reused": reused,
            "started": round(t_start, 3),
            "wall_seconds": round(time.time() - t_start, 3),
        }
        record_session(store, shard, session)
        if shard.sharded:
            did = f"{shard.label()}: ran batches {describe_batches(ran)}" + (
                f", reused {describe_batches(reused)}" if reused else ""
            )
            if collective:  # torchrun: rank 0 assembles once every rank is through the barrier
                barrier(cfg.shard_timeout)
                if shard.rank != 0:
                    announce(f"{did}; rank 0 writes the record")
                    return None, store.final_path, False
                wait_for(  # the barrier says the others are done; a shared file system may lag behind
                    lambda: not missing_batches(store, n_batches) or None,
                    f"the other ranks' batch files in {store.partial_dir}",
                    min(cfg.shard_timeout, 300.0),
                )
            elif missing := missing_batches(store, n_batches):  # array tasks: the last one assembles
                announce(
                    f"{did}; {len(missing)} of {n_batches} batches are still to come "
                    f"({describe_batches(missing)}): the shard that finishes last writes the record, "
                    f"or run `bench merge --results-dir {cfg.results_dir} --run-id {run_id}`"
                )
                return None, store.final_path, False
            announce(f"{did}; writing the record from all {n_batches} batches")

    manifest = {"run_name": run_name, "spec": spec, "n_batches": n_batches, "provenance": manifest_provenance}
    document = assemble(store, manifest, device=str(device), started=t_start)
    if document is None:  # another shard assembled at the same moment and removed the stage files
        if (done := store.finished()) is not None:
            return done, store.final_path, True
        raise BenchError(f"run {run_id}: stage files vanished while assembling the record")
    return document, store.final_path, False
