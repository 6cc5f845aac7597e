"""Test-wide settings.

One torch thread: the tests run many tiny tensor ops, for which a second thread only adds synchronisation,
and when the machine is busy an oversubscribed OpenMP pool makes each op 10-25x slower. Subprocesses the
tests start (CLI runs) inherit OMP_NUM_THREADS=1 for the same reason.
"""

from __future__ import annotations

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
