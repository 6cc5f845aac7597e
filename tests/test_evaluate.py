"""bench evaluate end to end on micro models: attack x estimator x readout, resume, worst case, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.errors import BenchError
from bench.evaluate import evaluate as run_spec
from bench.records.assemble import summarize
from bench.records.schema import adversarial_entries
from bench.spec import EvalConfig


def evaluate(cfg: EvalConfig):
    """Tests build runs from raw inputs, as the CLI does: parse, then evaluate the typed spec."""
    return run_spec(*cfg.parse())


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _cfg(tmp_path: Path, **kw) -> EvalConfig:
    base = dict(
        model="deq-micro", n_examples=6, batch_size=3, results_dir=str(tmp_path), quiet=True, device="cpu"
    )
    base.update(kw)
    return EvalConfig(**base)


def _robust_per_column(doc):
    cols = doc["results"]["columns"]
    labels = torch.tensor(cols["label"])
    out = {}
    for c in cols["attacks"]:
        clean_ok = torch.tensor(cols["clean"][c["readout"]]["pred"]) == labels
        out[(c["protocol"], c["group"], c["attack"], c["estimator"], c["readout"])] = (
            clean_ok & ~torch.tensor(c["broken"])
        )
    return out


ATTACKS = ["pgd:2", "apgd-ce:2", "apgd-t:2:2", "fab-t:2:2", "square:8"]
GRADS = ["exact", "unroll:1:0.5", "state:2:1:1", "neumann:2", "adjoint:2"]
READOUTS = ["final", "state:2", "ensemble-state", "ensemble-logit"]


def test_every_attack_estimator_readout_runs(micro, tmp_path):
    doc, path, reused = evaluate(
        _cfg(
            tmp_path,
            suite="white-box",
            attacks=ATTACKS,
            grads=GRADS,
            readouts=READOUTS,
            n_examples=4,
            batch_size=4,
        )
    )
    assert not reused and path.is_file()
    cols = doc["results"]["columns"]
    seen = {(c["attack"], c["estimator"], c["readout"]) for c in cols["attacks"]}
    gradient_attacks = [a for a in ATTACKS if not a.startswith("square")]
    assert len(seen) == len(cols["attacks"]) == (len(gradient_attacks) * len(GRADS) + 1) * len(READOUTS)
    # Square sees forward values only: it runs once per readout, labelled with the first estimator
    assert {(e, r) for a, e, r in seen if a == "square:8"} == {(GRADS[0], r) for r in READOUTS}
    n = len(cols["index"])
    for c in cols["attacks"]:
        assert len(c["broken"]) == len(c["attacked"]) == len(c["linf"]) == n
        # an example is attacked only while it is still robust in its group, and never beyond eps
        assert all(lin <= 0.1 + 1e-6 for lin, att in zip(c["linf"], c["attacked"], strict=True) if att)
        assert not any(b and not a for b, a in zip(c["broken"], c["attacked"], strict=True))
    assert "adjoint:2" in doc["provenance"]["reimplementations"]
    assert doc["results"]["columns"]["clean_solver"]["nsteps"]  # solver stats on clean inputs
    entries = list(adversarial_entries(doc["results"]["columns"]))
    assert entries and all("solver" in entry for *_, entry in entries)


def test_all_never_above_any_single_attack(micro, tmp_path):
    # eps 0.03: the micro model keeps some examples against some attacks, so the AND is not trivial
    doc, _, _ = evaluate(
        _cfg(
            tmp_path,
            suite="full",
            eps="0.03",
            attacks=["pgd:3", "apgd-ce:3", "square:20"],
            grads=["state:2:1:1", "exact"],
            n_examples=8,
            batch_size=4,
        )
    )
    summary = doc["results"]["summary"]["readouts"]["final"]
    per_column = _robust_per_column(doc)
    assert per_column, "no attack ran"
    all_acc = summary["all_acc"]
    for robust in per_column.values():
        # a column's own robust set is a superset of the All set (All = AND over every column)
        assert all_acc <= 100.0 * robust.float().mean().item() + 1e-9
    for protocol in summary["protocols"].values():
        for group in protocol["groups"].values():
            assert all_acc <= group["robust_acc"] + 1e-9
            assert protocol["all_acc"] <= group["robust_acc"] + 1e-9
    assert set(summary["protocols"]) == {"ready-made", "white-box"}
    assert summary["clean_acc"] > 0 and any(r.any() for r in per_column.values()), (
        "test needs robust examples"
    )


def test_white_box_sweep_picks_estimators_on_a_disjoint_dev_set(micro, tmp_path):
    doc, _, _ = evaluate(_cfg(tmp_path, suite="quick", n_examples=4, batch_size=4, n_dev=4))
    sweep = doc["results"]["sweep"]["white-box"]["final"]
    chosen = doc["results"]["selection"]["white-box"]["final"]
    assert len(chosen) == 1 and chosen[0] in {row["estimator"] for row in sweep}
    best = min(row["robust_acc"] for row in sweep)
    assert next(r for r in sweep if r["estimator"] == chosen[0])["robust_acc"] == best
    assert doc["spec"]["dev"]["indices"][0] >= 4  # the dev set is disjoint from the reported examples


def test_runs_that_differ_only_in_reported_attacks_share_one_sweep(micro, tmp_path, monkeypatch):
    import bench.evaluate.stages as evaluate_module

    first, _, _ = evaluate(_cfg(tmp_path, suite="quick", n_examples=4, batch_size=4, n_dev=4))
    assert len(list((tmp_path / ".sweeps").glob("*.json"))) == 1

    def no_sweep(*args, **kwargs):
        raise AssertionError("the cached sweep should have been reused")

    monkeypatch.setattr(evaluate_module, "select_estimators", no_sweep)
    other, _, _ = evaluate(
        _cfg(tmp_path, suite="quick", n_examples=4, batch_size=4, n_dev=4, attacks=["pgd:3"])
    )
    for key in ("sweep", "selection"):
        assert other["results"][key] == first["results"][key]
    with pytest.raises(AssertionError, match="cached sweep"):  # a changed sweep input computes anew
        evaluate(_cfg(tmp_path, suite="quick", n_examples=4, batch_size=4, n_dev=4, seed=1))
    with pytest.raises(AssertionError, match="cached sweep"):  # and so does --force
        evaluate(
            _cfg(tmp_path, suite="quick", n_examples=4, batch_size=4, n_dev=4, attacks=["pgd:3"], force=True)
        )


def test_summarize_is_the_per_example_and():
    cols = {
        "label": [0, 0, 0, 0],
        "clean": {"final": {"pred": [0, 0, 0, 1]}},
        "attacks": [
            {
                "protocol": "p",
                "group": "a",
                "attack": "x",
                "estimator": "e",
                "readout": "final",
                "broken": [True, False, False, False],
            },
            {
                "protocol": "p",
                "group": "b",
                "attack": "y",
                "estimator": "e",
                "readout": "final",
                "broken": [False, True, False, False],
            },
        ],
    }
    s = summarize(cols, {"readouts": ["final"]})["readouts"]["final"]
    assert s["clean_acc"] == 75.0
    assert s["protocols"]["p"]["groups"]["a"]["robust_acc"] == 50.0
    assert s["protocols"]["p"]["groups"]["b"]["robust_acc"] == 50.0
    assert s["all_acc"] == 25.0  # below both groups: different examples broke


def test_cnn_runs_and_finished_run_is_reused(micro, tmp_path):
    cfg = _cfg(tmp_path, model="cnn-micro", suite="quick", n_examples=8, batch_size=4)
    doc, path, reused = evaluate(cfg)
    assert not reused
    doc2, path2, reused2 = evaluate(cfg)
    assert reused2 and path2 == path and doc2 == doc
    mtime = path.stat().st_mtime_ns
    doc3, _, reused3 = evaluate(
        _cfg(tmp_path, model="cnn-micro", suite="quick", n_examples=8, batch_size=4, force=True)
    )
    assert not reused3 and doc3["results"] == doc["results"] and path.stat().st_mtime_ns != mtime


def test_interrupted_run_resumes_to_the_identical_record(micro, tmp_path):
    kw = dict(suite="quick", n_examples=6, batch_size=2, n_dev=4)
    whole, _, _ = evaluate(_cfg(tmp_path / "whole", **kw))
    with pytest.raises(BenchError, match="stopped after 1"):
        evaluate(_cfg(tmp_path / "cut", stop_after_batches=1, **kw))
    partial = list((tmp_path / "cut" / ".partial").glob("*/batch-*.json"))
    assert len(partial) == 1
    resumed, _, reused = evaluate(_cfg(tmp_path / "cut", **kw))
    assert not reused
    assert resumed["results"] == whole["results"]
    assert resumed["run_id"] == whole["run_id"]


def _bench_env(micro) -> dict[str, str]:
    env = dict(os.environ)
    env["DEQ_BENCH_EXTRA_REGISTRY"] = str(micro)
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_killed_process_resumes_to_the_identical_record(micro, tmp_path):
    args = [
        sys.executable,
        "-m",
        "bench",
        "evaluate",
        "--model",
        "cnn-micro",
        "--suite",
        "quick",
        "--n-examples",
        "40",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--quiet",
    ]
    env = _bench_env(micro)
    whole = subprocess.run(
        [*args, "--results-dir", str(tmp_path / "whole")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert whole.returncode == 0, whole.stderr
    cut_dir = tmp_path / "cut"
    proc = subprocess.Popen(
        [*args, "--results-dir", str(cut_dir)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(list(cut_dir.glob(".partial/*/batch-*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(cut_dir.glob(".partial/*/batch-*.json")))
    assert 2 <= done_before < 10, "the kill should land mid-run"
    assert not list(cut_dir.glob("*.json")), "a killed run must not leave a finished record"
    again = subprocess.run(
        [*args, "--results-dir", str(cut_dir)], env=env, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr
    a = json.loads(Path(whole.stdout.strip()).read_text())
    b = json.loads(Path(again.stdout.strip()).read_text())
    assert a["results"] == b["results"]


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--eps", "eight"], "invalid eps"),
        (["--suite", "whitebox"], "did you mean"),
        (["--attacks", "pgdd"], "unknown attack"),
        (["--grads", "state:9:1:1"], "needs state 9"),
        (["--readouts", "state:0"], "unknown readout"),
        (["--dataset", "cifar10"], "is for fashion-mnist"),
        (["--n-examples", "0"], "at least 1"),
        (["--checkpoint", "/nonexistent.safetensors"], "does not exist"),
        (["--defense", "magic"], "unknown defense"),
        (["--device", "tpu"], "unknown device"),
    ],
)
def test_bad_arguments_one_line_exit_2_no_result(micro, tmp_path, extra, fragment, monkeypatch, capsys):
    # in-process through the console script's entry point (test_unknown_model_suggests covers a real process)
    from bench.cli import main

    argv = ["bench", "evaluate", "--model", "deq-micro", "--n-examples", "2", "--results-dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", [*argv, *extra])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert not list(tmp_path.rglob("*.json")), "a failed run must not write a result"


def test_unknown_model_suggests(micro, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "evaluate", "--model", "deq-mikro", "--results-dir", str(tmp_path)],
        env=_bench_env(micro),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "did you mean 'deq-micro'" in proc.stderr


def test_defended_model_is_attacked_in_all_three_modes(micro, tmp_path):
    doc, _, _ = evaluate(
        _cfg(
            tmp_path,
            suite="white-box",
            defense="entropy-reduction:stages=2,steps=2",
            attacks=["pgd:2"],
            grads=["state:2:1:1"],
            n_examples=4,
            batch_size=4,
        )
    )
    modes = {c["estimator"] for c in doc["results"]["columns"]["attacks"]}
    assert modes == {"transfer@state:2:1:1", "bpda@state:2:1:1", "adaptive@bptt"}
    assert doc["spec"]["defense"].startswith("entropy-reduction:stages=2,steps=2")
    cost = doc["provenance"]["defense_cost_per_example"]
    assert cost["f_forward"] > 0 if "f_forward" in cost else any(v > 0 for v in cost.values())
    summary = doc["results"]["summary"]["readouts"]["final"]
    assert summary["all_acc"] <= min(
        g["robust_acc"] for p in summary["protocols"].values() for g in p["groups"].values()
    )


def test_score_based_attacks_run_once_per_distinct_forward(micro, tmp_path):
    """Square through bpda@e1, bpda@e2 and adaptive@bptt would attack one function (the defended
    prediction) three times; it runs once on it and once in transfer mode (the undefended prediction)."""
    grads = ["state:2:1:1", "exact"]
    doc, _, _ = evaluate(
        _cfg(
            tmp_path,
            suite="white-box",
            defense="entropy-reduction:stages=2,steps=2",
            attacks=["pgd:2", "square:6"],
            grads=grads,
            n_examples=4,
            batch_size=4,
        )
    )
    runs: dict[str, list[str]] = {}
    for c in doc["results"]["columns"]["attacks"]:
        runs.setdefault(c["attack"], []).append(c["estimator"])
    modes = [f"{m}@{e}" for m in ("transfer", "bpda") for e in grads] + ["adaptive@bptt"]
    assert runs == {"pgd:2": modes, "square:6": ["transfer@state:2:1:1", "bpda@state:2:1:1"]}


def test_record_carries_sanity_and_dynamics(micro, tmp_path):
    doc, _, _ = evaluate(_cfg(tmp_path, suite="white-box", attacks=["pgd:2", "square:10"], grads=["exact"]))
    sanity = doc["results"]["sanity"]
    assert sanity["eps_zero_breaks"] == 0
    grad = sanity["gradients"]["exact | final"]
    assert grad["nonfinite"] == 0 and grad["zero"] < grad["n"]
    assert isinstance(sanity["flags"], list)
    cols = doc["results"]["columns"]
    t = len(cols["clean_states"]["pred"][0])
    assert t == 4 and all(len(row) == t for row in cols["clean_states"]["entropy"])
    assert all(len(row) == t for row in cols["clean_solver"]["rel_trace"])


def test_early_state_is_chosen_on_the_dev_set(micro, tmp_path):
    doc, _, _ = evaluate(
        _cfg(
            tmp_path,
            suite="white-box",
            readouts=["early", "final"],
            attacks=["pgd:2"],
            grads=["state:2:1:1"],
            n_examples=4,
            batch_size=4,
            n_dev=8,
        )
    )
    early = doc["results"]["early_state"]
    curve = early["pgd10_acc_per_state"]
    assert len(curve) == 4 and early["n_dev"] == 8
    assert curve[early["t"] - 1] == max(curve) and early["readout"] == f"state:{early['t']}"
    cols = doc["results"]["columns"]
    # the early readout's clean prediction is the chosen state's prediction
    states = cols["clean_states"]["pred"]
    assert cols["clean"]["early"]["pred"] == [row[early["t"] - 1] for row in states]


def test_sweep_includes_the_ready_made_estimator_and_breaks_ties_by_margin(micro, tmp_path):
    from bench.evaluate.stages import rank_candidates

    doc, _, _ = evaluate(_cfg(tmp_path, suite="lite", n_examples=2, batch_size=2, n_dev=4, attacks=["pgd:2"]))
    plan = {p["name"]: p for p in doc["spec"]["plan"]["protocols"]}
    ready_made = plan["ready-made"]["estimators"][0]
    assert ready_made in plan["white-box"]["sweep"]["candidates"]
    rows = doc["results"]["sweep"]["white-box"]["final"]
    assert {r["estimator"] for r in rows} == set(plan["white-box"]["sweep"]["candidates"])
    assert all(isinstance(r["mean_margin"], float) for r in rows)
    assert doc["results"]["sweep_decided_by"]["white-box"]["final"] in ("accuracy", "margin", "order")
    # the rule itself: accuracy first, then the lower mean margin, then the candidate order
    table = [
        {"estimator": "a", "robust_acc": 50.0, "mean_margin": 1.0},
        {"estimator": "b", "robust_acc": 50.0, "mean_margin": 0.5},
        {"estimator": "c", "robust_acc": 75.0, "mean_margin": -3.0},
    ]
    assert rank_candidates(table, 1) == ([1], "margin")
    assert rank_candidates(table, 2) == ([1, 0], "accuracy")
    table[1]["mean_margin"] = 1.0
    assert rank_candidates(table, 1) == ([0], "order")


def test_dropped_nonfinite_gradients_are_counted_per_attack_and_flagged(micro, tmp_path, monkeypatch):
    from bench.deq.estimators import Unroll
    from bench.report.leaderboard import load_run

    original = Unroll.surrogate

    def nan_first_row(self, model, u, traj):
        out = original(self, model, u, traj)
        return torch.cat([torch.full_like(out[:1], float("nan")), out[1:]])

    monkeypatch.setattr(Unroll, "surrogate", nan_first_row)
    cfg = _cfg(tmp_path, suite="white-box", attacks=["pgd:2"], grads=["state:2:1:1"], n_examples=3)
    doc, path, _ = evaluate(cfg)
    (col,) = doc["results"]["columns"]["attacks"]
    assert col["nonfinite_grad_rows"] >= 1  # row 0 of every attacked forward lost its gradient
    assert "nonfinite-grad" in load_run(path).flags("final")


def test_successive_halving_sweep_is_recorded_and_chooses_among_the_survivors(micro, tmp_path):
    full, _, _ = evaluate(
        _cfg(tmp_path / "full", suite="lite", n_examples=2, batch_size=2, n_dev=4, attacks=["pgd:2"])
    )
    doc, _, _ = evaluate(
        _cfg(
            tmp_path / "halving",
            suite="lite",
            n_examples=2,
            batch_size=2,
            n_dev=4,
            attacks=["pgd:2"],
            sweep="halving",
        )
    )
    assert doc["request"]["sweep"] == "halving" and full["request"]["sweep"] == "full"
    plans = [p for p in doc["spec"]["plan"]["protocols"] if p["sweep"]]
    assert plans[0]["sweep"]["schedule"]["first_round"] == "pgd:2"
    assert all("schedule" not in (p["sweep"] or {}) for p in full["spec"]["plan"]["protocols"])
    table = doc["results"]["sweep"]["white-box"]["final"]
    first = [r for r in table if r["round"] == 1]
    second = [r for r in table if r["round"] == 2]
    assert (
        len(first) == len(plans[0]["sweep"]["candidates"])
        and len(second) == plans[0]["sweep"]["schedule"]["keep"]
    )
    chosen = doc["results"]["selection"]["white-box"]["final"]
    assert set(chosen) <= {r["estimator"] for r in second}
