"""Where one white-box attack's time goes on a DEQ (#16): f forward (every caller: solver, readout,
surrogate), the autograd backward, the solver outside f, and the rest (the attack's own logic, head,
readout, bookkeeping), from a cProfile of one run of the attack through an AttackView.

It answers "is this attack f-bound?": when f and its backward dominate, only fewer f per step can make
it faster, and attacks whose logic reads the deployed value (APGD, FAB, Square) pay a full deployed
solve at every step by design.

    python benchmarks/attack_shares.py apgd-t [--model deq-tiny] [--estimator state:2:9:1] [--n 4] [--eps 0.1]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.attacks.orchestrator import run_attacks
from bench.attacks.specs import parse_attack
from bench.data import load_dataset
from bench.deq.view import AttackView
from bench.registry import load_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("attack", help="an attack spec, e.g. apgd-t, fab-t, square, pgd-10")
    parser.add_argument("--model", default="deq-tiny")
    parser.add_argument("--estimator", default="state:2:9:1")
    parser.add_argument("--n", type=int, default=4, help="clean-correct test images attacked")
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    model = loaded.model.eval()
    data = load_dataset(loaded.entry.dataset, "test", None, False, 4 * args.n + 8)
    view = AttackView(model, "final", args.estimator)
    with torch.no_grad():
        correct = view(data.x).argmax(1) == data.y
    x, y = data.x[correct][: args.n], data.y[correct][: args.n]
    attack = parse_attack(args.attack, args.eps)
    profile = cProfile.Profile()
    begin = time.perf_counter()
    profile.enable()
    run_attacks(
        view, x, y, [attack], torch.arange(len(x)), torch.ones(len(x), dtype=torch.bool), checks=False
    )
    profile.disable()
    total = time.perf_counter() - begin
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]

    def keys(file: str, function: str) -> list[tuple[str, int, str]]:
        return [k for k in stats if k[0].endswith(file) and k[2] == function]

    def cumulative(file: str, function: str) -> float:
        return sum(stats[k][3] for k in keys(file, function))

    # The shares are found by function name: a renamed one would silently read 0%, so stop instead.
    named = [("models/mdeq.py", "f"), ("bench/deq/solvers.py", "_iterate")]
    missing = [f"{file}:{fn}" for file, fn in named if not keys(file, fn)]
    if not any("run_backward" in k[2] for k in stats) and not args.attack.startswith("square"):
        missing.append("autograd run_backward")
    if missing:
        sys.exit(f"attack_shares: never called (renamed?): {', '.join(missing)}; update this benchmark")

    f_forward = cumulative("models/mdeq.py", "f")
    solver = cumulative("bench/deq/solvers.py", "_iterate") - cumulative("bench/deq/solvers.py", "__call__")
    backward = sum(v[2] for k, v in stats.items() if "run_backward" in k[2])
    rest = total - f_forward - backward - solver
    print(
        f"{args.attack} on {args.model} through {args.estimator}, {len(x)} images: {total:.1f} s (profiled)"
    )
    for name, seconds in (
        ("f forward (every caller)", f_forward),
        ("backward (autograd engine)", backward),
        ("solver outside f", solver),
        ("rest: attack logic, head, readout, bookkeeping", rest),
    ):
        print(f"  {name:<48}{seconds:>8.1f} s {100 * seconds / total:>6.1f}%")


if __name__ == "__main__":
    main()
