"""bench plot on synthetic DEQ records: per-state series recomputed from per-example arrays, PNG and SVG
written, figures whose arrays are absent skipped with a message, and the user's errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.cli.report import plot_command
from bench.errors import BenchError
from bench.records.schema import SCHEMA_VERSION
from bench.report.plots import (
    entropy_traces,
    parse_formats,
    plot_run,
    residual_traces,
    state_accuracy,
)

LABELS = [0, 1, 2, 3]
# clean: state 1 gets 1/4 right, state 2 gets 3/4, state 3 all; adversarial: 2/4, 1/4, 0/4
CLEAN_STATES = [[0, 0, 0], [0, 1, 1], [0, 2, 2], [0, 0, 3]]
ADV_STATES = [[0, 0, 9], [1, 9, 9], [9, 9, 9], [9, 9, 9]]


def deq_record(root: Path, name: str = "deq", *, traces: bool = False, model: str = "deq-micro") -> Path:
    solver = {"rel_residual": [1e-4, 2e-4, 1e-3, 5e-4], "diverged": [False] * 4, "nsteps": [3] * 4}
    adv_solver = {"rel_residual": [1e-2, 3e-2, 5e-2, 1e-1], "diverged": [False] * 4, "nsteps": [3] * 4}
    clean_states: dict[str, Any] = {"pred": CLEAN_STATES}
    adv: dict[str, Any] = {"states_pred": ADV_STATES, "pred": [9] * 4, "solver": adv_solver}
    if traces:
        solver["rel_trace"] = [[1e-1, 1e-2, 1e-4]] * 4
        adv_solver["rel_trace"] = [[3e-1, 1e-1, 5e-2]] * 4
        clean_states["entropy"] = [[2.0, 1.0, 0.5]] * 4
        adv["states_entropy"] = [[2.2, 2.0, 1.8]] * 4
    doc = {
        "schema": SCHEMA_VERSION,
        "spec": {"model": model, "dataset": "fashion-mnist", "eps": 0.1, "plan": {"readouts": ["final"]}},
        "results": {
            "columns": {
                "index": [0, 1, 2, 3],
                "label": LABELS,
                "clean": {"final": {"pred": [0, 1, 2, 3]}},
                "clean_states": clean_states,
                "clean_solver": solver,
                "attacks": [],
                "adversarial": {"white-box": {"pgd": {"final": adv}}},
            },
            "warnings": [],
        },
    }
    path = root / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


def test_state_accuracy_is_recomputed_per_state(tmp_path: Path) -> None:
    doc = json.loads(deq_record(tmp_path).read_text())
    series = state_accuracy(doc)
    np.testing.assert_allclose(series["clean"], [25.0, 75.0, 100.0])
    np.testing.assert_allclose(series["white-box pgd"], [50.0, 25.0, 0.0])


def test_png_and_svg_written_and_absent_traces_are_skipped(tmp_path: Path) -> None:
    path = deq_record(tmp_path)
    written, skipped = plot_run(path, json.loads(path.read_text()), tmp_path / "plots", ["png", "svg"])
    names = sorted(p.name for p in written)
    assert names == [
        "deq-final-residual.png",
        "deq-final-residual.svg",
        "deq-state-accuracy.png",
        "deq-state-accuracy.svg",
    ]
    png = (tmp_path / "plots" / "deq-state-accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    svg = (tmp_path / "plots" / "deq-state-accuracy.svg").read_text()
    assert "<svg" in svg and "</svg>" in svg
    assert any("state-residual" in s and "clean_solver.rel_trace" in s for s in skipped)
    assert any("state-entropy" in s and "clean_states.entropy" in s for s in skipped)
    assert not list((tmp_path / "plots").glob(".*.tmp"))  # atomic writes leave no temp files
    plot_run(path, json.loads(path.read_text()), tmp_path / "again", ["png", "svg"])
    for name in names:  # the same record draws the same bytes (committed figures do not churn)
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "plots" / name).read_bytes(), name


def test_trace_figures_when_the_record_has_the_arrays(tmp_path: Path) -> None:
    path = deq_record(tmp_path, traces=True)
    doc = json.loads(path.read_text())
    np.testing.assert_allclose(residual_traces(doc)["white-box pgd"][0], [3e-1, 1e-1, 5e-2])
    np.testing.assert_allclose(entropy_traces(doc)["clean"].mean(0), [2.0, 1.0, 0.5])
    written, skipped = plot_run(path, doc, tmp_path / "plots", ["svg"])
    assert skipped == [] and len(written) == 4


def test_a_state_column_in_the_wrong_layout_is_skipped_not_misread(tmp_path: Path) -> None:
    path = deq_record(tmp_path)
    doc = json.loads(path.read_text())
    states_first = [list(r) for r in zip(*CLEAN_STATES, strict=True)]  # (T, n) instead of (n, T)
    doc["results"]["columns"]["clean_states"]["pred"] = states_first
    written, skipped = plot_run(path, doc, tmp_path / "plots", ["svg"])
    assert any("state-accuracy" in s and "shape (3, 4), expected (4, T)" in s for s in skipped)
    assert [p.name for p in written] == ["deq-final-residual.svg"]


def test_command_plots_a_results_dir_and_skips_cnn_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deq_record(tmp_path, "deq")
    cnn = json.loads(deq_record(tmp_path, "cnn").read_text())
    for key in ("clean_states", "clean_solver", "adversarial"):
        del cnn["results"]["columns"][key]
    (tmp_path / "cnn.json").write_text(json.dumps(cnn))
    plot_command(results_dir=str(tmp_path), fmt="svg")
    out = capsys.readouterr().out
    assert "cnn.json: skipped: not a DEQ run" in out
    assert (tmp_path / "plots" / "deq-state-accuracy.svg").is_file()
    with pytest.raises(BenchError, match="no figures written"):
        plot_command(run=str(tmp_path / "cnn.json"), out=str(tmp_path / "cnn-plots"))


def test_user_errors(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="unknown image format"):
        parse_formats("png,jpg")
    with pytest.raises(BenchError, match="at least one"):
        parse_formats(" , ")
    assert parse_formats("SVG, png,svg") == ["svg", "png"]
    with pytest.raises(BenchError, match="does not exist"):
        plot_command(results_dir=str(tmp_path / "missing"))
    with pytest.raises(BenchError, match="no run records"):
        plot_command(results_dir=str(tmp_path))
