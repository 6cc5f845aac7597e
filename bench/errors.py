"""The one exception type a user can cause.

The CLI turns it into a single `error: ...` line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class BenchError(Exception):
    """A failure caused by the user's input or environment, with a message that says what to do."""


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """A ' (did you mean ...?)' suffix naming the closest valid names, or '' when none is close."""
    valid = list(valid)
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    if not close:
        return f"; valid names: {', '.join(sorted(valid))}"
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)"
