"""A user's own model by import path: the docs example end to end, the registry's `import` entries, every
failure mode as one `error:` line, and a torchdeq-built DEQ through the adapter (bench/user_models.py,
models/torchdeq_adapter.py, docs/own-model.md)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bench.errors import BenchError

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--suite", "quick", "--n-examples", "3", "--batch-size", "3", "--n-dev", "3", "--attacks", "pgd:2"]
# the console script: no current directory on sys.path (-P), so the import of the user's file is ours
CONSOLE = "import sys; from bench.cli import main; sys.argv[0] = 'bench'; main()"


def docs_example() -> str:
    """The first python block of docs/own-model.md: the user's file `my_models.py`."""
    text = (ROOT / "docs" / "own-model.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def _bench(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-P", "-c", CONSOLE, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def _record(results: Path) -> dict:
    records = list(results.glob("*.json"))
    assert len(records) == 1, records
    return json.loads(records[0].read_text())


def test_docs_example_runs_through_the_command_line(tmp_path):
    """The docs' DEQ and CNN, named by import path, evaluated by the console script from their directory."""
    (tmp_path / "my_models.py").write_text(docs_example())
    for model, extra in (
        ("my_models:small_deq", []),
        ("my_models:small_cnn", ["--dataset", "fashion-mnist"]),
    ):
        results = tmp_path / model.replace(":", "_")
        proc = _bench(tmp_path, "evaluate", "--model", model, *extra, *QUICK, "--results-dir", str(results))
        assert proc.returncode == 0, proc.stderr
        doc = _record(results)
        source = doc["spec"]["user_model"]
        assert source["import"] == model and source["factory_args"] == {}
        assert re.fullmatch(r"[0-9a-f]{64}", source["weights_sha256"])
        assert doc["spec"]["model"] == model and doc["spec"]["dataset"] == "fashion-mnist"
        summary = doc["results"]["summary"]["readouts"]["final"]
        if model.endswith("deq"):
            assert source["kind"] == "deq" and doc["spec"]["deploy"]["solver"] == "anderson"
            assert set(doc["results"]["selection"]["white-box"]["final"]) <= {
                "state:4:1:1",
                "state:8:1:1",
                "exact",
                "adjoint:8",
            }
            assert "clean_solver" in doc["results"]["columns"]  # solved by bench.deq, not a plain forward
        else:
            assert source["kind"] == "cnn" and doc["spec"]["deploy"] is None
        assert summary["all_acc"] <= summary["clean_acc"]


def _state_estimator_run(model: str, root: Path, **extra: object):
    """An in-process quick run on 3 examples with the state:2:1:1 estimator (no sweep)."""
    from bench.spec import EvalConfig

    return EvalConfig(
        model=model,
        n_examples=3,
        batch_size=3,
        attacks=["pgd:2"],
        grads=["state:2:1:1"],
        results_dir=str(root / "results"),
        quiet=True,
        device="cpu",
        **extra,
    )


def test_a_duck_typed_deq_gets_readouts_and_the_defense(tmp_path, monkeypatch):
    """The docs' DEQ (no deq-bench import) is attacked through a state estimator, on every kind of
    readout, under input entropy reduction in all three attack modes."""
    from bench.evaluate import evaluate
    from bench.user_models import allow_import

    (tmp_path / "my_models.py").write_text(docs_example())
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    allow_import("my_models:small_deq")
    cfg = _state_estimator_run(
        "my_models:small_deq",
        tmp_path,
        readouts=["final", "state:2", "ensemble-logit"],
        defense="entropy-reduction:stages=1,steps=1",
    )
    try:
        doc, _, _ = evaluate(*cfg.parse())
    finally:
        sys.modules.pop("my_models", None)
    assert doc is not None
    estimators = {c["estimator"] for c in doc["results"]["columns"]["attacks"]}
    assert estimators == {"transfer@state:2:1:1", "bpda@state:2:1:1", "adaptive@bptt"}
    assert set(doc["results"]["summary"]["readouts"]) == {"final", "state:2", "ensemble-logit"}


# ----- failure modes: one error line, exit 2, no record -------------------------------------------

BAD = textwrap.dedent(
    """
    import torch
    from torch import nn

    raise_on_import = False

    class Cnn(nn.Module):
        def __init__(self, in_ch=1, classes=10):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(in_ch, 4, 3), nn.Linear(4, classes)
        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    class Deq(nn.Module):
        deploy = {"solver": "fixed_point", "max_iter": 3}
        def __init__(self, shrink=False, classes=10, flat=True):
            super().__init__()
            self.shrink, self.flat, self.fc = shrink, flat, nn.Linear(784, classes)
        def inject(self, x):
            return x.flatten(1)
        def init_state(self, u):
            return torch.zeros_like(u) if self.flat else torch.zeros(u.shape[0], 1, 28, 28)
        def f(self, z, u):
            return torch.tanh(z + u)[:, : (392 if self.shrink else None)]
        def head(self, z):
            return self.fc(z)

    class NoHead(nn.Module):
        deploy = {"max_iter": 3}
        def inject(self, x): return x
        def init_state(self, u): return u.flatten(1)
        def f(self, z, u): return z

    def wrong_input(): return Cnn(in_ch=3)
    def wrong_output(): return Cnn(classes=5)
    def not_a_module(): return {"weights": 1}
    def f_changes_shape(): return Deq(shrink=True)
    def head_wrong_classes(): return Deq(classes=7)
    def state_not_flat(): return Deq(flat=False)
    def lacks_head(): return NoHead()
    def raises(): raise RuntimeError("no weights here")
    def good(): return Cnn()
    def bad_deploy(): d = Deq(); d.deploy = {"solvr": "anderson"}; return d
    """
)

FAILURES = [
    ("not_there:factory", "cannot import 'not_there'"),
    (
        "broken_module:factory",
        "importing 'broken_module' for model broken_module:factory failed: SyntaxError",
    ),
    ("bad_models:missing", "has no 'missing'"),
    ("bad_models:raise_on_import", "is a bool, not a factory"),
    ("bad_models:raises", "factory bad_models:raises failed: RuntimeError: no weights here"),
    ("bad_models:not_a_module", "returned a dict, not a torch.nn.Module"),
    ("bad_models:wrong_input", "fails: RuntimeError"),
    ("bad_models:wrong_output", "the output has shape (2, 5), expected (2, 10)"),
    ("bad_models:f_changes_shape", "f changes the state shape from (2, 784) to (2, 392)"),
    ("bad_models:head_wrong_classes", "head returns (2, 7), expected (2, 10)"),
    ("bad_models:state_not_flat", "init_state must return (batch, D), got (2, 1, 28, 28)"),
    ("bad_models:lacks_head", "claims the DEQ protocol (it has deploy) but lacks head"),
    ("bad_models:bad_deploy", "bad deploy settings"),
]


@pytest.fixture
def bad_dir(tmp_path, monkeypatch):
    (tmp_path / "bad_models.py").write_text(BAD)
    (tmp_path / "broken_module.py").write_text("def factory(:\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield tmp_path
    for name in ("bad_models", "broken_module"):
        sys.modules.pop(name, None)


def _main(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    from bench.cli import main

    monkeypatch.setattr(sys, "argv", ["bench", *argv])
    with pytest.raises(SystemExit) as exc:
        main()
    return int(exc.value.code), capsys.readouterr().err


@pytest.mark.parametrize(("model", "message"), FAILURES, ids=[m.replace(":", "-") for m, _ in FAILURES])
def test_each_failure_is_one_error_line(bad_dir, monkeypatch, capsys, model, message):
    results = bad_dir / "results"
    args = ["evaluate", "--model", model, "--dataset", "fashion-mnist", *QUICK, "--results-dir", str(results)]
    code, err = _main(args, monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err
    assert not results.exists() or not any(results.rglob("*.json"))


def test_a_factory_without_a_data_set_asks_for_one(bad_dir, monkeypatch, capsys):
    code, err = _main(["evaluate", "--model", "bad_models:good", *QUICK], monkeypatch, capsys)
    assert code == 2 and err.startswith("error: ") and "--dataset NAME" in err, err


def test_import_paths_are_imported_only_when_named_on_the_command_line(bad_dir, monkeypatch):
    """A record or expected-results file naming an import path (bench check, leaderboard) imports nothing."""
    from bench import user_models
    from bench.registry import get_entry, load_model

    monkeypatch.setattr(user_models, "_allowed", set())
    sys.modules.pop("bad_models", None)

    with pytest.raises(BenchError, match="imports code only when it is named on the command line"):
        load_model("bad_models:wrong_output", dataset="fashion-mnist")
    with pytest.raises(BenchError, match="unknown model"):
        get_entry("bad_models:wrong_output")
    assert "bad_models" not in sys.modules


# ----- registry entries with `import` --------------------------------------------------------------


def test_registry_import_entry_passes_factory_arguments(bad_dir, monkeypatch):
    from bench.checkpoints import save_safetensors
    from bench.registry import get_entry, load_model, registry
    from bench.user_models import weights_sha256

    (bad_dir / "my_models.py").write_text(docs_example())
    (bad_dir / "reg.toml").write_text(
        '[my-deq]\nimport = "my_models:SmallDEQ"\ndataset = "fashion-mnist"\n'
        "[my-deq.config]\nwidth = 4\n[my-deq.deploy]\nmax_iter = 5\n"
    )
    monkeypatch.setenv("DEQ_BENCH_EXTRA_REGISTRY", str(bad_dir / "reg.toml"))
    registry.cache_clear()
    try:
        entry = get_entry("my-deq")
        assert (entry.family, entry.input_shape, entry.eps, entry.import_path) == (
            "user",
            (1, 28, 28),
            "0.1",
            "my_models:SmallDEQ",
        )
        loaded = load_model("my-deq")
        assert loaded.entry.family == "deq" and loaded.model.deploy.max_iter == 5
        assert loaded.model.deploy.solver == "anderson"  # the model's own setting, kept
        assert loaded.user_model["factory_args"] == {"width": 4}
        assert loaded.entry.parameters == sum(p.numel() for p in loaded.model.parameters())
        # --checkpoint loads strictly into the user's module; the record hashes the weights evaluated
        state = {k: torch.full_like(v, 0.01) for k, v in loaded.model.inner.state_dict().items()}
        save_safetensors(bad_dir / "w.safetensors", state, {})
        again = load_model("my-deq", bad_dir / "w.safetensors")
        assert again.checkpoint_sha256 is not None
        assert again.user_model["weights_sha256"] == weights_sha256(again.model.inner)
        assert again.user_model["weights_sha256"] != loaded.user_model["weights_sha256"]
    finally:
        monkeypatch.delenv("DEQ_BENCH_EXTRA_REGISTRY")
        registry.cache_clear()
        sys.modules.pop("my_models", None)


# ----- torchdeq ------------------------------------------------------------------------------------

TORCHDEQ_MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torchdeq import get_deq

    from models.torchdeq_adapter import TorchDEQAdapter

    class Net(nn.Module):
        def __init__(self, solver="fixed_point_iter", max_iter=5, tol=1e-3):
            super().__init__()
            self.inj = nn.Conv2d(1, 4, 3, stride=2, padding=1)
            self.conv, self.norm = nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4)
            self.fc = nn.Linear(4, 10)
            self.deq = get_deq(f_solver=solver, f_max_iter=max_iter, f_tol=tol, f_stop_mode="rel", grad=2)

        def cell(self, z, u):
            return torch.tanh(0.5 * self.norm(self.conv(z) + u))

        def readout(self, z):
            return self.fc(z.mean((2, 3)))

        def forward(self, x):
            u = self.inj(x)
            z_out, _ = self.deq(lambda z: self.cell(z, u), torch.zeros_like(u))
            return self.readout(z_out[-1])

    def adapted(solver="fixed_point_iter"):
        torch.manual_seed(0)
        net = Net(solver)
        return TorchDEQAdapter(net, inject=net.inj, f=net.cell, head=net.readout)

    adapted.dataset = "fashion-mnist"
    """
)


@pytest.fixture
def torchdeq_dir(tmp_path, monkeypatch):
    pytest.importorskip("torchdeq")
    (tmp_path / "tdq_models.py").write_text(TORCHDEQ_MODEL)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("tdq_models", None)


def test_torchdeq_adapter_matches_torchdeq_and_is_attacked_through_a_state_estimator(torchdeq_dir):
    from bench.data import load_dataset
    from bench.deq.view import AttackView
    from bench.evaluate import evaluate
    from bench.user_models import allow_import

    allow_import("tdq_models:adapted")
    import tdq_models

    x = load_dataset("fashion-mnist", "test", None, False, 6).x
    for solver in ("fixed_point_iter", "anderson"):
        model = tdq_models.adapted(solver).eval()
        assert model.deploy.max_iter == 4 and model.deploy.refine_apply_f  # K = 5 f-evaluations
        parity = model.check_forward(x)
        assert parity["max_abs_diff"] < 1e-6 and parity["agreement"] == 1.0, parity
        # the check can fail: one more solver state (an off-by-one in the mapping) is visible
        model.deploy = dataclasses.replace(model.deploy, max_iter=5)
        assert model.check_forward(x)["max_abs_diff"] > 1e-3
    from bench.user_models import check_model

    with pytest.raises(BenchError, match="differs from torchdeq's own forward by"):  # refused at load
        check_model(model, "tdq_models:adapted", "fashion-mnist", (1, 28, 28))
    assert model.training_grad == "unroll:1:1"
    assert model.state_layout == [(4, 14, 14)]

    # torchdeq's eval forward gives no input gradient; the adapter's state estimator does
    ref = tdq_models.adapted().eval()
    x_ref = x[:2].clone().requires_grad_(True)
    ref.inner(x_ref).sum().backward()
    assert x_ref.grad is None
    assert set(ref.state_dict()) == {f"inner.{k}" for k in ref.inner.state_dict()}
    view = AttackView(ref, readout="final", estimator="state:2:1:1")
    xg = x[:2].clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(view(xg), torch.tensor([0, 1])).backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0

    doc, _, _ = evaluate(*_state_estimator_run("tdq_models:adapted", torchdeq_dir).parse())
    assert doc is not None
    source = doc["spec"]["user_model"]
    assert source["kind"] == "torchdeq" and source["forward_check"]["max_abs_diff"] < 1e-6
    assert doc["results"]["selection"]["white-box"]["final"] == ["state:2:1:1"]
    with torch.no_grad():
        torchdeq_pred = ref.reference_logits(x[:3]).argmax(1).tolist()
    assert doc["results"]["columns"]["clean"]["final"]["pred"] == torchdeq_pred
    assert doc["spec"]["deploy"]["solver"] == "fixed_point" and doc["spec"]["deploy"]["max_iter"] == 4


def test_a_raw_torchdeq_model_is_pointed_at_the_adapter(torchdeq_dir):
    import tdq_models

    from bench.user_models import as_evaluable

    with pytest.raises(BenchError, match="TorchDEQAdapter"):
        as_evaluable(tdq_models.Net(), "tdq_models:Net")


def test_torchdeq_adapter_flattens_a_list_state(torchdeq_dir):
    """A multiscale state (a list of tensors, torchdeq's MDEQ style) is one flat (B, D) state here."""
    from torchdeq import get_deq

    from models.torchdeq_adapter import TorchDEQAdapter

    class TwoScale(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = (
                torch.nn.Conv2d(1, 2, 3, padding=1),
                torch.nn.Conv2d(1, 3, 3, stride=2, padding=1),
            )
            self.fc = torch.nn.Linear(5, 10)
            self.deq = get_deq(f_solver="fixed_point_iter", f_max_iter=4, f_tol=0.0)

        def inject(self, x):
            return [self.a(x), self.b(x)]

        def cell(self, z, u):
            z1, z2 = z
            return [torch.tanh(0.5 * z1 + u[0]), torch.tanh(0.5 * z2 + u[1] + z1[:, :1, ::2, ::2])]

        def head(self, z):
            return self.fc(torch.cat([z[0].mean((2, 3)), z[1].mean((2, 3))], 1))

        def forward(self, x):
            u = self.inject(x)
            z_out, _ = self.deq(lambda *z: self.cell(list(z), u), [torch.zeros_like(p) for p in u])
            return self.head(z_out[-1])

    torch.manual_seed(0)
    net = TwoScale().eval()
    model = TorchDEQAdapter(
        net, inject=net.inject, f=net.cell, head=net.head, init=lambda u: [torch.zeros_like(p) for p in u]
    ).eval()
    x = torch.rand(3, 1, 8, 8)
    parity = model.check_forward(x)
    assert parity["max_abs_diff"] < 1e-6, parity
    assert model.state_layout == [(2, 8, 8), (3, 4, 4)]
    z0 = model.init_state(model.inject(x))
    assert z0.shape == (3, 2 * 64 + 3 * 16)
