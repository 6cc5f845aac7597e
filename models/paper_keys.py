"""Checkpoints of the papers' MDEQ-Vision code -> state dicts of models.mdeq.MDEQ.

The papers' code saves `{'state_dict': ..., 'epoch': ..., ...}` (or, for TEST.MODEL_FILE, a bare state
dict) from a DataParallel-wrapped model, so every key starts with `module.`. MDEQ names its submodules
exactly as their code does (`downsample` = the stem, `stage0`, `fullstage.branches.<i>.blocks.0.conv1`,
`fullstage.fuse_layers.<i>.<j>.net...`, `fullstage.post_fuse_layers.<i>.conv`, `incre_modules`,
`downsamp_modules`, `final_layer`, `classifier`), so only two renames remain:

* `module.` prefixes are dropped;
* their custom WeightNorm stores `<name>_g` (the per-output-channel norm, shape (out, 1, 1, 1)) and
  `<name>_v` (the direction); torch's weight-norm parametrization stores the same tensors as
  `parametrizations.<name>.original0` (g) and `original1` (v). Their derived `weight` is a plain attribute
  and never appears in a checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from bench.errors import BenchError

DATA_PARALLEL_PREFIX = "module."
_WEIGHT_NORM_SUFFIXES = {"_g": "original0", "_v": "original1"}


def unwrap_checkpoint(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """The state dict inside a training checkpoint (`state_dict` entry), or the mapping itself."""
    inner = checkpoint.get("state_dict")
    return inner if isinstance(inner, Mapping) else checkpoint


def convert_key(key: str) -> str:
    """One papers'-code key -> the matching MDEQ state_dict key."""
    while key.startswith(DATA_PARALLEL_PREFIX):
        key = key[len(DATA_PARALLEL_PREFIX) :]
    module_path, _, leaf = key.rpartition(".")
    for suffix, original in _WEIGHT_NORM_SUFFIXES.items():
        if leaf.endswith(suffix) and len(leaf) > len(suffix):
            name = leaf[: -len(suffix)]
            prefix = f"{module_path}." if module_path else ""
            return f"{prefix}parametrizations.{name}.{original}"
    return key


def convert_paper_state_dict(sd: Mapping[str, Any]) -> dict[str, Tensor]:
    """Map a checkpoint of the papers' code onto MDEQ's keys; load the result with strict=True."""
    state = unwrap_checkpoint(sd)
    converted: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise BenchError(
                f"not an MDEQ state dict: entry {key!r} is a {type(value).__name__}, not a tensor"
            )
        new_key = convert_key(key)
        if new_key in converted:
            raise BenchError(f"checkpoint has two entries for {new_key!r} (one of them is {key!r})")
        converted[new_key] = value
    return converted
