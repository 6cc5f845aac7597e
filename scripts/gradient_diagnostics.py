"""Symptoms of gradient obfuscation in a DEQ: forward and exact-adjoint convergence, gradient agreement.

The NeurIPS 2022 paper explains the ready-made overestimate by a forward solve that stops far from the
fixed point while the exact gradient assumes it reached one. This prints, on the first N test images:
the relative residual of z* (deployed budget and 30 steps), the residual of the exact backward solve, the
cosine between the exact x-gradient and other estimators', and how much one FGSM step of 0.02 along each
gradient raises the deployed loss. Numbers from it back checkpoints/README.md (deq-tiny-exact).

    python scripts/gradient_diagnostics.py deq-tiny-exact [--checkpoint FILE] [--n 100]
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.data import load_dataset
from bench.deq.estimators import ExactImplicit, parse_estimator
from bench.deq.view import AttackView
from bench.registry import load_model


def gradient(model: Any, estimator: str, x: Tensor, y: Tensor, overrides: dict | None = None) -> tuple:
    """(flattened x-gradient of the summed CE, the view, the estimator) through AttackView."""
    est = parse_estimator(estimator)
    view = AttackView(model, "final", est, overrides)
    xx = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(view(xx), y, reduction="sum"), xx)
    return g.flatten(1), view, est


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--n", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model(args.model, checkpoint=args.checkpoint).model
    data = load_dataset("fashion-mnist", "test", None, n_examples=args.n)
    x, y = data.x, data.y
    steps = model.deploy.max_iter

    g_exact, view, est = gradient(model, "exact", x, y)
    assert isinstance(est, ExactImplicit) and est.last_backward is not None and view.last_trajectory
    fw = view.last_trajectory.residual("rel")
    bw = est.last_backward.residual("rel")
    print(f"{args.model}, n {len(y)}: forward {steps} steps, rel residual of z* median {fw.median():.4f}")
    share = float((bw > 0.1).float().mean())
    print(f"  exact backward (Broyden 7) rel residual median {bw.median():.4f}, share > 0.1: {share:.2f}")
    _, view30, _ = gradient(model, "exact", x, y, {"max_iter": 30})
    assert view30.last_trajectory is not None
    print(
        f"  forward with 30 steps: rel residual median {view30.last_trajectory.residual('rel').median():.4f}"
    )
    others = ["exact:30:1e-06", "unroll:9:0.5", f"state:{steps}:1:1", "state:1:1:1", f"adjoint:{steps}"]
    for other in others:
        cos = F.cosine_similarity(g_exact, gradient(model, other, x, y)[0], dim=1)
        print(f"  cos(exact, {other}) median {cos.median():.3f} mean {cos.mean():.3f}")
    with torch.no_grad():
        base = F.cross_entropy(model(x), y, reduction="none")
    for name in ["exact", f"state:{steps}:1:1", "unroll:9:0.5"]:
        g = gradient(model, name, x, y)[0]
        with torch.no_grad():
            stepped = F.cross_entropy(
                model((x + 0.02 * g.view_as(x).sign()).clamp(0, 1)), y, reduction="none"
            )
        print(f"  FGSM 0.02 along {name}: deployed loss increase mean {float((stepped - base).mean()):.4f}")


if __name__ == "__main__":
    main()
