"""`bench train`: adversarial training of DEQs and CNN baselines, resumable bit for bit.

One loop trains every model. Per iteration: the attack (PGD-AT, TRADES or FGSM with random start, "fast
AT") is generated in eval mode (BatchNorm running statistics, no dropout) through the training-time
gradient, then the loss is computed in train mode, where each DEQ forward draws a fresh variational-dropout
mask. A DEQ forward solves for z* without gradient, and the loss is taken on the surrogate logits of a
bench.deq estimator (`unroll:K:lam` phantom gradient, or `exact` implicit gradient). With `random_state`
the loss uses the ICML 2023 "random intermediate states": one k ~ U{1..max_iter} per forward, shared by
the batch, and the `state:k:K:lam` surrogate (our state z[k] is the k-th Broyden iterate; the papers'
code takes the lowest-residual one among the first k).

Determinism: `torch.manual_seed(seed)` drives initialisation and dropout; an explicit generator draws the
data order and another one all attack noise, augmentation, random states and Jacobian probes. Training
states (model, optimizer, scheduler, the three RNG states, the step and the epoch's permutation) are
written atomically and read back with `weights_only=True`, so `--resume` continues exactly.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.errors import BenchError, did_you_mean
from bench.io import atomic_write_bytes
from bench.train_recipes import PRESETS

METHODS = ("pgd-at", "trades", "fast-at", "clean")
FAST_AT_STEP = 1.25  # FGSM step in units of eps (Wong, Rice, Kolter 2020)
TRAINED_BY = "deq-bench bench train"
STATE_FORMAT = 1


@dataclass
class TrainConfig:
    """Everything that determines a training run (`recipe()` is what the checkpoint metadata records)."""

    model: str | None = None  # a registry name; or give architecture + config
    architecture: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    deploy: dict[str, Any] = field(default_factory=dict)  # DeployConfig overrides (DEQs)
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    train_subset: int | None = None  # the first N training examples
    method: str = "pgd-at"
    eps: float = 0.1
    step_size: float | None = None  # None: eps/4 for PGD and TRADES, 1.25 eps for fast-at
    attack_steps: int = 10
    trades_beta: float = 6.0
    grad: str = "unroll:5:0.5"  # training-time gradient through the DEQ
    random_state: bool = False
    epochs: int = 1
    batch_size: int = 128
    lr: float = 1e-3
    lr_min: float = 1e-6
    weight_decay: float = 0.0
    pretrain_steps: int = 0  # clean iterations first (DEQs: the weight-tied unroll)
    pretrain_layers: int | None = None  # None: the model config's num_layers
    jac_prob: float = 0.0
    jac_weight: float = 0.0
    jac_stop_epoch: int | None = None
    augment_crop: int = 0  # random-crop padding in pixels
    augment_flip: bool = False
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    out: str | None = None  # final .safetensors
    state_path: str | None = None  # training state; default <out>.state.pt
    log: str | None = None
    log_every: int = 20
    checkpoint_every: int = 100
    val_examples: int = 0  # test examples for the per-epoch clean / PGD check (0: none)
    val_pgd_steps: int = 5
    quiet: bool = False
    stop_after_steps: int | None = None  # stop (with a saved state) after this many steps: tests, time caps

    # fields that do not change the trained weights; a resumed run may differ in these
    RUNTIME = ("out", "state_path", "log", "log_every", "quiet", "stop_after_steps", "device", "threads")

    def recipe(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in self.RUNTIME and k != "data_dir"}

    def resolved_step_size(self) -> float:
        if self.step_size is not None:
            return self.step_size
        return FAST_AT_STEP * self.eps if self.method == "fast-at" else self.eps / 4

    def resolved_attack_steps(self) -> int:
        return 1 if self.method == "fast-at" else self.attack_steps

    def paths(self) -> tuple[Path, Path]:
        """(final safetensors, training state)."""
        if not self.out:
            raise BenchError("training needs an output path (--out FILE.safetensors)")
        out = Path(self.out)
        state = Path(self.state_path) if self.state_path else out.with_name(out.name + ".state.pt")
        return out, state


@dataclass
class TrainResult:
    out: Path | None
    sha256: str | None
    state_path: Path
    steps: int
    total_steps: int
    complete: bool
    seconds: float
    history: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    parameters: int


def config_with(preset: str | None, **overrides: Any) -> TrainConfig:
    """Defaults, then the preset's values, then every override that is not None."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise BenchError(f"unknown preset {preset!r}{did_you_mean(preset, PRESETS)}")
        values.update(PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise BenchError(f"unknown training options {unknown}")
    return TrainConfig(**values)


# ----- validation of a config -------------------------------------------------------------------------


def validate(cfg: TrainConfig) -> None:
    """Raise BenchError for options that cannot work, before any data or model is loaded."""
    if cfg.method not in METHODS:
        raise BenchError(f"unknown training method {cfg.method!r}{did_you_mean(cfg.method, METHODS)}")
    if not 0.0 <= cfg.eps <= 1.0:
        raise BenchError(f"eps must lie in [0, 1] (pixel units), got {cfg.eps}")
    if cfg.method != "clean" and cfg.eps == 0:
        raise BenchError(f"method {cfg.method!r} needs eps > 0 (use --method clean for clean training)")
    checks = [
        (cfg.epochs >= 1, f"epochs must be >= 1, got {cfg.epochs}"),
        (cfg.batch_size >= 1, f"batch size must be >= 1, got {cfg.batch_size}"),
        (cfg.lr > 0 and cfg.lr_min >= 0, f"lr must be > 0 and lr_min >= 0, got {cfg.lr}, {cfg.lr_min}"),
        (cfg.attack_steps >= 1, f"attack steps must be >= 1, got {cfg.attack_steps}"),
        (cfg.step_size is None or cfg.step_size > 0, f"step size must be positive, got {cfg.step_size}"),
        (cfg.trades_beta >= 0, f"TRADES beta must be >= 0, got {cfg.trades_beta}"),
        (cfg.pretrain_steps >= 0, f"pretrain steps must be >= 0, got {cfg.pretrain_steps}"),
        (0.0 <= cfg.jac_prob <= 1.0 and cfg.jac_weight >= 0, "jac_prob must be in [0, 1], jac_weight >= 0"),
        (cfg.train_subset is None or cfg.train_subset >= 1, "train subset must be >= 1 examples"),
        (cfg.augment_crop >= 0, f"augment crop must be >= 0, got {cfg.augment_crop}"),
        (cfg.log_every >= 1 and cfg.checkpoint_every >= 1, "log_every and checkpoint_every must be >= 1"),
        (cfg.val_examples >= 0 and cfg.val_pgd_steps >= 1, "val_examples >= 0 and val_pgd_steps >= 1"),
        (cfg.threads is None or cfg.threads >= 1, f"threads must be >= 1, got {cfg.threads}"),
    ]
    for ok, message in checks:
        if not ok:
            raise BenchError(message)
    if cfg.model is None and cfg.architecture is None:
        raise BenchError("say which model to train: --model NAME (registry) or an architecture")
    if cfg.model is not None and cfg.architecture is not None:
        raise BenchError("give either a registry model name or an architecture, not both")
    cfg.paths()


# ----- model, data ------------------------------------------------------------------------------------


def build_model(cfg: TrainConfig) -> tuple[nn.Module, str, str, dict[str, Any]]:
    """(untrained model, its name, its architecture, the architecture config), for training and metadata."""
    from bench.deq.protocol import DeployConfig, is_deq
    from models.factory import build_architecture

    if cfg.model is not None:
        from bench.registry import get_entry

        entry = get_entry(cfg.model)
        if entry.family == "zoo":
            raise BenchError(
                f"{cfg.model!r} is a RobustBench zoo model; bench train trains local architectures"
            )
        if entry.dataset != cfg.dataset:
            raise BenchError(f"model {cfg.model!r} is for {entry.dataset}; pass --dataset {entry.dataset}")
        arch, config, deploy, name = entry.architecture, dict(entry.config), dict(entry.deploy), entry.name
    else:
        arch, config, deploy, name = str(cfg.architecture), dict(cfg.config), {}, str(cfg.architecture)
    model = build_architecture(arch, config)
    deploy.update(cfg.deploy)
    if is_deq(model):
        try:
            model.deploy = DeployConfig(**{**model.deploy.to_dict(), **deploy})
        except TypeError as exc:
            raise BenchError(f"bad deploy overrides {deploy}: {exc}") from None
    elif cfg.deploy:
        raise BenchError(f"deploy overrides only apply to DEQs; {name!r} is not one")
    return model, name, arch, config


def load_train_data(cfg: TrainConfig) -> tuple[Tensor, Tensor]:
    from bench.data import load_dataset

    data = load_dataset(cfg.dataset, "train", cfg.data_dir, n_examples=cfg.train_subset)
    return data.x, data.y


def augment(x: Tensor, crop: int, flip: bool, gen: torch.Generator) -> Tensor:
    """Random crop (zero padding `crop`) and horizontal flip, per example, from `gen`."""
    if crop == 0 and not flip:
        return x
    b, _, h, w = x.shape
    if crop:
        padded = F.pad(x, (crop, crop, crop, crop))
        offsets = torch.randint(0, 2 * crop + 1, (b, 2), generator=gen).tolist()
        x = torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])
    if flip:
        mask = torch.rand(b, generator=gen) < 0.5
        x = torch.where(mask.to(x.device)[:, None, None, None], x.flip(3), x)
    return x


# ----- forwards ---------------------------------------------------------------------------------------


@dataclass
class Forward:
    """Training-time logits of one model forward, plus what the Jacobian penalty needs for a DEQ."""

    logits: Tensor
    z_star: Tensor | None = None
    u: Tensor | None = None


class ModelForward:
    """The training forward: a plain model call, or for a DEQ: no-grad solve + the estimator's surrogate."""

    def __init__(self, model: nn.Module, grad: str, random_state: bool, gen: torch.Generator) -> None:
        from bench.deq.estimators import Unroll, parse_estimator
        from bench.deq.protocol import is_deq
        from bench.deq.solvers import SolverSettings

        self.model, self.gen, self.random_state = model, gen, random_state
        self.deq = is_deq(model)
        self.states_used: list[int] = []  # k of every random-state forward, in order (diagnostics, tests)
        if not self.deq:
            if random_state:
                raise BenchError("--random-state needs a DEQ; the model is a plain network")
            return
        self.estimator = parse_estimator(grad)
        self.settings = SolverSettings.from_deploy(model.deploy)
        self.estimator.check_steps(self.settings.max_iter)
        if random_state and not (isinstance(self.estimator, Unroll) and self.estimator.t is None):
            raise BenchError(f"--random-state needs an unroll:K:lam training gradient, got {grad!r}")

    def _estimator_and_keep(self) -> tuple[Any, Any, set[int]]:
        from bench.deq.estimators import Unroll

        if not self.random_state:
            return self.estimator, self.settings, self.estimator.needed_states()
        k = int(torch.randint(1, self.settings.max_iter + 1, (1,), generator=self.gen))
        self.states_used.append(k)
        # z[1..k] do not depend on later steps, so the solve can stop at k
        return Unroll(self.estimator.steps, self.estimator.lam, t=k), replace(self.settings, max_iter=k), {k}

    def __call__(self, x: Tensor) -> Forward:
        if not self.deq:
            return Forward(self.model(x))
        from bench.deq.readouts import solve_model

        model = self.model
        estimator, settings, keep = self._estimator_and_keep()
        with _cached(model):
            model.begin_forward(x.shape[0])
            u = model.inject(x)
            with torch.no_grad():
                traj = solve_model(model, u.detach(), settings, keep=keep)
            return Forward(estimator.surrogate(model, u, traj), traj.result, u)

    def pretrain(self, x: Tensor, layers: int | None) -> Tensor:
        """Clean-pretraining logits: the weight-tied unroll for a DEQ, the plain forward otherwise."""
        if not self.deq:
            return self.model(x)
        with _cached(self.model):
            return self.model.unrolled_pretrain_forward(x, layers)


def _cached(model: nn.Module) -> contextlib.AbstractContextManager[Any]:
    cached = getattr(model, "weights_cached", None)
    return cached() if cached is not None else contextlib.nullcontext()


def jacobian_penalty(
    model: nn.Module, z_star: Tensor, u: Tensor, gen: torch.Generator, probes: int = 2
) -> Tensor:
    """Hutchinson estimate of ||J_f(z*)||_F^2 / numel(z), differentiable in the parameters (the papers')."""
    with _cached(model):
        z = z_star.detach().requires_grad_(True)
        fz = model.f(z, u)
        total = fz.new_zeros(())
        for _ in range(probes):
            v = torch.randn(fz.shape, generator=gen).to(fz.device, fz.dtype)
            (vj,) = torch.autograd.grad(fz, z, v, retain_graph=True, create_graph=True)
            total = total + vj.pow(2).sum()
    return total / probes / z.numel()


# ----- training-time attacks (lean: no per-example bookkeeping) ---------------------------------------


def _uniform(shape: torch.Size, gen: torch.Generator, like: Tensor) -> Tensor:
    return (torch.rand(shape, generator=gen) * 2 - 1).to(like.device, like.dtype)


def pgd_examples(
    forward: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    eps: float,
    step: float,
    steps: int,
    gen: torch.Generator,
) -> Tensor:
    """L-inf PGD on the CE loss from a uniform random start (one step of 1.25 eps = fast AT's FGSM-RS)."""
    x_adv = (x + eps * _uniform(x.shape, gen, x)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(forward(x_adv), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + step * g.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def trades_examples(
    forward: Callable[[Tensor], Tensor],
    x: Tensor,
    eps: float,
    step: float,
    steps: int,
    gen: torch.Generator,
) -> Tensor:
    """TRADES' inner maximisation: KL(f(x_adv) || f(x)) from x + 0.001 N(0, 1)."""
    with torch.no_grad():
        p_nat = F.softmax(forward(x), dim=1)
    noise = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
    x_adv = (x + 0.001 * noise).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.kl_div(F.log_softmax(forward(x_adv), dim=1), p_nat, reduction="sum")
        (g,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + step * g.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


# ----- one iteration ----------------------------------------------------------------------------------


def training_loss(
    cfg: TrainConfig, fwd: ModelForward, x: Tensor, y: Tensor, step: int, epoch: int, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """(loss, logits the accuracy is read from) of one iteration; leaves the model in train mode."""
    model = fwd.model
    if step < cfg.pretrain_steps or cfg.method == "clean":
        model.train()
        logits = fwd.pretrain(x, cfg.pretrain_layers) if step < cfg.pretrain_steps else fwd(x).logits
        return F.cross_entropy(logits, y), logits
    model.eval()

    def attack_forward(xa: Tensor) -> Tensor:
        return fwd(xa).logits

    step_size, steps = cfg.resolved_step_size(), cfg.resolved_attack_steps()
    if cfg.method == "trades":
        x_adv = trades_examples(attack_forward, x, cfg.eps, step_size, steps, gen)
    else:
        x_adv = pgd_examples(attack_forward, x, y, cfg.eps, step_size, steps, gen)
    model.train()
    outs = [fwd(x_adv)]
    if cfg.method == "trades":
        nat = fwd(x)
        outs.append(nat)
        kl = F.kl_div(F.log_softmax(outs[0].logits, dim=1), F.softmax(nat.logits, dim=1), reduction="sum")
        loss = F.cross_entropy(nat.logits, y) + cfg.trades_beta * kl / x.shape[0]
    else:
        loss = F.cross_entropy(outs[0].logits, y)
    jac_on = cfg.jac_weight > 0 and (cfg.jac_stop_epoch is None or epoch < cfg.jac_stop_epoch)
    if fwd.deq and jac_on and float(torch.rand((), generator=gen)) < cfg.jac_prob:
        for out in outs:
            loss = loss + cfg.jac_weight * jacobian_penalty(model, out.z_star, out.u, gen)
    return loss, outs[0].logits


# ----- training state ---------------------------------------------------------------------------------


@dataclass
class Generators:
    data: torch.Generator  # data order
    noise: torch.Generator  # attacks, augmentation, random states, Jacobian probes

    @classmethod
    def seeded(cls, seed: int) -> Generators:
        data, noise = torch.Generator(), torch.Generator()
        data.manual_seed(seed)
        noise.manual_seed(seed + 1_000_003)
        return cls(data, noise)


def save_state(path: Path, payload: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BenchError(f"no training state to resume at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise BenchError(f"cannot read training state {path}: {type(exc).__name__}") from None


def _capture(cfg: TrainConfig, model: nn.Module, optimizer: Any, scheduler: Any, gens: Generators) -> dict:
    """Everything stateful a bit-identical continuation needs, as tensors, dicts, numbers and strings."""
    return {
        "format": STATE_FORMAT,
        "recipe": json.dumps(cfg.recipe()),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "data_rng": gens.data.get_state(),
        "noise_rng": gens.noise.get_state(),
    }


def _restore(state: dict, model: nn.Module, optimizer: Any, scheduler: Any, gens: Generators) -> None:
    if state.get("format") != STATE_FORMAT:
        raise BenchError(f"training state format {state.get('format')!r} is not {STATE_FORMAT}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    gens.data.set_state(state["data_rng"])
    gens.noise.set_state(state["noise_rng"])


def _lr_schedule(optimizer: torch.optim.Optimizer, total: int, lr_min: float) -> Any:
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1), eta_min=lr_min)


# ----- the loop ---------------------------------------------------------------------------------------


class _Log:
    """One line per log interval in a plain file (appended), mirrored by a rich progress bar."""

    def __init__(self, path: str | None, quiet: bool, total: int, done: int) -> None:
        self.fh = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(path, "a", encoding="utf-8")  # noqa: SIM115
        self.progress: Any = None
        if not quiet:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=Console(stderr=True),
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=total, completed=done, status="")

    def line(self, text: str) -> None:
        if self.fh:
            self.fh.write(text + "\n")
            self.fh.flush()
        if self.progress is not None:
            self.progress.console.print(text)

    def advance(self, status: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, status=status)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.fh:
            self.fh.close()


def train(cfg: TrainConfig, resume: bool = False) -> TrainResult:
    """Train as `cfg` says (continuing the saved state when `resume`); returns where the weights went."""
    validate(cfg)
    out, state_path = cfg.paths()
    if cfg.device != "cpu" and not (cfg.device.startswith("cuda") and torch.cuda.is_available()):
        raise BenchError(f"device {cfg.device!r} is not available (use cpu or an available cuda device)")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gens = Generators.seeded(cfg.seed)
    model, name, arch, config = build_model(cfg)
    device = torch.device(cfg.device)
    model.to(device)
    fwd = ModelForward(model, cfg.grad, cfg.random_state, gens.noise)
    x_all, y_all = load_train_data(cfg)
    n = x_all.shape[0]
    per_epoch = math.ceil(n / cfg.batch_size)
    total = per_epoch * cfg.epochs
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = _lr_schedule(optimizer, total, cfg.lr_min)
    step, perm, perm_epoch = 0, torch.empty(0, dtype=torch.int64), -1
    history: list[dict[str, Any]] = []
    validation: list[dict[str, Any]] = []
    seconds = 0.0
    if resume:
        state = load_state(state_path)
        saved = json.loads(state["recipe"])
        if saved != json.loads(json.dumps(cfg.recipe())):
            diff = sorted(k for k in set(saved) | set(cfg.recipe()) if saved.get(k) != cfg.recipe().get(k))
            raise BenchError(f"cannot resume {state_path}: the recipe differs in {diff}")
        _restore(state, model, optimizer, scheduler, gens)
        step, perm, perm_epoch = int(state["step"]), state["perm"], int(state["perm_epoch"])
        history, validation = json.loads(state["history"]), json.loads(state["validation"])
        seconds = float(state["seconds"])

    def snapshot() -> None:
        save_state(
            state_path,
            {
                **_capture(cfg, model, optimizer, scheduler, gens),
                "step": step,
                "perm": perm,
                "perm_epoch": perm_epoch,
                "history": json.dumps(history),
                "validation": json.dumps(validation),
                "seconds": seconds,
            },
        )

    log = _Log(cfg.log, cfg.quiet, total, step)
    run_loss, run_correct, run_seen = 0.0, 0, 0
    started = time.perf_counter()
    try:
        while step < total:
            epoch, i = divmod(step, per_epoch)
            if perm_epoch != epoch:
                perm, perm_epoch = torch.randperm(n, generator=gens.data), epoch
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            x = augment(x_all[idx], cfg.augment_crop, cfg.augment_flip, gens.noise).to(device)
            y = y_all[idx].to(device)
            loss, logits = training_loss(cfg, fwd, x, y, step, epoch, gens.noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            run_loss += float(loss.detach()) * len(idx)
            run_correct += int((logits.argmax(1) == y).sum())
            run_seen += len(idx)
            log.advance(f"epoch {epoch + 1}/{cfg.epochs} loss {float(loss.detach()):.3f}")
            if step % cfg.log_every == 0 or step % per_epoch == 0:
                elapsed = seconds + time.perf_counter() - started
                row = {
                    "step": step,
                    "epoch": epoch + 1,
                    "lr": optimizer.param_groups[0]["lr"],
                    "loss": run_loss / run_seen,
                    "train_acc": run_correct / run_seen,
                    "seconds": round(elapsed, 1),
                }
                history.append(row)
                log.line(
                    f"step {step}/{total} epoch {epoch + 1} lr {row['lr']:.2e} loss {row['loss']:.4f} "
                    f"{'adv' if cfg.method != 'clean' else 'clean'}-acc {row['train_acc']:.3f} "
                    f"t {elapsed:.0f}s"
                )
                run_loss, run_correct, run_seen = 0.0, 0, 0
            if step % per_epoch == 0 and cfg.val_examples:
                val = quick_validation(cfg, model, epoch + 1)
                validation.append(val)
                log.line(f"validation epoch {epoch + 1}: " + json.dumps(val))
            stopping = cfg.stop_after_steps is not None and step >= cfg.stop_after_steps and step < total
            if step % cfg.checkpoint_every == 0 or step % per_epoch == 0 or stopping:
                seconds += time.perf_counter() - started
                started = time.perf_counter()
                snapshot()
            if stopping:
                break
    finally:
        log.close()
    seconds += time.perf_counter() - started
    parameters = sum(p.numel() for p in model.parameters())
    result = TrainResult(
        None, None, state_path, step, total, step >= total, seconds, history, validation, parameters
    )
    if result.complete:
        result.out = out
        result.sha256 = export_safetensors(model, cfg, (name, arch, config), out, validation, seconds, step)
        log_final = _Log(cfg.log, True, total, step)
        log_final.line(f"done: {out} sha256 {result.sha256} ({seconds:.0f}s)")
        log_final.close()
    return result


def export_safetensors(
    model: nn.Module,
    cfg: TrainConfig,
    identity: tuple[str, str, dict[str, Any]],
    out: Path,
    validation: list[dict[str, Any]],
    seconds: float,
    steps: int,
) -> str:
    """The final weights with the full recipe in the metadata; returns the file's sha256."""
    from bench.checkpoints import save_safetensors
    from bench.deq.protocol import is_deq

    name, arch, config = identity
    meta = {
        "recipe": json.dumps(cfg.recipe(), sort_keys=True),
        "model": name,
        "architecture": arch,
        "config": json.dumps(config, sort_keys=True),
        "dataset": cfg.dataset,
        "trained_by": TRAINED_BY,
        "created": datetime.now(UTC).strftime("%Y-%m-%d"),
        "steps": str(steps),
        "train_seconds": f"{seconds:.0f}",
        "validation": json.dumps(validation),
        "attack": json.dumps(
            {
                "method": cfg.method,
                "steps": cfg.resolved_attack_steps(),
                "step_size": cfg.resolved_step_size(),
            }
        ),
        "torch": torch.__version__,
    }
    if is_deq(model):
        meta["deploy"] = json.dumps(model.deploy.to_dict(), sort_keys=True)
    return save_safetensors(out, model.state_dict(), meta)


def export_from_state(cfg: TrainConfig, out: str | Path) -> str:
    """Write the weights of a (possibly unfinished) training state as safetensors: a usable fallback."""
    _, state_path = cfg.paths()
    state = load_state(state_path)
    model, name, arch, config = build_model(cfg)
    model.load_state_dict(state["model"])
    validation = json.loads(state["validation"])
    seconds, steps = float(state["seconds"]), int(state["step"])
    return export_safetensors(model, cfg, (name, arch, config), Path(out), validation, seconds, steps)


# ----- per-epoch check --------------------------------------------------------------------------------


def quick_validation(cfg: TrainConfig, model: nn.Module, epoch: int) -> dict[str, Any]:
    """Clean and PGD accuracy of the deployed model on the first `val_examples` test examples.

    Uses its own generator, so training randomness is untouched (resumed runs stay identical).
    """
    from bench.data import load_dataset
    from bench.deq.protocol import is_deq

    data = load_dataset(cfg.dataset, "test", cfg.data_dir, n_examples=cfg.val_examples)
    was_training = model.training
    model.eval()
    attacked: nn.Module = model
    if is_deq(model):
        from bench.deq.view import AttackView

        attacked = AttackView(model, "final", cfg.grad)
    gen = torch.Generator()
    gen.manual_seed(cfg.seed + 7919 * epoch)
    device = next(model.parameters()).device
    clean = robust = 0
    for start in range(0, len(data), 250):
        x = data.x[start : start + 250].to(device)
        y = data.y[start : start + 250].to(device)
        with torch.no_grad():
            clean += int((attacked(x).argmax(1) == y).sum())
        x_adv = pgd_examples(attacked, x, y, cfg.eps, cfg.eps / 4, cfg.val_pgd_steps, gen)
        with torch.no_grad():
            robust += int((attacked(x_adv).argmax(1) == y).sum())
    model.train(was_training)
    n = len(data)
    return {"epoch": epoch, "n": n, "clean_acc": clean / n, f"pgd{cfg.val_pgd_steps}_acc": robust / n}
