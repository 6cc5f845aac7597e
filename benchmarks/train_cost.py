"""What training a papers' DEQ with `bench train --preset paper-deq-large` (or -xl) costs, from f's FLOPs.

No GPU was available to time it, so the estimate counts work: the FLOPs of one f (torch's FlopCounterMode
on the built model, per example) times the f-evaluations the recipe spends per example, per epoch:

    PGD-10 adversarial training: 10 attack steps + 1 training step, each a forward solve (max_iter
    Broyden f's, no grad), f(z*) and K unroll steps with grad (K+1 f's), and their backward (~2x forward)
    -> 11 * (max_iter + 3 (K+1)) f-evaluations per example per epoch; the Jacobian penalty (2% of the
    iterations) and the clean pretraining of the unroll are a few percent and left out.

GPU-hours are that FLOP count divided by a sustained throughput (default 10 TFLOP/s, fp32 convolutions on
a V100/A100-class GPU); the printed numbers scale inversely with it.

    .venv/bin/python benchmarks/train_cost.py [--model deq-large] [--tflops 10]
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.registry import build_architecture, get_entry
from bench.train_recipes import PRESETS


def f_flops(model_name: str) -> float:
    """FLOPs of one f application per example (batch 4, eval mode)."""
    torch.manual_seed(0)
    model = build_architecture(get_entry(model_name)).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        u = model.inject(x)
        z = model.f(model.init_state(u), u)
        with FlopCounterMode(display=False) as counter:
            model.f(z, u)
    return counter.get_total_flops() / 4


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="deq-large", choices=["deq-large", "deq-xl"])
    parser.add_argument("--tflops", type=float, default=10.0, help="sustained GPU throughput, TFLOP/s")
    args = parser.parse_args()
    recipe = PRESETS[f"paper-{args.model}"]
    max_iter = get_entry(args.model).deploy.get("max_iter", 8)
    unroll = int(str(recipe["grad"]).split(":")[1])
    per_example_epoch = (recipe["attack_steps"] + 1) * (max_iter + 3 * (unroll + 1))
    examples = 50_000 * recipe["epochs"]
    flops = f_flops(args.model)
    total = flops * per_example_epoch * examples
    hours = total / (args.tflops * 1e12) / 3600
    print(f"{args.model}: one f = {flops / 1e9:.3f} GFLOP per example")
    print(f"f-evaluations per example per epoch: {per_example_epoch} (PGD-{recipe['attack_steps']} AT)")
    print(f"{recipe['epochs']} epochs x 50,000 examples: {per_example_epoch * examples:.3g} f-evaluations")
    print(f"total {total:.3g} FLOP: about {hours:.0f} GPU-hours at a sustained {args.tflops:g} TFLOP/s")


if __name__ == "__main__":
    main()
