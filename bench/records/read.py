"""Reading records back: one reader for the leaderboard, plots, check and merge.

A record is read, its schema checked and upgraded to the current layout (bench.records.schema), then
validated field by field (bench.records.validate), so every report sees one shape whatever deq-bench
version wrote the file, and a damaged file is one error naming the file and the field, never a wrong number.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.records.schema import READABLE_SCHEMAS, SCHEMA_VERSION, upgrade
from bench.records.validate import check_record


class NotARecord(BenchError):
    """A file that is not a deq-bench run record at all (other JSON, unreadable bytes)."""

    def __init__(self, message: str, report: bool = False) -> None:
        super().__init__(message)
        self.report = report  # a table this tool exported beside the records (a JSON list of rows)


def read_json(path: str | Path, what: str) -> Any:
    """A JSON file's content; BenchError naming the file when it cannot be read or parsed."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise BenchError(f"cannot read {what} {path}: {reason}") from None


def read_record(path: str | Path) -> dict[str, Any]:
    """A finished run record in the current layout; BenchError naming the file (and field) when it is not."""
    path = Path(path)
    try:
        doc = read_json(path, "run record")
    except BenchError as exc:
        raise NotARecord(str(exc)) from None
    if isinstance(doc, list):
        raise NotARecord(f"{path} is a list of rows (an exported table), not a run record", report=True)
    if not isinstance(doc, dict) or doc.get("schema") not in READABLE_SCHEMAS or "results" not in doc:
        raise NotARecord(f"{path} is not a deq-bench run record (schema {SCHEMA_VERSION})")
    return check_record(upgrade(doc), path)


def iter_records(results_dir: str | Path) -> Iterable[tuple[Path, dict[str, Any]]]:
    """Every finished run record directly under results_dir (partial progress is ignored).

    A JSON file that is no run record is skipped with a warning on stderr; a run record that fails
    validation is an error (a report without it would silently differ)."""
    root = Path(results_dir)
    if not root.is_dir():
        state = "is not a directory" if root.exists() else "does not exist"
        raise BenchError(f"results directory {root} {state}")
    for path in sorted(root.glob("*.json")):
        try:
            doc = read_record(path)
        except NotARecord as exc:
            if not exc.report:  # `bench leaderboard --format json --output results/...` lives here too
                print(f"warning: skipped {path}: {exc}", file=sys.stderr)
            continue
        yield path, doc
