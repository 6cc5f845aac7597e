"""`bench train`: the training command's flags -> bench.train.TrainConfig."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Annotated, Any

import typer

from bench.errors import BenchError
from bench.train_recipes import PRESETS


def train_command(
    model: Annotated[
        str | None, typer.Option("--model", help="Registry name, or an architecture name.")
    ] = None,
    config: Annotated[str | None, typer.Option("--config", help="Architecture config as JSON.")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="fashion-mnist or cifar10.")] = None,
    method: Annotated[str | None, typer.Option("--method", help="pgd-at, trades, fast-at or clean.")] = None,
    grad: Annotated[
        str | None, typer.Option("--grad", help="DEQ training gradient: exact | unroll:K:lam.")
    ] = None,
    random_state: Annotated[
        bool | None,
        typer.Option("--random-state/--final-state", help="Loss from random intermediate states."),
    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size")] = None,
    lr: Annotated[float | None, typer.Option("--lr")] = None,
    eps: Annotated[str | None, typer.Option("--eps", help="L-inf radius, e.g. 0.1 or 8/255.")] = None,
    step_size: Annotated[str | None, typer.Option("--step-size", help="Attack step (default eps/4).")] = None,
    attack_steps: Annotated[int | None, typer.Option("--attack-steps")] = None,
    beta: Annotated[float | None, typer.Option("--beta", help="TRADES beta (default 6).")] = None,
    pretrain_steps: Annotated[int | None, typer.Option("--pretrain-steps")] = None,
    out: Annotated[str | None, typer.Option("--out", help="Final weights (.safetensors).")] = None,
    state: Annotated[
        str | None, typer.Option("--state", help="Training state file (default <out>.state.pt).")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the saved training state.")] = False,
    preset: Annotated[str | None, typer.Option("--preset", help=f"One of: {', '.join(PRESETS)}.")] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    train_subset: Annotated[
        int | None, typer.Option("--train-subset", help="Use the first N examples.")
    ] = None,
    val_examples: Annotated[int | None, typer.Option("--val-examples", help="Per-epoch check size.")] = None,
    device: Annotated[str | None, typer.Option("--device")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="torch CPU threads.")] = None,
    checkpoint_every: Annotated[int | None, typer.Option("--checkpoint-every", help="Iterations.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    log: Annotated[str | None, typer.Option("--log", help="Append one line per log interval here.")] = None,
) -> None:
    """Adversarially train a DEQ or CNN; resumable; writes safetensors with the recipe in its metadata."""
    from bench.spec import parse_eps
    from bench.train import config_with, train
    from models.factory import ARCHITECTURES

    chosen: dict[str, Any] = {}
    if model is not None:  # replaces the preset's model entirely
        is_arch = model in ARCHITECTURES
        chosen = {
            "model": None if is_arch else model,
            "architecture": model if is_arch else None,
            "config": {},
        }
    if config is not None:
        try:
            chosen["config"] = json.loads(config)
        except json.JSONDecodeError as exc:
            raise BenchError(f"--config is not valid JSON: {exc.msg}") from None
    cfg = config_with(
        preset,
        dataset=dataset,
        method=method,
        grad=grad,
        random_state=random_state,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        eps=None if eps is None else parse_eps(eps),
        step_size=None if step_size is None else parse_eps(step_size),
        attack_steps=attack_steps,
        trades_beta=beta,
        pretrain_steps=pretrain_steps,
        out=out,
        state_path=state,
        seed=seed,
        train_subset=train_subset,
        val_examples=val_examples,
        device=device,
        threads=threads,
        checkpoint_every=checkpoint_every,
        quiet=quiet or None,
        log=log,
    )
    cfg = replace(cfg, **chosen)
    result = train(cfg, resume=resume)
    if result.complete:
        size = f"{result.parameters} parameters, {result.seconds:.0f}s"
        print(f"wrote {result.out} (sha256 {result.sha256}, {size})")
    else:
        print(f"stopped at step {result.steps}/{result.total_steps}; state in {result.state_path} (--resume)")
