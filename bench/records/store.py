"""Where a run's record and its progress live: identity, atomic storage, per-batch stages, sweep cache.

A run is identified by the hash of everything that determines its results (its spec). Its document holds
`results` (deterministic: per-example arrays and what was chosen) apart from `provenance` (versions, host,
wall times), so a resumed or re-run evaluation can be checked for equality on `results` alone.

Progress is one JSON file per finished batch in `<results>/.partial/<run_id>/`: a crash loses at most the
batch in flight, and a re-run with the same arguments skips the batches already there.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from bench.io import atomic_write_json


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def run_id_of(spec: dict[str, Any]) -> str:
    """A short stable id of a run spec: same arguments and inputs -> same id -> resume or reuse."""
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:16]


def _load_or_none(path: Path) -> dict[str, Any] | None:
    """A stored stage or cached sweep; None when absent (or unreadable, which atomic writes rule out:
    recompute rather than trust it)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


class RunStore:
    """Where one run's document and its per-batch progress live."""

    def __init__(self, results_dir: str | Path, run_name: str, run_id: str) -> None:
        self.results_dir = Path(results_dir)
        self.run_id = run_id
        self.final_path = self.results_dir / f"{run_name}-{run_id}.json"
        self.partial_dir = self.results_dir / ".partial" / run_id

    def finished(self) -> dict[str, Any] | None:
        from bench.records.read import read_record

        if not self.final_path.is_file():
            return None
        return read_record(self.final_path)

    def stage_path(self, stage: str) -> Path:
        return self.partial_dir / f"{stage}.json"

    def load_stage(self, stage: str) -> dict[str, Any] | None:
        return _load_or_none(self.stage_path(stage))

    def save_stage(self, stage: str, payload: dict[str, Any]) -> None:
        atomic_write_json(self.stage_path(stage), payload)

    def write_final(self, document: dict[str, Any]) -> None:
        atomic_write_json(self.final_path, document)
        shutil.rmtree(self.partial_dir, ignore_errors=True)

    def clear(self) -> None:
        shutil.rmtree(self.partial_dir, ignore_errors=True)
        self.final_path.unlink(missing_ok=True)


class SweepCache:
    """White-box sweeps shared between runs, in `<results>/.sweeps/<key>.json`.

    A sweep's outcome depends on the model and its deployed solver, the development set, eps, seed, batch
    plan, device, code version and the sweep's own settings; not on the reported examples, their attacks or
    a defense. Runs that differ only in those reuse one sweep instead of repeating hours of PGD. The key
    hashes exactly the inputs the caller passes (see `evaluate`), so any change in them computes anew.
    """

    def __init__(self, results_dir: str | Path) -> None:
        self.dir = Path(results_dir) / ".sweeps"

    @staticmethod
    def key(inputs: dict[str, Any]) -> str:
        return run_id_of(inputs)

    def load(self, key: str) -> dict[str, Any] | None:
        return _load_or_none(self.dir / f"{key}.json")

    def save(self, key: str, payload: dict[str, Any]) -> None:
        atomic_write_json(self.dir / f"{key}.json", payload)
