"""One schema for every file deq-bench reads back: final records, batch and stage files, manifests, sweep
caches and `bench check` baselines.

Why: a hand-edited or corrupted file must never turn into a wrong number (booleans stored as "true",
columns of the wrong length, a batch file copied under another batch's name) nor into a traceback. Every
reader calls one `check_*` function here on the upgraded layout (bench.records.schema.upgrade); a file
that fails raises `Malformed` (a BenchError) naming the file and the field, which the CLI prints as one
`error:` line with exit code 2.

Names and ids read from files are checked too, since they become file names: run names use the registry's
character set, run ids are hex of the length `run_id_of` makes.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.records.schema import COLUMN_KEYS, SCHEMA_VERSION

RUN_ID_LENGTH = 16
_RUN_ID = re.compile(rf"[0-9a-f]{{{RUN_ID_LENGTH}}}")
# registry names with ':' and '/' replaced by '_' (bench.evaluate.setup.Setup.run_name)
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,199}")


class Malformed(BenchError):
    """A file deq-bench wrote (or should have written) whose content is not what it promises."""


def _label(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _Checker:
    """Type checks with the file and the dotted field path in every message."""

    def __init__(self, kind: str, path: str | Path) -> None:
        self.kind, self.path = kind, path

    def fail(self, field: str, what: str) -> Malformed:
        return Malformed(f"{self.kind} {self.path} is malformed: field {field}: {what}")

    def dict(self, value: Any, field: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(field, f"expected an object, got {_label(value)}")
        return value

    def key(self, parent: dict[str, Any], key: str, field: str) -> Any:
        if key not in parent:
            raise self.fail(f"{field}.{key}" if field else key, "missing")
        return parent[key]

    def list(self, value: Any, field: str, length: int | None = None) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(field, f"expected a list, got {_label(value)}")
        if length is not None and len(value) != length:
            raise self.fail(field, f"has {len(value)} entries, the index has {length}")
        return value

    def str(self, value: Any, field: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(field, f"expected a non-empty string, got {_label(value)}")
        return value

    def opt_str(self, value: Any, field: str) -> str | None:
        return None if value is None else self.str(value, field)

    def int(self, value: Any, field: str, minimum: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(field, f"expected an integer, got {_label(value)}")
        if minimum is not None and value < minimum:
            raise self.fail(field, f"must be at least {minimum}, got {value}")
        return value

    def number(self, value: Any, field: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(field, f"expected a finite number, got {_label(value)}")
        return float(value)

    def bool(self, value: Any, field: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(field, f"expected true or false, got {_label(value)}")
        return value

    def items(self, values: list[Any], field: str, check: str) -> None:
        """Every element of a per-example list: 'int', 'ints', 'bool', 'number', or 'any'."""
        for i, v in enumerate(values):
            if check == "int":
                self.int(v, f"{field}[{i}]")
            elif check == "bool":
                self.bool(v, f"{field}[{i}]")
            elif check == "number":
                self.number(v, f"{field}[{i}]")
            elif check == "ints":  # a per-example int, or a per-example list of them (one per state)
                for j, w in enumerate(v if isinstance(v, list) else [v]):
                    self.int(w, f"{field}[{i}][{j}]" if isinstance(v, list) else f"{field}[{i}]")


# ----- names and ids ------------------------------------------------------------------------------------


def check_run_id(run_id: Any, where: str = "--run-id") -> str:
    """A run id as `run_id_of` makes it: it becomes a folder name, so nothing else is accepted."""
    if not isinstance(run_id, str) or _RUN_ID.fullmatch(run_id) is None:
        raise BenchError(
            f"{where} {_label(run_id)} is not a run id ({RUN_ID_LENGTH} lower-case hex digits, "
            "as in the record's file name)"
        )
    return run_id


def check_run_name(name: Any, where: str = "run name") -> str:
    """A run name (a registry name made file-safe): it becomes part of the record's file name."""
    if not isinstance(name, str) or _RUN_NAME.fullmatch(name) is None or ".." in name:
        raise BenchError(
            f"{where} {_label(name)} is not a valid run name (letters, digits and . _ + = -, "
            "starting with a letter or digit)"
        )
    return name


def inside(path: Path, root: Path, what: str) -> Path:
    """`path` resolved; BenchError unless it lies inside `root` (resolved): no write escapes its folder."""
    resolved, base = path.resolve(), root.resolve()
    if resolved != base and base not in resolved.parents:
        raise BenchError(f"{what} {path} would lie outside {root}: refused")
    return resolved


# ----- per-example columns ------------------------------------------------------------------------------

_TREE_ITEM_CHECKS = {
    "pred": "ints",
    "states_pred": "ints",
    "diverged": "bool",
    "nsteps": "int",
    "lowest_index": "int",
}


def _check_tree(c: _Checker, tree: Any, field: str, n: int) -> None:
    """Nested objects whose leaves are per-example lists of length n (solver stats, states, ...)."""
    c.dict(tree, field)
    for key, value in tree.items():
        sub = f"{field}.{key}"
        if isinstance(value, dict):
            _check_tree(c, value, sub, n)
        elif isinstance(value, list):
            c.list(value, sub, n)
            c.items(value, sub, _TREE_ITEM_CHECKS.get(key, "any"))
        elif value is not None and not isinstance(value, (str, int, float)):
            raise c.fail(sub, f"unexpected value {_label(value)}")


def check_columns(
    c: _Checker,
    cols: Any,
    field: str,
    readouts: Iterable[str],
    index: list[int] | None = None,
) -> int:
    """A record's or a batch's columns; returns the number of examples. `index`: the indices expected."""
    cols = c.dict(cols, field)
    idx = c.list(c.key(cols, "index", field), f"{field}.index")
    c.items(idx, f"{field}.index", "int")
    if len(set(idx)) != len(idx):
        raise c.fail(f"{field}.index", "repeats an example index")
    if index is not None and idx != index:
        shown = f"{index[0]}..{index[-1]}" if index else "none"
        raise c.fail(f"{field}.index", f"holds examples {_label(idx)}, the batch plan says {shown}")
    n = len(idx)
    labels = c.list(c.key(cols, "label", field), f"{field}.label", n)
    c.items(labels, f"{field}.label", "int")
    clean = c.dict(c.key(cols, "clean", field), f"{field}.clean")
    readouts = list(readouts)
    for r in readouts:
        entry = c.dict(c.key(clean, r, f"{field}.clean"), f"{field}.clean.{r}")
        pred = c.list(c.key(entry, "pred", f"{field}.clean.{r}"), f"{field}.clean.{r}.pred", n)
        c.items(pred, f"{field}.clean.{r}.pred", "int")
    attacks = c.list(cols.get("attacks", []), f"{field}.attacks")
    for i, col in enumerate(attacks):
        where = f"{field}.attacks[{i}]"
        c.dict(col, where)
        for k in COLUMN_KEYS:
            c.str(c.key(col, k, where), f"{where}.{k}")
        if col["readout"] not in readouts:
            raise c.fail(f"{where}.readout", f"{col['readout']!r} is not one of the plan's readouts")
        c.items(c.list(c.key(col, "broken", where), f"{where}.broken", n), f"{where}.broken", "bool")
        if "attacked" in col:
            c.items(c.list(col["attacked"], f"{where}.attacked", n), f"{where}.attacked", "bool")
        if "linf" in col:
            c.items(c.list(col["linf"], f"{where}.linf", n), f"{where}.linf", "number")
    for key in ("clean_solver", "clean_states"):
        if cols.get(key) is not None:
            _check_tree(c, cols[key], f"{field}.{key}", n)
    if cols.get("adversarial") is not None:
        _check_adversarial(c, cols["adversarial"], f"{field}.adversarial", n)
    return n


def _check_adversarial(c: _Checker, tree: Any, field: str, n: int) -> None:
    """protocol -> group -> readout -> the worst-case pass's entry (bench.records.schema.nest)."""
    for protocol, groups in c.dict(tree, field).items():
        for group, readouts in c.dict(groups, f"{field}.{protocol}").items():
            for readout, entry in c.dict(readouts, f"{field}.{protocol}.{group}").items():
                where = f"{field}.{protocol}.{group}.{readout}"
                c.dict(entry, where)
                c.items(c.list(c.key(entry, "pred", where), f"{where}.pred", n), f"{where}.pred", "int")
                _check_tree(c, entry, where, n)


def _check_warnings(c: _Checker, warnings: Any, field: str) -> None:
    for i, w in enumerate(c.list(warnings, field)):
        c.dict(w, f"{field}[{i}]")
        c.str(c.key(w, "message", f"{field}[{i}]"), f"{field}[{i}].message")
        for k in ("attack", "estimator", "readout"):
            c.opt_str(w.get(k), f"{field}[{i}].{k}")


def _check_timings(c: _Checker, timings: Any, field: str) -> None:
    for i, t in enumerate(c.list(timings, field)):
        c.dict(t, f"{field}[{i}]")
        for k in COLUMN_KEYS:
            c.str(c.key(t, k, f"{field}[{i}]"), f"{field}[{i}].{k}")
        c.number(c.key(t, "seconds", f"{field}[{i}]"), f"{field}[{i}].seconds")


def _check_sanity(c: _Checker, sanity: Any, field: str) -> None:
    c.dict(sanity, field)
    if "eps_zero_breaks" in sanity:
        c.number(sanity["eps_zero_breaks"], f"{field}.eps_zero_breaks")
    for name, g in c.dict(sanity.get("gradients", {}), f"{field}.gradients").items():
        c.dict(g, f"{field}.gradients.{name}")
        for k in ("nonfinite", "zero"):
            c.key(g, k, f"{field}.gradients.{name}")
    for i, s in enumerate(c.list(sanity.get("square", []), f"{field}.square")):
        where = f"{field}.square[{i}]"
        c.bool(c.key(c.dict(s, where), "fired", where), f"{where}.fired")
    if "autoattack_warnings" in sanity:
        _check_warnings(c, sanity["autoattack_warnings"], f"{field}.autoattack_warnings")


def _check_plan(c: _Checker, plan: Any, field: str, strict: bool = False) -> list[str]:
    """The plan's readouts (returned) and protocols; `strict` (what assembling needs): every protocol key."""
    c.dict(plan, field)
    readouts = c.list(c.key(plan, "readouts", field), f"{field}.readouts")
    if not readouts:
        raise c.fail(f"{field}.readouts", "is empty")
    for i, r in enumerate(readouts):
        c.str(r, f"{field}.readouts[{i}]")
    if len(set(readouts)) != len(readouts):
        raise c.fail(f"{field}.readouts", "repeats a readout")
    protocols = c.key(plan, "protocols", field) if strict else plan.get("protocols", [])
    for i, p in enumerate(c.list(protocols, f"{field}.protocols")):
        where = f"{field}.protocols[{i}]"
        c.dict(p, where)
        c.str(c.key(p, "name", where), f"{where}.name")
        if strict:
            for key in ("groups", "estimators", "sweep"):
                c.key(p, key, where)
        if p.get("sweep") is not None:
            c.dict(p["sweep"], f"{where}.sweep")
        for j, e in enumerate(c.list(p.get("estimators", []), f"{where}.estimators")):
            c.str(e, f"{where}.estimators[{j}]")
    return list(readouts)


def _attack_name(c: _Checker, spec: str, field: str) -> str:
    """The name an attack's columns carry (`pgd-10` runs as `pgd`): the plan holds specs as written."""
    from bench.attacks.specs import parse_attack

    try:
        return parse_attack(spec, 0.0).name
    except BenchError as exc:
        raise c.fail(field, f"not an attack spec ({exc})") from None


def _check_planned_columns(
    c: _Checker, plan: dict[str, Any], cols: dict[str, Any], readouts: list[str], field: str
) -> None:
    """Every attack the plan runs has a column for every readout: a record whose columns were dropped would
    otherwise report robust accuracy as high as if those attacks had failed."""
    have = {(col["protocol"], col["group"], col["attack"], col["readout"]) for col in cols.get("attacks", [])}
    for i, protocol in enumerate(plan.get("protocols", [])):
        groups = c.dict(protocol.get("groups", {}), f"spec.plan.protocols[{i}].groups")
        for group, attacks in groups.items():
            for j, attack in enumerate(c.list(attacks, f"spec.plan.protocols[{i}].groups.{group}")):
                c.str(attack, f"spec.plan.protocols[{i}].groups.{group}[{j}]")
                name = _attack_name(c, attack, f"spec.plan.protocols[{i}].groups.{group}[{j}]")
                for r in readouts:
                    if (protocol["name"], group, name, r) not in have:
                        raise c.fail(
                            field,
                            f"no column for attack {attack!r} (protocol {protocol['name']!r}, "
                            f"group {group!r}, readout {r!r})",
                        )


def _check_spec(c: _Checker, spec: Any, field: str, strict: bool = False) -> list[str]:
    c.dict(spec, field)
    for k in ("model", "dataset"):
        c.str(c.key(spec, k, field), f"{field}.{k}")
    c.number(c.key(spec, "eps", field), f"{field}.eps")
    for k in ("n_examples", "batch_size"):
        if k in spec:
            c.int(spec[k], f"{field}.{k}", 1)
    if spec.get("deploy") is not None:  # a DEQ's DeployConfig fields (None for a plain network)
        deploy = c.dict(spec["deploy"], f"{field}.deploy")
        for k in ("refine_steps", "max_iter"):
            if k in deploy:
                c.int(deploy[k], f"{field}.deploy.{k}", 0)
        if "refine_lambda" in deploy:
            c.number(deploy["refine_lambda"], f"{field}.deploy.refine_lambda")
        if "refine_apply_f" in deploy:
            c.bool(deploy["refine_apply_f"], f"{field}.deploy.refine_apply_f")
    if "batching" in spec and spec["batching"] not in ("per-example", "papers"):
        raise c.fail(
            f"{field}.batching", f"expected 'per-example' or 'papers', got {_label(spec['batching'])}"
        )
    return _check_plan(c, c.key(spec, "plan", field), f"{field}.plan", strict)


def _check_selection(c: _Checker, selection: Any, field: str) -> None:
    for protocol, chosen in c.dict(selection, field).items():
        for readout, labels in c.dict(chosen, f"{field}.{protocol}").items():
            for i, label in enumerate(c.list(labels, f"{field}.{protocol}.{readout}")):
                c.str(label, f"{field}.{protocol}.{readout}[{i}]")


# ----- whole files --------------------------------------------------------------------------------------


def check_record(doc: Any, path: str | Path) -> dict[str, Any]:
    """A finished run record (upgraded to the current layout): every field a report or check reads."""
    c = _Checker("run record", path)
    c.dict(doc, "(top level)")
    if "run_id" in doc:
        c.str(doc["run_id"], "run_id")
    readouts = _check_spec(c, c.key(doc, "spec", ""), "spec")
    results = c.dict(c.key(doc, "results", ""), "results")
    n = check_columns(c, c.key(results, "columns", "results"), "results.columns", readouts)
    n_examples = doc["spec"].get("n_examples")
    if n_examples is not None and n_examples != n:
        raise c.fail("results.columns.index", f"has {n} examples, spec.n_examples says {n_examples}")
    _check_planned_columns(c, doc["spec"]["plan"], results["columns"], readouts, "results.columns.attacks")
    if "selection" in results:
        _check_selection(c, results["selection"], "results.selection")
    _check_warnings(c, results.get("warnings", []), "results.warnings")
    if results.get("sanity") is not None:
        _check_sanity(c, results["sanity"], "results.sanity")
    if "summary" in results:
        c.dict(results["summary"], "results.summary")
    for key in ("provenance", "request"):
        if doc.get(key) is not None:
            c.dict(doc[key], key)
    meta = (doc.get("provenance") or {}).get("checkpoint_metadata")
    if meta is not None:  # the training recipe the leaderboard labels a row with
        for k, v in c.dict(meta, "provenance.checkpoint_metadata").items():
            c.str(v, f"provenance.checkpoint_metadata.{k}")
    return doc


def check_batch(
    stage: Any, path: str | Path, plan: dict[str, Any], index: list[int] | None
) -> dict[str, Any]:
    """One finished batch's file: its columns hold exactly the batch plan's examples and planned attacks."""
    c = _Checker("batch file", path)
    c.dict(stage, "(top level)")
    readouts = list(plan["readouts"])
    check_columns(c, c.key(stage, "columns", ""), "columns", readouts, index)
    for key in ("attacks", "adversarial"):  # always written by a batch (bench.evaluate.execute)
        c.key(stage["columns"], key, "columns")
    c.dict(stage["columns"]["adversarial"], "columns.adversarial")
    _check_planned_columns(c, plan, stage["columns"], readouts, "columns.attacks")
    _check_timings(c, c.key(stage, "timings", ""), "timings")
    _check_warnings(c, c.key(stage, "warnings", ""), "warnings")
    if stage.get("sanity") is not None:
        _check_sanity(c, stage["sanity"], "sanity")
    return stage


def column_shape(tree: Any) -> Any:
    """The key structure of a column tree (lists reduced to their kind; attack columns to their
    identity): every batch of a run has the same shape, so batches concatenate field by field."""
    if isinstance(tree, dict):
        return {k: column_shape(v) for k, v in sorted(tree.items()) if k != "attacks"} | (
            {"attacks": [(*(col.get(k) for k in COLUMN_KEYS), *sorted(col)) for col in tree["attacks"]]}
            if isinstance(tree.get("attacks"), list)
            else {}
        )
    return "list" if isinstance(tree, list) else type(tree).__name__


def odd_shapes(columns: list[Any], paths: list[Path]) -> list[Path]:
    """The batch files whose column shape differs from the one most batches share (none when they all
    agree). BenchError when no shape has a strict majority: then no file can be blamed."""
    shapes = [repr(column_shape(c)) for c in columns]
    common, count = Counter(shapes).most_common(1)[0]
    if count == len(shapes):
        return []
    if 2 * count <= len(shapes):
        raise BenchError(
            f"the batch files of {paths[0].parent} disagree in their fields or attack columns and no "
            "version has a majority: delete that folder and re-run the same command"
        )
    return [p for p, s in zip(paths, shapes, strict=True) if s != common]


def check_manifest(manifest: Any, path: str | Path) -> dict[str, Any]:
    """A run's `run.json`: what `bench merge` assembles from (its run name becomes a file name)."""
    c = _Checker("run manifest", path)
    c.dict(manifest, "(top level)")
    try:
        check_run_name(c.key(manifest, "run_name", ""), "run_name")
    except BenchError as exc:
        raise c.fail("run_name", str(exc)) from None
    spec = c.dict(c.key(manifest, "spec", ""), "spec")
    _check_spec(c, spec, "spec", strict=True)
    if c.key(spec, "schema", "spec") != SCHEMA_VERSION:
        raise c.fail(
            "spec.schema", f"expected {SCHEMA_VERSION} (this deq-bench's), got {_label(spec['schema'])}"
        )
    if not isinstance(spec.get("save_adversarial", False), bool):
        raise c.fail(
            "spec.save_adversarial", f"expected true or false, got {_label(spec['save_adversarial'])}"
        )
    n_examples = c.int(c.key(spec, "n_examples", "spec"), "spec.n_examples", 1)
    batch_size = c.int(c.key(spec, "batch_size", "spec"), "spec.batch_size", 1)
    n_batches = c.int(c.key(manifest, "n_batches", ""), "n_batches", 1)
    if n_batches != -(-n_examples // batch_size):
        raise c.fail("n_batches", f"{n_batches} batches do not fit {n_examples} examples by {batch_size}")
    c.dict(c.key(manifest, "provenance", ""), "provenance")
    if manifest.get("request") is not None:
        c.dict(manifest["request"], "request")
    return manifest


def check_sweep(stage: Any, path: str | Path, readouts: Iterable[str]) -> dict[str, Any]:
    """A white-box sweep (stage file or cross-run cache): the estimators chosen per readout."""
    c = _Checker("sweep file", path)
    c.dict(stage, "(top level)")
    chosen = c.dict(c.key(stage, "chosen", ""), "chosen")
    for r in readouts:
        labels = c.list(c.key(chosen, r, "chosen"), f"chosen.{r}")
        if not labels:
            raise c.fail(f"chosen.{r}", "is empty")
        for i, label in enumerate(labels):
            c.str(label, f"chosen.{r}[{i}]")
    c.dict(c.key(stage, "table", ""), "table")
    return stage


def check_early_state(stage: Any, path: str | Path) -> dict[str, Any]:
    """The dev set's early-state choice: the readout `state:t` the early defense predicts with."""
    c = _Checker("early-state file", path)
    c.dict(stage, "(top level)")
    t = c.int(c.key(stage, "t", ""), "t", 1)
    if c.key(stage, "readout", "") != f"state:{t}":
        raise c.fail("readout", f"expected 'state:{t}', got {_label(stage['readout'])}")
    return stage


def check_baseline(doc: Any, path: str | Path) -> dict[str, Any]:
    """A `bench check` expected-results file (kind and version checked by the caller)."""
    c = _Checker("expected-results file", path)
    c.dict(doc, "(top level)")
    c.dict(c.key(doc, "evaluation", ""), "evaluation")
    c.int(c.key(doc, "n", ""), "n", 1)
    metrics = c.dict(c.key(doc, "metrics", ""), "metrics")
    if not metrics:
        raise c.fail("metrics", "is empty")
    for name, value in metrics.items():
        c.number(value, f"metrics.{name}")
        if not 0.0 <= value <= 100.0:
            raise c.fail(f"metrics.{name}", f"{value} is not a percentage")
    c.dict(c.key(doc, "fingerprint", ""), "fingerprint")
    if doc.get("source") is not None:
        c.dict(doc["source"], "source")
    return doc
