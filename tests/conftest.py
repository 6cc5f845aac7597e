"""Test-wide settings.

One torch thread: the tests run many tiny tensor ops, for which a second thread only adds synchronisation,
and when the machine is busy an oversubscribed OpenMP pool makes each op 10-25x slower. Subprocesses the
tests start (CLI runs) inherit OMP_NUM_THREADS=1 for the same reason.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # test helpers (micro_models, toys) import by name


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """The micro test models registered through DEQ_BENCH_EXTRA_REGISTRY (tests/micro_models.py)."""
    from micro_models import write_micro_registry

    from bench.registry import registry as cached

    registry = write_micro_registry(tmp_path_factory.mktemp("micro"))
    old = os.environ.get("DEQ_BENCH_EXTRA_REGISTRY")
    os.environ["DEQ_BENCH_EXTRA_REGISTRY"] = str(registry)
    cached.cache_clear()
    yield registry
    if old is None:
        os.environ.pop("DEQ_BENCH_EXTRA_REGISTRY", None)
    else:
        os.environ["DEQ_BENCH_EXTRA_REGISTRY"] = old
    cached.cache_clear()
