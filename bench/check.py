"""`bench check`: a regression gate that compares an evaluation with its expected results.

An expected-results file (results/expected/*.json) holds the arguments of one evaluation and the numbers it
gave: clean accuracy, every protocol/group robust accuracy, each protocol's All and the overall All, per
readout, and n. `bench check` re-runs the evaluation (reusing an identical finished run) or reads a record,
and fails (exit 1) when a number leaves expected +- tolerance in either direction: a drop is a regression,
and a rise in robust accuracy is the classic sign of a broken attack or of gradient masking.

The default tolerance is the sampling noise of n examples: two binomial standard errors of the expected
accuracy p, 2 * sqrt(p (1 - p) / n) * 100 points, and never less than one example (100 / n points). On the
same machine and code a re-run reproduces the numbers exactly (seeds are per example); the tolerance is room
for a retrained checkpoint or other hardware, not for a weaker attack.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any

import typer

from bench.errors import BenchError
from bench.io import atomic_write_json
from bench.records import read_record

KIND = "deq-bench expected results"
VERSION = 1
# spec fields that make two evaluations comparable; a record that differs in one is a different evaluation
FINGERPRINT = (
    "model",
    "dataset",
    "n_examples",
    "eps",
    "plan",
    "defense",
    "batch_size",
    "seed",
    "data_sha256",
    "dev",
)
ROBUST_HINT = "above: broken attack or gradient masking?"


@dataclass(frozen=True)
class Row:
    metric: str
    expected: float
    measured: float | None  # None: the record lacks the metric
    allowed: float

    @property
    def delta(self) -> float | None:
        return None if self.measured is None else self.measured - self.expected

    @property
    def verdict(self) -> str:
        if self.delta is None:
            return "missing"
        if self.delta < -self.allowed - 1e-9:
            return "below"
        if self.delta > self.allowed + 1e-9:
            return "above" if self.metric.endswith("/clean") else ROBUST_HINT
        return "ok"


def metrics_of(summary: dict[str, Any]) -> dict[str, float]:
    """Metric name -> percent: readout/clean, readout/protocol/group, readout/protocol/All, readout/All."""
    out: dict[str, float] = {}
    for readout, r in summary["readouts"].items():
        out[f"{readout}/clean"] = r["clean_acc"]
        for protocol, p in r["protocols"].items():
            for group, g in p["groups"].items():
                out[f"{readout}/{protocol}/{group}"] = g["robust_acc"]
            out[f"{readout}/{protocol}/All"] = p["all_acc"]
        out[f"{readout}/All"] = r["all_acc"]
    return out


def default_tolerance(expected_pct: float, n: int) -> float:
    """Two binomial standard errors of the expected accuracy on n examples, at least one example (points)."""
    p = min(max(expected_pct / 100.0, 0.0), 1.0)
    return max(200.0 * math.sqrt(p * (1.0 - p) / n), 100.0 / n)


def _eps_text(eps: float) -> str:
    """8/255 when eps is exactly k/255 (as parse_eps reads it back), else the shortest exact decimal."""
    k = round(eps * 255)
    return f"{k}/255" if float(Fraction(k, 255)) == eps else repr(eps)


def _registered_sha(model: str) -> str | None:
    from bench.registry import get_entry

    try:
        return get_entry(model).checkpoint.sha256 or None
    except BenchError:
        return None


def evaluation_args(doc: dict[str, Any]) -> dict[str, Any]:
    """The `bench evaluate` arguments that reproduce a record's plan, checked by rebuilding the plan."""
    from bench.suites import build_plan, plan_to_dict

    spec = doc["spec"]
    if spec.get("random_weights"):
        raise BenchError("the record evaluates random weights: a baseline of it would guard nothing")
    plan = spec["plan"]
    protocols = {p["name"]: p for p in plan["protocols"]}
    is_deq = spec.get("deploy") is not None
    max_iter = int(spec["deploy"]["max_iter"]) if is_deq else 0
    ready = protocols.get("ready-made", {}).get("estimators") or ["autograd"]
    white = protocols.get("white-box")
    n_dev = white["sweep"]["n_dev"] if white and white["sweep"] else None
    grads = list(white["estimators"]) if is_deq and white and not white["sweep"] else None
    groups = plan["protocols"][0]["groups"] if plan["protocols"] else {}

    def rebuild(attacks: list[str] | None) -> dict[str, Any]:
        built = build_plan(
            plan["suite"],
            is_deq=is_deq,
            max_iter=max_iter,
            ready_made_estimator=ready[0],
            attacks=attacks,
            grads=grads,
            readouts=list(plan["readouts"]),
            n_dev=n_dev,
        )
        return plan_to_dict(built)

    attacks = None if rebuild(None)["protocols"] == plan["protocols"] else list(groups)
    if rebuild(attacks) != plan:
        raise BenchError(
            "cannot express this record's plan as bench evaluate arguments; write the file by hand"
        )
    registered = _registered_sha(spec["model"])
    own = spec.get("checkpoint_sha256")
    checkpoint = None if own is None or own == registered else doc["provenance"].get("checkpoint_path")
    return {
        "model": spec["model"],
        "checkpoint": checkpoint,
        "dataset": spec["dataset"],
        "n_examples": spec["n_examples"],
        "eps": _eps_text(spec["eps"]),
        "suite": plan["suite"],
        "attacks": attacks,
        "grads": grads,
        "readouts": None if plan["readouts"] == ["final"] else list(plan["readouts"]),
        "n_dev": n_dev,
        "defense": spec["defense"],
        "batch_size": spec["batch_size"],
        "seed": spec["seed"],
    }


def make_baseline(doc: dict[str, Any]) -> dict[str, Any]:
    """An expected-results document from a finished record."""
    spec = doc["spec"]
    return {
        "kind": KIND,
        "version": VERSION,
        "evaluation": evaluation_args(doc),
        "n": doc["results"]["summary"]["n_examples"],
        "metrics": metrics_of(doc["results"]["summary"]),
        "fingerprint": {k: spec.get(k) for k in FINGERPRINT},
        "source": {
            "run_id": doc["run_id"],
            "checkpoint_sha256": spec.get("checkpoint_sha256"),
            "code": spec.get("code"),
            "device": spec.get("device"),
        },
    }


def write_baseline(record: str | Path, out: str | Path) -> dict[str, Any]:
    baseline = make_baseline(read_record(record))
    atomic_write_json(out, baseline)
    return baseline


def load_baseline(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchError(f"cannot read expected results {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("kind") != KIND or doc.get("version") != VERSION:
        raise BenchError(f"{path} is not a deq-bench expected-results file (version {VERSION})")
    for key in ("evaluation", "n", "metrics", "fingerprint"):
        if key not in doc:
            raise BenchError(f"{path} lacks {key!r}")
    return doc


def check_fingerprint(baseline: dict[str, Any], doc: dict[str, Any]) -> None:
    """A record of another evaluation (other examples, plan, eps...) cannot pass or fail the gate."""
    given = baseline["fingerprint"]
    for key in sorted(given, key=lambda k: FINGERPRINT.index(k) if k in FINGERPRINT else len(FINGERPRINT)):
        expected, got = given[key], doc["spec"].get(key)
        if got != expected:  # the most telling difference first: model, data set, n, eps, plan...
            shown = "differs" if isinstance(expected, dict) else f"is {got!r}, expected {expected!r}"
            raise BenchError(f"the record is not the baseline's evaluation: its {key} {shown}")


def compare(baseline: dict[str, Any], doc: dict[str, Any], tolerance: float | None = None) -> list[Row]:
    """One row per expected metric; `tolerance` (points) overrides the per-metric default."""
    if tolerance is not None and tolerance < 0:
        raise BenchError("--tolerance must be at least 0")
    n = int(baseline["n"])
    measured = metrics_of(doc["results"]["summary"])
    natural = {name: i for i, name in enumerate(measured)}  # clean, groups, All per readout; not a-z
    expected = sorted(baseline["metrics"].items(), key=lambda kv: (natural.get(kv[0], len(natural)), kv[0]))
    return [
        Row(
            name,
            float(exp),
            measured.get(name),
            default_tolerance(exp, n) if tolerance is None else tolerance,
        )
        for name, exp in expected
    ]


def rerun(
    baseline: dict[str, Any],
    *,
    results_dir: str,
    checkpoint: str | None = None,
    data_dir: str | None = None,
    device: str = "auto",
    quiet: bool = True,
) -> tuple[dict[str, Any], Path, bool]:
    """Run the baseline's evaluation (one process, never sharded); reuses an identical finished run."""
    from bench.evaluate import EvalConfig, evaluate

    args = dict(baseline["evaluation"])
    if checkpoint is not None:
        args["checkpoint"] = checkpoint
    try:
        cfg = EvalConfig(
            **args, results_dir=results_dir, data_dir=data_dir, device=device, quiet=quiet, shard="0/1"
        )
    except TypeError as exc:
        raise BenchError(f"bad evaluation arguments in the expected-results file: {exc}") from None
    document, path, reused = evaluate(cfg)
    assert document is not None  # one process writes its own record
    return document, path, reused


def _fmt(v: float | None, signed: bool = False) -> str:
    return "-" if v is None else (f"{v:+.2f}" if signed else f"{v:.2f}")


def report(rows: list[Row], baseline_path: str, record_path: Path, notes: list[str]) -> bool:
    """Print the outcome; True when every metric is within tolerance."""
    from bench.console import print_table

    for note in notes:
        print(f"note: {note}")
    moved = [r for r in rows if r.verdict != "ok"]
    if moved:
        print_table(
            "metrics outside expected ± allowed",
            ["metric", "expected", "measured", "delta", "allowed", "verdict"],
            [
                [
                    r.metric,
                    _fmt(r.expected),
                    _fmt(r.measured),
                    _fmt(r.delta, True),
                    f"±{r.allowed:.2f}",
                    r.verdict,
                ]
                for r in moved
            ],
        )
        outcome = f"{len(moved)} of {len(rows)} metrics moved ({record_path} vs {baseline_path})"
        print(f"bench check FAILED: {outcome}")
        return False
    print(f"bench check passed: {len(rows)} metrics within tolerance of {baseline_path} ({record_path})")
    return True


def _notes(baseline: dict[str, Any], doc: dict[str, Any]) -> list[str]:
    source, spec = baseline.get("source", {}), doc["spec"]
    out = []
    for key, what in (
        ("checkpoint_sha256", "checkpoint"),
        ("code", "deq-bench version"),
        ("device", "device"),
    ):
        if source.get(key) is not None and source[key] != spec.get(key):
            old, new = (str(v)[:16] for v in (source[key], spec.get(key)))
            out.append(f"{what} differs from the baseline's: {old} -> {new}")
    return out


def check_command(
    baseline: Annotated[
        Path | None, typer.Option(help="Expected-results file (results/expected/*.json) to check against.")
    ] = None,
    read: Annotated[
        Path | None,
        typer.Option("--read", help="Compare this finished record instead of re-running the evaluation."),
    ] = None,
    tolerance: Annotated[
        float | None,
        typer.Option(help="Allowed deviation in points (default: 2 binomial std errors, >= 1 example)."),
    ] = None,
    write_baseline_to: Annotated[
        Path | None,
        typer.Option("--write-baseline", help="Write an expected-results file from the --read record."),
    ] = None,
    checkpoint: Annotated[
        str | None, typer.Option(help="Check these weights instead of the baseline's checkpoint.")
    ] = None,
    results_dir: Annotated[
        str, typer.Option(help="Where the re-run's record goes (reused if there).")
    ] = "results",
    data_dir: Annotated[str | None, typer.Option(help="Where the data set's files are.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Fail (exit 1) when clean, robust or All accuracy moved beyond tolerance from expected results."""
    if write_baseline_to is not None:
        if read is None or baseline is not None:
            raise BenchError(
                "--write-baseline FILE takes a finished record: --read RECORD (and no --baseline)"
            )
        written = write_baseline(read, write_baseline_to)
        print(f"wrote {write_baseline_to} ({len(written['metrics'])} metrics, n={written['n']})")
        return
    if baseline is None:
        raise BenchError(
            "give --baseline FILE to check, or --write-baseline FILE --read RECORD to create one"
        )
    expected = load_baseline(baseline)
    if read is not None:
        if checkpoint is not None:
            raise BenchError("--checkpoint re-runs the evaluation; it cannot be combined with --read")
        doc, path = read_record(read), read
    else:
        doc, path, _ = rerun(
            expected,
            results_dir=results_dir,
            checkpoint=checkpoint,
            data_dir=data_dir,
            device=device,
            quiet=False,  # progress bars on a terminal only; CI logs stay clean
        )
    check_fingerprint(expected, doc)
    if not report(compare(expected, doc, tolerance), str(baseline), Path(path), _notes(expected, doc)):
        raise SystemExit(1)  # 1: the gate failed; 2 (BenchError in bench.cli) stays for bad input
