"""Defense spec strings: `none`, or `entropy-reduction[:key=value,...]`.

Kept apart from the defense itself so that the grammar (and its error messages) is one small thing to read.
Radii and step sizes may be written as fractions (`2/255`); the canonical spec writes a multiple of 1/255
back that way, so records show the numbers the papers quote.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection

from bench.errors import BenchError, did_you_mean

GRAMMAR = (
    "none | entropy-reduction[:key=value,...] with keys stages (int >= 1), steps (int >= 0), "
    "alpha and eps (numbers >= 0, fractions like 2/255 allowed), solver_steps (int >= 1), tol (>= 0), "
    "stop (rel|abs)"
)
_NUMBER = r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?"


def parse_number(text: str, key: str, spec: str) -> float:
    """A finite number >= 0 written as a decimal or a fraction a/b."""
    m = re.fullmatch(rf"({_NUMBER})(?:/({_NUMBER}))?", text.strip())
    value = math.nan
    if m:
        value = float(m.group(1))
        if m.group(2) is not None:
            denominator = float(m.group(2))
            value = value / denominator if denominator > 0 else math.nan
    if not math.isfinite(value):
        raise BenchError(f"bad defense {spec!r}: {key} must be a number >= 0 (e.g. 2/255), got {text!r}")
    return value


def parse_count(text: str, key: str, spec: str, low: int) -> int:
    if not re.fullmatch(r"[0-9]+", text.strip()) or int(text) < low:
        raise BenchError(f"bad defense {spec!r}: {key} must be an integer >= {low}, got {text!r}")
    return int(text)


def parse_options(spec: str, name: str, keys: Collection[str]) -> dict[str, str]:
    """The raw key=value pairs of `name[:k=v,...]`; BenchError on unknown, repeated or malformed keys."""
    head, sep, tail = spec.strip().partition(":")
    if head.strip() != name:
        raise BenchError(f"unknown defense {spec!r}; grammar: {GRAMMAR}")
    options: dict[str, str] = {}
    if not sep:
        return options
    for item in tail.split(","):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key or not value.strip():
            raise BenchError(f"bad defense {spec!r}: expected key=value, got {item!r}; grammar: {GRAMMAR}")
        if key not in keys:
            raise BenchError(f"bad defense {spec!r}: unknown key {key!r}{did_you_mean(key, keys)}")
        if key in options:
            raise BenchError(f"bad defense {spec!r}: key {key!r} is given twice")
        options[key] = value.strip()
    return options
