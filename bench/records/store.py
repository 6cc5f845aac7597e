"""Where a run's record and its progress live: identity, atomic storage, per-batch stages, sweep cache.

A run is identified by the hash of everything that determines its results (its spec). Its document holds
`results` (deterministic: per-example arrays and what was chosen) apart from `provenance` (versions, host,
wall times), so a resumed or re-run evaluation can be checked for equality on `results` alone.

Progress is one JSON file per finished batch in `<results>/.partial/<run_id>/`: a crash loses at most the
batch in flight, and a re-run with the same arguments skips the batches already there.

Concurrency: `RunStore.lock` takes `<results>/.partial/<run_id>.lock` with flock. A single-process run
holds it exclusively; the shards of a sharded run (--shard, SLURM arrays, torchrun) hold it shared, so they
work in parallel on one `.partial` folder while a second identical single-process run waits for them (and
they for it) and then reuses the record. The lock file is removed by its last holder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.io import atomic_write_json, os_error_message
from bench.records.validate import check_run_id, check_run_name, inside


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def run_id_of(spec: dict[str, Any]) -> str:
    """A short stable id of a run spec: same arguments and inputs -> same id -> resume or reuse."""
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:16]


def _load_or_none(path: Path) -> Any:
    """A stored stage or cached sweep; None when absent (or unreadable, which atomic writes rule out:
    recompute rather than trust it). The caller validates what it reads (bench.records.validate)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    except OSError as exc:
        raise BenchError(os_error_message(exc, path, "read")) from None


def set_aside(path: Path) -> Path:
    """Move a corrupt file out of the way (kept for inspection, never read again): `<name>.corrupt-<time>`."""
    target = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    try:
        os.replace(path, target)
    except FileNotFoundError:
        pass  # another process moved it first
    except OSError as exc:
        raise BenchError(os_error_message(exc, path, "move aside")) from None
    return target


class RunStore:
    """Where one run's document and its per-batch progress live."""

    def __init__(self, results_dir: str | Path, run_name: str, run_id: str) -> None:
        self.results_dir = Path(results_dir)
        self.run_id = check_run_id(run_id, "run id")
        self.run_name = check_run_name(run_name)
        self.final_path = self.results_dir / f"{run_name}-{run_id}.json"
        self.partial_dir = self.results_dir / ".partial" / run_id
        self.lock_path = self.results_dir / ".partial" / f"{run_id}.lock"
        for path in (self.final_path, self.partial_dir, self.lock_path):
            inside(path, self.results_dir, "run file")  # names are checked; this holds even for links

    @contextmanager
    def lock(self, *, shared: bool, on_wait: Callable[[str], None]) -> Iterator[None]:
        """Hold the run's lock: exclusive for a single-process run, shared for a shard (see the module)."""
        fd = _acquire(self.lock_path, shared, on_wait, self.run_id)
        try:
            yield
        finally:
            _release(self.lock_path, fd)

    def finished(self) -> dict[str, Any] | None:
        from bench.records.read import read_record

        if not self.final_path.is_file():
            return None
        return read_record(self.final_path)

    def stage_path(self, stage: str) -> Path:
        return self.partial_dir / f"{stage}.json"

    def load_stage(self, stage: str) -> Any:
        return _load_or_none(self.stage_path(stage))

    def save_stage(self, stage: str, payload: dict[str, Any]) -> None:
        atomic_write_json(self.stage_path(stage), payload)

    def write_final(self, document: dict[str, Any]) -> None:
        atomic_write_json(self.final_path, document)
        shutil.rmtree(self.partial_dir, ignore_errors=True)

    def clear(self) -> None:
        shutil.rmtree(self.partial_dir, ignore_errors=True)
        self.final_path.unlink(missing_ok=True)


class SweepCache:
    """White-box sweeps shared between runs, in `<results>/.sweeps/<key>.json`.

    A sweep's outcome depends on the model and its deployed solver, the development set, eps, seed, batch
    plan, device, code version and the sweep's own settings; not on the reported examples, their attacks or
    a defense. Runs that differ only in those reuse one sweep instead of repeating hours of PGD. The key
    hashes exactly the inputs the caller passes (see `evaluate`), so any change in them computes anew.
    """

    def __init__(self, results_dir: str | Path) -> None:
        self.dir = Path(results_dir) / ".sweeps"

    @staticmethod
    def key(inputs: dict[str, Any]) -> str:
        return run_id_of(inputs)

    def load(self, key: str) -> Any:
        return _load_or_none(self.dir / f"{key}.json")

    def save(self, key: str, payload: dict[str, Any]) -> None:
        atomic_write_json(self.dir / f"{key}.json", payload)


try:
    import fcntl
except ImportError:  # pragma: no cover - no flock (Windows): runs are not locked
    fcntl = None  # type: ignore[assignment]


def _acquire(path: Path, shared: bool, on_wait: Callable[[str], None], run_id: str) -> int | None:
    """flock `path` (shared or exclusive), waiting with one message; retried when the holder removed it."""
    if fcntl is None:
        return None
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    told = False
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise BenchError(os_error_message(exc, path, "create the lock file")) from None
        try:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if not told:
                    on_wait(
                        f"another process is evaluating run {run_id} ({path} is locked): waiting for it to "
                        "finish, then its record is reused (Ctrl-C to stop)"
                    )
                    told = True
                fcntl.flock(fd, mode)
            try:  # the previous holder may have removed the file: only the file that is there counts
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            return fd
        os.close(fd)


def _release(path: Path, fd: int | None) -> None:
    """Remove the lock file if no one else holds it, then let go (waiters retry on a fresh file)."""
    if fd is None or fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the last holder: no other shard holds it
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                path.unlink()
        except OSError:
            pass
    except OSError:
        pass  # other shards still hold it; the last of them removes it
    finally:
        os.close(fd)
