"""Build bench/assets/: the first 1000 Fashion-MNIST test images and labels as gzipped idx files.

Reproducible: the source files must match the official content (sha256 pinned in bench/data.py), the
output is the idx format with a fixed gzip header (mtime 0), and the printed content sha256s are the ones
pinned as `bench.data.BUILTIN_SHA256`.

    python scripts/make_builtin_subset.py [--source /usr/share/datasets/fashion-mnist] [--prove]

`--prove` re-derives why Debian's dataset-fashion-mnist files count as official: Debian re-wrapped the
upstream archives without changing their deflate streams, so putting the upstream gzip header (file name and
mtime) back in front reproduces the md5s that torchvision lists for the official downloads.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.data import (
    BUILTIN_FILES,
    BUILTIN_SHA256,
    BUILTIN_SIZE,
    FASHION_SHA256,
    encode_idx,
    read_fashion_pair,
)
from bench.io import atomic_write_bytes
from bench.paths import ASSETS_DIR

# mtimes in the gzip headers of the upstream archives (zalandoresearch/fashion-mnist, data/fashion/).
_UPSTREAM_MTIME = {
    "t10k-images-idx3-ubyte.gz": 0x59A7E9F3,
    "t10k-labels-idx1-ubyte.gz": 0x59A7E9F3,
    "train-images-idx3-ubyte.gz": 0x59A7E9DE,
    "train-labels-idx1-ubyte.gz": 0x59A7E9DE,
}


def prove_official(source: Path) -> bool:
    """Re-wrap each source archive's deflate stream in the upstream header; compare with torchvision's md5."""
    from torchvision.datasets import FashionMNIST

    ok = True
    for fname, md5 in FashionMNIST.resources:
        raw = (source / fname).read_bytes()
        if raw[:4] != b"\x1f\x8b\x08\x00":  # gzip, deflate, no optional fields: the body starts at byte 10
            print(f"{fname}: unexpected gzip header flags, cannot re-wrap")
            ok = False
            continue
        header = b"\x1f\x8b\x08\x08" + struct.pack("<I", _UPSTREAM_MTIME[fname]) + b"\x00\x03"
        header += fname.removesuffix(".gz").encode() + b"\x00"
        got = hashlib.md5(header + raw[10:]).hexdigest()
        print(f"{fname}: re-wrapped md5 {got} {'==' if got == md5 else '!='} official {md5}")
        ok &= got == md5
    return ok


def build(source: Path, out: Path) -> dict[str, str]:
    """Write the subset files; return the sha256 of each file's idx content."""
    images, labels = read_fashion_pair(
        source / "t10k-images-idx3-ubyte.gz", source / "t10k-labels-idx1-ubyte.gz", FASHION_SHA256
    )
    digests = {}
    for fname, array in zip(BUILTIN_FILES, (images[:BUILTIN_SIZE, 0], labels[:BUILTIN_SIZE]), strict=True):
        content = encode_idx(array.astype("uint8"))
        atomic_write_bytes(out / fname, gzip.compress(content, compresslevel=9, mtime=0))
        os.chmod(out / fname, 0o644)  # package data must be readable by every user
        digests[fname] = hashlib.sha256(content).hexdigest()
    return digests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--out", type=Path, default=ASSETS_DIR)
    parser.add_argument("--prove", action="store_true", help="check the source archives against torchvision")
    args = parser.parse_args()
    if args.prove and not prove_official(args.source):
        return 1
    digests = build(args.source, args.out)
    for fname, digest in digests.items():
        state = "matches" if BUILTIN_SHA256.get(fname) == digest else "DIFFERS from"
        print(f"{fname}: content sha256 {digest} ({state} bench.data.BUILTIN_SHA256)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
