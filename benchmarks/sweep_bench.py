"""The white-box sweep, full vs successive halving, on the same development set (issue #16.5).

Both schedules run on one model's dev set in one invocation (halving first, then full, each timed): the
estimators each chooses per readout, what decided the choice, the f applications (rows through f) each
spent, and their wall time. The sweep is what `bench evaluate --suite white-box` runs before its batches
(`--sweep full|halving`); here it runs alone, without the cache.

    python benchmarks/sweep_bench.py [--model deq-tiny] [--n-dev 20] [--batch 20] [--suite white-box]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.deq.view import count_f_evals
from bench.evaluate.setup import prepare
from bench.evaluate.stages import select_estimators
from bench.progress import Reporter
from bench.spec import EvalConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deq-tiny")
    parser.add_argument("--n-dev", type=int, default=20)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--suite", default="white-box", choices=("white-box", "lite"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        spec, options = EvalConfig(
            model=args.model,
            n_examples=1,
            n_dev=args.n_dev,
            batch_size=args.batch,
            suite=args.suite,
            results_dir=tmp,
            quiet=True,
            device="cpu",
        ).parse()
        setup = prepare(spec, options, torch.device("cpu"))
    protocol = next(p for p in setup.plan.protocols if p.sweep is not None)
    assert setup.dev is not None and protocol.sweep is not None
    print(
        f"{args.model}, {args.suite} sweep ({protocol.sweep.attack}, {len(protocol.sweep.candidates)} "
        f"candidates, top {protocol.sweep.top_k}), dev set of {len(setup.dev)}, batch {args.batch}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    results = {}
    for schedule in ("halving", "full"):
        p = replace(protocol, sweep=replace(protocol.sweep, schedule=schedule))
        start = time.perf_counter()
        with count_f_evals(setup.views.model) as counter, Reporter(quiet=True) as reporter:
            chosen, table, decided = select_estimators(
                setup.views, p, setup.plan.readouts, setup.dev, spec, reporter
            )
        results[schedule] = (chosen, decided, counter.rows, time.perf_counter() - start, table)
    full_rows, full_seconds = results["full"][2], results["full"][3]
    print(f"{'schedule':<10}{'f rows':>12}{'vs full':>9}{'seconds':>10}{'vs full':>9}  chosen (decided by)")
    for schedule, (chosen, decided, rows, seconds, _) in results.items():
        picks = "; ".join(f"{r}: {', '.join(es)} ({decided[r]})" for r, es in chosen.items())
        print(
            f"{schedule:<10}{rows:>12}{rows / full_rows:>8.2f}x{seconds:>10.1f}"
            f"{seconds / full_seconds:>8.2f}x  {picks}"
        )
    same = results["halving"][0] == results["full"][0]
    print(f"same choice: {same}")
    for readout, rows in results["full"][4].items():
        ranked = sorted(rows, key=lambda r: (r["robust_acc"], r["mean_margin"]))[:5]
        print(
            f"full sweep, {readout}, strongest five: "
            + ", ".join(f"{r['estimator']} {r['robust_acc']:.1f}%" for r in ranked)
        )


if __name__ == "__main__":
    main()
