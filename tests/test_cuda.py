"""The GPU path (marker `cuda`; skipped without a CUDA device; benchmarks/gpu_check.sh runs them on a lent
GPU): the engine's tensors follow the model's device, and CUDA results agree with the CPU's."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _micro_deq():
    """The trained micro MDEQ of the test registry (the `micro` fixture registers it)."""
    from bench.registry import load_model

    return load_model("deq-micro").model.eval()


@pytest.mark.parametrize("estimator", ["exact", "state:2:1:1", "unroll:1:0.5", "adjoint:2"])
def test_attack_view_on_cuda_matches_cpu(micro, estimator):
    from bench.deq.view import AttackView

    model = _micro_deq()
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    grads = {}
    outs = {}
    for device in ("cpu", "cuda"):
        view = AttackView(model.to(device), "final", estimator)
        xd = x.to(device).requires_grad_(True)
        out = view(xd)
        out.sum().backward()
        assert out.device.type == device and torch.isfinite(xd.grad).all()
        outs[device], grads[device] = out.detach().cpu(), xd.grad.cpu()
    assert torch.allclose(outs["cuda"], outs["cpu"], rtol=1e-4, atol=1e-4)
    assert torch.allclose(grads["cuda"], grads["cpu"], rtol=1e-3, atol=1e-4)


def test_cuda_solve_is_batch_independent_to_the_documented_tolerance(micro):
    from bench.deq.readouts import deployed_logits

    model = _micro_deq().cuda()
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(2)).cuda()
    full = deployed_logits(model, x)
    for i in range(5):
        alone = deployed_logits(model, x[i : i + 1])
        assert (alone - full[i : i + 1]).abs().max() <= 1e-6 * full[i].abs().max() + 1e-6


def test_pgd_on_cuda_claims_only_what_the_deployed_prediction_confirms(micro):
    from bench.attacks.orchestrator import run_attacks
    from bench.attacks.pgd import PGD
    from bench.deq.view import AttackView

    model = _micro_deq().cuda()
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad():
        y = model(x).argmax(1)
    for loss_on in ("deployed", "estimator"):
        view = AttackView(model, "final", "state:2:1:1")
        attack = PGD(0.1, steps=3, loss_on=loss_on)
        res = run_attacks(view, x, y, [attack], torch.arange(8), checks=False).results[attack.name]
        assert not res.warnings and res.x_adv.device.type == "cuda"


def test_quick_evaluation_runs_on_cuda(micro, tmp_path):
    from bench.evaluate import evaluate
    from bench.spec import EvalConfig

    cfg = EvalConfig(
        model="deq-micro",
        n_examples=4,
        batch_size=4,
        n_dev=4,
        results_dir=str(tmp_path),
        quiet=True,
        device="cuda",
        suite="quick",
    )
    doc, _, _ = evaluate(*cfg.parse())
    assert doc["results"]["columns"]["attacks"]
