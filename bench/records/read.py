"""Reading records back: one reader for the leaderboard, plots, check and merge.

A record is read, its schema checked and upgraded to the current layout (bench.records.schema), so every
report sees one shape whatever deq-bench version wrote the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.records.schema import READABLE_SCHEMAS, SCHEMA_VERSION, upgrade


def read_record(path: str | Path) -> dict[str, Any]:
    """A finished run record in the current layout; BenchError naming the file when it is not one."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BenchError(f"cannot read run record {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("schema") not in READABLE_SCHEMAS or "results" not in doc:
        raise BenchError(f"{path} is not a deq-bench run record (schema {SCHEMA_VERSION})")
    return upgrade(doc)


def iter_records(results_dir: str | Path) -> Iterable[tuple[Path, dict[str, Any]]]:
    """Every finished run record directly under results_dir (partial progress is ignored)."""
    root = Path(results_dir)
    if not root.is_dir():
        raise BenchError(f"results directory {root} does not exist")
    for path in sorted(root.glob("*.json")):
        try:
            yield path, read_record(path)
        except BenchError:
            continue
