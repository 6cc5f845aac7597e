"""Sharded evaluation: which batches a process runs, where its rank comes from, and waiting for the others.

The batch plan (batch size over the reported examples, in order) is part of the run spec and independent of
the number of processes. Process `rank` of `world` runs the batches b with b % world == rank: exact index
sets (no padding, no duplicates, as DistributedSampler would add), and strided so that the expensive robust
examples, which cluster nowhere in particular, spread over the processes. Every process writes the same
per-batch stage files a single process writes, so the merged record is the single-process record.

Rank and world come from, in this order: an explicit `--shard RANK/WORLD`; `--shard slurm` (a SLURM job
array, or the tasks of one `srun`); torchrun's RANK / WORLD_SIZE / LOCAL_RANK. SLURM is opt-in because an
array over *different* models or seeds is the common use of arrays, and silently evaluating 1/N of each
would be wrong.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

from bench.errors import BenchError

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """This process's part of a run: rank of world, how that was learnt, and its local GPU index."""

    rank: int
    world: int
    source: str  # single | explicit | torchrun | slurm-array | slurm-tasks
    local_rank: int | None = None

    @property
    def sharded(self) -> bool:
        return self.world > 1

    def label(self) -> str:
        return f"rank {self.rank}/{self.world} ({self.source})"


SINGLE = Shard(0, 1, "single")


def batch_plan(n_examples: int, batch_size: int) -> list[range]:
    """The example index ranges of the batches, in order; the last one may be short (never padded)."""
    if n_examples < 1 or batch_size < 1:
        raise BenchError("a batch plan needs at least one example and a batch size of at least 1")
    return [range(s, min(s + batch_size, n_examples)) for s in range(0, n_examples, batch_size)]


def shard_batches(n_batches: int, rank: int, world: int) -> list[int]:
    """Batches of `rank`: b % world == rank. Ranks beyond the last batch get none (world > n_batches)."""
    if world < 1 or not 0 <= rank < world:
        raise BenchError(f"invalid shard {rank}/{world}: need 0 <= rank < world")
    return list(range(rank, n_batches, world))


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise BenchError(f"environment variable {name}={value!r} is not an integer") from None


def parse_shard(text: str) -> Shard:
    """'RANK/WORLD' -> Shard, e.g. '0/4'."""
    rank_s, sep, world_s = text.strip().partition("/")
    try:
        rank, world = int(rank_s), int(world_s)
    except ValueError:
        rank = world = -1
    if not sep or world < 1 or not 0 <= rank < world:
        raise BenchError(f"invalid --shard {text!r}: write RANK/WORLD with 0 <= RANK < WORLD, e.g. 0/4")
    return Shard(rank, world, "explicit" if world > 1 else "single")


def slurm_shard(env: Mapping[str, str]) -> Shard:
    """A SLURM job array (task id relative to the array's first, with its step), else the tasks of srun."""
    task = _int(env, "SLURM_ARRAY_TASK_ID")
    if task is not None:
        count = _int(env, "SLURM_ARRAY_TASK_COUNT")
        first = _int(env, "SLURM_ARRAY_TASK_MIN")
        if count is None or first is None:
            raise BenchError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT/MIN are not")
        step = _int(env, "SLURM_ARRAY_TASK_STEP") or 1
        last = _int(env, "SLURM_ARRAY_TASK_MAX")
        offset = task - first
        if (
            offset % step
            or offset // step >= count
            or (last is not None and (last - first) // step + 1 != count)
        ):
            raise BenchError(
                "--shard slurm needs a plain array range such as --array=0-7 (or 0-14:2); "
                f"got task {task} of min {first}, max {last}, step {step}, count {count}; "
                "for other layouts pass --shard RANK/WORLD"
            )
        return Shard(offset // step, count, "slurm-array" if count > 1 else "single")
    rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
    if rank is None or world is None:
        raise BenchError("--shard slurm: neither SLURM_ARRAY_TASK_ID nor SLURM_PROCID/SLURM_NTASKS is set")
    return Shard(rank, world, "slurm-tasks" if world > 1 else "single", _int(env, "SLURM_LOCALID"))


def torchrun_shard(env: Mapping[str, str]) -> Shard | None:
    """torchrun's (and torch.distributed.launch's) RANK / WORLD_SIZE / LOCAL_RANK, if present."""
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    if rank is None or world is None:
        return None
    if world < 1 or not 0 <= rank < world:
        raise BenchError(f"RANK={rank} and WORLD_SIZE={world} from the launcher are inconsistent")
    return Shard(rank, world, "torchrun" if world > 1 else "single", _int(env, "LOCAL_RANK"))


def resolve_shard(option: str | None, env: Mapping[str, str] | None = None) -> Shard:
    """The shard of this process: `option` ('R/W' or 'slurm'), else torchrun's variables, else single."""
    env = os.environ if env is None else env
    if option is not None and option.strip().lower() == "slurm":
        return slurm_shard(env)
    if option is not None:
        return parse_shard(option)
    return torchrun_shard(env) or SINGLE


def shard_device(requested: str, shard: Shard) -> str:
    """One GPU per local process: 'auto'/'cuda' become cuda:LOCAL_RANK when several processes share a node."""
    if shard.local_rank is None or not shard.sharded or requested not in ("auto", "cuda"):
        return requested
    import torch

    if not torch.cuda.is_available():
        return requested
    count = torch.cuda.device_count()
    if shard.local_rank >= count:
        raise BenchError(
            f"local rank {shard.local_rank} but only {count} CUDA device(s) are visible: "
            f"start at most {count} processes per node"
        )
    torch.cuda.set_device(shard.local_rank)
    return f"cuda:{shard.local_rank}"


@contextmanager
def process_group(shard: Shard, timeout_s: float) -> Iterator[bool]:
    """Under torchrun, a gloo group for the final barrier; yields whether collectives are available.

    Nothing but a barrier goes through it (every result travels as a file), so gloo serves CPU and GPU
    runs alike. A group someone else initialised is used and left alone.
    """
    if shard.source != "torchrun":
        yield False
        return
    import torch.distributed as dist

    if not dist.is_available():
        yield False
        return
    if dist.is_initialized():
        yield True
        return
    if not dist.is_gloo_available() or "MASTER_ADDR" not in os.environ:
        yield False
        return
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    try:
        yield True
    finally:
        dist.destroy_process_group()


def barrier(timeout_s: float) -> None:
    """Wait until every rank has finished its batches; a rank that never arrives is named in the error."""
    import torch.distributed as dist

    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
        else:
            dist.barrier()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BenchError(f"waiting {timeout_s:.0f} s for the other ranks failed: {first}") from None


def wait_for(poll: Callable[[], T | None], what: str, timeout_s: float, interval_s: float = 0.5) -> T:
    """Poll until `poll()` returns something; a BenchError saying what was awaited after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = poll()
        if value is not None:
            return value
        if time.monotonic() >= deadline:
            raise BenchError(f"gave up after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def describe_batches(batches: list[int], limit: int = 12) -> str:
    """'1, 3, 5' or '1, 3, ... (40 batches)' for messages."""
    if not batches:
        return "none"
    if len(batches) <= limit:
        return ", ".join(str(b) for b in batches)
    return f"{', '.join(str(b) for b in batches[:limit])}, ... ({len(batches)} batches)"


def announce(message: str) -> None:
    """One line on stderr from a shard (stdout stays for the record path of --quiet)."""
    print(message, file=sys.stderr, flush=True)
