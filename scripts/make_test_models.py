"""Train the two micro models the end-to-end tests attack (tests/fixtures/*.safetensors).

Random weights make a useless test subject (a random MDEQ predicts one class, so no attack has anything to
break). These are trained for a few hundred clean steps on the built-in Fashion-MNIST subset: accurate
enough that attacks break some examples and not others. Deterministic: re-running gives the same files.

    .venv/bin/python scripts/make_test_models.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from micro_models import CNN_CONFIG, DEQ_CONFIG, DEQ_DEPLOY  # noqa: E402

from bench.checkpoints import save_safetensors  # noqa: E402
from bench.data import load_dataset  # noqa: E402
from bench.deq.estimators import parse_estimator  # noqa: E402
from bench.deq.protocol import DeployConfig  # noqa: E402
from bench.deq.readouts import solve_model  # noqa: E402
from bench.deq.solvers import SolverSettings  # noqa: E402
from models.factory import build_architecture  # noqa: E402


def train(model: torch.nn.Module, logits_fn, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = F.cross_entropy(logits_fn(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    data = load_dataset("fashion-mnist-builtin")
    x, y = data.x[:800], data.y[:800]  # the tests report examples from the start and develop on the end

    deq = build_architecture("mdeq", DEQ_CONFIG)
    deq.deploy = DeployConfig(**DEQ_DEPLOY)
    settings = SolverSettings.from_deploy(deq.deploy)
    estimator = parse_estimator(f"unroll:{deq.deploy.refine_steps}:{deq.deploy.refine_lambda}")

    def deq_logits(batch: torch.Tensor) -> torch.Tensor:
        deq.begin_forward(batch.shape[0])
        with torch.no_grad():
            traj = solve_model(deq, deq.inject(batch), settings, keep=())
        return estimator.surrogate(deq, deq.inject(batch), traj)

    cnn = build_architecture("tiny-cnn", CNN_CONFIG)
    out = ROOT / "tests" / "fixtures"
    report = {}
    for name, model, fn, steps in (("deq-micro", deq, deq_logits, 300), ("cnn-micro", cnn, cnn, 300)):
        last = train(model, fn, x, y, steps)
        with torch.no_grad():
            acc = (model(data.x[800:]).argmax(1) == data.y[800:]).float().mean().item()
        sha = save_safetensors(out / f"{name}.safetensors", model.state_dict(), {"purpose": "tests only"})
        report[name] = {"last_loss": round(last, 4), "held_out_acc": round(acc, 4), "sha256": sha}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
