"""Ctrl-C, SIGTERM and SLURM's preemption signal: one clean, resumable stop.

Why: Python's default SIGINT becomes a KeyboardInterrupt that libraries (typer, in its non-standalone mode)
turn into a quiet return code, and SIGTERM (what SLURM and torchrun send on preemption or failure) kills
the process without running any cleanup. Here each becomes `Interrupted`, a BaseException that unwinds
through every `finally` (temp files removed, locks released), and the CLI prints
`error: interrupted; re-run the same command to resume` and exits 128 + the signal number (130, 143).
Every file a run keeps is written atomically, so what is left is exactly what a re-run resumes from.

A signal that lands while a module is being imported is held until the import is done (re-checked every
20 ms on a SIGALRM timer): raised inside a C extension's initialisation (numpy's, pulled in by torch), the
exception leaves that extension half-initialised and un-importable, and the process would die with an
ImportError traceback instead of the clean message. A second signal while one is held is raised at once,
so a hung import still stops on a second Ctrl-C.
"""

from __future__ import annotations

import signal
from types import FrameType

MESSAGE = "interrupted; re-run the same command to resume"
TRAIN_MESSAGE = "interrupted; re-run the same command with --resume to continue from the last saved state"
# SIGUSR1: what `sbatch --signal=USR1@<seconds>` sends ahead of a time limit or preemption
SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))


class Interrupted(BaseException):
    """A stop signal arrived: unwind (cleanup runs), then exit with 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_IMPORT_CODE = ("<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>")
_RETRY_S = 0.02
_fired = False
_held: int | None = None  # the first stop signal that arrived during an import, not yet raised


def importing(frame: FrameType | None) -> bool:
    """True when `frame` runs inside an import (importlib's machinery is on its call stack)."""
    while frame is not None:
        if frame.f_code.co_filename in _IMPORT_CODE:
            return True
        frame = frame.f_back
    return False


def _handler(signum: int, frame: FrameType | None) -> None:
    global _held
    if _fired:  # a second signal while unwinding must not tear the cleanup apart
        return
    if _held is None and importing(frame) and hasattr(signal, "setitimer"):
        _held = signum
        signal.signal(signal.SIGALRM, _retry)
        signal.setitimer(signal.ITIMER_REAL, _RETRY_S)
        return
    _raise(signum if _held is None else _held)  # a second signal while one is held: the user insists


def _retry(_signum: int, frame: FrameType | None) -> None:
    """The timer of a held signal: raise it now unless an import is still under way."""
    if _held is None or _fired:
        return
    if importing(frame):
        signal.setitimer(signal.ITIMER_REAL, _RETRY_S)
        return
    _raise(_held)


def _raise(signum: int) -> None:
    global _fired, _held
    stop_timer()
    _fired, _held = True, None
    raise Interrupted(signum)


def raise_held() -> None:
    """Raise a signal still held now; the CLI calls this when its command is done (a command that is
    mostly imports, such as `bench models`, may finish before the timer finds it outside an import)."""
    stop_timer()
    if _held is not None and not _fired:
        _raise(_held)


def stop_timer() -> None:
    """Cancel a held signal's retry timer: at exit, finalisation restores SIGALRM's default action, and a
    timer that fires then would kill the process with 142."""
    if _held is not None and hasattr(signal, "setitimer"):
        signal.setitimer(signal.ITIMER_REAL, 0)


def install() -> None:
    """Route the stop signals to `Interrupted` (main thread only; a no-op elsewhere)."""
    for signum in SIGNALS:
        try:
            signal.signal(signum, _handler)
        except (ValueError, OSError):  # not the main thread, or a signal this platform cannot catch
            continue
