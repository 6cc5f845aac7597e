"""bench leaderboard on synthetic per-example records: recomputed rows, merging, reported rows and deltas,
the gap view, every export format, RobustBench model_info, and the user's errors."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from bench.cli.report import leaderboard_command
from bench.errors import BenchError
from bench.report import exports
from bench.report.leaderboard import (
    REPORTED,
    arch_key,
    gap_rows,
    leaderboard_rows,
    load_run,
    load_runs,
    run_row,
    runs_rows,
    warning_flags,
)
from bench.spec import format_eps

SCHEMA_VERSION = 1  # records as deq-bench 0.2 wrote them (text warnings, '|' keys): read through the upgrade

EPS = 8 / 255
N = 10
DEFAULT_RECIPE = {"method": "pgd-at", "random_state": False}
LABELS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
CLEAN = [0, 1, 2, 3, 4, 5, 6, 7, 0, 0]  # examples 8 and 9 misclassified: clean 80 %


def _mask(*broken: int, n: int = N) -> list[bool]:
    return [i in broken for i in range(n)]


def _col(protocol: str, group: str, attack: str, estimator: str, broken: list[bool], readout: str = "final"):
    return {
        "protocol": protocol,
        "group": group,
        "attack": attack,
        "estimator": estimator,
        "readout": readout,
        "attacked": [True] * len(broken),
        "broken": broken,
        "linf": [EPS if b else 0.0 for b in broken],
    }


# Ready-made breaks {0} (PGD) and {2} (AA); white-box breaks {1, 3} (PGD) and {0} (AA).
# Clean 80, PGD 80-3 = 50, AA 80-2 = 60, All 80-4 = 40 (strictly below both); ready-made All 60,
# white-box All 50, gap +10.
STANDARD_ATTACKS = [
    _col("ready-made", "pgd", "pgd", "unroll:5:0.5", _mask(0)),
    _col("ready-made", "aa", "apgd-ce", "unroll:5:0.5", _mask(2)),
    _col("ready-made", "aa", "square", "unroll:5:0.5", _mask()),
    _col("white-box", "pgd", "pgd", "state:3:1:1", _mask(1)),
    _col("white-box", "pgd", "pgd", "exact", _mask(3)),
    _col("white-box", "aa", "apgd-ce", "state:3:1:1", _mask(0)),
]


def make_record(
    root: Path,
    name: str,
    *,
    model: str = "deq-large",
    dataset: str = "cifar10",
    eps: float = EPS,
    attacks: list[dict[str, Any]] | None = None,
    labels: list[int] | None = None,
    clean: list[int] | None = None,
    index: list[int] | None = None,
    warnings: list[str] | None = None,
    recipe: dict[str, Any] | None = None,
    checkpoint_sha256: str | None = "a" * 64,
    defense: str = "none",
    sanity: dict[str, Any] | None = None,
    selection: dict[str, Any] | None = None,
    suite: str = "full",
    finished: float | None = None,
    extra_columns: dict[str, Any] | None = None,
) -> Path:
    """A run record in the evaluator's schema with known per-example arrays; its summary is garbage on
    purpose, so a test passes only if rows are recomputed from the columns."""
    labels = LABELS if labels is None else labels
    clean = CLEAN if clean is None else clean
    index = list(range(len(labels))) if index is None else index
    attacks = STANDARD_ATTACKS if attacks is None else attacks
    doc = {
        "schema": SCHEMA_VERSION,
        "run_id": name,
        "spec": {
            "schema": SCHEMA_VERSION,
            "model": model,
            "checkpoint_sha256": checkpoint_sha256,
            "random_weights": False,
            "dataset": dataset,
            "data_sha256": "d" * 64,
            "n_examples": len(labels),
            "eps": eps,
            "plan": {"suite": suite, "readouts": ["final"], "protocols": []},
            "defense": defense,
            "seed": 0,
            "deploy": {"max_iter": 4},
        },
        "results": {
            "selection": selection
            if selection is not None
            else {
                "ready-made": {"final": ["unroll:5:0.5"]},
                "white-box": {"final": ["state:3:1:1", "exact"]},
            },
            "columns": {
                "index": index,
                "label": labels,
                "clean": {"final": {"pred": clean}},
                "attacks": attacks,
                "adversarial": {},
                **(extra_columns or {}),
            },
            "summary": {"n_examples": 99, "readouts": {"final": {"clean_acc": 99.0, "all_acc": 99.0}}},
            "warnings": warnings or [],
            **({"sanity": sanity} if sanity is not None else {}),
        },
        "provenance": {
            "checkpoint_metadata": {"recipe": json.dumps(DEFAULT_RECIPE if recipe is None else recipe)},
            **(
                {"shard_plan": {"sessions": [{"started": finished - 5.0, "wall_seconds": 5.0}]}}
                if finished
                else {}
            ),
        },
    }
    path = root / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def results(tmp_path: Path) -> Path:
    make_record(tmp_path, "deq-large-run")
    return tmp_path


def _rows(results_dir: Path, **kw: Any) -> list[dict[str, Any]]:
    return exports.records(leaderboard_rows(load_runs(results_dir), **kw))


def _measured(rows: list[dict[str, Any]], model: str = "deq-large") -> dict[str, Any]:
    (row,) = [r for r in rows if r["source"] == "measured" and r["model"] == model]
    return row


def test_rows_are_recomputed_from_per_example_columns(results: Path) -> None:
    row = _measured(_rows(results))
    assert (row["clean"], row["pgd"], row["aa"], row["all"]) == (80.0, 50.0, 60.0, 40.0)
    assert row["all"] < min(row["pgd"], row["aa"])  # the per-example AND, not the minimum of columns
    assert row["n_examples"] == N and row["eps_text"] == "8/255" and row["readout"] == "final"
    assert row["method"] == "pgd-at" and row["defense"] == "none"
    assert row["estimator"] == "state:3:1:1"  # the white-box sweep's first choice
    assert row["protocols"]["ready-made"]["all"] == 60.0 and row["protocols"]["white-box"]["all"] == 50.0
    assert row["flags"] == [] and row["unreliable"] is False


def test_json_rows_have_the_promised_keys(results: Path, capsys: pytest.CaptureFixture[str]) -> None:
    leaderboard_command(results_dir=str(results), fmt="json")
    rows = json.loads(capsys.readouterr().out)
    keys = {
        "model",
        "method",
        "defense",
        "readout",
        "clean",
        "pgd",
        "aa",
        "all",
        "n_examples",
        "eps",
        "source",
    }
    assert all(keys <= set(r) for r in rows)
    assert {r["source"] for r in rows} == {"measured", REPORTED}


def test_reported_rows_and_delta_against_the_matching_paper_row(results: Path) -> None:
    rows = _rows(results)
    reported = [r for r in rows if r["source"] == REPORTED]
    assert {r["model"] for r in reported} == {"ResNet-18", "DEQ-Large"}
    base = next(r for r in reported if r["method"] == "Yang et al. (2022)")
    assert (base["clean"], base["pgd"], base["aa"], base["all"]) == (74.92, 50.46, 50.33, 50.33)
    assert next(r for r in reported if r["model"] == "ResNet-18")["pgd"] is None  # not given: no 0
    row = _measured(rows)
    assert row["reference"]["method"] == "Yang et al. (2022)"  # defense none, no random states
    assert row["delta_all"] == pytest.approx(40.0 - 50.33)
    assert row["delta_clean"] == pytest.approx(80.0 - 74.92)
    assert row["delta_pgd"] == pytest.approx(50.0 - 50.46)


def test_random_state_training_matches_its_own_paper_row(tmp_path: Path) -> None:
    make_record(tmp_path, "ris", recipe={"method": "trades", "random_state": True})
    row = _measured(_rows(tmp_path))
    assert row["method"] == "trades+random-states"
    assert row["reference"]["method"] == "+ Loss from Random z[t]"
    assert row["delta_aa"] == pytest.approx(60.0 - 49.64)


def test_a_defense_matches_the_paper_row_by_its_name(tmp_path: Path) -> None:
    make_record(tmp_path, "er", defense="entropy-reduction:steps=5,eps=2/255")
    make_record(tmp_path, "plain")
    rows = _rows(tmp_path)
    defended = next(r for r in rows if r["source"] == "measured" and r["defense"] != "none")
    assert defended["defense"] == "entropy-reduction:steps=5,eps=2/255"  # settings stay in the row key
    assert defended["reference"]["method"] == "+ Input Entropy Reduction"
    assert defended["delta_all"] == pytest.approx(40.0 - 50.52)
    plain = next(r for r in rows if r["source"] == "measured" and r["defense"] == "none")
    assert plain["reference"]["method"] == "Yang et al. (2022)"


def test_no_delta_for_another_setting(tmp_path: Path) -> None:
    make_record(tmp_path, "other-eps", eps=4 / 255)
    make_record(tmp_path, "fmnist", model="deq-tiny", dataset="fashion-mnist-builtin", eps=0.1)
    rows = _rows(tmp_path)
    assert _measured(rows)["delta_all"] is None and _measured(rows)["eps_text"] == "4/255"
    tiny = _measured(rows, "deq-tiny")
    assert tiny["dataset"] == "fashion-mnist" and tiny["delta_all"] is None and tiny["eps_text"] == "0.1"


def test_unregistered_model_does_not_crash_and_method_falls_back(tmp_path: Path) -> None:
    make_record(tmp_path, "mine", model="my-own-net", recipe={})
    make_record(tmp_path, "zoo", model="robustbench:NoSuchZooModel2099", recipe={"method": "trades"})
    rows = _rows(tmp_path)
    assert _measured(rows, "my-own-net")["method"] == "unknown"
    assert _measured(rows, "robustbench:NoSuchZooModel2099")["method"] == "trades"


def test_runs_on_the_same_examples_merge_into_the_per_example_worst_case(tmp_path: Path) -> None:
    make_record(tmp_path, "a", attacks=[_col("white-box", "pgd", "pgd", "exact", _mask(0, 1))], finished=1000)
    make_record(
        tmp_path, "b", attacks=[_col("white-box", "aa", "square", "exact", _mask(1, 2))], finished=2000
    )
    row = _measured(_rows(tmp_path))
    assert (row["pgd"], row["aa"], row["all"]) == (60.0, 60.0, 50.0)
    assert row["runs"] == ["b.json", "a.json"]


def test_different_checkpoints_are_not_merged_the_larger_run_wins(tmp_path: Path) -> None:
    make_record(
        tmp_path, "small", attacks=[_col("white-box", "pgd", "pgd", "exact", _mask(0))], finished=3000
    )
    labels = [*LABELS, 0, 1]
    make_record(
        tmp_path,
        "large",
        labels=labels,
        clean=[*CLEAN, 0, 1],
        attacks=[_col("white-box", "pgd", "pgd", "exact", _mask(0, 1, 2, n=12))],
        checkpoint_sha256="b" * 64,
        finished=1000,
    )
    row = _measured(_rows(tmp_path))
    assert row["runs"] == ["large.json"] and row["n_examples"] == 12
    assert row["all"] == pytest.approx(100 * 7 / 12)


def test_equal_size_tie_goes_to_the_newest_run(tmp_path: Path) -> None:
    make_record(tmp_path, "old", attacks=[_col("white-box", "pgd", "pgd", "exact", _mask(0))], finished=1000)
    make_record(
        tmp_path,
        "new",
        attacks=[_col("white-box", "pgd", "pgd", "exact", _mask(0, 1))],
        checkpoint_sha256="c" * 64,
        finished=2000,
    )
    assert _measured(_rows(tmp_path))["runs"] == ["new.json"]


def test_newest_is_read_from_the_record_not_the_file_mtime(tmp_path: Path) -> None:
    # a fresh checkout sets mtimes in checkout order: the leaderboard must not change with it
    old = make_record(
        tmp_path, "old", attacks=[_col("white-box", "pgd", "pgd", "exact", _mask(0))], finished=1000
    )
    new = make_record(
        tmp_path,
        "new",
        attacks=[_col("white-box", "pgd", "pgd", "exact", _mask(0, 1))],
        checkpoint_sha256="c" * 64,
        finished=2000,
    )
    os.utime(new, (10, 10))
    os.utime(old, (3e9, 3e9))
    assert _measured(_rows(tmp_path))["runs"] == ["new.json"]
    merged = tmp_path / "merged"
    merged.mkdir()  # merged runs: the newest one's white-box selection leads the row's estimator
    a = make_record(merged, "a", attacks=[_col("white-box", "pgd", "pgd", "exact", _mask(0))], finished=1000)
    b = make_record(merged, "b", attacks=[_col("white-box", "pgd", "pgd", "exact", _mask(1))], finished=2000)
    os.utime(b, (10, 10))
    os.utime(a, (3e9, 3e9))
    assert _measured(_rows(merged))["runs"] == ["b.json", "a.json"]


def test_same_checkpoint_but_different_clean_predictions_are_not_merged(tmp_path: Path) -> None:
    make_record(tmp_path, "x", attacks=[_col("white-box", "pgd", "pgd", "exact", _mask(0))], finished=1000)
    make_record(
        tmp_path, "y", clean=[0, 1, 2, 3, 4, 5, 6, 0, 0, 0], attacks=[], selection={}, finished=2000
    )  # another solver setting would do this: same weights, another function
    row = _measured(_rows(tmp_path))
    assert row["runs"] == ["y.json"] and row["clean"] == 70.0 and row["pgd"] is None


def test_flags_from_warnings_and_solver_mark_rows_unreliable(tmp_path: Path) -> None:
    warnings = [
        "square [unroll:5:0.5, final]: Square Attack has decreased the robust accuracy of 3.00%. This might "
        "indicate that the robustness evaluation using AutoAttack is unreliable.",
        "apgd-ce [exact, state:2]: there are 3 points with zero gradient!",
    ]
    solver = {"diverged": [False] * 9 + [True], "rel_residual": [0.1] * N}
    make_record(tmp_path, "flagged", warnings=warnings, extra_columns={"clean_solver": solver})
    row = _measured(_rows(tmp_path))
    assert row["flags"] == ["solver-diverged", "square-beats-gradient"]  # the zero-gradient one is state:2
    assert row["unreliable"] is True
    assert warning_flags([{"message": "something unexpected"}], "final") == ["warning"]


def test_the_records_sanity_checks_become_flags(tmp_path: Path) -> None:
    from bench.sanity import flags_fired

    sanity = {"eps_zero_breaks": 2, "gradients": {}, "square": [], "autoattack_warnings": []}
    make_record(tmp_path, "sane", sanity=sanity)
    row = _measured(_rows(tmp_path))
    assert flags_fired(sanity) and set(flags_fired(sanity)) <= set(row["flags"])
    assert row["unreliable"] is True


def test_white_box_weaker_than_ready_made_is_an_informational_flag(tmp_path: Path) -> None:
    attacks = [
        _col("ready-made", "pgd", "pgd", "unroll:5:0.5", _mask(0, 1)),
        _col("white-box", "pgd", "pgd", "exact", _mask(0)),
    ]
    make_record(tmp_path, "weak", attacks=attacks)
    row = _measured(_rows(tmp_path))
    assert row["flags"] == ["white-box-weaker"] and row["unreliable"] is False


def test_gap_view(results: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gap = exports.records(gap_rows(leaderboard_rows(load_runs(results))))
    assert len(gap) == 1  # measured rows only
    assert (gap[0]["ready_made"], gap[0]["white_box"], gap[0]["gap"]) == (60.0, 50.0, 10.0)
    leaderboard_command(results_dir=str(results), fmt="md", view="gap")
    out = capsys.readouterr().out
    assert "Ready-made All" in out and "+10.00" in out


def test_gap_is_missing_not_zero_without_both_protocols(tmp_path: Path) -> None:
    make_record(tmp_path, "wb-only", attacks=[_col("white-box", "pgd", "pgd", "exact", _mask(0))])
    (row,) = exports.records(gap_rows(leaderboard_rows(load_runs(tmp_path))))
    assert row["ready_made"] is None and row["gap"] is None and row["white_box"] == 70.0


def test_dataset_filter_and_reference_switch(tmp_path: Path) -> None:
    make_record(tmp_path, "fm", model="deq-tiny", dataset="fashion-mnist", eps=0.1)
    make_record(tmp_path, "c10", model="deq-large")
    rows = _rows(tmp_path, dataset="fashion-mnist")
    assert {r["dataset"] for r in rows} == {"fashion-mnist"}
    assert all(r["source"] == "measured" for r in _rows(tmp_path, reference=False))
    with pytest.raises(BenchError, match="no rows for data set"):
        _rows(tmp_path, dataset="imagenet")


@pytest.mark.parametrize("fmt", ["table", "md", "csv", "latex", "html", "json"])
@pytest.mark.parametrize("view", ["main", "gap", "runs"])
def test_every_format_renders_to_a_file(results: Path, fmt: str, view: str) -> None:
    out = results / "out" / f"board.{fmt}"
    leaderboard_command(results_dir=str(results), fmt=fmt, output=str(out), view=view)
    text = out.read_text()
    assert "deq-large" in text
    raw = fmt in ("csv", "json")  # raw numbers; the others print two decimals
    all_text = "40.0" if raw else "40.00"
    expected = {"main": all_text, "runs": all_text, "gap": "10.0" if raw else "+10.00"}[view]  # All, gap
    assert expected in text
    if view == "runs":  # measured runs only (a JSON row still names its matching paper row)
        assert fmt == "json" or "Yang et al. (2022)" not in text
    else:
        assert ("Yang et al. (2022)" in text) == (view == "main")  # reported rows only in the main view


def test_piped_table_is_one_tsv_with_the_dataset(results: Path, capsys: pytest.CaptureFixture[str]) -> None:
    leaderboard_command(results_dir=str(results))
    out = capsys.readouterr().out  # not a terminal: one tab-separated table
    assert out.count("Dataset\tModel\tMethod") == 1
    line = next(s for s in out.splitlines() if s.startswith("cifar10\tdeq-large\t"))
    assert line.split("\t")[5:11] == ["80.00", "50.00", "60.00", "40.00", "+5.08", "-10.33"]


def test_terminal_tables_keep_brackets(
    results: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    import bench.console

    monkeypatch.setattr(bench.console, "stdout_is_terminal", lambda: True)
    monkeypatch.setenv("COLUMNS", "250")
    leaderboard_command(results_dir=str(results))
    out = capsys.readouterr().out
    assert "cifar10 (L-inf, eps 8/255)" in out and "z[t]" in out  # not eaten as rich markup


def test_csv_holds_raw_numbers(results: Path) -> None:
    text = exports.render(leaderboard_rows(load_runs(results)), "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    measured = next(r for r in rows if r["source"] == "measured")
    assert float(measured["all"]) == 40.0 and measured["estimators"] == "unroll:5:0.5; state:3:1:1; exact"
    assert next(r for r in rows if r["model"] == "ResNet-18")["pgd"] == ""


def test_latex_is_booktabs_and_escaped(tmp_path: Path) -> None:
    make_record(tmp_path, "odd", model="my_net&co", recipe={"method": "100%_{at}~#1"})
    text = exports.render(leaderboard_rows(load_runs(tmp_path)), "latex")
    assert r"\toprule" in text and r"\midrule" in text and r"\bottomrule" in text
    assert r"my\_net\&co" in text and r"100\%\_\{at\}\textasciitilde{}\#1" in text
    assert r"\textit{DEQ-Large}" in text  # reported rows in italics
    assert r"+ Loss from Random z{[}t{]}" in text
    assert "my_net" not in text and "Δ" not in text
    assert exports.latex_escape("a\\b^c$") == r"a\textbackslash{}b\textasciicircum{}c\$"


def test_html_is_self_contained(tmp_path: Path) -> None:
    make_record(
        tmp_path, "x", model="<script>alert(1)</script>", warnings=["fab-t [exact, final]: dynamic defense"]
    )
    text = exports.render(leaderboard_rows(load_runs(tmp_path)), "html")
    assert text.startswith("<!DOCTYPE html>") and "<style>" in text
    assert not re.search(r"(src|href)\s*=", text, re.IGNORECASE)
    assert "<script" not in text.lower() and "<link" not in text.lower() and "@import" not in text
    assert "http://" not in text and "https://" not in text
    assert "&lt;script&gt;" in text
    assert 'class="reported"' in text and '<span class="flag">dynamic-defense</span>' in text
    assert text.count("<table>") == 1  # one data set


def test_robustbench_model_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_record(
        tmp_path, "rb", warnings=["square [unroll:5:0.5, final]: Square Attack has decreased x"]
    )
    leaderboard_command(fmt="robustbench", run=str(path))
    info = json.loads(capsys.readouterr().out)
    assert info["eps"] == "8/255" and info["dataset"] == "cifar10"
    assert info["clean_acc"] == "80.00"
    assert info["autoattack_acc"] == "70.00"  # the ready-made AA group alone: example 2 broken
    assert info["external"] == "40.00"  # our All, lower than AutoAttack's
    assert info["reported"] == "50.33"  # the matching paper row's AA
    assert info["unreliable"] is True and "square-beats-gradient" in info["footnote"]
    assert info["architecture"] == "DEQ-Large" and info["number_forward_passes"] == 1
    for key in ("link", "name", "authors", "additional_data", "venue"):
        assert key in info


def test_model_info_without_external_and_flags(tmp_path: Path) -> None:
    path = make_record(
        tmp_path, "clean-run", attacks=[_col("ready-made", "aa", "apgd-ce", "autograd", _mask(0))]
    )
    info = exports.model_info(run_row(load_run(path)))
    assert info["autoattack_acc"] == "70.00" and "external" not in info and info["unreliable"] is False
    no_aa = make_record(tmp_path, "pgd-only", attacks=[_col("white-box", "pgd", "pgd", "exact", _mask(0))])
    with pytest.raises(BenchError, match="no AutoAttack"):
        exports.model_info(run_row(load_run(no_aa)))


def test_format_eps_and_arch_key() -> None:
    assert format_eps(8 / 255) == "8/255" and format_eps(0.1) == "0.1" and format_eps(0.0) == "0"
    assert arch_key("deq-large") == arch_key("DEQ-Large") and arch_key("resnet-18") == arch_key("ResNet-18")
    assert arch_key("deq-xl") != arch_key("deq-large")


def test_user_errors(tmp_path: Path, results: Path) -> None:
    with pytest.raises(BenchError, match="does not exist"):
        leaderboard_command(results_dir=str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.json").write_text('{"not": "a record"}')
    with pytest.raises(BenchError, match="no run records"):
        leaderboard_command(results_dir=str(empty))
    with pytest.raises(BenchError, match="unknown format"):
        leaderboard_command(results_dir=str(results), fmt="xlsx")
    with pytest.raises(BenchError, match="unknown view"):
        leaderboard_command(results_dir=str(results), view="gaps")
    with pytest.raises(BenchError, match="--run"):
        leaderboard_command(results_dir=str(results), fmt="robustbench")
    with pytest.raises(BenchError, match="does not exist"):
        leaderboard_command(fmt="robustbench", run=str(tmp_path / "nope.json"))
    with pytest.raises(BenchError, match="no readout"):
        leaderboard_command(fmt="robustbench", run=str(results / "deq-large-run.json"), readout="state:9")


def test_malformed_record_is_a_one_line_error(tmp_path: Path) -> None:
    make_record(tmp_path, "bad", attacks=[_col("white-box", "pgd", "pgd", "exact", [True, False])])
    with pytest.raises(BenchError, match=r"bad\.json is malformed"):
        _rows(tmp_path)
    path = make_record(tmp_path, "bad", attacks=[{"protocol": "white-box", "broken": [False] * N}])
    with pytest.raises(BenchError, match=r"bad\.json is malformed"):
        load_run(path)
    doc = json.loads(path.read_text())
    del doc["spec"]["plan"]
    path.write_text(json.dumps(doc))
    with pytest.raises(BenchError, match=r"bad\.json is malformed"):
        load_run(path)


def test_command_options_parse_through_typer(results: Path) -> None:
    app = typer.Typer()
    app.command("leaderboard")(leaderboard_command)
    app.command("other")(lambda: None)  # two commands: the subcommand name is then required
    out = results / "lb.json"
    res = CliRunner().invoke(
        app,
        [
            "leaderboard",
            "--results-dir",
            str(results),
            "--format",
            "json",
            "--output",
            str(out),
            "--no-reference",
        ],
    )
    assert res.exit_code == 0, res.output
    assert [r["source"] for r in json.loads(out.read_text())] == ["measured"]


def test_every_accuracy_has_its_wilson_interval(results: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.stats import wilson_interval

    row = _measured(_rows(results))
    low, high = wilson_interval(4, N)  # All: 4 of 10 robust
    assert row["all_ci"] == [pytest.approx(100 * low), pytest.approx(100 * high)]
    assert row["protocols"]["white-box"]["all_ci"] == pytest.approx([100 * b for b in wilson_interval(5, N)])
    assert next(r for r in _rows(results) if r["source"] == REPORTED)["all_ci"] is None  # papers give no n
    leaderboard_command(results_dir=str(results), fmt="md")
    out = capsys.readouterr().out
    assert "All 95% CI" in out and f"[{100 * low:.1f}, {100 * high:.1f}]" in out and "| Suite |" in out


def test_gap_view_pairs_the_protocols_per_example(results: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.stats import mcnemar_exact

    (gap,) = exports.records(gap_rows(leaderboard_rows(load_runs(results))))
    # ready-made robust {1,3,4,5,6,7}, white-box robust {2,4,5,6,7}: white-box alone breaks 1 and 3,
    # ready-made alone breaks 2
    assert (gap["only_white_box"], gap["only_ready_made"]) == (2, 1)
    assert gap["p_value"] == mcnemar_exact(2, 1) and gap["gap_ci"][0] < 10.0 < gap["gap_ci"][1]
    leaderboard_command(results_dir=str(results), fmt="md", view="gap")
    out = capsys.readouterr().out
    assert "McNemar p" in out and "Only white-box breaks" in out and "| 1.000 |" in out


def test_runs_view_lists_every_run_not_only_the_largest(tmp_path: Path) -> None:
    make_record(tmp_path, "big", checkpoint_sha256="a" * 64)
    small = [_col("white-box", "pgd", "pgd", "exact", _mask(0, n=5))]
    make_record(
        tmp_path, "small", checkpoint_sha256="b" * 64, labels=LABELS[:5], clean=CLEAN[:5], attacks=small,
        suite="quick",
    )  # fmt: skip
    assert len([r for r in _rows(tmp_path) if r["source"] == "measured"]) == 1  # main: the largest
    runs = exports.records(runs_rows(load_runs(tmp_path)))
    assert {(r["run"], r["suite"], r["n_examples"]) for r in runs} == {
        ("big.json", "full", 10),
        ("small.json", "quick", 5),
    }
    out = tmp_path / "runs.md"
    leaderboard_command(results_dir=str(tmp_path), fmt="md", view="runs", output=str(out))
    assert "small.json" in out.read_text() and "big.json" in out.read_text()
