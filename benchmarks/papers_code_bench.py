"""Baseline for `evaluate_bench.py papers`: the papers' own code running the same PGD-10, on this machine.

Issue "bench evaluate" (benchmark) compares our white-box attack path with the code of Yang, Pang & Liu
(NeurIPS 2022, "A Closer Look at the Adversarial Robustness of Deep Equilibrium Models"; repository
minicheshire/DEQ-White-Box-Robustness, folder deq-evaluation-with-unrolled-intermediates). This script
measures that code, unchanged, on CPU: their MDEQ-Large classifier (their yacs config
experiments/cifar/cls_mdeq_LARGE_reg.yaml, their random initialisation, eval mode) attacked by PGD-10
(eps 8/255, step 2/255, uniform random start, cross-entropy) through two of their gradient estimators:

    Munroll-6-1  intermediate state 7 of the forward Broyden solve (results_list[6]), then 1 unrolled
                 step with lambda 0.5 (our spec "state:7:1:0.5")
    real         their exact implicit gradient: a Broyden backward solve (B_THRES 7) in a hook (our "exact")

Their code is not copied here: `--papers-repo` points at a checkout of their repository, whose directories
go on sys.path. The PGD loop below is written here but mirrors their `pgd()` in lib/core/cls_function.py
step for step: the model is called as `model(x, train_step=-1, compute_jac_loss=False,
spectral_radius_mode=False, writer=None, AttackGrad=...)[0]`, the random start is not clipped to [0, 1]
before the first step, there is no early stop and no per-step success check (the logits the attack sees are
the estimator's own, not the deployed prediction). As in their `validate_observe_train`, success is judged
once after the attack, by a separate forward with AttackGrad = TrainGrad (the deployed model; "real" by
default: the logits of f(z*) at the Broyden solution). Labels are the model's clean deployed predictions,
so clean accuracy is 100% and every example is attacked.

Printed: seconds per example (attack + the judging forward), robust accuracy, and the f (MDEQModule
forward) calls per example, counted by wrapping their module's forward; "vjp" counts the
torch.autograd.grad calls of their backward hook (the exact estimator's backward Broyden solve; the plain
.backward() through the graphed f calls is not counted). Also printed: one bare f call (no grad) at batch B,
per example, to compare f's cost with our implementation of MDEQ-Large.

    .venv/bin/python benchmarks/papers_code_bench.py --papers-repo DIR [--n 64] [--batch 32] [--threads 2]

Needs `yacs` and `termcolor` (imported by their code) in the environment. Their code is loaded by
benchmarks/papers_code.py (its shims: see there); `count_calls` below wraps their f without editing it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from papers_code import call, load_papers_model  # the shared loader (same folder: on sys.path)

# their AttackGrad name -> our estimator spec (benchmarks/evaluate_bench.py PAPERS_SECONDS_PER_EXAMPLE)
ESTIMATORS = {"Munroll-6-1": "state:7:1:0.5", "real": "exact"}


def pgd(
    model: torch.nn.Module,
    data: torch.Tensor,
    target: torch.Tensor,
    attack_grad: str,
    epsilon: float,
    step_size: float,
    num_steps: int,
) -> torch.Tensor:
    """Their pgd() (lib/core/cls_function.py), step for step, on CPU."""
    model.eval()
    noise = torch.from_numpy(np.random.uniform(-epsilon, epsilon, data.shape)).float()
    x_adv = data.detach() + noise.to(data.device)  # their code: .cuda() on the noise
    with torch.enable_grad():
        for _ in range(num_steps):
            x_adv.requires_grad_()
            output = call(model, x_adv, attack_grad)[0]
            model.zero_grad()
            F.cross_entropy(output, target).backward()
            x_adv = x_adv.detach() + step_size * x_adv.grad.sign()
            x_adv = torch.min(torch.max(x_adv, data - epsilon), data + epsilon)
            x_adv = torch.clamp(x_adv, 0, 1)
    return x_adv


def deployed(model: torch.nn.Module, x: torch.Tensor, train_grad: str) -> torch.Tensor:
    """Their judging forward (validate_observe_train: AttackGrad=TrainGrad under no_grad), argmax."""
    with torch.no_grad():
        return call(model, x, train_grad)[0].argmax(1)


@contextmanager
def count_calls(model: torch.nn.Module) -> Iterator[dict[str, int]]:
    """Rows through their MDEQModule.forward (f) and through torch.autograd.grad (their backward hook)."""
    counts = {"f": 0, "vjp": 0}
    module = model.fullstage
    forward, grad = module.forward, torch.autograd.grad

    def counted_forward(x: list[torch.Tensor], injection: Any, *args: Any) -> Any:
        counts["f"] += x[0].shape[0]
        return forward(x, injection, *args)

    def counted_grad(outputs: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        first = outputs if isinstance(outputs, torch.Tensor) else outputs[0]
        counts["vjp"] += first.shape[0]
        return grad(outputs, inputs, *args, **kwargs)

    module.forward = counted_forward  # instance attribute: nn.Module.__call__ picks it up
    torch.autograd.grad = counted_grad  # their mdeq_core calls autograd.grad(...) through the module
    try:
        yield counts
    finally:
        del module.forward
        torch.autograd.grad = grad


def bare_f_seconds(model: torch.nn.Module, x: torch.Tensor, reps: int = 3) -> float:
    """One f call (their get_func's closure, no grad) at batch len(x), seconds per example."""
    with torch.no_grad():
        func, cutoffs = model.get_func(x)
        z = torch.randn(len(x), sum(c * h * w for c, h, w in cutoffs), 1)
        func(z)  # warm-up
        start = time.perf_counter()
        for _ in range(reps):
            func(z)
    return (time.perf_counter() - start) / reps / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--papers-repo", type=Path, required=True, help="checkout of their repository")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-grad", default="real", help="their TrainGrad: the deployed forward")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, cfg = load_papers_model(args.papers_repo, args.seed)
    n, batch, steps = args.n, args.batch, 10
    epsilon, step_size = 8 / 255, 2 / 255
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.cat([deployed(model, x[i : i + batch], args.train_grad) for i in range(0, n, batch)])

    print(f"MDEQ-Large (papers' code), random weights, CPU, {args.threads} threads, batch {batch}, n {n}")
    print(
        f"PGD-{steps}, eps 8/255, step 2/255, random start; forward Broyden {cfg.DEQ.F_THRES} steps, "
        f"backward {cfg.DEQ.B_THRES}; judged by AttackGrad={args.train_grad}"
    )
    print(f"bare f call, no grad, batch {batch}: {1e3 * bare_f_seconds(model, x[:batch]):.2f} ms per example")
    header = (
        "estimator",
        "AttackGrad",
        "s/example",
        "clean %",
        "robust %",
        "f/example",
        "f/step",
        "vjp/step",
    )
    print(f"{header[0]:<16}{header[1]:<14}" + "".join(f"{h:>11}" for h in header[2:]))
    for attack_grad, spec in ESTIMATORS.items():
        np.random.seed(args.seed)
        xb = x[:batch].clone().requires_grad_()
        F.cross_entropy(call(model, xb, attack_grad)[0], y[:batch]).backward()  # warm-up at the timed shape
        robust = 0
        with count_calls(model) as counts:
            attack_f = attack_vjp = 0
            start = time.perf_counter()
            for i in range(0, n, batch):
                xb, yb = x[i : i + batch], y[i : i + batch]
                before = dict(counts)
                x_adv = pgd(model, xb, yb, attack_grad, epsilon, step_size, steps)
                attack_f += counts["f"] - before["f"]
                attack_vjp += counts["vjp"] - before["vjp"]
                robust += int((deployed(model, x_adv, args.train_grad) == yb).sum())
            per_example = (time.perf_counter() - start) / n
        print(
            f"{spec:<16}{attack_grad:<14}{per_example:>11.3f}{100.0:>11.1f}{100.0 * robust / n:>11.1f}"
            f"{counts['f'] / n:>11.0f}{attack_f / n / steps:>11.1f}{attack_vjp / n / steps:>11.1f}"
        )
    print(
        "clean % is 100 by construction: labels = the clean deployed predictions; s/example and f/example "
        "include the one judging forward after the attack; f/step and vjp/step are the attack's alone"
    )


if __name__ == "__main__":
    main()
