"""How numbers are written in specs and records: shortest round-trip decimals, budgets as k/255."""

from __future__ import annotations


def format_number(x: float) -> str:
    """Shortest text that parses back to the same float, without a trailing '.0' ('1', '0.5', '1e-06')."""
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


def format_fraction(x: float) -> str:
    """'8/255' when x is exactly k/255 (RobustBench's and the papers' convention, read back to the same
    float), else `format_number` ('0' for zero)."""
    k = round(x * 255)
    if x != 0 and k != 0 and k / 255 == x:
        return f"{k}/255"
    return format_number(x)
