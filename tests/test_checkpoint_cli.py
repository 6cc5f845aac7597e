"""Every documented checkpoint layout, end to end through `bench evaluate --checkpoint` in a subprocess.

The layouts are written here as their producers write them: safetensors (ours), a plain `.pt`/`.pth`
state dict, RobustBench's zoo files (`{'state_dict': {'module.' + key: ...}}`) and the papers' training
script (`torch.save({'epoch', 'state_dict' of a DataParallel model with weight-norm `_g`/`_v` names,
'optimizer'}, 'checkpoint.pth.tar')`). Each must reach a finished record whose predictions equal the
registered weights' own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from micro_models import FIXTURES

from bench.checkpoints import load_state_dict, save_safetensors, sha256_file

_ORIGINALS = {"original0": "_g", "original1": "_v"}


def to_papers_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MDEQ keys -> the papers' keys: a DataParallel `module.` prefix, their WeightNorm `<name>_g/_v`."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) >= 3 and parts[-3] == "parametrizations" and parts[-1] in _ORIGINALS:
            key = ".".join([*parts[:-3], parts[-2] + _ORIGINALS[parts[-1]]])
        out["module." + key] = value.clone()
    return out


def papers_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, object]:
    """What the papers' training script saves: epoch, the wrapped state dict, the optimizer, the best acc."""
    weights = to_papers_layout(state)
    params = [torch.nn.Parameter(v.float()) for v in weights.values()]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()  # a real optimizer state: step counts and moment buffers
    return {"epoch": 12, "state_dict": weights, "perf": 0.5, "optimizer": optimizer.state_dict()}


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args], capture_output=True, text=True, env=env, timeout=600
    )


def _write(kind: str, model: str, path: Path) -> Path:
    state, _ = load_state_dict(FIXTURES / f"{model}.safetensors", None)
    if kind == "safetensors":
        save_safetensors(path, state, {"source": "test"})
    elif kind == "plain":
        torch.save(state, path)
    elif kind == "robustbench":
        torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    elif kind == "papers":
        torch.save(papers_checkpoint(state), path)
    else:
        raise AssertionError(kind)
    return path


LAYOUTS = [
    ("deq-micro", "safetensors", "w.safetensors"),
    ("deq-micro", "plain", "w.pt"),
    ("deq-micro", "papers", "checkpoint.pth.tar"),
    ("cnn-micro", "plain", "w.pth"),
    ("cnn-micro", "robustbench", "model.pt"),
]


@pytest.fixture(scope="module")
def registered_predictions(micro, tmp_path_factory):
    """The quick record of each micro model with its registered checkpoint: what every layout must match."""
    out = {}
    for model in ("deq-micro", "cnn-micro"):
        results = tmp_path_factory.mktemp(f"registered-{model}")
        proc = _run(*_evaluate_args(model, results), env=_env())
        assert proc.returncode == 0, proc.stderr
        out[model] = _record(results)
    return out


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _evaluate_args(model: str, results: Path, *extra: str) -> list[str]:
    return [
        "evaluate", "--model", model, "--suite", "quick", "--n-examples", "3", "--batch-size", "3",
        "--n-dev", "3", "--attacks", "pgd:2", "--results-dir", str(results), "--quiet", *extra,
    ]  # fmt: skip


def _record(results: Path) -> dict:
    records = [p for p in results.glob("*.json") if p.is_file()]
    assert len(records) == 1, records
    return json.loads(records[0].read_text())


@pytest.mark.parametrize(("model", "kind", "name"), LAYOUTS, ids=[f"{m}-{k}" for m, k, _ in LAYOUTS])
def test_checkpoint_layout_runs_through_evaluate(micro, registered_predictions, tmp_path, model, kind, name):
    ckpt = _write(kind, model, tmp_path / name)
    results = tmp_path / "results"
    proc = _run(*_evaluate_args(model, results, "--checkpoint", str(ckpt)), env=_env())
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    doc = _record(results)
    assert doc["spec"]["checkpoint_sha256"] == sha256_file(ckpt)
    assert doc["provenance"]["checkpoint_path"] == str(ckpt)
    reference = registered_predictions[model]["results"]["columns"]
    assert doc["results"]["columns"]["clean"] == reference["clean"]  # the same weights, the same predictions
    assert doc["results"]["summary"] == registered_predictions[model]["results"]["summary"]


def test_papers_layout_without_its_weight_norm_keys_is_one_error_line(micro, tmp_path):
    state, _ = load_state_dict(FIXTURES / "deq-micro.safetensors", None)
    broken = papers_checkpoint(state)
    weights = broken["state_dict"]
    assert isinstance(weights, dict)
    dropped = next(k for k in weights if k.endswith("_v"))
    del weights[dropped]
    torch.save(broken, tmp_path / "checkpoint.pth.tar")
    proc = _run(
        *_evaluate_args("deq-micro", tmp_path / "r", "--checkpoint", str(tmp_path / "checkpoint.pth.tar")),
        env=_env(),
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing" in lines[0], proc.stderr
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").glob("*.json"))


def test_deq_large_papers_layout_loads_strictly_and_predicts(tmp_path):
    """deq-large's full-size MDEQ, saved as the papers' code saves it, loads strictly and runs a forward."""
    from bench.registry import build_architecture, get_entry, load_model

    torch.manual_seed(0)
    reference = build_architecture(get_entry("deq-large")).eval()
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(papers_checkpoint(reference.state_dict()), path)
    loaded = load_model("deq-large", path)
    assert loaded.checkpoint_sha256 == sha256_file(path)
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        logits = loaded.model(x)
        expected = reference(x)
    assert logits.shape == (1, 10) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_deq_large_without_a_checkpoint_says_how_to_get_one(tmp_path):
    proc = _run("evaluate", "--model", "deq-large", "--results-dir", str(tmp_path), env=_env())
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in ("--checkpoint FILE", "bench train --preset paper-deq-large", "GPU-hours"):
        assert fragment in lines[0]
    assert not list(tmp_path.glob("*"))
