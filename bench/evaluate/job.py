"""`evaluate(spec)`: one run, top down. Read this first; each step is one call into this package.

Flow: set up (model as deployed, data, plan, identity) -> reuse a finished identical run -> stages (the
dev set's early state, the white-box sweep) -> this process's batches, each saved when done (a killed run
resumes) -> the record, always assembled from the batch files (bench/records/assemble.py), so a sharded
record's results equal a single-process one's (torchrun, SLURM arrays, --shard; docs/distributed.md).
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

from bench.distributed import (
    Shard,
    announce,
    barrier,
    batch_plan,
    describe_batches,
    process_group,
    resolve_shard,
    shard_batches,
    shard_device,
    wait_for,
)
from bench.errors import BenchError
from bench.evaluate.execute import Batch, Selection, run_batch
from bench.evaluate.setup import Setup, prepare, resolve_device
from bench.evaluate.stages import run_stages
from bench.evaluate.views import Views
from bench.io import atomic_write_tensor
from bench.progress import Reporter
from bench.records.assemble import (
    assemble,
    batch_stage,
    manifest_of,
    missing_batches,
    record_session,
    save_manifest,
    sort_out_batches,
)
from bench.records.store import RunStore, run_id_of
from bench.spec import RunOptions, RunSpec

Outcome = tuple[dict[str, Any] | None, Path, bool]  # (record or None for a finished shard, path, reused)


def evaluate(spec: RunSpec, options: RunOptions | None = None) -> Outcome:
    """Run (or resume, or reuse) one evaluation, or this process's shard of it.

    Returns (document, path, reused); document is None for a shard that did its batches while another
    process (rank 0, the last shard to finish, or `bench merge`) writes the record at `path`.
    """
    options = options or RunOptions()
    shard = resolve_shard(options.shard)
    if options.force and shard.sharded:  # one shard's --force would delete the other shards' batches
        raise BenchError("--force cannot be used with shards: delete the run's record and .partial first")
    device = resolve_device(shard_device(spec.device, shard))
    setup = prepare(spec, options, device)
    run_id = run_id_of(setup.identity)
    store = RunStore(options.results_dir, setup.run_name, run_id)
    # one single-process run at a time (a second identical one waits, then reuses the record); the shards
    # of a sharded run share the lock and work on the run's .partial folder together
    with store.lock(shared=shard.sharded, on_wait=announce):
        return _run(spec, options, shard, device, setup, store)


def _run(
    spec: RunSpec, options: RunOptions, shard: Shard, device: Any, setup: Setup, store: RunStore
) -> Outcome:
    """The run under its lock: reuse, or stages, batches and the record."""
    run_id = store.run_id
    if options.force:
        store.clear()
    else:
        try:
            done = store.finished()
        except BenchError as exc:  # a damaged finished record is never reused silently
            raise BenchError(f"{exc}; --force recomputes the run") from None
        if done is not None:
            return done, store.final_path, True

    t_start = time.time()
    batches = batch_plan(len(setup.data), spec.batch_size)  # fixed by the spec, whatever the processes
    manifest = manifest_of(setup.run_name, setup.identity, spec.to_dict(), len(batches), setup.provenance)
    save_manifest(store, manifest)  # what `bench merge` reads
    with process_group(shard, options.shard_timeout) as collective, Reporter(quiet=options.quiet) as reporter:
        views, selection = run_stages(
            setup.views,
            setup.plan,
            spec,
            options,
            setup.dev,
            setup.ready_made,
            setup.identity,
            store,
            shard,
            reporter,
        )
        ran, reused = _run_batches(setup, views, selection, spec, options, store, shard, reporter)
        record_session(store, shard, _session(shard, device, ran, reused, t_start))
        if shard.sharded and not _last_to_finish(
            store, shard, collective, ran, reused, len(batches), options
        ):
            return None, store.final_path, False

    document = assemble(store, manifest, device=str(device), started=t_start)
    if document is None:  # another shard assembled at the same moment and removed the stage files
        if (done := store.finished()) is not None:
            return done, store.final_path, True
        raise BenchError(f"run {run_id}: stage files vanished while assembling the record")
    return document, store.final_path, False


def _run_batches(
    setup: Setup,
    views: Views,
    selection: Selection,
    spec: RunSpec,
    options: RunOptions,
    store: RunStore,
    shard: Shard,
    reporter: Reporter,
) -> tuple[list[int], list[int]]:
    """This process's share of the batch plan; a batch already on disk is skipped (resume)."""
    from bench.attacks.specs import parse_attack

    data, plan = setup.data, setup.plan
    batches = batch_plan(len(data), spec.batch_size)
    mine = shard_batches(len(batches), shard.rank, shard.world)  # every batch when not sharded
    units = sum(
        len(views.runs_of(parse_attack(a, views.eps), selection[p.name][r]))
        for p in plan.protocols
        for r in plan.readouts
        for g in p.groups.values()
        for a in g
    )
    reporter.start("attacks", len(mine) * units)
    ran: list[int] = []
    reused: list[int] = []
    for line in sort_out_batches(store, setup.identity, mine):  # a corrupt batch file is recomputed
        announce(f"warning: {line}; recomputing it")
    for b in mine:
        if store.stage_path(batch_stage(b)).is_file():
            reporter.skip(units)
            reused.append(b)
            continue
        if options.stop_after_batches is not None and len(ran) >= options.stop_after_batches:
            raise BenchError(f"stopped after {len(ran)} batches (as asked)")
        sl = slice(batches[b].start, batches[b].stop)
        batch = Batch(views.inputs(data.x[sl]), data.y[sl].to(views.device), data.indices[sl], b == 0)
        result = run_batch(views, plan, selection, batch, spec.seed, reporter)
        if spec.save_adversarial:
            worst = {r: t.cpu() for r, t in result["worst"].items()}
            atomic_write_tensor(store.partial_dir / f"adv-{b:05d}.pt", worst)
        stage = {k: result.get(k) for k in ("columns", "timings", "warnings", "sanity")}
        store.save_stage(batch_stage(b), stage)
        ran.append(b)
    return ran, reused


def _session(shard: Shard, device: Any, ran: list[int], reused: list[int], t_start: float) -> dict[str, Any]:
    return {
        "rank": shard.rank,
        "world": shard.world,
        "source": shard.source,
        "host": platform.node(),
        "device": str(device),
        "batches_run": ran,
        "batches_reused": reused,
        "started": round(t_start, 3),
        "wall_seconds": round(time.time() - t_start, 3),
    }


def _last_to_finish(
    store: RunStore,
    shard: Shard,
    collective: bool,
    ran: list[int],
    reused: list[int],
    n_batches: int,
    options: RunOptions,
) -> bool:
    """True when this shard writes the record: torchrun's rank 0 after the barrier, or the array task
    that finds every batch on disk."""
    did = f"{shard.label()}: ran batches {describe_batches(ran)}" + (
        f", reused {describe_batches(reused)}" if reused else ""
    )
    if collective:  # torchrun: rank 0 assembles once every rank is through the barrier
        barrier(options.shard_timeout)
        if shard.rank != 0:
            announce(f"{did}; rank 0 writes the record")
            return False
        wait_for(  # the barrier says the others are done; a shared file system may lag behind
            lambda: not missing_batches(store, n_batches) or None,
            f"the other ranks' batch files in {store.partial_dir}",
            min(options.shard_timeout, 300.0),
        )
    elif missing := missing_batches(store, n_batches):  # array tasks: the last one assembles
        announce(
            f"{did}; {len(missing)} of {n_batches} batches are still to come "
            f"({describe_batches(missing)}): the shard that finishes last writes the record, "
            f"or run `bench merge --results-dir {options.results_dir} --run-id {store.run_id}`"
        )
        return False
    announce(f"{did}; writing the record from all {n_batches} batches")
    return True
