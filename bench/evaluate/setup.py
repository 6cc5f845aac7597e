"""From a RunSpec to what a run needs: the model as deployed, its data, the plan, and the run's identity.

The identity (`Setup.identity`) is what the run id hashes: the resolved inputs (checkpoint sha256, data
hashes, eps, the expanded plan, the deployed solver, the code version), not the flags that named them.
"""

from __future__ import annotations

import platform
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bench import __version__
from bench.data import ExampleSet, dataset_info, load_dataset, load_dev_set
from bench.errors import BenchError
from bench.evaluate.plan import Plan, build_plan, plan_to_dict
from bench.evaluate.views import Views, is_deq
from bench.numbers import format_number
from bench.records.schema import SCHEMA_VERSION
from bench.registry import LoadedModel, load_model
from bench.spec import AUTOGRAD, EARLY, RunOptions, RunSpec, default_n_dev


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise BenchError(f"unknown device {name!r}: use auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


def ready_made_estimator(loaded: LoadedModel) -> str:
    """The model's own gradient at the final state: what a ready-made attack differentiates."""
    model = loaded.model
    if not is_deq(model):
        return AUTOGRAD
    grad = str(loaded.entry.recipe.get("grad", "")) if loaded.entry.recipe else ""
    if grad.startswith("exact"):
        return grad
    deploy = model.deploy
    if deploy.refine_steps == 0:
        return "exact"  # f(z*) alone: the papers' "real" deploy, whose own gradient is the exact one
    return f"unroll:{deploy.refine_steps}:{format_number(deploy.refine_lambda)}"


def dev_source(dataset: str, n_report: int, n_dev: int) -> str:
    """Fashion-MNIST dev examples come from the built-in subset whenever they fit there.

    The built-in images equal the full test set's first 1000, so a machine with and one without the full
    data set choose estimators on the same examples and produce the same record.
    """
    if dataset == "fashion-mnist" and n_report + n_dev <= 1000:
        return "fashion-mnist-builtin"
    return dataset


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


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"deq-bench": __version__, "python": platform.python_version()}
    for pkg in ("torch", "torchvision", "pyautoattack", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


@dataclass
class Setup:
    """Everything a run reads before its first batch."""

    loaded: LoadedModel
    views: Views
    data: ExampleSet
    dev: ExampleSet | None
    plan: Plan
    ready_made: str  # the model's own gradient: the ready-made protocol's and the early-state selection's
    identity: dict[str, Any]  # hashed into the run id
    provenance: dict[str, Any]

    @property
    def run_name(self) -> str:
        return self.loaded.entry.name.replace(":", "_").replace("/", "_")


def _deployed(loaded: LoadedModel, spec: RunSpec) -> LoadedModel:
    """The model with the spec's deployed prediction and batching rules (DEQs only)."""
    model = loaded.model
    if not is_deq(model):
        if spec.deploy is not None:
            raise BenchError(f"--deploy needs a DEQ model; {loaded.entry.name} is a {loaded.entry.family}")
        return loaded
    changes = dict(spec.deploy.overrides()) if spec.deploy is not None else {}
    model.deploy = replace(model.deploy, batching=spec.batching.value, **changes)
    return loaded


def prepare(spec: RunSpec, options: RunOptions, device: torch.device) -> Setup:
    """Load, check and plan: every bad input fails here, before any work."""
    loaded = load_model(spec.model, spec.checkpoint, random_weights=spec.random_weights, dataset=spec.dataset)
    loaded = _deployed(loaded, spec)
    entry = loaded.entry
    dataset = spec.dataset or entry.dataset
    info = dataset_info(dataset)
    if dataset.replace("-builtin", "") != entry.dataset.replace("-builtin", ""):
        raise BenchError(f"model {entry.name!r} is for {entry.dataset}, not {dataset}")
    eps = spec.eps if spec.eps is not None else info.eps
    data = load_dataset(dataset, "test", options.data_dir, options.download, spec.n_examples)
    if tuple(data.x.shape[1:]) != tuple(entry.input_shape):
        raise BenchError(
            f"input shape {tuple(data.x.shape[1:])} of {dataset} does not match "
            f"{entry.name}'s {entry.input_shape}"
        )
    model = loaded.model.to(device).eval()
    views = Views(model, eps, device, spec.defense)
    if spec.defense is not None and not views.is_deq:
        raise BenchError(f"--defense {spec.defense_text} needs a DEQ model; {entry.name} is a {entry.family}")
    ready_made = ready_made_estimator(loaded)
    max_iter = model.deploy.max_iter if views.is_deq else 0
    plan = build_plan(spec, is_deq=views.is_deq, max_iter=max_iter, ready_made_estimator=ready_made)
    if EARLY in plan.readouts and not views.is_deq:
        raise BenchError("the early-state readout needs a DEQ model")
    _validate_plan(views, plan)
    dev = _dev_set(spec, options, plan, dataset, len(data))
    identity = {
        "schema": SCHEMA_VERSION,
        "model": entry.name,
        "checkpoint_sha256": loaded.checkpoint_sha256,
        "random_weights": spec.random_weights,
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
        "plan": plan_to_dict(plan),
        "defense": spec.defense_text,
        "batch_size": spec.batch_size,
        "seed": spec.seed,
        "save_adversarial": spec.save_adversarial,
        "device": device.type,
        "deploy": model.deploy.to_dict() if views.is_deq else None,
        "batching": spec.batching.value,
        "code": __version__,
    }
    if loaded.user_model is not None:  # a user's model: import path, factory arguments, weights' sha256
        identity["user_model"] = loaded.user_model
    provenance = {
        "checkpoint_path": loaded.checkpoint_path,
        "checkpoint_metadata": loaded.checkpoint_metadata,
        "data_source": data.source,
        "versions": versions(),
        "git_commit": _git_commit(),
        "defense_cost_per_example": spec.defense.cost() if spec.defense is not None else None,
    }
    return Setup(loaded, views, data, dev, plan, ready_made, identity, provenance)


def _validate_plan(views: Views, plan: Plan) -> None:
    """Every attack spec and every (readout, estimator) view builds: a typo fails before any work."""
    from bench.attacks.specs import parse_attack
    from bench.evaluate.plan import views_of

    for protocol in plan.protocols:
        for group in protocol.groups.values():
            for spec in group:
                parse_attack(spec, views.eps)
        if not views.is_deq:
            continue
        estimators = list(protocol.estimators) or list(protocol.sweep.candidates if protocol.sweep else ())
        # "early" stands for the final state until the dev set has chosen one
        stand_in = views.with_states({EARLY: "final"})
        stand_in.validate(v for r in plan.readouts for v in views_of(estimators, r, defended=False))


def _dev_set(
    spec: RunSpec, options: RunOptions, plan: Plan, dataset: str, n_report: int
) -> ExampleSet | None:
    """The development examples of the sweep and the early-state selection, disjoint from the reported."""
    n_dev = max((p.sweep.n_dev for p in plan.protocols if p.sweep), default=0)
    if EARLY in plan.readouts:
        n_dev = max(n_dev, spec.n_dev or default_n_dev(spec.suite))
    if not n_dev:
        return None
    source = dev_source(dataset, n_report, n_dev)
    return load_dev_set(source, n_dev, n_report, options.data_dir, options.download)
