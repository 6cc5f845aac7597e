"""Where the project's data lives: repo folders (checkpoints, results) and the package's built-in assets."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"
REPO_ROOT = PACKAGE_DIR.parent


def checkpoints_dir() -> Path:
    """Registered checkpoint files live here; `DEQ_BENCH_CHECKPOINTS` overrides it."""
    return Path(os.environ.get("DEQ_BENCH_CHECKPOINTS", REPO_ROOT / "checkpoints"))
