"""Cost of one cell f(z, u) under cheaper variants that keep its values (#16, lever 3), interleaved.

Every variant evaluates the same f on the same (z, u): u = model.inject(x), z the result of the model's
deployed solve (a state near z*, as the estimators' VJPs see it). Two costs per variant:

    fwd       one f under no_grad (the solver's call)
    fwd+bwd   one f with grad, then torch.autograd.grad w.r.t. z and u with a fixed random cotangent
              (the estimators' VJPs; parameters frozen, as bench.attacks.frozen_parameters does)

Variants (all in eval mode):

    eager               the baseline: f outside the weight-norm cache, so every call recomputes the
                        weight-normed weights (g v / ||v||) of the block and post-fuse convs
    eager+cache         f inside model.weights_cached(), as bench's solve, readouts and estimators call it
    channels-last       a copy of the model and u converted with .to(memory_format=torch.channels_last),
                        with the cache (the flat state z has no memory format: split_state's NCHW views
                        meet channels-last weights, so the convs return channels-last tensors)
    compile             torch.compile(model.f) (inductor, default mode), with the cache; its two
                        compilations (no_grad and grad mode) are timed separately and not counted
    compile max-autotune  mode="max-autotune-no-cudagraphs", with `--max-autotune` only: it benchmarks
                        kernel choices on top of a compile that already takes minutes on a 2-core CPU

A variant whose compile raises is marked unavailable with the reason (no C compiler, no inductor
support on this platform...) and the others still run. Each round runs every variant in turn (the order
rotated each round), `--calls` fwd then `--calls` fwd+bwd, and each variant's time is the sum over the
rounds, so a shared machine's load falls on all of them alike: only the ratios count. The speedup is the
eager time over the variant's (> 1: faster) over all rounds; "median" and "rounds" are the median and the
range of the same ratio taken round by round (the median is the steadier under a bursty load). The values
table compares each variant's f output and gradients with the eager baseline's: bit-identical, or the
largest absolute difference and that difference relative to the largest baseline magnitude.

Models: deq-large (MDEQ-Large, random weights, inputs 3x32x32 uniform in [0, 1], batch 4) and deq-tiny
(the trained checkpoint, the first Fashion-MNIST test images, batch 100; uniform inputs if the data set
is not on this machine).

    python benchmarks/cell_bench.py [--model both] [--rounds 5] [--calls 5] [--threads 1] [--device cpu]
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/cell_bench.py --threads 1 --rounds 6
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.attacks import synchronize
from bench.deq.readouts import solve_model
from bench.deq.solvers import SolverSettings

MODELS = ("deq-large", "deq-tiny")
DEFAULT_BATCH = {"deq-large": 4, "deq-tiny": 100}


@dataclass
class Variant:
    """One way of evaluating f: the function, the model whose cache it uses, its (z, u), its totals."""

    name: str
    model: torch.nn.Module
    f: Callable[[Tensor, Tensor], Tensor]
    z: Tensor
    u: Tensor
    cached: bool
    unavailable: str | None = None
    compile_s: tuple[float, float] | None = None
    fwd_s: float = 0.0
    bwd_s: float = 0.0
    rounds: list[tuple[float, float]] = field(default_factory=list)
    values: tuple[Tensor, Tensor, Tensor] | None = None

    def context(self) -> AbstractContextManager[object]:
        return self.model.weights_cached() if self.cached else nullcontext()


def forward(v: Variant) -> Tensor:
    with torch.no_grad():
        return v.f(v.z, v.u)


def forward_backward(v: Variant, cotangent: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    z, u = v.z.detach().requires_grad_(), v.u.detach().requires_grad_()
    out = v.f(z, u)
    gz, gu = torch.autograd.grad(out, (z, u), cotangent)
    return out.detach(), gz, gu


def reason(exc: BaseException) -> str:
    """The first line of an exception, short enough for one table line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


def warm_up(v: Variant, cotangent: Tensor, device: torch.device) -> None:
    """One call of each kind (for a compiled f: its two compilations, timed); the values it returns."""
    try:
        with v.context():
            synchronize(device)
            begin = time.perf_counter()
            forward(v)
            synchronize(device)
            mid = time.perf_counter()
            forward_backward(v, cotangent)
            synchronize(device)
            end = time.perf_counter()
            out = forward(v)
            _, gz, gu = forward_backward(v, cotangent)
    except Exception as exc:  # a compile failure: report it, keep the other variants
        v.unavailable = reason(exc)
        return
    if v.compile_s is not None:
        v.compile_s = (mid - begin, end - mid)
    v.values = (out, gz, gu)


def one_round(v: Variant, cotangent: Tensor, calls: int, device: torch.device) -> None:
    with v.context():
        synchronize(device)
        begin = time.perf_counter()
        for _ in range(calls):
            forward(v)
        synchronize(device)
        mid = time.perf_counter()
        for _ in range(calls):
            forward_backward(v, cotangent)
        synchronize(device)
        end = time.perf_counter()
    v.fwd_s += mid - begin
    v.bwd_s += end - mid
    v.rounds.append((mid - begin, end - mid))


def compiled(model: torch.nn.Module, mode: str | None) -> Callable[[Tensor, Tensor], Tensor] | str:
    """torch.compile(model.f) or, if torch.compile itself refuses, the reason."""
    try:
        return torch.compile(model.f, mode=mode)
    except Exception as exc:
        return reason(exc)


def inputs(name: str, batch: int, device: torch.device) -> tuple[torch.nn.Module, Tensor, str]:
    from bench.errors import BenchError
    from bench.registry import load_model

    if name == "deq-large":
        model = load_model(name, random_weights=True).model.eval()
        return model, torch.rand(batch, 3, 32, 32).to(device), "random weights, uniform inputs"
    model = load_model(name).model.eval()
    try:
        from bench.data import load_dataset

        x, what = load_dataset("fashion-mnist", "test", None, False, batch).x, "Fashion-MNIST test images"
    except (BenchError, OSError) as exc:
        x, what = torch.rand(batch, 1, 28, 28), f"uniform inputs (no data set: {reason(exc)})"
    return model, x.to(device), f"trained, first {len(x)} {what}"


def build(name: str, args: argparse.Namespace, device: torch.device) -> tuple[list[Variant], Tensor, str]:
    model, x, what = inputs(name, args.batch or DEFAULT_BATCH[name], device)
    model = model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad(), model.weights_cached():
        model.begin_forward(x.shape[0])
        u = model.inject(x)
        z = solve_model(model, u, SolverSettings.from_deploy(model.deploy), keep=()).result
    cotangent = torch.randn(z.shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    u_last = u.contiguous(memory_format=torch.channels_last)
    variants = [
        Variant("eager", model, model.f, z, u, cached=False),
        Variant("eager+cache", model, model.f, z, u, cached=True),
        Variant("channels-last", last, last.f, z, u_last, cached=True),
    ]
    modes = {"compile": None}
    if args.max_autotune:
        modes["compile max-autotune"] = "max-autotune-no-cudagraphs"
    for label, mode in modes.items():
        fn = compiled(model, mode)
        v = Variant(label, model, model.f, z, u, cached=True, compile_s=(0.0, 0.0))
        if isinstance(fn, str):
            v.unavailable = fn
        else:
            v.f = fn
        variants.append(v)
    return variants, cotangent, what


def compare(v: Variant, base: Variant) -> str:
    """The variant's f output and (dz, du) gradients against the eager baseline's."""
    assert v.values is not None and base.values is not None
    parts = []
    identical = True
    for label, a, b in zip(("f", "dz", "du"), v.values, base.values, strict=True):
        a = a.contiguous()
        identical &= torch.equal(a, b)
        diff = float((a - b).abs().max())
        scale = float(b.abs().max())
        parts.append(f"{label} {diff:8.1e} ({diff / scale if scale else 0.0:7.1e})")
    return "bit-identical" if identical else "   ".join(parts)


def bench(name: str, args: argparse.Namespace, device: torch.device) -> None:
    torch.manual_seed(args.seed)
    variants, cotangent, what = build(name, args, device)
    base = variants[0]
    print(
        f"\n{name} ({what}), batch {base.z.shape[0]}, state {base.z.shape[1]}, {device}, "
        f"{torch.get_num_threads()} thread(s), {args.rounds} rounds x {args.calls} calls per variant",
        flush=True,
    )
    for v in variants:
        warm_up(v, cotangent, device)
        if v.compile_s is not None and v.unavailable is None:
            print(
                f"  {v.name}: compile {v.compile_s[0]:.1f} s (no_grad f) + {v.compile_s[1]:.1f} s "
                f"(grad f + backward), {inductor_cache_note()}",
                flush=True,
            )
        elif v.unavailable:
            print(f"  {v.name}: unavailable ({v.unavailable})", flush=True)
    live = [v for v in variants if v.unavailable is None]
    for r in range(args.rounds):
        for v in live[r % len(live) :] + live[: r % len(live)]:
            one_round(v, cotangent, args.calls, device)
    n = args.rounds * args.calls
    print(
        f"{'variant':<22}{'fwd ms':>9}{'speedup':>9}{'median':>8}{'rounds':>11}"
        f"{'fwd+bwd ms':>12}{'speedup':>9}{'median':>8}{'rounds':>11}"
    )
    for v in variants:
        if v.unavailable:
            print(f"{v.name:<22}  unavailable: {v.unavailable}")
            continue
        cells = ""
        for k, (total, base_total) in enumerate(((v.fwd_s, base.fwd_s), (v.bwd_s, base.bwd_s))):
            ratios = sorted(b[k] / s[k] for s, b in zip(v.rounds, base.rounds, strict=True))
            cells += f"{1e3 * total / n:>{9 if k == 0 else 12}.2f}{base_total / total:>8.2f}x"
            cells += f"{statistics.median(ratios):>7.2f}x{ratios[0]:>6.2f}-{ratios[-1]:.2f}"
        print(f"{v.name:<22}{cells}")
    print("values vs eager: max |difference| (relative to max |eager|) of f(z, u), dz and du")
    for v in live[1:]:
        print(f"{v.name:<22}{compare(v, base)}")


def inductor_cache_note() -> str:
    """Inductor's on-disk FX graph cache: a hit makes the compile time a warm-cache time."""
    from torch._dynamo.utils import counters

    hits, misses = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
    return f"inductor graph cache so far: {hits} hit(s), {misses} miss(es)"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="both", choices=(*MODELS, "both"))
    parser.add_argument("--batch", type=int, default=0, help="0: 4 for deq-large, 100 for deq-tiny")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds, times summed")
    parser.add_argument("--calls", type=int, default=5, help="f calls of each kind per variant per round")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-autotune", action="store_true", help="add mode=max-autotune-no-cudagraphs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for name in MODELS if args.model == "both" else (args.model,):
        bench(name, args, device)


if __name__ == "__main__":
    main()
