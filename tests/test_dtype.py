"""Every tensor the tool creates follows the model's dtype and device: a DEQ evaluation run end to end in
float64 (the micro MDEQ converted with .double()) fails on any hard-coded float32 (issue #16.6)."""

from __future__ import annotations

import pytest
import torch

from bench.evaluate import evaluate
from bench.spec import EvalConfig

ATTACKS = ["pgd:2", "apgd-ce:2", "apgd-t:2:2", "fab-t:2:2", "square:8"]
GRADS = ["exact", "unroll:1:0.5", "state:2:1:1", "neumann:2", "adjoint:2"]


@pytest.fixture
def float64_models(micro, monkeypatch):
    """The registry's models loaded in float64 (parameters and buffers), as a float64 user model would be."""
    import bench.evaluate.setup as setup

    original = setup.load_model

    def load_double(*args, **kwargs):
        loaded = original(*args, **kwargs)
        loaded.model.double()
        return loaded

    monkeypatch.setattr(setup, "load_model", load_double)


@pytest.mark.parametrize("defense", [None, "entropy-reduction:steps=1"])
def test_deq_evaluation_runs_end_to_end_in_float64(float64_models, tmp_path, defense):
    cfg = EvalConfig(
        model="deq-micro",
        n_examples=3,
        batch_size=3,
        results_dir=str(tmp_path),
        quiet=True,
        device="cpu",
        suite="white-box",
        attacks=ATTACKS if defense is None else ["pgd:2", "square:8"],
        grads=GRADS if defense is None else ["state:2:1:1"],
        readouts=["final", "state:2", "ensemble-state"],
        defense=defense or "none",
    )
    doc, _, _ = evaluate(*cfg.parse())
    summary = doc["results"]["summary"]["readouts"]["final"]
    assert 0.0 <= summary["all_acc"] <= summary["clean_acc"] <= 100.0
    assert doc["results"]["columns"]["attacks"]


def test_float64_sweep_and_early_state(float64_models, tmp_path):
    cfg = EvalConfig(
        model="deq-micro",
        n_examples=2,
        batch_size=2,
        n_dev=2,
        results_dir=str(tmp_path),
        quiet=True,
        device="cpu",
        suite="quick",
        readouts=["final", "early"],
    )
    doc, _, _ = evaluate(*cfg.parse())
    assert doc["results"]["columns"]["attacks"]
    assert torch.get_default_dtype() == torch.float32
