"""The registry as data: every entry builds, its parameter count is true, shipped checkpoints verify."""

from __future__ import annotations

import pytest

from bench.errors import BenchError
from bench.registry import checkpoint_status, get_entry, load_model, registry
from bench.spec import parse_eps


@pytest.mark.parametrize("name", sorted(registry()))
def test_entry_builds_with_the_registered_parameter_count(name):
    from bench.registry import build_architecture

    entry = registry()[name]
    model = build_architecture(entry)
    assert sum(p.numel() for p in model.parameters()) == entry.parameters
    assert entry.eps_value == parse_eps(entry.eps)


@pytest.mark.parametrize("name", [n for n, e in sorted(registry().items()) if e.checkpoint.registered])
def test_shipped_checkpoints_are_present_verified_and_load(name):
    entry = registry()[name]
    assert entry.checkpoint.sha256, "a registered file needs its sha256"
    assert checkpoint_status(entry) == "present"
    loaded = load_model(name)
    assert loaded.checkpoint_sha256 == entry.checkpoint.sha256
    assert not loaded.model.training


def test_unknown_names_and_bad_eps():
    with pytest.raises(BenchError, match="did you mean 'deq-large'"):
        get_entry("deq-larg")
    for bad in ("8/0", "eight", "2"):
        with pytest.raises(BenchError, match="invalid eps"):
            parse_eps(bad)
    assert parse_eps("8/255") == pytest.approx(8 / 255)


def test_missing_registered_checkpoint_says_where(tmp_path, monkeypatch):
    monkeypatch.setenv("DEQ_BENCH_CHECKPOINTS", str(tmp_path))
    shipped = [n for n, e in registry().items() if e.checkpoint.registered]
    assert shipped, "the registry ships checkpoints"
    with pytest.raises(BenchError, match=f"place it at {tmp_path}"):
        load_model(shipped[0])
