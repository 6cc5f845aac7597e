"""Throughput of the white-box attack path: examples per second, and seconds per example.

Two measurements (issue "bench evaluate", benchmark):

1. The papers' two PGD configurations on MDEQ-Large (random weights, CPU, batch 32, 2 threads, warmed up):
   PGD-10 at eps 8/255, step 2/255, through the state-7 / 1-step unrolled estimator and through the exact
   implicit gradient. The papers' code, measured on this machine, takes 0.70 s and 1.05 s per example.
   Our path runs the same attack through AttackView (the value is the deployed prediction, so every step
   knows which examples are already broken; those stop costing anything) and reports robust accuracy too:
   a speed-up only counts at equal or lower robust accuracy.
2. `bench evaluate --suite white-box` end to end on a model (e.g. deq-tiny), examples per second.
3. `defense`: one forward (no grad) and one forward+backward of each view an attack on the entropy-reduction
   defense sees (the undefended AttackView for transfer, BPDAView, AdaptiveView bptt), per batch size, with
   the weight-norm cache per forward and without it (recomputed per f, as before the cache).

The "papers" column holds the issue's figures. To measure the papers' code itself on the same machine,
threads and batch, run benchmarks/papers_code_bench.py with a checkout of their repository: on this
2-core CPU (1 thread, batch 8, n 16) it took 3.71 s (state-7) and 5.07 s (exact) per example, not
0.70 / 1.05 s, and one MDEQ-Large f costs about the same in both implementations (18-19 ms per example).
Their attack needs 11 f per PGD step; ours 21 (9 solve + 10 for the deployed prediction's refinement, which
the papers' attack never computes because it judges success on the estimator's logits) plus the same
gradient work, so on a model where few examples break early ours cannot be faster per example.

    .venv/bin/python benchmarks/evaluate_bench.py papers [--n 64] [--batch 32]
    .venv/bin/python benchmarks/evaluate_bench.py suite --model deq-tiny [--n 50] [--n-dev 100]
    .venv/bin/python benchmarks/evaluate_bench.py suite --model deq-large --n 4 --batch 4 --n-dev 4
    .venv/bin/python benchmarks/evaluate_bench.py defense --model deq-tiny [--batches 1,3] [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

PAPERS_SECONDS_PER_EXAMPLE = {"state:7:1:0.5": 0.70, "exact": 1.05}


def papers(n: int, batch: int, threads: int) -> None:
    from bench.attacks.orchestrator import run_attacks
    from bench.attacks.pgd import PGD
    from bench.deq.view import AttackView, count_f_evals
    from bench.registry import load_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = load_model("deq-large", random_weights=True).model.eval()
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    attack = PGD(8 / 255, steps=10, step_size=2 / 255)
    print(f"MDEQ-Large, random weights, CPU, {threads} threads, batch {batch}, n {n}")
    print("PGD-10, eps 8/255, step 2/255")
    header = ("estimator", "s/example", "papers", "speed-up", "clean %", "robust %", "f/example")
    print(f"{header[0]:<16}" + "".join(f"{h:>11}" for h in header[1:]))
    for spec, reference in PAPERS_SECONDS_PER_EXAMPLE.items():
        view = AttackView(model, "final", spec)
        with torch.no_grad():
            y = torch.cat(
                [view(x[i : i + batch]).argmax(1) for i in range(0, n, batch)]
            )  # labels = clean pred
        view(x[:2]).sum().backward()  # warm-up
        start = time.perf_counter()
        robust = 0
        with count_f_evals(model) as counter:
            for i in range(0, n, batch):
                xb, yb = x[i : i + batch], y[i : i + batch]
                seeds = torch.arange(i, i + len(xb))
                res = run_attacks(
                    view,
                    xb,
                    yb,
                    [attack],
                    seeds,
                    clean_correct=torch.ones(len(xb), dtype=torch.bool),
                    checks=False,
                ).results[attack.name]
                robust += int((~res.broken).sum())
        per_example = (time.perf_counter() - start) / n
        print(
            f"{spec:<16}{per_example:>11.3f}{reference:>11.2f}{reference / per_example:>10.1f}x{100.0:>11.1f}"
            f"{100.0 * robust / n:>11.1f}{counter.rows / n:>11.0f}"
        )
    print("clean % is 100 by construction: labels = the clean predictions, so every example is attacked")


def suite(model_name: str, n: int, batch: int, threads: int, n_dev: int | None) -> None:
    from bench.evaluate import evaluate
    from bench.registry import get_entry
    from bench.spec import EvalConfig

    torch.set_num_threads(threads)
    random_weights = get_entry(model_name).family == "deq" and not get_entry(model_name).checkpoint.registered
    with tempfile.TemporaryDirectory() as tmp:
        cfg = EvalConfig(
            model=model_name,
            n_examples=n,
            batch_size=batch,
            suite="white-box",
            results_dir=tmp,
            quiet=True,
            device="cpu",
            n_dev=n_dev,
            random_weights=random_weights,
        )
        start = time.perf_counter()
        doc, _, _ = evaluate(*cfg.parse())
        seconds = time.perf_counter() - start
    s = doc["results"]["summary"]["readouts"]["final"]
    walls = doc["provenance"].get("wall_seconds", {})
    print(
        f"{model_name}{' (random weights)' if random_weights else ''}: white-box suite, n {n}, "
        f"n_dev {n_dev if n_dev is not None else 'default'}: {seconds:.1f} s, {n / seconds:.4f} examples/s "
        f"(dev sweep included); clean {s['clean_acc']:.1f}%, All {s['all_acc']:.1f}%"
    )
    if walls:
        print("wall seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in walls.items()))


def _mean_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def defense(model_name: str, batches: list[int], repeats: int, threads: int) -> None:
    import contextlib

    from bench.defenses import AdaptiveView, BPDAView, parse_defense
    from bench.deq.view import AttackView
    from bench.registry import load_model

    torch.set_num_threads(threads)
    model = load_model(model_name, None).model.eval()
    for p in model.parameters():
        p.requires_grad_(False)  # as inside an attack (frozen_parameters)
    d = parse_defense("entropy-reduction")
    shape = tuple(load_model(model_name, None).entry.input_shape)
    estimator = "state:1:9:0.5"
    views = {
        "undefended (transfer)": AttackView(model, readout="final", estimator=estimator),
        f"bpda@{estimator}": BPDAView(model, d, "final", estimator),
        "adaptive@bptt": AdaptiveView(model, d, "final"),
    }
    gen = torch.Generator().manual_seed(0)
    print(f"{model_name}, {threads} thread(s), {repeats} repeats; milliseconds per call")
    for cache in (True, False):
        if not cache:
            model.weights_cached = contextlib.nullcontext  # type: ignore[method-assign]
        for b in batches:
            x = torch.rand(b, *shape, generator=gen)
            y = torch.randint(0, 10, (b,), generator=gen)
            for name, view in views.items():
                with torch.no_grad():
                    fwd = _mean_seconds(lambda v=view, x=x: v(x), repeats)

                def fwd_bwd(v=view, x=x, y=y) -> None:
                    xg = x.clone().requires_grad_(True)
                    torch.autograd.grad(torch.nn.functional.cross_entropy(v(xg), y), xg)

                both = _mean_seconds(fwd_bwd, repeats)
                print(
                    f"weights cached {cache!s:5}  batch {b:3}  {name:24} forward {1000 * fwd:7.1f}"
                    f"  forward+backward {1000 * both:7.1f}"
                )
    del model.weights_cached


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("papers")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    s = sub.add_parser("suite")
    s.add_argument("--model", default="deq-tiny")
    s.add_argument("--n", type=int, default=50)
    s.add_argument("--batch", type=int, default=50)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--n-dev", type=int, default=None)
    d = sub.add_parser("defense")
    d.add_argument("--model", default="deq-tiny")
    d.add_argument("--batches", default="1,3")
    d.add_argument("--repeats", type=int, default=5)
    d.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.what == "papers":
        papers(args.n, args.batch, args.threads)
    elif args.what == "defense":
        defense(args.model, [int(b) for b in args.batches.split(",")], args.repeats, args.threads)
    else:
        suite(args.model, args.n, args.batch, args.threads, args.n_dev)


if __name__ == "__main__":
    main()
