"""A run, typed: what `bench evaluate` is asked to do, parsed once at the CLI edge.

`EvalConfig` holds the user's raw inputs (flag strings, comma lists). `EvalConfig.parse` validates every
one of them with the engine's own grammars and returns a `RunSpec` (what to compute: it decides the
results, is stored in the record and read back by `bench check`) and `RunOptions` (how and where to run
it: never part of a run's identity). Below this module nothing parses a spec string: the evaluation, the
records and the reports work on these types, and on `ViewSpec` for "which module does an attack see".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from enum import StrEnum
from fractions import Fraction
from typing import Any

from bench.errors import BenchError, did_you_mean
from bench.numbers import format_fraction, format_number

ZOO_PREFIX = "robustbench:"
SUITES = ("quick", "ready-made", "white-box", "full", "lite")
SWEEP_SCHEDULES = ("full", "halving")  # the white-box sweep: every candidate at full budget, or halving
AUTOGRAD = "autograd"  # the estimator name of a plain (non-DEQ) network: its own backward pass
EARLY = "early"  # the readout whose state the dev set chooses (the papers' early-exit defense)
DEFAULT_SHARD_TIMEOUT_S = 6 * 3600.0


def default_n_dev(suite: str) -> int:
    """Development examples of the estimator sweep and the early-state selection, when not given."""
    return 16 if suite == "quick" else 100


def parse_eps(text: str | float) -> float:
    """'8/255' or '0.1' -> float; anything else is a one-line error."""
    if isinstance(text, int | float):
        value = float(text)
    else:
        try:
            value = float(Fraction(str(text).strip()))
        except (ValueError, ZeroDivisionError):
            raise BenchError(
                f"invalid eps {text!r}: write it as a fraction like 8/255 or a decimal like 0.1"
            ) from None
    if not 0.0 <= value <= 1.0:
        raise BenchError(f"invalid eps {text!r}: it must lie in [0, 1] (inputs are in [0, 1])")
    return value


def format_eps(eps: float) -> str:
    """'8/255' when eps is exactly k/255 (parse_eps reads it back to the same float), else the shortest
    decimal that round-trips."""
    return format_fraction(eps)


class AttackMode(StrEnum):
    """How an attack meets a defended model; `undefended` when there is no defense."""

    UNDEFENDED = "undefended"
    TRANSFER = "transfer"  # crafted on the undefended model, judged by the defended prediction
    BPDA = "bpda"  # forward through the defense, backward through the estimator
    ADAPTIVE = "adaptive"  # backward through the defense's unrolled input steps

    @property
    def defended_forward(self) -> bool:
        """True when the attacked module's value is the defended prediction."""
        return self in (AttackMode.BPDA, AttackMode.ADAPTIVE)


DEFENSE_MODES = (AttackMode.TRANSFER, AttackMode.BPDA, AttackMode.ADAPTIVE)


@dataclass(frozen=True)
class ViewSpec:
    """The module an attack sees: its value is `readout`, its gradient `estimator`'s, in `mode`."""

    readout: str
    estimator: str
    mode: AttackMode = AttackMode.UNDEFENDED

    @property
    def label(self) -> str:
        """The estimator column of a record: `e`, or `mode@e` on a defended model (`transfer@exact`)."""
        return self.estimator if self.mode is AttackMode.UNDEFENDED else f"{self.mode.value}@{self.estimator}"

    @classmethod
    def from_label(cls, readout: str, label: str) -> ViewSpec:
        """The inverse of `label`, for records and user input; BenchError on an unknown mode."""
        mode, sep, estimator = label.rpartition("@")
        if not sep:
            return cls(readout, label)
        try:
            parsed = AttackMode(mode)
        except ValueError:
            modes = [m.value for m in DEFENSE_MODES]
            raise BenchError(f"unknown defense attack mode {mode!r} in {label!r}; use {modes}") from None
        if parsed is AttackMode.UNDEFENDED:
            raise BenchError(f"{label!r}: write an undefended estimator without a mode")
        return cls(readout, estimator, parsed)


class Batching(StrEnum):
    """Whose rules stop the solver and pick its lowest-residual state: each example's, or the batch's."""

    PER_EXAMPLE = "per-example"  # results do not depend on batch composition (the default)
    PAPERS = "papers"  # the papers' code: batch-wide stop rule and pick, in every solve


_UNROLL_DEPLOY = re.compile(r"unroll:([0-9]+):([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")


@dataclass(frozen=True)
class DeploySpec:
    """How a DEQ's deployed prediction refines the solver's z*: `fz` (f(z*) only, the papers' "real"
    readout) or `unroll:K:lam` (f(z*) then K damped steps z <- (1 - lam) z + lam f(z))."""

    steps: int
    lam: float = 0.5

    @property
    def text(self) -> str:
        return "fz" if self.steps == 0 else f"unroll:{self.steps}:{format_number(self.lam)}"

    @classmethod
    def parse(cls, text: str) -> DeploySpec:
        value = text.strip().lower()
        if value in ("fz", "real"):
            return cls(0)
        m = _UNROLL_DEPLOY.fullmatch(value)
        if m is None:
            raise BenchError(f"bad --deploy {text!r}: use fz (alias real) or unroll:K:lam, e.g. unroll:9:0.5")
        lam = float(m.group(2))
        if not 0.0 < lam <= 1.0:
            raise BenchError(f"bad --deploy {text!r}: lam must lie in (0, 1]")
        return cls(0, 0.5) if int(m.group(1)) == 0 else cls(int(m.group(1)), lam)

    @staticmethod
    def describe(deploy: dict[str, Any] | None) -> str:
        """A deployed-prediction setting (a DeployConfig's fields) in this grammar: `fz`, `unroll:K:lam`,
        or `z*` when the solver's state itself predicts (no f applied); '' for a network without one."""
        if not deploy:
            return ""
        if not deploy.get("refine_apply_f", True):
            return "z*" if not deploy.get("refine_steps") else f"z*+unroll:{deploy['refine_steps']}"
        steps = int(deploy.get("refine_steps", 0))
        return DeploySpec(steps, float(deploy.get("refine_lambda", 0.5))).text if steps else "fz"

    def overrides(self) -> dict[str, Any]:
        """DeployConfig fields this deploy sets (the solver settings stay the registry's)."""
        return {"refine_apply_f": True, "refine_steps": self.steps, "refine_lambda": self.lam}


@dataclass(frozen=True)
class RunSpec:
    """What one evaluation computes. Every field is validated; equal specs give equal results."""

    model: str
    checkpoint: str | None = None
    dataset: str | None = None  # None: the model's
    n_examples: int = 100
    eps: float | None = None  # None: the data set's
    suite: str = "quick"
    attacks: tuple[str, ...] | None = None  # replaces the suite's attacks, each in its own group
    grads: tuple[str, ...] | None = None  # fixes the white-box estimators (no sweep)
    readouts: tuple[str, ...] | None = None  # None: ('final',)
    defense: Any = None  # an EntropyReduction, or None
    deploy: DeploySpec | None = None  # None: the registry's deployed prediction
    batching: Batching = Batching.PER_EXAMPLE
    n_dev: int | None = None
    sweep: str = "full"  # SWEEP_SCHEDULES: successive halving tries every candidate with a short PGD first
    batch_size: int = 50
    seed: int = 0
    device: str = "auto"
    save_adversarial: bool = False
    random_weights: bool = False  # benchmarks only: evaluate an untrained architecture

    @property
    def defense_text(self) -> str:
        return "none" if self.defense is None else self.defense.spec

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what the record stores and `bench check` rebuilds the run from."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["defense"] = self.defense_text
        out["deploy"] = None if self.deploy is None else self.deploy.text
        out["batching"] = self.batching.value
        out["eps"] = None if self.eps is None else format_eps(self.eps)
        for key in ("attacks", "grads", "readouts"):
            out[key] = None if out[key] is None else list(out[key])
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunSpec:
        """A spec from its `to_dict` form (or an expected-results file's `evaluation`), validated again."""
        if not isinstance(values, dict):
            raise BenchError("a run specification must be a JSON object")
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(values) - known - set(_OPTION_FIELDS)):
            raise BenchError(f"unknown run specification field(s): {', '.join(unknown)}")
        raw = {k: v for k, v in values.items() if k in known}
        for key in ("attacks", "grads", "readouts"):
            if raw.get(key) is not None and not isinstance(raw[key], list | tuple):
                raise BenchError(f"run specification field {key!r} must be a list")
        return EvalConfig(**raw).parse()[0]


@dataclass(frozen=True)
class RunOptions:
    """How and where a run happens: never part of its identity."""

    results_dir: str = "results"
    data_dir: str | None = None
    download: bool = False
    force: bool = False
    quiet: bool = False
    shard: str | None = None  # "RANK/WORLD" or "slurm"; None: torchrun's RANK/WORLD_SIZE if set, else all
    shard_timeout: float = DEFAULT_SHARD_TIMEOUT_S
    stop_after_batches: int | None = None  # tests only: simulate a crash after this many new batches


_OPTION_FIELDS = tuple(f.name for f in fields(RunOptions))


def _strings(value: list[str] | tuple[str, ...] | str | None, what: str) -> list[str] | None:
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    if not all(isinstance(v, str) for v in items):
        raise BenchError(f"{what} must be strings")
    cleaned = [v.strip() for v in items if v.strip()]
    return cleaned or None


def _positive(value: Any, flag: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BenchError(f"{flag} must be an integer of at least 1, got {value!r}")
    return value


@dataclass
class EvalConfig:
    """The raw inputs of `bench evaluate` (flag values as typed). `parse` is the only way in."""

    model: str
    checkpoint: str | None = None
    dataset: str | None = None
    data_dir: str | None = None
    download: bool = False
    n_examples: int = 100
    eps: str | float | None = None
    suite: str = "quick"
    attacks: list[str] | str | None = None
    grads: list[str] | str | None = None
    readouts: list[str] | str | None = None
    defense: str = "none"
    deploy: str | None = None
    batching: str = "per-example"
    batch_size: int = 50
    device: str = "auto"
    seed: int = 0
    results_dir: str = "results"
    n_dev: int | None = None
    sweep: str = "full"
    force: bool = False
    save_adversarial: bool = False
    quiet: bool = False
    random_weights: bool = False
    stop_after_batches: int | None = None
    shard: str | None = None
    shard_timeout: float = DEFAULT_SHARD_TIMEOUT_S

    def parse(self) -> tuple[RunSpec, RunOptions]:
        """Validate every input; BenchError (one line) on the first bad one, before any work."""
        from bench.attacks.specs import expand_attacks, parse_attacks
        from bench.defenses.entropy import parse_defense
        from bench.deq.estimators import parse_estimator
        from bench.deq.readouts import parse_readout

        if not isinstance(self.model, str) or not self.model.strip():
            raise BenchError("--model must name a model (see `bench models`)")
        if self.suite not in SUITES:
            raise BenchError(f"unknown suite {self.suite!r}{did_you_mean(str(self.suite), SUITES)}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise BenchError(f"--seed must be an integer, got {self.seed!r}")
        eps = None if self.eps is None else parse_eps(self.eps)
        attacks = _strings(self.attacks, "--attacks")
        if attacks is not None:
            attacks = expand_attacks(attacks)
            parse_attacks(attacks, 0.0)  # the grammar and duplicates; eps only scales the budget
        grads = _strings(self.grads, "--grads")
        if grads is not None:
            for g in grads:  # validated here; kept as written (records label estimators as the user did)
                if g != AUTOGRAD:
                    parse_estimator(g)
        readouts = _strings(self.readouts, "--readouts")
        if readouts is not None:
            for r in readouts:
                if r != EARLY:
                    parse_readout(r)
            if dupes := sorted({r for r in readouts if readouts.count(r) > 1}):
                raise BenchError(f"readout(s) listed twice: {', '.join(dupes)}")
        try:
            batching = Batching(self.batching)
        except ValueError:
            raise BenchError(
                f"unknown --batching {self.batching!r}; use {' or '.join(b.value for b in Batching)}"
            ) from None
        if self.n_dev is not None:
            _positive(self.n_dev, "--n-dev")
        if self.sweep not in SWEEP_SCHEDULES:
            raise BenchError(
                f"unknown --sweep {self.sweep!r}{did_you_mean(str(self.sweep), SWEEP_SCHEDULES)}"
            )
        if not (isinstance(self.shard_timeout, int | float) and math.isfinite(self.shard_timeout)):
            raise BenchError("--shard-timeout must be a finite number of seconds")
        spec = RunSpec(
            model=self.model.strip(),
            checkpoint=self.checkpoint,
            dataset=self.dataset,
            n_examples=_positive(self.n_examples, "--n-examples"),
            eps=eps,
            suite=self.suite,
            attacks=None if attacks is None else tuple(attacks),
            grads=None if grads is None else tuple(grads),
            readouts=None if readouts is None else tuple(readouts),
            defense=parse_defense(self.defense),
            deploy=None if self.deploy is None else DeploySpec.parse(self.deploy),
            batching=batching,
            n_dev=self.n_dev,
            sweep=self.sweep,
            batch_size=_positive(self.batch_size, "--batch-size"),
            seed=self.seed,
            device=self.device,
            save_adversarial=bool(self.save_adversarial),
            random_weights=bool(self.random_weights),
        )
        options = RunOptions(
            results_dir=self.results_dir,
            data_dir=self.data_dir,
            download=bool(self.download),
            force=bool(self.force),
            quiet=bool(self.quiet),
            shard=self.shard,
            shard_timeout=float(self.shard_timeout),
            stop_after_batches=self.stop_after_batches,
        )
        return spec, options
