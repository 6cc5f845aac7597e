"""f-evaluations and wall time to a relative residual of 1e-3: our solvers vs torchdeq's, on the same f.

The cell is a randomly initialised MDEQ (LARGE by default) in eval mode; every solver gets the same
injection, the same z0 = 0 and the same counting wrapper around model.f, so the numbers differ only by
the solver. torchdeq (0.1.0, optional: `pip install torchdeq==0.1.0`) stops when the batch's *largest*
residual is below tol; ours stops per example (frozen examples are no longer evaluated, so "rows"
counts the examples f actually processed) or, with `global`, on the residual norm of the whole batch
as in the papers' code.

The time outside f ("other s") is the solver's own overhead. `--repeats R` runs every implementation once
per round, R rounds interleaved, and sums each one's times, so a shared machine's load falls on all of
them alike; the last column is each row's time outside f over torchdeq's (same method). `--tol 0` makes
every implementation run exactly `--max-iter` steps: the same f calls for all. The row
`deq-bench (elementwise, before #16.2)` runs our solver with its earlier low-rank products (one pairwise
elementwise dot product per history vector, bit-identical by construction), to show that lever alone.

    python benchmarks/solver_bench.py [--preset large] [--batch 32] [--max-iter 50] [--tol 1e-3]
    python benchmarks/solver_bench.py --batch 8 --max-iter 8 --tol 0 --threads 1 --repeats 3 --methods broyden
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.deq import solvers
from bench.deq.solvers import rownorm, solve
from models.mdeq import MDEQ, MDEQ_PRESETS


@dataclass
class Row:
    solver: str
    impl: str
    f_calls: int
    f_rows: int
    seconds: float
    f_seconds: float
    median_rel: float
    max_rel: float
    converged: int
    batch: int


class CountingF:
    """model.f(z, u) (or f(z) on a fixed u) counting batched calls, processed rows and time inside f."""

    def __init__(self, model: MDEQ, u: Tensor) -> None:
        self.model, self.u = model, u
        self.reset()

    def reset(self) -> None:
        self.calls = self.rows = 0
        self.seconds = 0.0

    def rows_f(self, z: Tensor, u: Tensor) -> Tensor:
        self.calls += 1
        self.rows += z.shape[0]
        start = time.perf_counter()
        out = self.model.f(z, u)
        self.seconds += time.perf_counter() - start
        return out

    def full_f(self, z: Tensor) -> Tensor:
        return self.rows_f(z, self.u)


def relative_residual(f: CountingF, z: Tensor) -> Tensor:
    """Per-example ||f(z) - z|| / ||f(z)|| of a returned solution (one extra f, not counted)."""
    fz = f.model.f(z, f.u)
    return rownorm(fz - z) / (rownorm(fz) + 1e-9)


def timed(run: Callable[[], Tensor], f: CountingF) -> tuple[Tensor, float]:
    f.reset()
    start = time.perf_counter()
    with torch.no_grad():
        z = run()
    return z, time.perf_counter() - start


def _elementwise_rowdot(a: Tensor, b: Tensor) -> Tensor:
    """A row dot product before #16.2: a pairwise sum of elementwise adds (log2 D in-place passes)."""
    return solvers._rowsum_consuming(a * b)


def _elementwise_rownorm(x: Tensor) -> Tensor:
    return _elementwise_rowdot(x, x).sqrt()


def _elementwise_dots(vectors: Tensor, x: Tensor) -> Tensor:
    """The low-rank dot products before #16.2: one pairwise elementwise row sum per history vector."""
    return torch.stack([_elementwise_rowdot(vectors[:, j], x) for j in range(vectors.shape[1])], dim=1)


def _elementwise_combine(coef: Tensor, vectors: Tensor) -> Tensor:
    out = coef[:, 0, None] * vectors[:, 0]
    for j in range(1, vectors.shape[1]):
        out += coef[:, j, None] * vectors[:, j]
    return out


@contextmanager
def elementwise_products() -> Iterator[None]:
    """Our solver with the earlier elementwise low-rank products, for the before/after row."""
    names = ("_dots", "_combine", "rowdot", "rownorm")
    saved = [getattr(solvers, name) for name in names]
    before = (_elementwise_dots, _elementwise_combine, _elementwise_rowdot, _elementwise_rownorm)
    for name, fn in zip(names, before, strict=True):
        setattr(solvers, name, fn)
    try:
        yield
    finally:
        for name, fn in zip(names, saved, strict=True):
            setattr(solvers, name, fn)


def run_ours(
    method: str, f: CountingF, z0: Tensor, args, per_example: bool, elementwise: bool = False
) -> Row:
    def go() -> Tensor:
        kw = dict(max_iter=args.max_iter, tol=args.tol, stop_mode="rel", keep=(), per_example=per_example)
        with elementwise_products() if elementwise else nullcontext():
            return solve(f.rows_f, z0, method, u=f.u, **kw).result

    z, seconds = timed(go, f)
    impl = "deq-bench" if per_example else "deq-bench (global)"
    if elementwise:
        impl = "deq-bench (elementwise, before #16.2)"
    return make_row(method, impl, f, z, seconds, args.tol)


def run_torchdeq(method: str, f: CountingF, z0: Tensor, args) -> Row:
    from torchdeq.solver import anderson_solver, broyden_solver

    solver = broyden_solver if method == "broyden" else anderson_solver
    z, seconds = timed(
        lambda: solver(f.full_f, z0, max_iter=args.max_iter, tol=args.tol, stop_mode="rel")[0], f
    )
    return make_row(method, "torchdeq 0.1.0", f, z, seconds, args.tol)


def make_row(method: str, impl: str, f: CountingF, z: Tensor, seconds: float, tol: float) -> Row:
    """One table row from the counter's totals and the returned solution's per-example residuals."""
    calls, rows, f_seconds = f.calls, f.rows, f.seconds
    rel = relative_residual(f, z)
    converged = int((rel < tol).sum())
    return Row(
        method,
        impl,
        calls,
        rows,
        seconds,
        f_seconds,
        float(rel.median()),
        float(rel.max()),
        converged,
        z.shape[0],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="large", choices=sorted(MDEQ_PRESETS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-iter", type=int, default=50)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", default="broyden,anderson")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds, times summed")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    cfg = MDEQ_PRESETS[args.preset]
    model = MDEQ(cfg).to(args.device).eval()
    x = torch.rand(args.batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=args.device)
    try:
        import torchdeq  # noqa: F401

        have_torchdeq = True
    except ImportError:
        have_torchdeq = False
        print("torchdeq not installed: its rows are skipped (pip install torchdeq==0.1.0)")

    print(
        f"MDEQ-{args.preset} (random init, eval), batch {args.batch}, {args.device}, "
        f"torch threads {torch.get_num_threads()}, tol {args.tol:g} (rel), max_iter {args.max_iter}"
    )
    header = f"{'solver':9} {'implementation':38} {'f calls':>7} {'f rows':>7} {'wall s':>8} {'in f s':>8} "
    print(
        header + f"{'other s':>8} {'median rel':>10} {'max rel':>9} {'converged':>9} {'other/torchdeq':>14}"
    )
    with torch.no_grad(), model.weights_cached():
        model.begin_forward(args.batch)
        u = model.inject(x)
        z0 = model.init_state(u)
        f = CountingF(model, u)
        f.full_f(z0)  # warm-up
        for method in args.methods.split(","):
            runs: dict[str, Callable[[], Row]] = {
                "ours": lambda m=method: run_ours(m, f, z0, args, per_example=True),
                "elementwise": lambda m=method: run_ours(m, f, z0, args, per_example=True, elementwise=True),
                "global": lambda m=method: run_ours(m, f, z0, args, per_example=False),
            }
            if have_torchdeq:
                runs["torchdeq"] = lambda m=method: run_torchdeq(m, f, z0, args)
            totals: dict[str, Row] = {}
            for _ in range(args.repeats):  # interleaved rounds
                for key, run in runs.items():
                    row = run()
                    if key in totals:
                        totals[key].seconds += row.seconds
                        totals[key].f_seconds += row.f_seconds
                    else:
                        totals[key] = row
            ref = totals.get("torchdeq")
            for row in totals.values():
                print_row(row, None if ref is None else ref.seconds - ref.f_seconds)


def print_row(r: Row, reference_other: float | None) -> None:
    other = r.seconds - r.f_seconds
    ratio = f"{other / reference_other:13.2f}x" if reference_other else f"{'':>14}"
    print(
        f"{r.solver:9} {r.impl:38} {r.f_calls:7d} {r.f_rows:7d} {r.seconds:8.2f} {r.f_seconds:8.2f} "
        f"{other:8.2f} {r.median_rel:10.2e} {r.max_rel:9.2e} {r.converged:>5}/{r.batch} {ratio}",
        flush=True,
    )


if __name__ == "__main__":
    main()
