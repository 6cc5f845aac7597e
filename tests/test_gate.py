"""The project's own regression gate: the shipped models still give their expected numbers.

Each results/expected/*.json describes a small fixed evaluation of a shipped checkpoint; `bench check`
re-runs it here (CI) and fails when clean, robust or All accuracy moved beyond the noise of n examples.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

EXPECTED = sorted((Path(__file__).resolve().parent.parent / "results" / "expected").glob("*.json"))


def test_every_shipped_model_has_a_baseline():
    models = {p.name.split("-quick")[0] for p in EXPECTED}
    assert {"deq-tiny", "resnet-tiny"} <= models


@pytest.mark.parametrize("baseline", EXPECTED, ids=[p.stem for p in EXPECTED])
def test_bench_check_passes_on_the_shipped_models(baseline, tmp_path, monkeypatch, capsys):
    from bench.cli import main

    monkeypatch.setattr(
        sys,
        "argv",
        ["bench", "check", "--baseline", str(baseline), "--results-dir", str(tmp_path), "--device", "cpu"],
    )
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
