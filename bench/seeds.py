"""Seeds derived from labels: one function, so every stream in the harness is keyed the same way."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from a base seed and labels (attack, batch, example): independent streams per key,
    stable across runs, platforms and Python hash seeds."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def mix_seed(*values: int) -> int:
    """A 63-bit seed mixed from integers (an attack's per-example seeds, a restart number).

    A second construction beside `derive_seed` only so that attack randomness stays bit-identical to
    records written before both lived here (deq-bench <= 0.2); new streams use `derive_seed`.
    """
    data = b"".join(int(v).to_bytes(16, "little", signed=True) for v in values)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & (2**63 - 1)
