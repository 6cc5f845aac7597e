"""`--deploy`: the DEQ's deployed prediction is the user's choice, and the record, run id and leaderboard say
which one was evaluated."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from bench.errors import BenchError
from bench.evaluate import evaluate
from bench.spec import EvalConfig


def _run(tmp_path, **kw):
    base = dict(
        model="deq-micro",
        n_examples=4,
        batch_size=4,
        suite="quick",
        n_dev=3,
        attacks=["pgd:2"],
        results_dir=str(tmp_path),
        quiet=True,
        device="cpu",
    )
    return evaluate(*EvalConfig(**{**base, **kw}).parse())


def test_deploy_changes_the_prediction_the_record_and_the_run_id(micro, tmp_path):
    from bench.deq.readouts import deployed_logits
    from bench.registry import load_model

    registered, path_registered, _ = _run(tmp_path)
    fz, path_fz, _ = _run(tmp_path, deploy="fz")
    assert path_fz != path_registered and fz["run_id"] != registered["run_id"]
    assert registered["spec"]["deploy"]["refine_steps"] == 1 and fz["spec"]["deploy"]["refine_steps"] == 0
    assert fz["request"]["deploy"] == "fz" and registered["request"]["deploy"] is None
    # the clean predictions are those of f(z*) alone
    loaded = load_model("deq-micro")
    model = loaded.model
    model.deploy = dataclasses.replace(model.deploy, refine_steps=0)
    from bench.data import load_dataset

    x = load_dataset("fashion-mnist", "test", None, False, 4).x
    with torch.no_grad():
        expected = deployed_logits(model, x).argmax(1).tolist()
    assert fz["results"]["columns"]["clean"]["final"]["pred"] == expected


def test_leaderboard_rows_show_the_deploy(micro, tmp_path):
    _run(tmp_path)
    _run(tmp_path, deploy="fz")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "leaderboard", "--results-dir", str(tmp_path), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [r for r in json.loads(proc.stdout) if r["source"] == "measured"]
    assert sorted(r["deploy"] for r in rows) == ["fz", "unroll:1:0.5"]  # two functions: two rows


def test_deploy_needs_a_deq(micro, tmp_path):
    with pytest.raises(BenchError, match="--deploy needs a DEQ model"):
        _run(tmp_path, model="cnn-micro", deploy="fz")


def test_papers_batching_reaches_the_model_and_the_run_id(micro, tmp_path):
    from bench.deq.protocol import BATCHING_MODES
    from bench.spec import Batching

    assert tuple(b.value for b in Batching) == BATCHING_MODES  # one grammar for the flag and the model
    default, _, _ = _run(tmp_path)
    papers, _, _ = _run(tmp_path, batching="papers")
    assert papers["run_id"] != default["run_id"]
    assert papers["spec"]["batching"] == "papers" and papers["spec"]["deploy"]["batching"] == "papers"
    assert default["spec"]["batching"] == "per-example" and "batching" not in default["spec"]["deploy"]
    assert papers["request"]["batching"] == "papers"
