"""Assembling a run's record from its stage files (batch columns -> one record with its summary), and
`bench merge`.

A run's `.partial/<run_id>/` holds a manifest (`run.json`: the spec and the environment), the sweep stages,
one file per finished batch and one session file per process that worked on it. The record is always built
from these files, whether one process ran every batch, torchrun's ranks did, or a SLURM array's tasks did
and `bench merge` assembles afterwards: one code path, so a sharded record's `results` equal the
single-process record's by construction.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch

from bench.distributed import Shard, batch_plan, describe_batches
from bench.errors import BenchError
from bench.io import atomic_write_tensor
from bench.records.read import read_record
from bench.records.schema import COLUMN_KEYS, add_timings, timings_list, unique_warnings
from bench.records.store import RunStore, set_aside
from bench.records.validate import (
    Malformed,
    check_batch,
    check_early_state,
    check_manifest,
    check_run_id,
    check_sweep,
    odd_shapes,
)

MANIFEST = "run"


def batch_stage(b: int) -> str:
    return f"batch-{b:05d}"


def session_stage(shard: Shard) -> str:
    return f"shard-r{shard.rank:05d}-w{shard.world:05d}"


def manifest_of(
    run_name: str,
    spec: dict[str, Any],
    request: dict[str, Any],
    n_batches: int,
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """What `bench merge` needs to assemble without loading the model or the data."""
    return {
        "run_name": run_name,
        "spec": spec,
        "request": request,
        "n_batches": n_batches,
        "provenance": provenance,
    }


def save_manifest(store: RunStore, manifest: dict[str, Any]) -> None:
    store.save_stage(MANIFEST, manifest)


def record_session(store: RunStore, shard: Shard, session: dict[str, Any]) -> None:
    """Append this process's session (batches run and reused, wall time) to its rank's file."""
    name = session_stage(shard)
    previous = store.load_stage(name) or {"sessions": []}
    previous["sessions"].append(session)
    store.save_stage(name, previous)


def missing_batches(store: RunStore, n_batches: int) -> list[int]:
    return [b for b in range(n_batches) if not store.stage_path(batch_stage(b)).is_file()]


def batch_index(spec: dict[str, Any], b: int) -> list[int]:
    """The example indices batch b holds: the batch plan over the first n_examples test examples."""
    return list(batch_plan(int(spec["n_examples"]), int(spec["batch_size"]))[b])


def load_batch(store: RunStore, spec: dict[str, Any], b: int) -> dict[str, Any] | None:
    """Batch b's file, validated against the plan (types, lengths, exactly its examples); None if absent.
    Malformed when it is corrupt (e.g. another batch's file copied under its name)."""
    path = store.stage_path(batch_stage(b))
    stage = store.load_stage(batch_stage(b))
    if stage is None:
        if path.is_file():  # present but not JSON
            raise Malformed(f"batch file {path} is malformed: not valid JSON")
        return None
    return check_batch(stage, path, spec["plan"], batch_index(spec, b))


def sort_out_batches(store: RunStore, spec: dict[str, Any], batches: list[int]) -> list[str]:
    """Validate the batch files present among `batches`; each corrupt one is moved aside (so it is
    recomputed, or reported missing by `bench merge`). Returns one line per file moved."""
    moved = []
    for b in batches:
        try:
            load_batch(store, spec, b)
        except Malformed as exc:
            target = set_aside(store.stage_path(batch_stage(b)))
            moved.append(f"{exc}; moved aside to {target.name}")
    return moved


def _number(value: Any, default: float) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else default


def _sessions(store: RunStore) -> list[dict[str, Any]]:
    out = []
    for path in sorted(store.partial_dir.glob("shard-r*-w*.json")):
        try:
            sessions = json.loads(path.read_text())["sessions"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            continue  # provenance only: a vanished or foreign file must not block the record
        if isinstance(sessions, list):
            out += [s for s in sessions if isinstance(s, dict)]
    return sorted(
        out,
        key=lambda s: (_number(s.get("started"), 0.0), _number(s.get("world"), 1), _number(s.get("rank"), 0)),
    )


def assemble(
    store: RunStore, manifest: dict[str, Any], *, device: str | None, started: float
) -> dict[str, Any] | None:
    """Build and write the record from the stage files; None if one is gone (another process finished)."""
    from bench.sanity import flags_fired, square_check

    spec, n_batches = manifest["spec"], int(manifest["n_batches"])
    plan_dict = spec["plan"]
    readouts = list(plan_dict["readouts"])
    selection: dict[str, dict[str, list[str]]] = {}
    sweep_tables: dict[str, Any] = {}
    decided_by: dict[str, Any] = {}  # per protocol and readout: what decided the sweep's choice
    for protocol in plan_dict["protocols"]:
        name = protocol["name"]
        if protocol["sweep"] is None:
            selection[name] = {r: list(protocol["estimators"]) for r in readouts}
            continue
        stage = store.load_stage(f"sweep-{name}")
        if stage is None:
            return None
        check_sweep(stage, store.stage_path(f"sweep-{name}"), readouts)
        selection[name], sweep_tables[name] = stage["chosen"], stage["table"]
        decided_by[name] = stage.get("decided_by", {})
    parts: list[dict[str, Any]] = []
    seconds: dict[tuple[str, ...], float] = {}
    warnings: list[dict[str, Any]] = []
    first_sanity: dict[str, Any] = {}
    for b in range(n_batches):
        try:
            stage = load_batch(store, spec, b)
        except Malformed as exc:
            target = set_aside(store.stage_path(batch_stage(b)))
            raise BenchError(
                f"{exc}; moved aside to {target.name}: re-run the same command to recompute it"
            ) from None
        if stage is None:
            return None
        if b == 0:
            first_sanity = stage.get("sanity") or {}
        parts.append(stage["columns"])
        add_timings(seconds, stage["timings"])
        warnings += stage["warnings"]

    paths = [store.stage_path(batch_stage(b)) for b in range(n_batches)]
    if odd := odd_shapes(parts, paths):  # e.g. a column's field deleted by hand in one batch
        moved = ", ".join(f"{p.name} (moved aside to {set_aside(p).name})" for p in odd)
        raise BenchError(
            f"batch file(s) {moved} are malformed: field columns: their fields or attack columns differ "
            "from the other batches'; re-run the same command to recompute them"
        )
    columns = merge_batches(parts)
    warnings = unique_warnings(warnings)
    sessions = _sessions(store)
    sanity = {
        **first_sanity,
        "square": square_check(columns),
        "autoattack_warnings": warnings,
    }
    sanity["flags"] = flags_fired(sanity)
    results = {
        "selection": selection,
        "sweep": sweep_tables,
        "sweep_decided_by": decided_by,
        "columns": columns,
        "summary": summarize(columns, plan_dict),
        "warnings": warnings,
        "sanity": sanity,
    }
    early = store.load_stage("early-state")
    if early is not None:  # the readout "early" is head(z[t]) with this t, chosen on the dev set
        check_early_state(early, store.stage_path("early-state"))
        results["early_state"] = early
    devices = sorted({str(s["device"]) for s in sessions if s.get("device")})
    provenance = {
        **manifest["provenance"],
        "device": device if device is not None else ", ".join(devices) or None,
        "host": platform.node(),
        "wall_seconds_this_session": round(time.time() - started, 3),
        "attack_seconds": timings_list(seconds),
        "reimplementations": reimplementations(selection),
        # who ran which batches: provenance, not results, so results match a single-process run
        "shard_plan": {
            "n_batches": n_batches,
            "batch_size": spec["batch_size"],
            "worlds": sorted({int(s.get("world", 1)) for s in sessions}),
            "sessions": sessions,
        },
    }
    document = {
        "schema": spec["schema"],
        "run_id": store.run_id,
        "spec": spec,
        "request": manifest.get("request"),
        "results": results,
        "provenance": provenance,
    }
    if spec["save_adversarial"]:
        pieces = []
        for b in range(n_batches):
            path = store.partial_dir / f"adv-{b:05d}.pt"
            if not path.is_file():
                return None
            pieces.append(torch.load(path, weights_only=True))
        tensors = {r: torch.cat([p[r] for p in pieces]) for r in readouts}
        adv_path = store.final_path.with_suffix(".adv.pt")
        atomic_write_tensor(adv_path, tensors["final"] if "final" in tensors else tensors[readouts[0]])
        provenance["adversarial_examples"] = str(adv_path)
    store.write_final(document)
    return document


def reimplementations(selection: dict[str, dict[str, list[str]]]) -> list[str]:
    """The chosen estimators that re-implement a method whose authors' code is not public."""
    from bench.defenses.view import BPTT
    from bench.deq.estimators import parse_estimator
    from bench.spec import AUTOGRAD, ViewSpec

    out = []
    for chosen in selection.values():
        for readout, labels in chosen.items():
            for label in labels:
                estimator = ViewSpec.from_label(readout, label).estimator
                if estimator not in (AUTOGRAD, BPTT) and parse_estimator(estimator).reimplementation:
                    out.append(label)
    return out


def _load_manifest(partial: Path) -> dict[str, Any] | None:
    """The run's manifest, validated; None when there is none. Malformed when it is corrupt."""
    path = partial / f"{MANIFEST}.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise Malformed(f"run manifest {path} is malformed: not valid JSON") from None
    except OSError as exc:
        raise BenchError(f"cannot read run manifest {path}: {exc.strerror or exc}") from None
    return check_manifest(manifest, path)


def _pick_run(root: Path, run_id: str | None) -> str:
    if run_id is not None:
        return check_run_id(run_id)
    partial_root = root / ".partial"
    runs = sorted(d.name for d in partial_root.iterdir() if d.is_dir()) if partial_root.is_dir() else []
    runs = [check_run_id(r, f"folder {partial_root}/") for r in runs]
    if not runs:
        raise BenchError(f"no unfinished run in {root}: nothing to merge")
    if len(runs) > 1:
        raise BenchError(f"{len(runs)} unfinished runs in {root} ({', '.join(runs)}): pass --run-id")
    return runs[0]


def _missing_message(store: RunStore, manifest: dict[str, Any], missing: list[int]) -> str:
    n_batches = int(manifest["n_batches"])
    owners = []
    for world in sorted({int(s.get("world", 1)) for s in _sessions(store)} - {1}):
        ranks = sorted({b % world for b in missing})
        owners.append(f"with {world} shards rank(s) {', '.join(str(r) for r in ranks)} own them")
    hint = f" ({'; '.join(owners)})" if owners else ""
    return (
        f"run {store.run_id} ({manifest['spec']['model']}) is missing {len(missing)} of {n_batches} batches: "
        f"{describe_batches(missing)}{hint}; re-run those shards with the same arguments, then merge again"
    )


def merge_run(results_dir: str | Path, run_id: str | None = None) -> tuple[dict[str, Any], Path, bool]:
    """Assemble an unfinished run whose batches are all present. Returns (document, path, already_done)."""
    started = time.time()
    root = Path(results_dir)
    if not root.is_dir():
        state = "is not a directory" if root.exists() else "does not exist"
        raise BenchError(f"results directory {root} {state}")
    run_id = _pick_run(root, run_id)
    partial = root / ".partial" / run_id
    manifest = _load_manifest(partial)
    if manifest is None:
        done = sorted(root.glob(f"*-{run_id}.json"))
        if done:
            return read_record(done[0]), done[0], True
        if partial.is_dir():
            raise BenchError(
                f"run {run_id} has no manifest (started by an older deq-bench): "
                "re-run `bench evaluate` with the same arguments to finish it"
            )
        raise BenchError(f"no run {run_id!r} in {root}")
    store = RunStore(root, manifest["run_name"], run_id)
    if (done_doc := store.finished()) is not None:
        return done_doc, store.final_path, True
    moved = sort_out_batches(store, manifest["spec"], list(range(int(manifest["n_batches"]))))
    missing = missing_batches(store, int(manifest["n_batches"]))
    if missing:
        message = _missing_message(store, manifest, missing)
        if moved:
            message = f"{'; '.join(moved)}. {message}"
        raise BenchError(message)
    document = assemble(store, manifest, device=None, started=started)
    if document is None:
        if (done_doc := store.finished()) is not None:  # a shard finished it meanwhile
            return done_doc, store.final_path, True
        raise BenchError(f"run {run_id}: a stage file (sweep or adversarial examples) is missing")
    return document, store.final_path, False


def merge_batches(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate batch columns; attack columns are matched by their identity, in the plan's order."""
    base = [{k: v for k, v in p.items() if k != "attacks"} for p in parts]
    merged = concat_columns(base)
    ids = [tuple(c[k] for k in COLUMN_KEYS) for c in parts[0]["attacks"]]
    cols = []
    for i, ident in enumerate(ids):
        rows = [p["attacks"][i] for p in parts]
        if any(tuple(r[k] for k in COLUMN_KEYS) != ident for r in rows):
            raise BenchError("cannot merge batches: their attack columns differ")
        col = dict(zip(COLUMN_KEYS, ident, strict=True))
        for key in ("attacked", "broken", "linf"):
            col[key] = [v for r in rows for v in r[key]]
        col["nonfinite_grad_rows"] = sum(int(r.get("nonfinite_grad_rows", 0)) for r in rows)
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
            gkey = (col["protocol"], col["group"])
            g = groups.setdefault(gkey, {"robust": clean_ok.clone(), "attacks": {}})
            g["robust"] &= ~torch.tensor(col["broken"], dtype=torch.bool)
            g["attacks"][f"{col['attack']} [{col['estimator']}]"] = 100.0 * g["robust"].sum().item() / n
            all_ok &= ~torch.tensor(col["broken"], dtype=torch.bool)
        protocols: dict[str, Any] = {}
        for (protocol, group), g in groups.items():
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


def concat_columns(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate per-example column trees (nested dicts whose leaves are equal-length lists)."""
    if not parts:
        return {}
    first = parts[0]
    out: dict[str, Any] = {}
    for key, value in first.items():
        if isinstance(value, dict):
            out[key] = concat_columns([p[key] for p in parts])
        elif isinstance(value, list):
            merged: list[Any] = []
            for p in parts:
                merged.extend(p[key])
            out[key] = merged
        else:
            if any(p[key] != value for p in parts):
                raise BenchError(f"cannot merge: field {key!r} differs between parts")
            out[key] = value
    return out
