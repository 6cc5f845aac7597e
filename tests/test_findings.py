"""`bench leaderboard --view findings` on synthetic records: each claim paired on the same examples, the
McNemar verdicts, honest 'no run' where the records cannot answer, and the page with its figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_leaderboard import _col, make_record

from bench.cli.report import leaderboard_command
from bench.errors import BenchError
from bench.report.findings import findings, render_findings, verdict
from bench.report.leaderboard import load_runs

N = 30
LABELS = [i % 10 for i in range(N)]
T = 3


def _mask(broken: set[int]) -> list[bool]:
    return [i in broken for i in range(N)]


def _deq_columns(clean_pred: list[int], broken: dict[str, set[int]]) -> dict[str, Any]:
    """clean_states: every state predicts like the final readout; on each protocol's worst-case inputs
    z[1] stays right and z[2], z[3] fail wherever the attack broke the final readout."""
    states = [[p] * T for p in clean_pred]
    adversarial: dict[str, Any] = {}
    for protocol, hit in broken.items():
        pred = [(y + 1) % 10 if i in hit else y for i, y in enumerate(LABELS)]
        states_pred = [[y, p, p] for y, p in zip(LABELS, pred, strict=True)]
        # schema-1 records (test_leaderboard's) key entries "protocol|group|readout"; read_record nests them
        adversarial[f"{protocol}|pgd|final"] = {"pred": pred, "states_pred": states_pred}
    return {"clean_states": {"pred": states}, "adversarial": adversarial}


@pytest.fixture
def records(tmp_path: Path) -> Path:
    clean = [y if i < 28 else (y + 1) % 10 for i, y in enumerate(LABELS)]  # 28 / 30 right
    deq_broken = {"ready-made": {0}, "white-box": set(range(11))}  # white-box alone breaks 1..10
    deq_attacks = [
        _col("ready-made", "pgd", "pgd", "unroll:2:0.5", _mask(deq_broken["ready-made"])),
        _col("white-box", "pgd", "pgd", "state:3:1:1", _mask(deq_broken["white-box"])),
    ]
    common = {"model": "deq-tiny", "dataset": "fashion-mnist", "eps": 0.1, "labels": LABELS}
    fast_at = {"method": "fast-at", "random_state": False}
    make_record(
        tmp_path, "deq", **common, clean=clean, attacks=deq_attacks, recipe=fast_at,
        extra_columns=_deq_columns(clean, deq_broken), suite="lite",
    )  # fmt: skip
    make_record(
        tmp_path, "deq-defended", **common, clean=clean, recipe=fast_at, defense="entropy-reduction:steps=5",
        attacks=[_col("white-box", "pgd", "pgd", "bpda@state:3:1:1", _mask({0, 1}))], suite="lite",
        extra_columns=_deq_columns(clean, {"white-box": {0, 1}}),
    )  # fmt: skip
    make_record(
        tmp_path, "ris", **{**common, "model": "deq-tiny-ris"}, clean=LABELS, attacks=deq_attacks,
        recipe={"method": "fast-at", "random_state": True}, checkpoint_sha256="b" * 64, suite="lite",
        extra_columns=_deq_columns(LABELS, deq_broken),
    )  # fmt: skip
    make_record(
        tmp_path, "cnn", **{**common, "model": "resnet-tiny"}, clean=LABELS, recipe=fast_at,
        attacks=[_col("ready-made", "pgd", "pgd", "autograd", _mask({0, 1, 2}))],
        checkpoint_sha256="c" * 64, suite="lite",
    )  # fmt: skip
    return tmp_path


def _by_key(results: Path) -> dict[tuple[str, str], dict[str, Any]]:
    rows = [f.row() for f in findings(load_runs(results))]
    return {(r["key"], r["measured"].split(":")[0].split(" ")[0]): r for r in rows}


def test_each_claim_is_paired_on_the_same_examples_with_its_verdict(records: Path) -> None:
    rows = _by_key(records)
    over = rows["overestimate", "deq-tiny"]
    assert (over["a"], over["b"], over["n"]) == (pytest.approx(90.0), pytest.approx(56.6666667), N)
    assert (over["paired"]["only_a"], over["paired"]["only_b"]) == (10, 0)  # only white-box breaks 1..10
    assert over["paired"]["p_value"] == pytest.approx(2 / 2**10) and over["verdict"] == "reproduced"
    states = rows["states-differ", "deq-tiny"]
    assert states["a_label"] == "z[1] of 3" and states["paired"]["only_a"] == 11
    assert states["paired"]["p_value"] == pytest.approx(2 * 2 / 2**11)  # Bonferroni over 2 states
    assert rows["early-exit", "deq-tiny"]["verdict"] == "no run"
    assert rows["state-ensemble", "deq-tiny"]["verdict"] == "no run"
    ris = rows["ris-clean", "deq-tiny-ris"]  # 30 / 30 vs 28 / 30: two discordant examples, p = 0.5
    assert (ris["paired"]["only_a"], ris["paired"]["only_b"]) == (2, 0)
    assert ris["verdict"] == "inconclusive at this n"
    entropy = rows["entropy-reduction", "deq-tiny"]  # same checkpoint and examples: 26 vs 17 robust
    assert (entropy["a"], entropy["b"]) == (pytest.approx(86.6666667), pytest.approx(56.6666667))
    assert entropy["verdict"] == "reproduced"
    assert rows["entropy-reduction", "deq-tiny-ris"]["verdict"] == "no run"  # no defended RIS run
    competitive = rows["competitive", "deq-tiny"]  # 17 vs 27 robust: worse by far more than 5 points
    assert competitive["b_label"] == "resnet-tiny" and competitive["verdict"] == "not reproduced"


def test_runs_on_other_examples_are_not_paired(
    records: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = tmp_path_factory.mktemp("other")
    make_record(
        other,
        "deq",
        model="deq-tiny",
        dataset="fashion-mnist",
        eps=0.1,
        labels=LABELS,
        clean=LABELS,
        attacks=[],
    )
    make_record(
        other, "cnn", model="resnet-tiny", dataset="fashion-mnist", eps=0.1, labels=LABELS, clean=LABELS,
        index=list(range(100, 100 + N)), checkpoint_sha256="c" * 64, attacks=[],
    )  # fmt: skip
    assert _by_key(other)["competitive", "deq-tiny"]["verdict"] == "no run"


def test_verdict_rules() -> None:
    assert verdict("greater", {"diff": 3.0, "diff_ci": [0.5, 6.0], "p_value": 0.01}) == "reproduced"
    assert verdict("greater", {"diff": -3.0, "diff_ci": [-6.0, -0.5], "p_value": 0.01}) == "not reproduced"
    assert (
        verdict("greater", {"diff": 3.0, "diff_ci": [-1.0, 6.0], "p_value": 0.2}) == "inconclusive at this n"
    )
    assert verdict("not-worse", {"diff": -1.0, "diff_ci": [-4.0, 2.0], "p_value": 0.5}) == "reproduced"
    assert verdict("not-worse", {"diff": -9.0, "diff_ci": [-12.0, -6.0], "p_value": 0.01}) == "not reproduced"
    assert verdict("not-worse", {"diff": -3.0, "diff_ci": [-8.0, 2.0], "p_value": 0.3}) == (
        "inconclusive at this n"
    )


def test_page_and_figures_are_written_and_linked(records: Path) -> None:
    out = records / "site" / "findings.md"
    leaderboard_command(results_dir=str(records), fmt="md", view="findings", output=str(out))
    text = out.read_text()
    assert "**reproduced**" in text and "**no run**" in text and "DEQ-Large" in text  # reference rows
    assert "only the white-box attacks break 10 (test-set indices 1, 2, 3" in text
    for stem in ("findings-gap", "findings-dynamics-deq-tiny", "findings-dynamics-deq-tiny-ris"):
        for ext in ("png", "svg"):
            assert (out.parent / "plots" / f"{stem}.{ext}").stat().st_size > 0
            assert f"plots/{stem}.{ext}" in text


def test_json_and_unsupported_formats(records: Path) -> None:
    import json

    rows = json.loads(render_findings(load_runs(records), "json"))
    assert {r["verdict"] for r in rows} >= {"reproduced", "no run"}
    with pytest.raises(BenchError, match="--view findings renders"):
        render_findings(load_runs(records), "latex")


def test_random_states_pair_only_with_the_same_recipe(tmp_path: Path) -> None:
    common = {"dataset": "fashion-mnist", "eps": 0.1, "labels": LABELS, "clean": LABELS, "attacks": []}
    phantom = {"method": "fast-at", "grad": "unroll:2:0.5"}
    make_record(tmp_path, "base", model="deq-tiny", recipe={**phantom, "random_state": False}, **common)
    make_record(
        tmp_path, "exact", model="deq-tiny", recipe={**phantom, "grad": "exact", "random_state": False},
        checkpoint_sha256="e" * 64, finished=2e9, **common,
    )  # fmt: skip  # newer, same size: it would win a tie if recipes did not count
    make_record(
        tmp_path, "ris", model="deq-tiny-ris", recipe={**phantom, "random_state": True},
        checkpoint_sha256="b" * 64, **common,
    )  # fmt: skip
    (row,) = [f.row() for f in findings(load_runs(tmp_path)) if f.key == "ris-clean"]
    assert row["runs"] == ["ris.json", "base.json"]


def test_the_examples_only_white_box_breaks_are_drawn_when_the_images_are_at_hand(tmp_path: Path) -> None:
    from bench.data import load_dataset

    labels = [int(y) for y in load_dataset("fashion-mnist-builtin", "test", n_examples=N).y]
    attacks = [
        _col("ready-made", "pgd", "pgd", "unroll:2:0.5", _mask(set())),
        _col("white-box", "pgd", "pgd", "state:3:1:1", _mask({1, 2, 3})),
    ]
    make_record(
        tmp_path, "deq", model="deq-tiny", dataset="fashion-mnist", eps=0.1, labels=labels, clean=labels,
        attacks=attacks,
    )  # fmt: skip
    out = tmp_path / "findings.md"
    leaderboard_command(results_dir=str(tmp_path), fmt="md", view="findings", output=str(out))
    assert (tmp_path / "plots" / "findings-only-white-box-deq-tiny.png").stat().st_size > 0
    assert "plots/findings-only-white-box-deq-tiny.svg" in out.read_text()
    assert "only the white-box attacks break 3 (test-set indices 1, 2, 3)" in out.read_text()


def test_every_one_factor_pair_is_listed(records: Path) -> None:
    from bench.report.findings import all_pairs, build_pools

    pairs = all_pairs(build_pools(load_runs(records)))
    assert {(p["kind"], p["a"], p["b"]) for p in pairs} == {
        ("defense", "entropy-reduction", "none"),  # deq-defended vs deq: one checkpoint
        ("random states", "deq-tiny-ris", "deq-tiny"),  # the CNN differs in more than one factor
    }
    defense = next(p for p in pairs if p["kind"] == "defense")
    assert (defense["paired"]["only_a"], defense["paired"]["only_b"], defense["paired"]["n"]) == (9, 0, N)


@pytest.mark.parametrize("suite", ["lite", "quick"])
def test_a_smaller_run_pairs_on_the_examples_it_shares_only_under_the_same_suite(
    tmp_path: Path, suite: str
) -> None:
    """A defended run on the first 15 images beside an undefended one on all 30: compared on those 15 (the
    n = 200 defended runs beside the n = 1000 undefended ones), never across suites."""
    from bench.report.findings import all_pairs, build_pools

    half = N // 2
    common = {"model": "deq-tiny", "dataset": "fashion-mnist", "eps": 0.1, "recipe": {"method": "fast-at"}}
    make_record(
        tmp_path, "deq", **common, labels=LABELS, clean=LABELS, suite="lite",
        attacks=[_col("white-box", "pgd", "pgd", "state:3:1:1", _mask(set(range(0, N, 2))))],
    )  # fmt: skip  # breaks the even examples: 8 of the first 15
    make_record(
        tmp_path, "deq-defended", **common, labels=LABELS[:half], clean=LABELS[:half], suite=suite,
        defense="entropy-reduction:steps=5",
        attacks=[_col("white-box", "pgd", "pgd", "bpda@state:3:1:1", [i in {0, 2} for i in range(half)])],
    )  # fmt: skip
    (entropy,) = [f.row() for f in findings(load_runs(tmp_path)) if f.key == "entropy-reduction"]
    pairs = [p for p in all_pairs(build_pools(load_runs(tmp_path))) if p["kind"] == "defense"]
    if suite == "quick":  # another protocol on other examples: no pair, not a cut-down one
        assert entropy["verdict"] == "no run" and pairs == []
        return
    assert entropy["n"] == half and (entropy["a"], entropy["b"]) == (
        pytest.approx(1300 / 15),
        pytest.approx(700 / 15),
    )
    assert (entropy["paired"]["only_a"], entropy["paired"]["only_b"]) == (6, 0)
    assert entropy["runs"] == ["deq-defended.json", "deq.json"]
    assert entropy["note"].endswith("; on the 15 examples both runs hold")
    (pair,) = pairs
    assert (pair["paired"]["n"], pair["paired"]["only_a"], pair["suites"]) == (half, 6, "lite / lite")


def test_overestimate_is_tested_on_every_readout_with_bonferroni(tmp_path: Path) -> None:
    """A run with an early-exit readout adds a ready-made vs white-box row for it; the model's readouts
    form one family, so each p-value is multiplied by their number."""
    import json

    early_broken = {"ready-made": set(), "white-box": set(range(12))}  # only white-box breaks 0..11
    attacks = [
        _col("ready-made", "pgd", "pgd", "unroll:2:0.5", _mask({0})),
        _col("white-box", "pgd", "pgd", "state:3:1:1", _mask({0})),
        _col("ready-made", "pgd", "pgd", "unroll:2:0.5", _mask(early_broken["ready-made"]), readout="early"),
        _col("white-box", "pgd", "pgd", "state:1:1:1", _mask(early_broken["white-box"]), readout="early"),
    ]
    path = make_record(
        tmp_path, "deq", model="deq-tiny", dataset="fashion-mnist", eps=0.1, labels=LABELS, clean=LABELS,
        attacks=attacks, recipe={"method": "fast-at", "random_state": False}, suite="lite",
    )  # fmt: skip
    doc = json.loads(path.read_text())
    doc["spec"]["plan"]["readouts"] = ["final", "early"]
    doc["results"]["columns"]["clean"]["early"] = {"pred": LABELS}
    doc["results"]["selection"] = {
        "ready-made": {"final": ["unroll:2:0.5"], "early": ["unroll:2:0.5"]},
        "white-box": {"final": ["state:3:1:1"], "early": ["state:1:1:1"]},
    }
    path.write_text(json.dumps(doc))
    rows = [f.row() for f in findings(load_runs(tmp_path)) if f.key == "overestimate"]
    by_measured = {r["measured"].split(":")[0]: r for r in rows}
    assert set(by_measured) == {"deq-tiny", "deq-tiny (early readout)"}
    early = by_measured["deq-tiny (early readout)"]
    assert (early["paired"]["only_a"], early["paired"]["only_b"]) == (12, 0)
    assert early["tests"] == 2 and early["paired"]["p_value"] == pytest.approx(2 * 2 / 2**12)
    assert early["verdict"] == "reproduced" and "Bonferroni x2" in early["note"]
    final = by_measured["deq-tiny"]
    assert final["paired"]["p_value"] == 1.0 and final["verdict"] == "inconclusive at this n"
