"""Submitting a run as a SLURM job array through submitit: one `--shard i/N` evaluation per task."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.evaluate.job import evaluate
from bench.spec import RunOptions, RunSpec


def _run_shard(spec: RunSpec, options: RunOptions, rank: int, world: int) -> str | None:
    """What one array task runs: its shard of the run; the path of the record if this task wrote it."""
    document, path, _ = evaluate(spec, replace(options, shard=f"{rank}/{world}", quiet=True))
    return None if document is None else str(path)


def submit_array(
    spec: RunSpec, options: RunOptions, n_tasks: int, folder: str | Path, **slurm_params: Any
) -> list[Any]:
    """Submit the run as one SLURM job array of `n_tasks` shards through submitit; returns the jobs.

    `slurm_params` go to `AutoExecutor.update_parameters` (e.g. slurm_partition='gpu', gpus_per_node=1,
    timeout_min=240). Without SLURM, submitit runs the tasks locally. The shard that finishes last writes
    the record; `bench merge` does it if that shard died.
    """
    if n_tasks < 1:
        raise BenchError("submit_array needs at least one task")
    try:
        import submitit
    except ImportError:
        raise BenchError(
            "submit_array needs submitit: pip install 'deq-bench[slurm]' (or pip install submitit)"
        ) from None
    executor = submitit.AutoExecutor(folder=str(folder))
    executor.update_parameters(**slurm_params)
    ranks = list(range(n_tasks))
    return executor.map_array(_run_shard, [spec] * n_tasks, [options] * n_tasks, ranks, [n_tasks] * n_tasks)
