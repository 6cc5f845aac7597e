"""Sharded evaluation: the batch plan's index sets, where ranks come from, and sharded records equal to
single-process records (torchrun with gloo, SLURM-like independent shards with `bench merge`)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from bench.distributed import (
    SINGLE,
    Shard,
    batch_plan,
    resolve_shard,
    shard_batches,
    wait_for,
)
from bench.errors import BenchError
from bench.evaluate import evaluate as run_spec
from bench.evaluate.slurm import submit_array
from bench.records.assemble import merge_run
from bench.spec import EvalConfig


def evaluate(cfg: EvalConfig):
    """Tests build runs from raw inputs, as the CLI does: parse, then evaluate the typed spec."""
    return run_spec(*cfg.parse())


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _env(micro) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE"))}
    env["DEQ_BENCH_EXTRA_REGISTRY"] = str(micro)
    env["PYTHONPATH"] = str(ROOT)
    return env


# --- the plan ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "batch"), [(1, 1), (8, 2), (9, 2), (10, 3), (5, 50)])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_shards_partition_the_examples_exactly(n, batch, world):
    plan = batch_plan(n, batch)
    assert [i for r in plan for i in r] == list(range(n))  # in order, last batch short, never padded
    owned = [shard_batches(len(plan), rank, world) for rank in range(world)]
    flat = sorted(b for bs in owned for b in bs)
    assert flat == list(range(len(plan)))  # every batch exactly once: no duplicates, none left out
    for rank, bs in enumerate(owned):
        assert bs == list(range(rank, len(plan), world))  # strided: rank, rank + world, ...
        if rank >= len(plan):
            assert bs == []  # world > n_batches: the extra ranks get nothing (and nothing is padded)
    examples = sorted(i for bs in owned for b in bs for i in plan[b])
    assert examples == list(range(n))


@pytest.mark.parametrize("bad", [(2, 2), (-1, 2), (0, 0)])
def test_invalid_shard_is_bad_input(bad):
    with pytest.raises(BenchError, match="invalid shard"):
        shard_batches(4, *bad)


@pytest.mark.parametrize(
    ("option", "env", "expected"),
    [
        (None, {}, SINGLE),
        (None, {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, Shard(1, 4, "torchrun", 1)),
        (
            None,
            {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0"},
            SINGLE,
        ),
        ("2/3", {"RANK": "1", "WORLD_SIZE": "4"}, Shard(2, 3, "explicit")),
        ("0/1", {}, SINGLE),
        (
            "slurm",
            {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"},
            Shard(3, 4, "slurm-array"),
        ),
        (
            "slurm",
            {
                "SLURM_ARRAY_TASK_ID": "14",
                "SLURM_ARRAY_TASK_COUNT": "4",
                "SLURM_ARRAY_TASK_MIN": "10",
                "SLURM_ARRAY_TASK_MAX": "16",
                "SLURM_ARRAY_TASK_STEP": "2",
            },
            Shard(2, 4, "slurm-array"),
        ),
        (
            "slurm",
            {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"},
            Shard(3, 8, "slurm-tasks", 1),
        ),
    ],
)
def test_rank_and_world_come_from_option_or_launcher(option, env, expected):
    # a SLURM array alone does not shard: arrays over different models are the common case
    assert resolve_shard(option, env) == expected


@pytest.mark.parametrize(
    ("option", "env", "fragment"),
    [
        ("1/1", {}, "invalid --shard"),
        ("a/b", {}, "invalid --shard"),
        ("slurm", {}, "neither SLURM_ARRAY_TASK_ID"),
        (
            "slurm",  # --array=0,3,7: not a plain range, task ids are not ranks
            {
                "SLURM_ARRAY_TASK_ID": "3",
                "SLURM_ARRAY_TASK_COUNT": "3",
                "SLURM_ARRAY_TASK_MIN": "0",
                "SLURM_ARRAY_TASK_MAX": "7",
            },
            "plain array range",
        ),
        (None, {"RANK": "4", "WORLD_SIZE": "2"}, "inconsistent"),
    ],
)
def test_bad_shard_settings_are_one_line_errors(option, env, fragment):
    with pytest.raises(BenchError, match=fragment):
        resolve_shard(option, env)


# --- sharded runs equal the single-process run -------------------------------------------------------


def _cfg(results_dir: Path, **kw) -> EvalConfig:
    base = dict(
        model="cnn-micro",
        suite="quick",
        n_examples=8,
        batch_size=2,
        results_dir=str(results_dir),
        quiet=True,
        device="cpu",
    )
    base.update(kw)
    return EvalConfig(**base)


def test_last_array_shard_writes_the_record(micro, tmp_path, capsys):
    kw = dict(eps="0.03", save_adversarial=True)
    single, single_path, _ = evaluate(_cfg(tmp_path / "single", **kw))
    doc, path, _ = evaluate(_cfg(tmp_path / "sharded", shard="0/2", **kw))
    assert doc is None and not path.exists()
    err = capsys.readouterr().err
    assert "rank 0/2 (explicit): ran batches 0, 2; 2 of 4 batches are still to come (1, 3)" in err
    assert "bench merge" in err
    doc, path, reused = evaluate(_cfg(tmp_path / "sharded", shard="1/2", **kw))
    assert doc is not None and path.is_file() and not reused
    assert doc["run_id"] == single["run_id"]  # the shard is not part of the run's identity
    assert doc["results"] == single["results"]
    adv = torch.load(path.with_suffix(".adv.pt"), weights_only=True)
    assert torch.equal(adv, torch.load(single_path.with_suffix(".adv.pt"), weights_only=True))
    assert adv.shape[0] == 8
    sessions = doc["provenance"]["shard_plan"]["sessions"]
    assert [(s["rank"], s["world"], s["batches_run"]) for s in sessions] == [(0, 2, [0, 2]), (1, 2, [1, 3])]
    assert not (tmp_path / "sharded" / ".partial" / doc["run_id"]).exists()


def test_force_with_shards_is_refused(micro, tmp_path):
    with pytest.raises(BenchError, match="--force cannot be used with shards"):
        evaluate(_cfg(tmp_path, shard="0/2", force=True))


SHARD_SCRIPT = """
import sys
from bench.evaluate import evaluate
from bench.spec import EvalConfig
cfg = EvalConfig(model="cnn-micro", suite="quick", eps="0.03", n_examples=8, batch_size=2,
                 results_dir=sys.argv[1], quiet=True, device="cpu", shard=sys.argv[2])
doc, path, _ = evaluate(*cfg.parse())
print("record" if doc is not None else "shard-only", path)
"""


def test_independent_shards_then_merge_equal_single_process(micro, tmp_path, capsys):
    # SLURM-array-like: rank 1 in its own process, rank 0 in this one, each with a node-local results
    # directory; the batch files are gathered afterwards and `bench merge` assembles them
    other = subprocess.Popen(
        [sys.executable, "-c", SHARD_SCRIPT, str(tmp_path / "node1"), "1/2"],
        env=_env(micro),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    doc, _, _ = evaluate(_cfg(tmp_path / "node0", eps="0.03", shard="0/2"))
    single, _, _ = evaluate(_cfg(tmp_path / "single", eps="0.03"))
    out, err = other.communicate(timeout=300)
    assert other.returncode == 0, err
    assert doc is None and out.startswith("shard-only"), out  # neither saw all batches in its directory
    assert "rank 1/2 (explicit): ran batches 1, 3; 2 of 4 batches are still to come (0, 2)" in err
    run_id = single["run_id"]
    gathered = tmp_path / "node0"
    # (c) merging before every batch is there names what is missing and who owns it
    with pytest.raises(
        BenchError, match=r"missing 2 of 4 batches: 1, 3 \(with 2 shards rank\(s\) 1 own them\)"
    ):
        merge_run(gathered)
    for f in (tmp_path / "node1" / ".partial" / run_id).glob("*.json"):
        if f.name.startswith(("batch-", "shard-")):
            shutil.copy(f, gathered / ".partial" / run_id / f.name)
    merged, path, reused = merge_run(gathered, run_id)
    assert not reused and path.is_file()
    assert merged["results"] == single["results"]
    assert json.loads(path.read_text())["results"] == single["results"]
    assert merge_run(gathered, run_id)[2]  # merging again: the finished record, untouched


def test_wait_for_returns_once_the_file_appears(tmp_path):
    target = tmp_path / "sweep-white-box.json"
    timer = threading.Timer(0.3, lambda: target.write_text("{}"))
    timer.start()
    try:
        assert wait_for(lambda: target.read_text() if target.exists() else None, "it", 30, 0.05) == "{}"
    finally:
        timer.cancel()


def test_shard_waits_for_rank_0_sweep_with_a_clear_timeout(micro, tmp_path):
    cfg = _cfg(tmp_path, model="deq-micro", attacks=["pgd:1"], n_dev=2, shard="1/2", shard_timeout=0.3)
    with pytest.raises(BenchError, match=r"gave up after 0 s waiting for rank 0's white-box sweep .*sweep-"):
        evaluate(cfg)
    assert not list(tmp_path.glob(".partial/*/batch-*.json"))


@pytest.mark.skipif(importlib.util.find_spec("submitit") is not None, reason="submitit is installed")
def test_submit_array_without_submitit_says_how_to_install(tmp_path):
    with pytest.raises(BenchError, match=r"pip install 'deq-bench\[slurm\]'"):
        submit_array(*_cfg(tmp_path).parse(), 2, tmp_path / "logs")


def test_merge_without_any_run_is_bad_input(tmp_path):
    with pytest.raises(BenchError, match="nothing to merge"):
        merge_run(tmp_path)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def test_torchrun_two_processes_equal_single_process(micro, tmp_path):
    args = ["--model", "cnn-micro", "--suite", "quick", "--eps", "0.03", "--n-examples", "8"]
    args += ["--batch-size", "2", "--device", "cpu", "--quiet", "--results-dir", str(tmp_path / "torchrun")]
    proc = subprocess.run(
        [*TORCHRUN, "-m", "bench", "evaluate", *args],
        env=_env(micro),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1/2 (torchrun): ran batches 1, 3; rank 0 writes the record" in proc.stderr
    assert "rank 0/2 (torchrun): ran batches 0, 2; writing the record from all 4 batches" in proc.stderr
    records = list((tmp_path / "torchrun").glob("*.json"))
    assert len(records) == 1
    sharded = json.loads(records[0].read_text())
    single, _, _ = evaluate(_cfg(tmp_path / "single", eps="0.03"))
    assert sharded["run_id"] == single["run_id"]
    assert sharded["results"] == single["results"]
    summary = single["results"]["summary"]["readouts"]["final"]
    assert 0 < summary["all_acc"] < summary["clean_acc"], "attacks should break some examples, not all"
    plan = sharded["provenance"]["shard_plan"]
    assert plan["worlds"] == [2] and plan["n_batches"] == 4
    assert sorted((s["rank"], s["batches_run"]) for s in plan["sessions"]) == [(0, [0, 2]), (1, [1, 3])]
