"""Tiny registered models for end-to-end tests: a micro MDEQ and a micro CNN on Fashion-MNIST shapes.

Their weights (tests/fixtures, made by scripts/make_test_models.py: a few hundred clean training steps)
are accurate enough that attacks break some examples and not others. They are registered through an extra
registry file (DEQ_BENCH_EXTRA_REGISTRY), so tests go through the same registry -> sha256-verified
checkpoint -> evaluate path as a user's model.
"""

from __future__ import annotations

import json
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"

DEQ_CONFIG = {
    "preset": "test",
    "in_channels": 1,
    "image_size": 28,
    "channels": [4, 8],
    "head_channels": [2, 4],
    "final_chansize": 16,
    "num_groups": 2,
    "downsample_times": 1,
}
DEQ_DEPLOY = {"max_iter": 4, "refine_steps": 1, "train_unroll_steps": 1}
CNN_CONFIG = {"in_channels": 1}


def _toml_value(value: object) -> str:
    return json.dumps(value)  # TOML accepts JSON's strings, numbers, booleans and arrays


def _table(name: str, items: dict[str, object]) -> str:
    return f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in items.items())


def write_micro_registry(root: Path) -> Path:
    """An extra registry file naming the fixture checkpoints (with their sha256), returned for the env var."""
    from bench.checkpoints import sha256_file

    parts = []
    for name, family, arch, config, deploy in (
        ("deq-micro", "deq", "mdeq", DEQ_CONFIG, DEQ_DEPLOY),
        ("cnn-micro", "cnn", "tiny-cnn", CNN_CONFIG, None),
    ):
        ckpt = FIXTURES / f"{name}.safetensors"
        parts.append(
            _table(
                name,
                {
                    "family": family,
                    "architecture": arch,
                    "dataset": "fashion-mnist",
                    "input_shape": [1, 28, 28],
                    "threat_model": "Linf",
                    "eps": "0.1",
                    "parameters": 1,
                    "description": "test-only micro model",
                },
            )
        )
        parts.append(_table(f"{name}.config", config))
        parts.append(_table(f"{name}.checkpoint", {"file": str(ckpt), "sha256": sha256_file(ckpt)}))
        if deploy:
            parts.append(_table(f"{name}.deploy", deploy))
    registry = root / "micro.toml"
    registry.write_text("\n".join(parts))
    return registry
