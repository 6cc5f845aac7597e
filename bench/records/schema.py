"""The record's layout: its keys, its structured warnings, and the upgrade of older records.

One writer and one reader for every structured part of a record: evaluation writes warnings with
`warning`, per-(protocol, group, readout) adversarial entries with `nest`, attack timings with `timing`;
reports read them back with `warnings_of`, `adversarial_entries` and `column_view`. Records of schema 1
(text warnings `"<attack> [<estimator>, <readout>]: <message>"`, keys joined with `|`) are upgraded on
read by `upgrade`, the only place that still parses those strings.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from bench.spec import ViewSpec

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
# the identity of one attack column: one attack run with one view, in one group of one protocol
COLUMN_KEYS = ("protocol", "group", "attack", "estimator", "readout")
_V1_WARNING = re.compile(
    r"^(?P<attack>[^\s\[]+) \[(?P<estimator>[^\]]*), (?P<readout>[^\],]+)\]: (?P<msg>.*)$"
)


def warning(message: str, attack: str | None = None, view: ViewSpec | None = None) -> dict[str, Any]:
    """A structured warning: what an attack (on a view) or the run as a whole reported."""
    return {
        "attack": attack,
        "estimator": None if view is None else view.label,
        "readout": None if view is None else view.readout,
        "message": message,
    }


def warning_key(w: dict[str, Any]) -> tuple[str, ...]:
    return tuple(str(w.get(k) or "") for k in ("attack", "estimator", "readout", "message"))


def unique_warnings(warnings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sorted, each once: batches repeat the same warning."""
    seen: dict[tuple[str, ...], dict[str, Any]] = {}
    for w in warnings:
        seen.setdefault(warning_key(w), w)
    return [seen[k] for k in sorted(seen)]


def warning_text(w: dict[str, Any]) -> str:
    """How a person reads one warning."""
    if w.get("attack") is None:
        return str(w["message"])
    return f"{w['attack']} [{w.get('estimator')}, {w.get('readout')}]: {w['message']}"


def warnings_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(doc["results"].get("warnings", []))


def nest(tree: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    """tree[k1][k2]...[kn] = value, creating the levels."""
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def adversarial_entries(columns: dict[str, Any]) -> Iterator[tuple[str, str, str, dict[str, Any]]]:
    """(protocol, group, readout, entry) of every worst-case pass in a record's columns."""
    for protocol, groups in columns.get("adversarial", {}).items():
        for group, readouts in groups.items():
            for readout, entry in readouts.items():
                yield protocol, group, readout, entry


def column_view(col: dict[str, Any]) -> ViewSpec:
    """The view an attack column was run with."""
    return ViewSpec.from_label(col["readout"], col["estimator"])


def timing(protocol: str, group: str, attack: str, view: ViewSpec, seconds: float) -> dict[str, Any]:
    return {
        "protocol": protocol,
        "group": group,
        "attack": attack,
        "estimator": view.label,
        "readout": view.readout,
        "seconds": seconds,
    }


def add_timings(total: dict[tuple[str, ...], float], timings: list[dict[str, Any]]) -> None:
    for t in timings:
        key = tuple(str(t[k]) for k in COLUMN_KEYS)
        total[key] = total.get(key, 0.0) + float(t["seconds"])


def timings_list(total: dict[tuple[str, ...], float]) -> list[dict[str, Any]]:
    return [{**dict(zip(COLUMN_KEYS, k, strict=True)), "seconds": round(v, 4)} for k, v in total.items()]


def _upgrade_warning(text: Any) -> dict[str, Any]:
    if isinstance(text, dict):
        return text
    m = _V1_WARNING.match(str(text))
    if m is None:
        return warning(str(text))
    return {
        "attack": m.group("attack"),
        "estimator": m.group("estimator"),
        "readout": m.group("readout"),
        "message": m.group("msg"),
    }


def _split_key(key: str, n: int) -> tuple[str, ...]:
    parts = key.split("|")
    return tuple([*parts, *[""] * n][:n])


def upgrade(doc: dict[str, Any]) -> dict[str, Any]:
    """A record of any readable schema in the current layout (schema 1: text warnings, `|` keys)."""
    if doc.get("schema") == SCHEMA_VERSION:
        return doc
    results = doc.get("results")
    if isinstance(results, dict):
        if isinstance(results.get("warnings"), list):
            results["warnings"] = [_upgrade_warning(w) for w in results["warnings"]]
        sanity = results.get("sanity")
        if isinstance(sanity, dict) and isinstance(sanity.get("autoattack_warnings"), list):
            sanity["autoattack_warnings"] = [_upgrade_warning(w) for w in sanity["autoattack_warnings"]]
        columns = results.get("columns")
        if isinstance(columns, dict) and isinstance(columns.get("adversarial"), dict):
            nested: dict[str, Any] = {}
            for key, entry in columns["adversarial"].items():
                nest(nested, _split_key(key, 3), entry)
            columns["adversarial"] = nested
    provenance = doc.get("provenance")
    if isinstance(provenance, dict) and isinstance(provenance.get("attack_seconds"), dict):
        provenance["attack_seconds"] = [
            {**dict(zip(COLUMN_KEYS, _split_key(k, 5), strict=True)), "seconds": v}
            for k, v in provenance["attack_seconds"].items()
        ]
    doc["schema"] = SCHEMA_VERSION
    return doc
