"""Attack spec strings: one short, documented string per attack configuration.

* `pgd`, `pgd:STEPS`, `pgd:STEPS:LOSS`, `pgd:STEPS:LOSS:RESTARTS`, `pgd:STEPS:LOSS:RESTARTS:ON`: our PGD
  with step eps/4 and a random start; LOSS is ce, dlr or margin; ON says which logits the loss is on:
  `deployed` (default) or `estimator` (the papers' way, success confirmed on the deployed prediction; see
  bench.attacks.pgd); `pgd` = `pgd:10:ce:1:deployed`. `pgd-STEPS` is the papers' name for
  `pgd:STEPS` (`pgd-10` is their preset).
* `apgd-ce`, `apgd-ce:N_ITER`, `apgd-ce:N_ITER:RESTARTS`: APGD on CE (default 100 iterations, 1 restart).
* `apgd-dlr[:N_ITER[:RESTARTS]]`: APGD on the untargeted DLR loss (in AutoAttack's 'plus' version).
* `apgd-t`, `apgd-t:N_ITER`, `apgd-t:N_ITER:TARGETS`: APGD-T (default 100 iterations, 9 target classes).
* `fab-t`, `fab-t:N_ITER`, `fab-t:N_ITER:TARGETS`: FAB-T (default 100 iterations, 9 target classes).
* `square`, `square:QUERIES`: Square (default 5000 queries).
* `autoattack` (in lists only): the standard suite apgd-ce, apgd-t, fab-t, square.

eps is not part of the spec: the same suite is run at every eps of a sweep.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from bench.attacks import Attack
from bench.attacks.autoattack import APGD, APGDT, FABT, Square
from bench.attacks.pgd import LOSS_SOURCES, PGD, PGD_LOSSES
from bench.errors import BenchError, did_you_mean

STANDARD_AA = ("apgd-ce", "apgd-t", "fab-t", "square")
SUITE_ALIASES = {"autoattack": STANDARD_AA}


def _ints(spec: str, fields: list[str], names: list[str]) -> list[int]:
    if len(fields) > len(names):
        raise BenchError(f"attack spec {spec!r} has too many fields; expected at most {':'.join(names)}")
    out = []
    for field, what in zip(fields, names, strict=False):
        if not re.fullmatch(r"[0-9]+", field):
            raise BenchError(f"attack spec {spec!r}: {what} must be a positive integer, got {field!r}")
        out.append(int(field))
    return out


def _pgd(spec: str, fields: list[str], eps: float) -> Attack:
    if len(fields) > 4:
        raise BenchError(f"attack spec {spec!r} has too many fields; expected pgd:STEPS:LOSS:RESTARTS:ON")
    if len(fields) > 3 and fields[3] not in LOSS_SOURCES:
        raise BenchError(
            f"attack spec {spec!r}: the loss is on {' or '.join(LOSS_SOURCES)} logits, got {fields[3]!r}"
        )
    steps = _ints(spec, fields[:1], ["STEPS"])
    if len(fields) > 1 and fields[1] not in PGD_LOSSES:
        raise BenchError(
            f"attack spec {spec!r}: unknown loss {fields[1]!r}{did_you_mean(fields[1], PGD_LOSSES)}"
        )
    restarts = _ints(spec, fields[2:3], ["RESTARTS"])
    return PGD(
        eps,
        steps=steps[0] if steps else 10,
        loss=fields[1] if len(fields) > 1 else "ce",
        restarts=restarts[0] if restarts else 1,
        loss_on=fields[3] if len(fields) > 3 else LOSS_SOURCES[0],
    )


def _apgd(loss: str) -> Callable[[str, list[str], float], Attack]:
    def build(spec: str, fields: list[str], eps: float) -> Attack:
        return APGD(eps, *_ints(spec, fields, ["N_ITER", "RESTARTS"]), loss=loss)

    return build


_BUILDERS: dict[str, Callable[[str, list[str], float], Attack]] = {
    "pgd": _pgd,
    "apgd-ce": _apgd("ce"),
    "apgd-dlr": _apgd("dlr"),
    "apgd-t": lambda spec, f, eps: APGDT(eps, *_ints(spec, f, ["N_ITER", "TARGETS"])),
    "fab-t": lambda spec, f, eps: FABT(eps, *_ints(spec, f, ["N_ITER", "TARGETS"])),
    "square": lambda spec, f, eps: Square(eps, *_ints(spec, f, ["QUERIES"])),
}
ATTACK_NAMES = tuple(_BUILDERS)


def parse_attack(spec: str, eps: float) -> Attack:
    """One attack from its spec string (table in the module docstring), with budget eps in pixel units."""
    text = spec.strip().lower()
    if match := re.fullmatch(r"pgd-([0-9]+)", text):
        text = f"pgd:{match.group(1)}"
    base, *fields = text.split(":")
    if base not in _BUILDERS:
        raise BenchError(f"unknown attack {spec!r}{did_you_mean(base, [*ATTACK_NAMES, *SUITE_ALIASES])}")
    if any(f == "" for f in fields):
        raise BenchError(f"attack spec {spec!r} has an empty field")
    return _BUILDERS[base](spec, fields, eps)


def expand_attacks(specs: str | Iterable[str]) -> list[str]:
    """Attack specs from a comma-separated string or a list; `autoattack` becomes the standard four."""
    items = specs.split(",") if isinstance(specs, str) else list(specs)
    expanded: list[str] = []
    for item in (s.strip() for s in items):
        if not item:
            continue
        expanded.extend(SUITE_ALIASES.get(item.lower(), (item,)))
    if not expanded:
        raise BenchError("no attacks given")
    return expanded


def parse_attacks(specs: str | Iterable[str], eps: float) -> list[Attack]:
    """A suite from a comma-separated string or a list of specs; `autoattack` expands to the standard four."""
    attacks = [parse_attack(s, eps) for s in expand_attacks(specs)]
    names = [a.name for a in attacks]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise BenchError(f"attack(s) listed twice: {', '.join(dupes)}")
    return attacks
