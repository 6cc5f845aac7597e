"""Row sources and the short flags that warnings and sanity checks become in tables."""

from __future__ import annotations

MEASURED = "measured"
REPORTED = "reported"

# Warning messages (AutoAttack's checks, the orchestrator's re-check) -> short flag names; first match wins.
FLAG_PATTERNS: tuple[tuple[str, str], ...] = (
    ("dynamic-check-unsupported", "not currently supported"),
    ("randomized", "randomized defense"),
    ("probability-output", "probability distribution"),
    ("zero-grad", "zero gradient"),
    ("square-beats-gradient", "square attack has decreased"),
    ("dynamic-defense", "dynamic defense"),
    ("recheck-mismatch", "on re-check"),
    ("n-classes", "target classes"),
    ("n-classes", "dlr loss"),
)
# Flags that say something about the setup but not that the robustness number may be overestimated.
INFO_FLAGS = frozenset({"dynamic-check-unsupported", "n-classes", "white-box-weaker", "sweep-tie"})


def classify_warning(message: str) -> str:
    low = message.lower()
    for flag, needle in FLAG_PATTERNS:
        if needle in low:
            return flag
    return "warning"
