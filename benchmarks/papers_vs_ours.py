"""PGD-10 throughput, ours vs the papers' code, both sides in ONE run, interleaved batch by batch (#16).

Only ratios measured this way count: the machine is shared, so each batch is attacked by every variant in
turn (same threads, same batch, same examples) and each variant's time is the sum over the batches.

    mdeq  MDEQ-Large, random weights, PGD-10 at 8/255, step 2/255. The papers' code (a checkout of
          minicheshire/DEQ-White-Box-Robustness, `--papers-repo`, run unchanged through
          benchmarks/papers_code_bench.py's loader and its mirror of their pgd()) against our MDEQ-Large
          carrying *their* randomly initialised weights (converted by models/paper_keys.py), so both attack
          one function. Their judge is their TrainGrad forward (`--train-grad real`: the logits of f(z*));
          ours is deployed the same way (`fz`; `--train-grad unroll` compares f(z*) + 9 damped steps, our
          `unroll:9:0.5`). Estimators: Munroll-6-1 = state:7:1:0.5 and real = exact.
    tiny  deq-tiny (trained), the first N test images, PGD-10 at eps 0.1, step eps/4, through state:3:1:1:
          ours against a loop on our model that mirrors the papers' pgd() step for step (the estimator's
          logits, mean cross-entropy, .backward() with parameter gradients as their code computes them, no
          early stop, an unclipped random start) and judges once after the attack on the deployed prediction.

Our variants: `deployed` (the default PGD: loss on the deployed value, gradient the estimator's, success
known at every step) and `estimator` (pgd:10:ce:1:estimator: loss on the estimator's logits, success
confirmed on the deployed prediction for the rows the estimator says are broken, and on every row at the
end). Every robust accuracy is judged on the deployed prediction. f/example counts the rows through f.

`--shares` adds, after the table, where the `estimator` variant's time goes on the first batch (timers
around the view's parts; nested parts count in their outermost one) beside the papers' side on that batch,
and the floor: the speed-up ours would reach if the deployed re-checks and the attack's bookkeeping were
free (the solve the estimator reads, its differentiated f's, their backward and the final judge remain),
from the table's interleaved ratio.

    python benchmarks/papers_vs_ours.py mdeq --papers-repo DIR [--n 16] [--batch 8] [--threads 1] [--device D]
    python benchmarks/papers_vs_ours.py tiny [--n 1000] [--batch 100] [--threads 1] [--shares]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.attacks import synchronize
from bench.attacks.orchestrator import run_attacks
from bench.attacks.pgd import PGD
from bench.deq.estimators import parse_estimator
from bench.deq.readouts import solve_model
from bench.deq.solvers import SolverSettings
from bench.deq.view import AttackView, count_f_evals

VARIANTS = ("deployed", "estimator")


@dataclass
class Tally:
    """One variant's totals over the batches: seconds, examples robust on the deployed prediction, f rows."""

    seconds: float = 0.0
    robust: int = 0
    f_rows: int = 0


def ours(view: AttackView, attack: PGD, x: Tensor, y: Tensor, start: int) -> tuple[int, int]:
    """Our PGD through the view on every example, as the papers' loop (no clean pass: a misclassified
    example counts as broken at once): (robust on the deployed prediction, f rows)."""
    everyone = torch.ones(len(x), dtype=torch.bool, device=x.device)
    with count_f_evals(view.model) as counter:
        res = run_attacks(view, x, y, [attack], torch.arange(start, start + len(x)), everyone, checks=False)
    return int((~res.results[attack.name].broken).sum()), counter.rows


def timed(fn: Callable[[], tuple[int, int]], tally: Tally, device: torch.device) -> None:
    synchronize(device)
    begin = time.perf_counter()
    robust, rows = fn()
    synchronize(device)
    tally.seconds += time.perf_counter() - begin
    tally.robust += robust
    tally.f_rows += rows


def table(title: str, n: int, rows: dict[str, Tally], baseline: str) -> dict[str, float]:
    """Print the variants' speeds; returns each one's speed-up over `baseline`."""
    print(title)
    head = ("s/example", "examples/s", "vs papers", "robust %", "f/example")
    print(f"{'variant':<34}" + "".join(f"{h:>11}" for h in head))
    base = rows[baseline].seconds
    for name, t in rows.items():
        print(
            f"{name:<34}{t.seconds / n:>11.3f}{n / t.seconds:>11.3f}{base / t.seconds:>10.2f}x"
            f"{100.0 * t.robust / n:>11.1f}{t.f_rows / n:>11.0f}"
        )
    return {name: base / t.seconds for name, t in rows.items()}


# ----- where the time goes (--shares) ---------------------------------------------------------------

PARTS = {
    "solve": "no-grad solve the estimator reads",
    "surrogate": "estimator's f's with grad (forward)",
    "backward": "backward to the input",
    "recheck": "deployed re-check of candidate rows",
    "judge": "final judge (deployed forward)",
}
MANDATORY = ("solve", "surrogate", "backward", "judge")


@dataclass
class Shares:
    """Seconds per part of one timed call of ours(); nested timed parts count in the outermost one."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))
    depth: int = 0

    def wrap(self, part: str, fn: Callable[..., object]) -> Callable[..., object]:
        def timed_part(*args: object, **kw: object) -> object:
            if self.depth:
                return fn(*args, **kw)
            self.depth += 1
            begin = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self.seconds[part] += time.perf_counter() - begin
                self.depth -= 1

        return timed_part


@contextmanager
def measured_parts(view: AttackView) -> Iterator[Shares]:
    """Timers on the view's parts for the block: the no-grad solve (the judge's full one counts as
    `judge`), the estimator's surrogate, the deployed re-check, and torch.autograd.grad (the backward)."""
    shares = Shares()
    solve, value, surrogate, grad = view._solve, view._value, view.estimator.surrogate, torch.autograd.grad
    timed_solve = shares.wrap("solve", solve)
    timed_judge = shares.wrap("judge", solve)

    def either_solve(model: object, x: Tensor, upto: int | None = None) -> object:
        return (timed_solve if torch.is_grad_enabled() else timed_judge)(model, x, upto)

    view._solve = either_solve  # type: ignore[method-assign]
    view._value = shares.wrap("recheck", value)  # type: ignore[method-assign]
    view.estimator.surrogate = shares.wrap("surrogate", surrogate)  # type: ignore[method-assign]
    torch.autograd.grad = shares.wrap("backward", grad)  # type: ignore[assignment]
    try:
        yield shares
    finally:
        del view._solve, view._value, view.estimator.surrogate
        torch.autograd.grad = grad


def share_table(view: AttackView, attack: PGD, x: Tensor, y: Tensor, ratio: float) -> None:
    """The `estimator` variant's parts on one batch; `ratio` is its speed vs the papers' side from the
    interleaved table (a ratio timed alone here would follow the shared machine's load)."""
    begin = time.perf_counter()
    with measured_parts(view) as shares:
        ours(view, attack, x, y, 0)
    total = time.perf_counter() - begin
    print(f"\nwhere the time goes: ours `estimator` on the first batch ({len(x)} examples), one call")
    print(f"{'part':<42}{'seconds':>10}{'share':>9}")
    for part, label in PARTS.items():
        print(f"{label:<42}{shares.seconds[part]:>10.3f}{100 * shares.seconds[part] / total:>8.1f}%")
    rest = total - sum(shares.seconds.values())
    print(f"{'attack bookkeeping and the rest':<42}{rest:>10.3f}{100 * rest / total:>8.1f}%")
    print(f"{'total':<42}{total:>10.3f}{100.0:>8.1f}%")
    mandatory = sum(shares.seconds[p] for p in MANDATORY) / total
    print(
        f"floor: with the re-checks and the bookkeeping free, {ratio:.2f}x / {mandatory:.2f} = "
        f"{ratio / mandatory:.2f}x the papers' side"
    )


# ----- MDEQ-Large against the papers' code ----------------------------------------------------------


def mdeq(args: argparse.Namespace) -> None:
    from papers_code_bench import ESTIMATORS, call, count_calls, deployed, load_papers_model, pgd

    from bench.registry import load_model
    from models.paper_keys import convert_paper_state_dict

    device = torch.device(args.device)
    theirs, _ = load_papers_model(args.papers_repo, args.seed)
    model = load_model("deq-large", random_weights=True).model.eval()
    model.load_state_dict(convert_paper_state_dict(theirs.state_dict()))
    theirs, model = theirs.to(device), model.to(device)
    refine = 0 if args.train_grad == "real" else 9
    model.deploy = replace(model.deploy, refine_apply_f=True, refine_steps=refine, refine_lambda=0.5)
    n, batch = args.n, args.batch
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    y = torch.cat([deployed(theirs, x[i : i + batch], args.train_grad) for i in range(0, n, batch)])
    with torch.no_grad():
        gap = (call(theirs, x[:batch], args.train_grad)[0] - model(x[:batch])).abs().max().item()
    print(
        f"MDEQ-Large, their random weights in both, {device}, {torch.get_num_threads()} thread(s), "
        f"batch {batch}, n {n}; PGD-10 eps 8/255 step 2/255; deployed/judge: their {args.train_grad} = our "
        f"{'fz' if refine == 0 else 'unroll:9:0.5'}; max |their logits - ours| on clean inputs {gap:.2e}"
    )
    eps, step = 8 / 255, 2 / 255
    for their_name, spec in ESTIMATORS.items():
        if args.estimators and spec not in args.estimators.split(","):
            continue
        views = {v: AttackView(model, "final", spec) for v in VARIANTS}
        attacks = {v: PGD(eps, steps=10, step_size=step, loss_on=v) for v in VARIANTS}
        rows = {f"papers' code {their_name}": Tally(), **{f"ours {spec} {v}": Tally() for v in VARIANTS}}
        names = list(rows)
        np.random.seed(args.seed)
        warm = x[:batch].clone().requires_grad_()  # warm-up of both at the timed shape
        F.cross_entropy(call(theirs, warm, their_name)[0], y[:batch]).backward()
        ours(views["deployed"], attacks["deployed"], x[:batch], y[:batch], 0)
        for i in range(0, n, batch):
            xb, yb = x[i : i + batch], y[i : i + batch]

            def papers(xb: Tensor = xb, yb: Tensor = yb, grad: str = their_name) -> tuple[int, int]:
                with count_calls(theirs) as counts:
                    x_adv = pgd(theirs, xb, yb, grad, eps, step, 10)
                    robust = int((deployed(theirs, x_adv, args.train_grad) == yb).sum())
                return robust, counts["f"]

            timed(papers, rows[names[0]], device)
            for v, name in zip(VARIANTS, names[1:], strict=True):
                view, attack = views[v], attacks[v]
                timed(lambda a=attack, m=view, xb=xb, yb=yb, i=i: ours(m, a, xb, yb, i), rows[name], device)
        speed = table(f"\nestimator {spec} (their {their_name})", n, rows, names[0])
        if args.shares:
            ratio = speed[names[-1]]
            share_table(views["estimator"], attacks["estimator"], x[:batch], y[:batch], ratio)


# ----- deq-tiny against a loop mirroring the papers' pgd() ------------------------------------------


def papers_loop(
    model: nn.Module, spec: str, x: Tensor, y: Tensor, eps: float, step: float
) -> tuple[int, int]:
    """The papers' pgd() on our model, step for step, then one judging forward: (robust, f rows)."""
    estimator = parse_estimator(spec)
    settings = SolverSettings.from_deploy(model.deploy)
    keep = estimator.needed_states()
    with count_f_evals(model) as counter:
        x_adv = x.detach() + torch.from_numpy(np.random.uniform(-eps, eps, x.shape)).to(x.dtype)
        for _ in range(10):
            x_adv.requires_grad_()
            with model.weights_cached():
                model.begin_forward(len(x))
                with torch.no_grad():
                    traj = solve_model(model, model.inject(x_adv), settings, keep=keep)
                logits = estimator.surrogate(model, model.inject(x_adv), traj)
            model.zero_grad()
            F.cross_entropy(logits, y).backward()
            x_adv = x_adv.detach() + step * x_adv.grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
        with torch.no_grad():
            robust = int((model(x_adv).argmax(1) == y).sum())
    return robust, counter.rows


def tiny(args: argparse.Namespace) -> None:
    from bench.data import load_dataset
    from bench.registry import load_model

    model = load_model("deq-tiny").model.eval()
    data = load_dataset("fashion-mnist", "test", None, False, args.n)
    eps, step, spec = 0.1, 0.025, "state:3:1:1"
    cpu = torch.device("cpu")
    print(
        f"deq-tiny (trained), first {args.n} test images, CPU, {torch.get_num_threads()} thread(s), "
        f"batch {args.batch}; PGD-10 eps 0.1 step eps/4 through {spec}; robust = correct on the deployed "
        "prediction after the attack (true labels)"
    )
    views = {v: AttackView(model, "final", spec) for v in VARIANTS}
    attacks = {v: PGD(eps, steps=10, step_size=step, loss_on=v) for v in VARIANTS}
    rows = {"papers' pgd() loop on our model": Tally(), **{f"ours {spec} {v}": Tally() for v in VARIANTS}}
    names = list(rows)
    np.random.seed(args.seed)
    for i in range(0, args.n, args.batch):
        xb, yb = data.x[i : i + args.batch], data.y[i : i + args.batch]
        timed(lambda xb=xb, yb=yb: papers_loop(model, spec, xb, yb, eps, step), rows[names[0]], cpu)
        for v, name in zip(VARIANTS, names[1:], strict=True):

            def run(v: str = v, xb: Tensor = xb, yb: Tensor = yb, start: int = i) -> tuple[int, int]:
                return ours(views[v], attacks[v], xb, yb, start)

            timed(run, rows[name], cpu)
    speed = table("", args.n, rows, names[0])
    if args.shares:
        xb, yb = data.x[: args.batch], data.y[: args.batch]
        share_table(views["estimator"], attacks["estimator"], xb, yb, speed[names[-1]])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("mdeq")
    m.add_argument("--papers-repo", type=Path, required=True)
    m.add_argument("--n", type=int, default=16)
    m.add_argument("--batch", type=int, default=8)
    m.add_argument("--train-grad", default="real", choices=("real", "unroll"))
    m.add_argument("--device", default="cpu", help="cpu or cuda (both sides)")
    m.add_argument("--estimators", default="", help="only these of state:7:1:0.5,exact (default both)")
    t = sub.add_parser("tiny")
    t.add_argument("--n", type=int, default=1000)
    t.add_argument("--batch", type=int, default=100)
    for p in (m, t):
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--shares", action="store_true", help="where the estimator variant's time goes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    (mdeq if args.what == "mdeq" else tiny)(args)


if __name__ == "__main__":
    main()
