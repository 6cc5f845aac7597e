"""Atomic file writes: a reader or a crash never sees a half-written file, and a failed write (no permission,
not a directory, no space, file too large) is one BenchError naming the path, with no partial file left."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from bench.errors import BenchError


class WriteFailed(BenchError, OSError):
    """A write that failed on the user's path: a BenchError for the CLI (one line, exit 2) and still an
    OSError for callers that handle those."""


def os_error_message(exc: OSError, path: str | os.PathLike[str] | None = None, action: str = "write") -> str:
    """One line for a failed file operation: what, where, and the system's reason (naming the file it
    concerns when that is another one, e.g. a parent that is not a directory)."""
    where = path if path is not None else exc.filename
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in (errno.EEXIST, errno.ENOTDIR) and exc.filename is not None:
        reason = "a parent is not a directory"
    if exc.filename is not None and path is not None and str(exc.filename) != str(path):
        reason = f"{reason} ({exc.filename})"
    return f"cannot {action} {where}: {reason}" if where is not None else f"{action} failed: {reason}"


def _default_mode() -> int:
    """0666 minus the umask: what open() would give, not mkstemp's private 0600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to a temp file in the same directory, fsync it, then rename it over `path`."""
    path = Path(path)
    if path.is_dir():
        raise WriteFailed(f"cannot write {path}: it is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise WriteFailed(os_error_message(exc, path)) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise WriteFailed(os_error_message(exc, path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def atomic_write_tensor(path: str | os.PathLike[str], obj: Any) -> None:
    """torch.save, atomically (tensors and plain containers: loadable with weights_only=True)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
