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

The measured numbers are recomputed from the record's per-example columns (as the leaderboard does), never
taken from its stored summary, and both the record and the baseline are validated field by field
(bench.records.validate): a corrupt file is bad input (exit 2), never a pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.io import atomic_write_json
from bench.records.assemble import summarize
from bench.records.read import read_json, read_record
from bench.records.validate import check_baseline
from bench.spec import RunOptions, RunSpec

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


def measured_metrics(doc: dict[str, Any]) -> dict[str, float]:
    """A validated record's metrics recomputed from its per-example columns (the stored summary is not
    trusted: a hand-edited summary must not pass the gate)."""
    return metrics_of(summarize(doc["results"]["columns"], doc["spec"]["plan"]))


def check_tolerance(tolerance: float | None) -> float | None:
    """--tolerance: finite and non-negative (nan would pass everything)."""
    if tolerance is not None and (not math.isfinite(tolerance) or tolerance < 0):
        raise BenchError(f"--tolerance must be a finite number of points, at least 0; got {tolerance}")
    return tolerance


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


def _spec_from(values: Any, where: str) -> RunSpec:
    """A stored run request as a RunSpec; a damaged one is bad input naming where it came from."""
    try:
        return RunSpec.from_dict(values)
    except BenchError as exc:
        raise BenchError(f"{where} is not a valid run specification: {exc}") from None
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        raise BenchError(f"{where} is not a valid run specification: {exc}") from None


def evaluation_of(doc: dict[str, Any]) -> RunSpec:
    """The run a record evaluated, as its stored request (what `bench evaluate` was asked)."""
    spec = doc["spec"]
    if spec.get("random_weights"):
        raise BenchError("the record evaluates random weights: a baseline of it would guard nothing")
    request = doc.get("request")
    if not isinstance(request, dict):
        raise BenchError(
            "the record stores no run request (written by deq-bench < 0.3): re-run it with this version"
        )
    spec = _spec_from(request, "the record's request")
    # the baseline names what was evaluated: the data set and eps as resolved, not "the model's default"
    return replace(spec, dataset=spec.dataset or doc["spec"]["dataset"], eps=float(doc["spec"]["eps"]))


# fields of a request that do not change the numbers a baseline guards (device: --device of bench check)
_NOT_GUARDED = ("device", "save_adversarial", "random_weights")


def make_baseline(doc: dict[str, Any]) -> dict[str, Any]:
    """An expected-results document from a finished record."""
    spec = doc["spec"]
    return {
        "kind": KIND,
        "version": VERSION,
        "evaluation": {k: v for k, v in evaluation_of(doc).to_dict().items() if k not in _NOT_GUARDED},
        "n": len(doc["results"]["columns"]["index"]),
        "metrics": measured_metrics(doc),
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
    doc = read_json(path, "expected results")
    if not isinstance(doc, dict) or doc.get("kind") != KIND or doc.get("version") != VERSION:
        raise BenchError(f"{path} is not a deq-bench expected-results file (version {VERSION})")
    for key in ("evaluation", "n", "metrics", "fingerprint"):
        if key not in doc:
            raise BenchError(f"{path} lacks {key!r}")
    check_baseline(doc, path)
    _spec_from(doc["evaluation"], f"expected-results file {path}: field evaluation")
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
    check_tolerance(tolerance)
    n = int(baseline["n"])
    measured = measured_metrics(doc)
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
    from bench.evaluate import evaluate

    spec = _spec_from(baseline["evaluation"], "the baseline's evaluation")
    spec = replace(spec, device=device, **({} if checkpoint is None else {"checkpoint": checkpoint}))
    options = RunOptions(results_dir=results_dir, data_dir=data_dir, quiet=quiet, shard="0/1")
    document, path, reused = evaluate(spec, options)
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


def run_check(
    baseline: Path | None,
    read: Path | None,
    tolerance: float | None,
    write_baseline_to: Path | None,
    checkpoint: str | None,
    results_dir: str,
    data_dir: str | None,
    device: str,
) -> bool:
    """`bench check`: True when every metric is within tolerance (or a baseline was written)."""
    if write_baseline_to is not None:
        if read is None or baseline is not None:
            raise BenchError(
                "--write-baseline FILE takes a finished record: --read RECORD (and no --baseline)"
            )
        written = write_baseline(read, write_baseline_to)
        print(f"wrote {write_baseline_to} ({len(written['metrics'])} metrics, n={written['n']})")
        return True
    if baseline is None:
        raise BenchError(
            "give --baseline FILE to check, or --write-baseline FILE --read RECORD to create one"
        )
    check_tolerance(tolerance)
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
    return report(compare(expected, doc, tolerance), str(baseline), Path(path), _notes(expected, doc))
