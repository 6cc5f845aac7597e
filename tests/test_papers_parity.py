"""Parity with the papers' own code on identical weights and inputs (issue #13; docs/fidelity.md).

Golden data made by scripts/make_papers_fixture.py from the papers' repositories (not needed here): a
small MDEQ in their checkpoint layout, loaded through bench's registry loader, and their float64 outputs
on two batches whose rows' own lowest-residual Broyden steps partly differ from the batch-wide ones. With
DeployConfig.batching = "papers" everything matches to 1e-10 (absolute for logits, relative for gradients);
per example it matches on the rows where the per-example and batch-wide picks coincide and differs on
the others.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import make_papers_fixture as papers  # the fixture script's "our side" (no papers' code imported)

from bench.deq.view import AttackView
from bench.errors import BenchError
from models.deq import DeployConfig

FIXTURE = Path(__file__).resolve().parent / "fixtures" / papers.FIXTURE
TOL = 1e-10  # absolute for logits, relative to the largest absolute value for gradients (`rel_error`)
STATE_GRADS = tuple(f"grad/{name}" for name in papers.ESTIMATORS if name not in ("unroll", "real"))


def _golden() -> list[dict[str, torch.Tensor]]:
    with safe_open(str(FIXTURE), "pt") as fh:
        meta = fh.metadata()
        tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 - safe_open has no iteration
    assert json.loads(meta["estimators"]) == papers.ESTIMATORS
    assert json.loads(meta["config"]) == papers.SMALL_CONFIG
    prefixes = [f"{b}/" for b in range(int(meta["batches"]))]
    return [{k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)} for p in prefixes]


@pytest.fixture(scope="module")
def model():
    """The fixture's checkpoint (their layout) through bench's registry loader, in float64."""
    with papers.float64():
        checkpoint = FIXTURE.parent / papers.CHECKPOINT
        model = papers.bench_model("papers-mdeq-small", papers.SMALL_CONFIG, checkpoint)
    assert next(model.parameters()).dtype == torch.float64
    return model


@pytest.fixture(scope="module")
def runs(model) -> list[tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]]:
    """Per batch: their outputs, and ours under each batching."""
    out = []
    for golden in _golden():
        x, y = golden.pop("x"), golden.pop("y")
        out.append((golden, {mode: papers.ours(model, x, y, mode) for mode in papers.BATCHINGS}))
    return out


def _by_batch_dim(key: str, t: torch.Tensor) -> torch.Tensor:
    """Examples first: (states, B, classes) -> (B, states, classes)."""
    return t.transpose(0, 1) if key in ("states", "defended") else t


def rel_error(key: str, mine: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """(B,) max abs difference per example, relative to the quantity's largest value in the batch when
    that is below 1 (gradients, ~1e-5 here), absolute otherwise (logits, ~43 here)."""
    diff = _by_batch_dim(key, (mine - want).abs())
    return diff.flatten(1).amax(dim=1) / want.abs().max().clamp(max=1.0)


def test_papers_batching_matches_their_code(runs):
    for golden, ours in runs:
        for key, want in golden.items():
            err = rel_error(key, ours["papers"][key], want)
            assert float(err.max()) < TOL, (key, err.tolist())
        for pick in ("forward_pick", "backward_pick"):  # one step for the whole batch, as theirs
            assert (ours["papers"][pick] == ours["papers"][pick][0]).all()


def test_per_example_matches_their_code_where_the_picks_coincide(runs):
    checked = dict.fromkeys(("fz", "grad/real", "defended"), 0)
    for golden, ours in runs:
        forward = papers.coinciding_rows(ours, "forward_pick")
        rows = {key: torch.ones_like(forward) for key in ("states", *STATE_GRADS)}  # no pick involved
        rows |= {key: forward for key in ("fz", "unroll", "grad/unroll")}
        rows["grad/real"] = papers.coinciding_rows(ours, "forward_pick", "backward_pick")
        rows["defended"] = papers.coinciding_rows(ours, "defense_picks")
        assert set(rows) == set(golden)
        for key, want in golden.items():
            err = rel_error(key, ours["per-example"][key], want)[rows[key]]
            assert bool((err < TOL).all()), (key, err.tolist())
        for key in checked:
            checked[key] += int(rows[key].sum())
    assert all(checked.values()), checked  # the fixture holds rows of each kind


def test_per_example_differs_from_their_code_on_the_crafted_rows(runs):
    """Where a row's own lowest-residual step is not the batch's, per-example results are not theirs."""
    differing = dict.fromkeys(("fz", "unroll", "grad/real", "defended"), 0)
    for golden, ours in runs:
        forward = ~papers.coinciding_rows(ours, "forward_pick")
        rows = {
            "fz": forward,
            "unroll": forward,
            "grad/real": ~papers.coinciding_rows(ours, "forward_pick", "backward_pick"),
            "defended": ~papers.coinciding_rows(ours, "defense_picks"),
        }
        for key, mask in rows.items():
            err = rel_error(key, ours["per-example"][key], golden[key])[mask]
            assert bool((err > 1e-4).all()), (key, err.tolist())
            differing[key] += int(mask.sum())
    assert all(differing.values()), differing


@pytest.mark.parametrize(
    ("deploy", "estimator", "theirs"), [("fz", "exact", "real"), ("unroll", "unroll:9:0.5", "unroll")]
)
def test_attack_view_reproduces_their_pgd_gradient_where_the_deployed_value_is_the_estimator_s(
    model, deploy, estimator, theirs
):
    """AttackView takes CE on the deployed value (docs/fidelity.md); when that value is the estimator's own
    logits (a real-trained model attacked with `exact`, an unroll-trained one with `unroll:9:0.5`), its
    gradient is their pgd()'s, and model(x) is their deployed prediction."""
    refine = {"refine_steps": 0} if deploy == "fz" else {}
    for golden in _golden():
        x, y = golden["x"], golden["y"]
        with papers.batching(model, "papers", **refine):
            assert float((model(x) - golden[deploy]).abs().max()) < TOL
            xg = x.clone().requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(AttackView(model, "final", estimator)(xg), y)
            (grad,) = torch.autograd.grad(loss, xg)
        assert float(rel_error("grad", grad, golden[f"grad/{theirs}"]).max()) < TOL


def test_batching_is_validated_and_kept_out_of_default_records():
    with pytest.raises(BenchError, match="batching must be 'per-example' or 'papers'"):
        DeployConfig(batching="batch")
    assert "batching" not in DeployConfig().to_dict()  # run ids of existing records stay as they were
    assert DeployConfig(batching="papers").to_dict()["batching"] == "papers"
    assert DeployConfig(batching="papers").per_example is False
