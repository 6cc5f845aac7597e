"""Sanity checks an honest evaluation runs on itself, stored in the record and shown with its numbers.

eps-zero       an attack with eps = 0 must break nothing (robust accuracy = clean accuracy)
gradients      the input gradient every attacked view gives must be finite and non-zero
square-beats   Square (gradient-free) breaking examples that every gradient attack before it in
               the group left standing is a sign of gradient masking (AutoAttack's check_square_sr:
               a drop of more than 0.2 percentage points)
autoattack     AutoAttack's own warnings (randomness, output range, dynamic forward, zero gradients)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.attacks.orchestrator import run_attacks
from bench.attacks.specs import parse_attack

SQUARE_DROP_PP = 0.2  # AutoAttack's threshold for check_square_sr, in percentage points


def gradient_check(view: nn.Module, x: Tensor, y: Tensor) -> dict[str, Any]:
    """Per example: is the CE input gradient of the view finite, and non-zero?"""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(view(x), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    flat = grad.flatten(1)
    finite = torch.isfinite(flat).all(1)
    nonzero = (flat.abs() > 0).any(1)
    return {
        "n": len(x),
        "nonfinite": int((~finite).sum()),
        "zero": int((finite & ~nonzero).sum()),
        "mean_abs": float(flat[finite].abs().mean()) if finite.any() else float("nan"),
    }


def eps_zero_check(view: nn.Module, attack_spec: str, x: Tensor, y: Tensor, clean_correct: Tensor) -> int:
    """How many examples the attack breaks at eps = 0 (must be 0)."""
    attack = parse_attack(attack_spec, 0.0)
    seeds = torch.arange(len(x), dtype=torch.int64)
    res = run_attacks(view, x, y, [attack], seeds, clean_correct=clean_correct, checks=False)
    return int(res.results[attack.name].broken.sum())


def square_check(columns: dict[str, Any]) -> list[dict[str, Any]]:
    """Square's extra breaks per (protocol, group, readout) where it ran after gradient attacks."""
    n = len(columns["label"])
    found = []
    seen_gradient: dict[tuple[str, str, str], bool] = {}
    for col in columns["attacks"]:
        key = (col["protocol"], col["group"], col["readout"])
        if not col["attack"].startswith("square"):
            seen_gradient[key] = True
            continue
        if not seen_gradient.get(key):
            continue  # Square alone in its group: nothing to compare with
        extra = sum(col["broken"])
        drop = 100.0 * extra / max(n, 1)
        found.append(
            {
                "protocol": key[0],
                "group": key[1],
                "readout": key[2],
                "estimator": col["estimator"],
                "square_breaks": extra,
                "drop_pp": drop,
                "fired": drop > SQUARE_DROP_PP,
            }
        )
    return found


def flags_fired(sanity: dict[str, Any]) -> list[str]:
    """Short names of the checks that fired, for tables and leaderboards."""
    fired = []
    if sanity.get("eps_zero_breaks", 0) > 0:
        fired.append("eps0-breaks")
    grads = sanity.get("gradients", {})
    if any(g["nonfinite"] for g in grads.values()):
        fired.append("nonfinite-grad")
    if any(g["zero"] for g in grads.values()):
        fired.append("zero-grad")
    if any(s["fired"] for s in sanity.get("square", [])):
        fired.append("square-beats-gradient")
    if sanity.get("autoattack_warnings"):
        fired.append("autoattack-warning")
    return fired
