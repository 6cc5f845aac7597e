from __future__ import annotations

import json

import pytest

from bench.errors import BenchError
from bench.records.assemble import concat_columns
from bench.records.read import read_record
from bench.records.store import RunStore, run_id_of
from bench.seeds import derive_seed


def test_run_id_is_stable_and_order_independent():
    a = run_id_of({"model": "m", "eps": 0.1, "attacks": ["pgd"]})
    b = run_id_of({"attacks": ["pgd"], "eps": 0.1, "model": "m"})
    assert a == b
    assert a != run_id_of({"model": "m", "eps": 0.2, "attacks": ["pgd"]})


def test_derive_seed_separates_streams():
    seeds = {derive_seed(0, "pgd", i) for i in range(100)}
    assert len(seeds) == 100
    assert derive_seed(0, "pgd", 3) == derive_seed(0, "pgd", 3)
    assert 0 <= derive_seed(1, "x") < 2**63


MINIMAL_SPEC = {"model": "m", "dataset": "fashion-mnist", "eps": 0.1, "plan": {"readouts": ["final"]}}
MINIMAL_RESULTS = {"columns": {"index": [0], "label": [1], "clean": {"final": {"pred": [1]}}}}


def test_store_stages_and_final(tmp_path):
    store = RunStore(tmp_path, "m", run_id_of({"model": "m"}))
    assert store.finished() is None and store.load_stage("batch-0") is None
    store.save_stage("batch-0", {"rows": [1, 2]})
    assert store.load_stage("batch-0") == {"rows": [1, 2]}
    store.write_final({"schema": 1, "spec": MINIMAL_SPEC, "results": MINIMAL_RESULTS, "provenance": {}})
    assert store.finished()["results"] == MINIMAL_RESULTS
    assert not store.partial_dir.exists()  # progress is dropped once the document is written
    assert not list(tmp_path.glob("**/*.tmp"))


def test_read_record_rejects_foreign_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(BenchError, match="not a deq-bench run record"):
        read_record(path)
    path.write_text("{broken")
    with pytest.raises(BenchError, match="cannot read"):
        read_record(path)


def test_concat_columns_merges_leaves_and_checks_constants():
    parts = [{"a": [1, 2], "b": {"c": [True]}, "k": "x"}, {"a": [3], "b": {"c": [False]}, "k": "x"}]
    assert concat_columns(parts) == {"a": [1, 2, 3], "b": {"c": [True, False]}, "k": "x"}
    with pytest.raises(BenchError):
        concat_columns([{"k": "x"}, {"k": "y"}])
