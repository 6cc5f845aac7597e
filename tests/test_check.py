"""`bench check`: baselines from finished runs pass, weakened or gradient-masked models fail with exit 1."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from bench.check import (
    compare,
    default_tolerance,
    evaluation_of,
    load_baseline,
    write_baseline,
)
from bench.checkpoints import save_safetensors
from bench.cli.report import check_command
from bench.errors import BenchError
from bench.evaluate import evaluate as run_spec
from bench.evaluate.plan import build_plan, plan_to_dict
from bench.spec import EvalConfig, parse_eps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from micro_models import FIXTURES, write_micro_registry


def evaluate(cfg: EvalConfig):
    """Tests build runs from raw inputs, as the CLI does: parse, then evaluate the typed spec."""
    return run_spec(*cfg.parse())


N = 64  # enough examples that the default tolerance (2 standard errors) is tighter than the damage done


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A finished micro-CNN run, its baseline, and two weakened checkpoints of the same network."""
    root = tmp_path_factory.mktemp("check")
    old = os.environ.get("DEQ_BENCH_EXTRA_REGISTRY")
    os.environ["DEQ_BENCH_EXTRA_REGISTRY"] = str(write_micro_registry(root))
    from bench.registry import registry as cached

    cached.cache_clear()
    results = root / "results"
    _, record, _ = evaluate(
        EvalConfig(
            model="cnn-micro", n_examples=N, batch_size=16, results_dir=str(results), device="cpu", quiet=True
        )
    )
    baseline = root / "expected" / "cnn-micro.json"
    write_baseline(record, baseline)
    from safetensors.torch import load_file

    weights = load_file(str(FIXTURES / "cnn-micro.safetensors"))
    gen = torch.Generator().manual_seed(0)
    noisy = {k: v + 0.5 * v.std() * torch.randn(v.shape, generator=gen) for k, v in weights.items()}
    # logits x1000: softmax saturates, cross-entropy gradients vanish, PGD stops finding adversarial examples
    masked = {k: v * 1000 if k.startswith("linear") else v for k, v in weights.items()}
    save_safetensors(root / "noisy.safetensors", noisy, {})
    save_safetensors(root / "masked.safetensors", masked, {})
    yield {"root": root, "results": results, "record": record, "baseline": baseline}
    if old is None:
        os.environ.pop("DEQ_BENCH_EXTRA_REGISTRY", None)
    else:
        os.environ["DEQ_BENCH_EXTRA_REGISTRY"] = old
    cached.cache_clear()


def _check(setup, **kw) -> None:
    args = dict(
        baseline=setup["baseline"],
        read=None,
        tolerance=None,
        write_baseline_to=None,
        checkpoint=None,
        results_dir=str(setup["results"]),
        data_dir=None,
        device="cpu",
    )
    args.update(kw)
    check_command(**args)


def test_default_tolerance_is_two_standard_errors_and_at_least_one_example():
    assert default_tolerance(50.0, 100) == pytest.approx(10.0)  # 2 * sqrt(.25 / 100) * 100
    assert default_tolerance(90.0, 400) == pytest.approx(3.0)
    assert default_tolerance(0.0, 64) == pytest.approx(100 / 64)  # no variance: one example
    assert default_tolerance(100.0, 10) == pytest.approx(10.0)


def test_baseline_names_the_evaluation_and_its_numbers(setup):
    baseline = load_baseline(setup["baseline"])
    assert baseline["evaluation"] == {
        "model": "cnn-micro",
        "checkpoint": None,  # the registered weights
        "dataset": "fashion-mnist",
        "n_examples": N,
        "eps": "0.1",
        "suite": "quick",
        "attacks": None,
        "grads": None,
        "readouts": None,
        "n_dev": None,
        "sweep": "full",
        "defense": "none",
        "deploy": None,
        "batching": "per-example",
        "batch_size": 16,
        "seed": 0,
    }
    assert baseline["n"] == N
    assert set(baseline["metrics"]) == {
        "final/clean",
        "final/white-box/pgd",
        "final/white-box/aa",
        "final/white-box/All",
        "final/All",
    }
    assert 0 < baseline["metrics"]["final/clean"] < 100


def test_baseline_passes_when_read_and_when_rerun(setup, capsys):
    _check(setup, read=setup["record"])
    assert "bench check passed: 5 metrics" in capsys.readouterr().out
    mtime = setup["record"].stat().st_mtime_ns
    _check(setup)  # re-run: the identical finished run is reused, not recomputed
    assert "bench check passed" in capsys.readouterr().out
    assert setup["record"].stat().st_mtime_ns == mtime


@pytest.mark.parametrize(
    ("weights", "moved"),
    [
        ("masked", {"final/white-box/pgd": "above: broken attack or gradient masking?"}),
        ("noisy", {"final/clean": "below", "final/white-box/pgd": "above", "final/All": "above"}),
    ],
)
def test_weakened_model_fails_with_exit_1_and_names_what_moved(setup, capsys, weights, moved):
    with pytest.raises(SystemExit) as exit_info:
        _check(setup, checkpoint=str(setup["root"] / f"{weights}.safetensors"))
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "bench check FAILED" in out and "note: checkpoint differs" in out
    rows = {line.split("\t")[0]: line.split("\t") for line in out.splitlines() if line.startswith("final/")}
    for metric, verdict in moved.items():
        assert rows[metric][5].startswith(verdict), out
    assert "final/white-box/aa" not in rows or weights == "noisy"  # Square still breaks the masked model


def test_tolerance_override_widens_or_tightens_the_gate(setup):
    masked = str(setup["root"] / "masked.safetensors")
    _check(setup, checkpoint=masked, tolerance=40.0)  # the +37.5 jump is inside 40 points
    with pytest.raises(SystemExit):
        _check(setup, checkpoint=masked, tolerance=30.0)
    with pytest.raises(BenchError, match="at least 0"):
        _check(setup, read=setup["record"], tolerance=-1.0)


def test_rows_report_expected_measured_delta_allowed(setup):
    baseline = load_baseline(setup["baseline"])
    doc = json.loads(setup["record"].read_text())
    doc["results"]["summary"]["readouts"]["final"]["clean_acc"] -= 20.0  # the stored summary is not trusted
    assert all(r.verdict == "ok" and r.delta == 0 for r in compare(baseline, doc))
    # misclassify every example that every group breaks: clean accuracy drops, robust accuracy cannot move
    cols = doc["results"]["columns"]
    pred, labels = cols["clean"]["final"]["pred"], cols["label"]
    groups = {c["group"] for c in cols["attacks"]}
    flipped = [
        i
        for i in range(N)
        if pred[i] == labels[i]
        and all(any(c["broken"][i] for c in cols["attacks"] if c["group"] == g) for g in groups)
    ]
    for i in flipped:
        pred[i] = (labels[i] + 1) % 10
    rows = {r.metric: r for r in compare(baseline, doc)}
    clean = rows["final/clean"]
    assert len(flipped) >= 10  # a drop beyond the default tolerance
    assert clean.delta == pytest.approx(-100.0 * len(flipped) / N) and clean.verdict == "below"
    assert clean.allowed == pytest.approx(default_tolerance(baseline["metrics"]["final/clean"], N))
    assert all(r.verdict == "ok" for name, r in rows.items() if name != "final/clean")


def test_a_record_of_another_evaluation_is_bad_input(setup, tmp_path):
    _, other, _ = evaluate(
        EvalConfig(
            model="cnn-micro",
            n_examples=8,
            batch_size=16,
            results_dir=str(tmp_path),
            device="cpu",
            quiet=True,
        )
    )
    with pytest.raises(BenchError, match="not the baseline's evaluation: its n_examples is 8, expected 64"):
        _check(setup, read=other)


@pytest.mark.parametrize(
    "kw",
    [
        dict(write_baseline_to=Path("x.json")),  # writing needs --read RECORD
        dict(baseline=None),
        dict(checkpoint="w.safetensors", read=Path("r.json")),
    ],
)
def test_contradictory_options_are_bad_input(setup, kw):
    with pytest.raises(BenchError):
        _check(setup, **kw)


def test_a_file_that_is_no_baseline_is_bad_input(setup, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(BenchError, match="not a deq-bench expected-results file"):
        _check(setup, baseline=bad)


@pytest.mark.parametrize(
    ("is_deq", "suite", "options"),
    [
        (True, "quick", dict(n_dev=4)),
        (True, "white-box", dict(attacks=["pgd:2", "square:8"], grads=["exact", "state:2:1:1"])),
        (True, "full", dict(readouts=["final", "state:2"], n_dev=8)),
        (True, "ready-made", {}),
        (False, "quick", dict(attacks=["apgd-ce:3"])),
        (False, "full", {}),
    ],
)
def test_the_recorded_request_rebuilds_the_record_plan(is_deq, suite, options):
    spec, _ = EvalConfig(
        model="m",
        dataset="fashion-mnist",
        n_examples=10,
        eps="8/255",
        suite=suite,
        batch_size=5,
        seed=3,
        **options,
    ).parse()
    plan = build_plan(spec, is_deq=is_deq, max_iter=4, ready_made_estimator="unroll:1:0.5")
    record = {
        "spec": {"plan": plan_to_dict(plan), "dataset": "fashion-mnist", "eps": 8 / 255},
        "request": json.loads(json.dumps(spec.to_dict())),
    }
    rebuilt_spec = evaluation_of(record)
    assert rebuilt_spec == spec
    assert rebuilt_spec.to_dict()["eps"] == "8/255" and parse_eps("8/255") == 8 / 255
    assert rebuilt_spec.attacks == (tuple(options["attacks"]) if "attacks" in options else None)
    rebuilt = build_plan(rebuilt_spec, is_deq=is_deq, max_iter=4, ready_made_estimator="unroll:1:0.5")
    assert plan_to_dict(rebuilt) == record["spec"]["plan"]
