"""bench train: exact resume, random intermediate states, the attacks' losses, metadata, argument errors."""

from __future__ import annotations

import json

import pytest
import torch
from deq_toys import DTYPE, linear_toy

import bench.train as train_mod
from bench.checkpoints import load_into, load_state_dict
from bench.cli.train import train_command
from bench.deq.estimators import Unroll
from bench.deq.readouts import solve_model
from bench.deq.solvers import SolverSettings
from bench.deq.trajectory import Trajectory
from bench.errors import BenchError
from bench.train import (
    ModelForward,
    TrainConfig,
    augment,
    build_model,
    config_with,
    export_from_state,
    jacobian_penalty,
    train,
    training_loss,
)

TEST_DEPLOY = {"max_iter": 3, "refine_steps": 1, "train_unroll_steps": 1}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest, and spares the cores other jobs share."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _synthetic(n: int, shape: tuple[int, int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class is the brightest of 10 horizontal bands: learnable by a tiny net in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=gen)
    x = 0.3 * torch.rand(n, *shape, generator=gen)
    rows = torch.arange(shape[1])
    band = (rows[None, :] * 10 // shape[1]) == y[:, None]  # (n, H)
    x = x + 0.6 * band[:, None, :, None].float()
    return x.clamp(0, 1), y


@pytest.fixture
def fake_data(monkeypatch: pytest.MonkeyPatch):
    """Training data without files: 3x8x8 for the MDEQ test preset, 1x28x28 otherwise."""

    def load(cfg: TrainConfig):
        shape = (3, 8, 8) if cfg.architecture == "mdeq" else (1, 28, 28)
        return _synthetic(cfg.train_subset or 48, shape)

    monkeypatch.setattr(train_mod, "load_train_data", load)


def _deq_cfg(tmp_path, **changes) -> TrainConfig:
    values = dict(
        architecture="mdeq",
        config={"preset": "test"},
        deploy=dict(TEST_DEPLOY),
        method="pgd-at",
        attack_steps=1,
        eps=0.1,
        grad="unroll:1:0.5",
        random_state=True,
        pretrain_steps=1,
        pretrain_layers=2,
        jac_prob=0.5,
        jac_weight=0.4,
        epochs=2,
        batch_size=8,
        lr=3e-3,
        train_subset=12,  # 2 batches per epoch, the last one partial
        seed=5,
        out=str(tmp_path / "model.safetensors"),
        quiet=True,
        log=str(tmp_path / "train.log"),
        log_every=1,
        checkpoint_every=100,
    )
    values.update(changes)
    return TrainConfig(**values)


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_after_stop_is_bit_identical(tmp_path, fake_data):
    whole = train(_deq_cfg(tmp_path / "a"))
    assert whole.complete and whole.steps == whole.total_steps == 4
    first = train(_deq_cfg(tmp_path / "b", stop_after_steps=3))  # stops inside epoch 2
    assert not first.complete and first.steps == 3 and first.out is None
    assert not (tmp_path / "b" / "model.safetensors").exists()
    partial = tmp_path / "partial.safetensors"
    export_from_state(_deq_cfg(tmp_path / "b"), partial)  # the fallback when time runs out
    assert load_state_dict(partial, None)[1]["steps"] == "3"
    second = train(_deq_cfg(tmp_path / "b"), resume=True)
    assert second.complete and second.steps == 4
    a, _ = load_state_dict(whole.out, None)
    b, _ = load_state_dict(second.out, None)
    _assert_same_weights(a, b)
    drop = {"seconds"}
    rows = [{k: v for k, v in r.items() if k not in drop} for r in whole.history]
    assert rows == [{k: v for k, v in r.items() if k not in drop} for r in second.history]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert whole.history[-1]["lr"] == pytest.approx(1e-6)  # the cosine schedule ends at lr_min
    log = (tmp_path / "b" / "train.log").read_text().splitlines()
    assert [line.split()[1] for line in log if line.startswith("step ")] == ["1/4", "2/4", "3/4", "4/4"]


def test_resume_after_crash_from_periodic_checkpoint(tmp_path, fake_data, monkeypatch):
    cfg = dict(architecture="tiny-cnn", config={"in_channels": 1}, deploy={}, random_state=False)
    cfg.update(method="fast-at", pretrain_steps=0, jac_prob=0.0, checkpoint_every=2, grad="exact")
    cfg.update(train_subset=24)  # 3 batches per epoch: periodic snapshots at 2 and 4, epoch ends at 3 and 6
    whole = train(_deq_cfg(tmp_path / "a", **cfg))
    calls = {"n": 0}
    real = train_mod.training_loss

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # during step 6
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "training_loss", crashing)
    with pytest.raises(KeyboardInterrupt):
        train(_deq_cfg(tmp_path / "b", **cfg))
    state = torch.load(tmp_path / "b" / "model.safetensors.state.pt", weights_only=True)
    assert state["step"] == 4  # the periodic snapshot inside epoch 2 came last
    monkeypatch.setattr(train_mod, "training_loss", real)
    resumed = train(_deq_cfg(tmp_path / "b", **cfg), resume=True)
    _assert_same_weights(load_state_dict(whole.out, None)[0], load_state_dict(resumed.out, None)[0])


def test_random_state_uses_state_k_of_each_forward(monkeypatch):
    torch.manual_seed(0)
    cfg = TrainConfig(architecture="mdeq", config={"preset": "test"}, deploy={"max_iter": 5}, out="x")
    model, *_ = build_model(cfg)
    model.eval()  # no dropout: the surrogate can be recomputed exactly
    gen = torch.Generator().manual_seed(1)
    fwd = ModelForward(model, "unroll:1:0.5", True, gen)
    consumed: list[int] = []
    real_state = Trajectory.state

    def spy(self, t):
        consumed.append(t)
        return real_state(self, t)

    monkeypatch.setattr(Trajectory, "state", spy)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    outs = [fwd(x).logits for _ in range(8)]
    used = list(consumed)
    assert used == fwd.states_used and len(used) == 8
    assert set(used) <= set(range(1, 6)) and len(set(used)) >= 3
    # the loss is the state:k:1:0.5 surrogate of the full deployed-length solve
    with torch.no_grad():
        for k, logits in zip(used, outs, strict=True):
            u = model.inject(x)
            traj = solve_model(model, u, SolverSettings.from_deploy(model.deploy), keep={k})
            expected = Unroll(1, 0.5, t=k).surrogate(model, u, traj)
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)


def test_final_state_training_never_reads_intermediate_states(monkeypatch):
    cfg = TrainConfig(architecture="mdeq", config={"preset": "test"}, deploy={"max_iter": 3}, out="x")
    model, *_ = build_model(cfg)
    fwd = ModelForward(model, "unroll:1:0.5", False, torch.Generator())
    monkeypatch.setattr(Trajectory, "state", lambda self, t: pytest.fail("state read"))
    fwd(torch.rand(2, 3, 8, 8)).logits.sum().backward()
    assert fwd.states_used == []


def test_exact_training_gradient_is_the_implicit_one():
    torch.manual_seed(0)
    cfg = TrainConfig(architecture="mdeq", config={"preset": "test"}, deploy=dict(TEST_DEPLOY), out="x")
    model, *_ = build_model(cfg)
    model.eval()
    x, y = _synthetic(4, (3, 8, 8))
    grads, values = {}, {}
    for spec in ("exact", "unroll:0:1"):  # both surrogates are head(f(z*)); only the backward differs
        model.zero_grad()
        logits = ModelForward(model, spec, False, torch.Generator())(x).logits
        torch.nn.functional.cross_entropy(logits, y).backward()
        values[spec] = logits.detach()
        grads[spec] = torch.cat(
            [p.grad.flatten() for p in model.fullstage.parameters() if p.grad is not None]
        )
    torch.testing.assert_close(values["exact"], values["unroll:0:1"])
    assert not torch.allclose(grads["exact"], grads["unroll:0:1"])


@pytest.mark.parametrize("method", ["trades", "fast-at", "pgd-at"])
def test_adversarial_losses_decrease_on_a_tiny_problem(method):
    torch.manual_seed(0)
    cfg = TrainConfig(architecture="tiny-cnn", config={"in_channels": 1}, method=method, eps=0.05, out="x")
    cfg.attack_steps = 2
    model, *_ = build_model(cfg)
    fwd = ModelForward(model, cfg.grad, False, torch.Generator())
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (64,), generator=gen)  # dark or bright images: robustly separable at eps 0.05
    x = 0.25 + 0.5 * y[:, None, None, None] + 0.1 * (torch.rand(64, 1, 28, 28, generator=gen) - 0.5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(25):
        loss, _ = training_loss(cfg, fwd, x, y, step, 0, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert model.training
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_fast_at_is_one_fgsm_step_of_1_25_eps():
    cfg = TrainConfig(architecture="tiny-cnn", method="fast-at", eps=0.08, attack_steps=10, out="x")
    assert cfg.resolved_attack_steps() == 1 and cfg.resolved_step_size() == pytest.approx(0.1)
    assert TrainConfig(eps=0.08, out="x").resolved_step_size() == pytest.approx(0.02)


def test_jacobian_penalty_estimates_frobenius_norm():
    model = linear_toy(dim=6)
    z = torch.zeros(4, 6, dtype=DTYPE)
    u = torch.rand(4, 6, dtype=DTYPE)
    est = jacobian_penalty(model, z, u, torch.Generator().manual_seed(0), probes=1000)
    exact = float((model.W.detach() ** 2).sum()) / 6  # ||W||_F^2 per state dimension
    assert float(est.detach()) == pytest.approx(exact, rel=0.1)
    est.backward()
    assert model.W.grad is not None and model.W.grad.abs().sum() > 0


def test_safetensors_has_recipe_and_loads(tmp_path, fake_data):
    result = train(_deq_cfg(tmp_path, epochs=1, random_state=False, method="pgd-at"))
    weights, meta = load_state_dict(result.out, None)
    recipe = json.loads(meta["recipe"])
    assert recipe["method"] == "pgd-at" and recipe["grad"] == "unroll:1:0.5" and recipe["eps"] == 0.1
    assert recipe["epochs"] == 1 and recipe["train_subset"] == 12 and recipe["jac_weight"] == 0.4
    assert meta["trained_by"] == "deq-bench bench train" and meta["dataset"] == "fashion-mnist"
    assert meta["model"] == "mdeq" and len(meta["created"]) == 10
    assert json.loads(meta["attack"]) == {"method": "pgd-at", "steps": 1, "step_size": 0.025}
    assert json.loads(meta["deploy"])["max_iter"] == 3 and json.loads(meta["config"]) == {"preset": "test"}
    fresh, *_ = build_model(_deq_cfg(tmp_path))
    load_into(fresh, weights)
    assert result.sha256 and len(result.sha256) == 64


def test_validation_and_cnn_training_on_builtin_test_images(tmp_path, fake_data):
    cfg = _deq_cfg(tmp_path, architecture="tiny-cnn", config={"in_channels": 1}, deploy={}, grad="exact")
    cfg.random_state, cfg.method, cfg.epochs, cfg.val_examples, cfg.val_pgd_steps = False, "pgd-at", 1, 20, 2
    result = train(cfg)
    (val,) = result.validation
    assert val["n"] == 20 and 0 <= val["pgd2_acc"] <= val["clean_acc"] <= 1


def test_augment_crop_and_flip():
    x = torch.arange(2 * 16, dtype=torch.float32).view(2, 1, 4, 4)
    assert torch.equal(augment(x, 0, False, torch.Generator()), x)
    out = augment(x, 1, True, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.equal(out, x)


def test_cli_maps_options_over_the_preset(monkeypatch, tmp_path):
    seen = {}

    def fake_train(cfg, resume=False):
        seen["cfg"], seen["resume"] = cfg, resume
        return train_mod.TrainResult(None, None, tmp_path, 0, 1, False, 0.0, [], [], 0)

    monkeypatch.setattr(train_mod, "train", fake_train)
    train_command(
        preset="fmnist-tiny-deq-ris", eps="8/255", epochs=7, out="m.safetensors", resume=True, model="mdeq"
    )
    cfg = seen["cfg"]
    assert seen["resume"] and cfg.random_state and cfg.eps == pytest.approx(8 / 255) and cfg.epochs == 7
    assert cfg.architecture == "mdeq" and cfg.config == {} and cfg.grad == "unroll:2:0.5"
    large = config_with("paper-deq-large")
    paper = (large.attack_steps, large.batch_size, large.pretrain_steps, large.jac_stop_epoch, large.epochs)
    assert paper == (10, 96, 16000, 90, 220)
    assert large.step_size == pytest.approx(2 / 255) and large.config == {"preset": "large"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "pgd"}, "unknown training method"),
        ({"eps": 2.0}, "eps must lie in"),
        ({"epochs": 0}, "epochs must be"),
        ({"out": None}, "output path"),
        ({"architecture": None}, "say which model"),
        ({"model": "deq-large"}, "not both"),
        ({"model": "deq-large", "architecture": None}, "is for cifar10"),
        ({"grad": "unroll:x:0.5"}, "bad estimator"),
        ({"grad": "exact"}, "random-state needs an unroll"),
        ({"architecture": "tiny-cnn", "config": {}, "deploy": {}}, "needs a DEQ"),
        ({"architecture": "nope"}, "unknown architecture"),
        ({"deploy": {"max_iters": 3}}, "bad deploy overrides"),
    ],
)
def test_bad_arguments_raise_bench_error(tmp_path, fake_data, changes, message):
    with pytest.raises(BenchError, match=message):
        train(_deq_cfg(tmp_path, **changes))


def test_bad_preset_and_resume_errors(tmp_path, fake_data):
    with pytest.raises(BenchError, match="unknown preset"):
        config_with("paper-deq-huge")
    with pytest.raises(BenchError, match="no training state"):
        train(_deq_cfg(tmp_path, epochs=1), resume=True)
    train(_deq_cfg(tmp_path, stop_after_steps=1))
    with pytest.raises(BenchError, match=r"recipe differs in \['lr'\]"):
        train(_deq_cfg(tmp_path, lr=0.5), resume=True)
