"""The summary table printed at the end of `bench evaluate` (computed from the record's per-example data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.console import print_table


def summary_rows(document: dict[str, Any]) -> list[list[str]]:
    summary = document["results"]["summary"]
    rows: list[list[str]] = []
    for readout, r in summary["readouts"].items():
        rows.append([readout, "clean", "", f"{r['clean_acc']:.2f}"])
        for protocol, p in r["protocols"].items():
            for group, g in p["groups"].items():
                for attack, acc in g["cumulative"].items():
                    rows.append([readout, f"{protocol}/{group}", attack, f"{acc:.2f}"])
                rows.append([readout, f"{protocol}/{group}", "(group)", f"{g['robust_acc']:.2f}"])
            rows.append([readout, protocol, "All", f"{p['all_acc']:.2f}"])
        rows.append([readout, "every protocol", "All", f"{r['all_acc']:.2f}"])
    return rows


def print_summary(document: dict[str, Any], path: Path, reused: bool) -> None:
    spec = document["spec"]
    n = document["results"]["summary"]["n_examples"]
    title = (
        f"{spec['model']} on {spec['dataset']} (n={n}, eps={spec['eps']:.4g}, suite {spec['plan']['suite']})"
    )
    print_table(
        title, ["readout", "protocol/group", "attack [estimator]", "accuracy %"], summary_rows(document)
    )
    for warning in document["results"]["warnings"]:
        print(f"warning: {warning}")
    print(f"{'reused' if reused else 'wrote'} {path}")
