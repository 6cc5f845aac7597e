"""The `bench` command line: the only importer of typer, and the only place that turns a failure into an
exit code: a BenchError or an OSError on a user's path is one `error:` line and exit 2, a stop signal
(Ctrl-C, SIGTERM, SLURM's preemption) is `error: interrupted; ...` and 128 + the signal number. Each command
parses its flags into the typed specs (bench.spec) and calls one function below; nothing here computes."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from bench import __version__, interrupts
from bench.console import print_json, print_table
from bench.errors import BenchError
from bench.io import os_error_message
from bench.spec import DEFAULT_SHARD_TIMEOUT_S, EvalConfig

try:  # typer >= 0.2x vendors click; older ones use the click package
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="deq-bench: honest white-box robustness evaluation of Deep Equilibrium Models and baselines.",
    pretty_exceptions_enable=False,
)


@app.command()
def version() -> None:
    """Print the deq-bench, torch and torchvision versions."""
    import torch
    import torchvision

    print(f"deq-bench {__version__} (torch {torch.__version__}, torchvision {torchvision.__version__})")


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list for programs.")] = False,
) -> None:
    """List the model registry: family, data set, parameters, threat model, eps, checkpoint status."""
    from bench.registry import checkpoint_status, deploy_of, registry
    from bench.spec import DeploySpec

    rows = []
    for entry in registry().values():
        rows.append(
            {
                "name": entry.name,
                "family": entry.family,
                "architecture": entry.architecture,
                "dataset": entry.dataset,
                "parameters": entry.parameters,
                "threat_model": entry.threat_model,
                "eps": entry.eps,
                "checkpoint": checkpoint_status(entry),
                "deploy": DeploySpec.describe(deploy_of(entry)),
                "expected_clean_acc": entry.expected_clean_acc,
            }
        )
    if as_json:
        print_json(rows)
        return
    columns = ["name", "family", "dataset", "parameters", "threat", "eps", "deploy", "checkpoint", "clean %"]
    table_rows = [
        [
            r["name"],
            r["family"],
            r["dataset"],
            f"{r['parameters'] / 1e6:.2f}M" if r["parameters"] >= 1e6 else f"{r['parameters'] / 1e3:.1f}k",
            r["threat_model"],
            r["eps"],
            r["deploy"],
            r["checkpoint"],
            "" if r["expected_clean_acc"] is None else f"{r['expected_clean_acc']:.2f}",
        ]
        for r in rows
    ]
    print_table("deq-bench model registry", columns, table_rows)


@app.command()
def evaluate(
    model: Annotated[
        str,
        typer.Option(
            "--model", "-m", help="Registered model name (see `bench models`) or package.module:factory."
        ),
    ],
    checkpoint: Annotated[
        str | None, typer.Option(help="Weights file overriding the registered one.")
    ] = None,
    dataset: Annotated[str | None, typer.Option(help="Data set (default: the model's).")] = None,
    data_dir: Annotated[str | None, typer.Option(help="Where the data set's files are.")] = None,
    download: Annotated[
        bool, typer.Option(help="Download the data set if missing (needs internet).")
    ] = False,
    n_examples: Annotated[int, typer.Option(help="Evaluate the first N test examples.")] = 100,
    eps: Annotated[
        str | None, typer.Option(help="L-inf budget, e.g. 8/255 or 0.1 (default per data set).")
    ] = None,
    suite: Annotated[str, typer.Option(help="quick | ready-made | white-box | full | lite")] = "quick",
    attacks: Annotated[
        str | None, typer.Option(help="Comma-separated attack specs (replaces the suite's).")
    ] = None,
    grads: Annotated[
        str | None, typer.Option(help="Comma-separated estimator specs (skips the sweep).")
    ] = None,
    readouts: Annotated[
        str | None,
        typer.Option(help="Comma-separated readouts (default: final); early = the dev set's best state."),
    ] = None,
    defense: Annotated[
        str,
        typer.Option(
            help="none | entropy-reduction[:stages=4,steps=10,alpha=2/255,eps=8/255,solver_steps=2] "
            "(attacked in transfer, BPDA and adaptive modes; the worst case is reported)."
        ),
    ] = "none",
    deploy: Annotated[
        str | None,
        typer.Option(
            help="DEQ deployed prediction: fz (alias real: f(z*) only) or unroll:K:lam (f(z*) then K damped "
            "steps); default: the registry's."
        ),
    ] = None,
    batching: Annotated[
        str,
        typer.Option(
            help="per-example (results independent of batch composition) | papers (the papers' batch-wide "
            "solver stop rule and lowest-residual pick)."
        ),
    ] = "per-example",
    batch_size: Annotated[int, typer.Option(help="Examples per batch.")] = 50,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    seed: Annotated[int, typer.Option(help="Base seed of every attack's randomness.")] = 0,
    results_dir: Annotated[str, typer.Option(help="Where run records go.")] = "results",
    n_dev: Annotated[int | None, typer.Option(help="Development examples for the estimator sweep.")] = None,
    sweep: Annotated[
        str,
        typer.Option(
            help="White-box sweep: full (every candidate with the sweep's PGD) | halving (every candidate "
            "with PGD-2, the best third with the sweep's PGD)."
        ),
    ] = "full",
    force: Annotated[bool, typer.Option(help="Recompute even if an identical finished run exists.")] = False,
    save_adversarial: Annotated[
        bool, typer.Option(help="Store the worst-case adversarial examples (RobustBench format).")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars or tables; print the record path.")] = False,
    shard: Annotated[
        str | None,
        typer.Option(help="This process's share: RANK/WORLD (e.g. 0/4) or 'slurm'; torchrun is detected."),
    ] = None,
    shard_timeout: Annotated[
        float, typer.Option(help="Seconds a shard waits for rank 0's sweep or for the other ranks.")
    ] = DEFAULT_SHARD_TIMEOUT_S,
) -> None:
    """Attack a model with the white-box suite and record per-example results."""
    from bench.evaluate import evaluate as run_evaluation
    from bench.report.summary import print_summary
    from bench.user_models import allow_import

    allow_import(model)  # an import path named here may be imported (never one read from a record)
    spec, options = EvalConfig(
        model=model,
        checkpoint=checkpoint,
        dataset=dataset,
        data_dir=data_dir,
        download=download,
        n_examples=n_examples,
        eps=eps,
        suite=suite,
        attacks=attacks,
        grads=grads,
        readouts=readouts,
        defense=defense,
        deploy=deploy,
        batching=batching,
        batch_size=batch_size,
        device=device,
        seed=seed,
        results_dir=results_dir,
        n_dev=n_dev,
        sweep=sweep,
        force=force,
        save_adversarial=save_adversarial,
        quiet=quiet,
        shard=shard,
        shard_timeout=shard_timeout,
    ).parse()
    document, path, reused = run_evaluation(spec, options)
    if (
        document is None
    ):  # a shard that did its batches; rank 0 / the last shard / `bench merge` writes the record
        return
    if quiet:
        print(path)
        return
    print_summary(document, path, reused)


from bench.cli.report import check_command, leaderboard_command, merge_command, plot_command  # noqa: E402
from bench.cli.train import train_command  # noqa: E402

app.command("leaderboard")(leaderboard_command)
app.command("check")(check_command)
app.command("merge")(merge_command)
app.command("plot")(plot_command)
app.command("train")(train_command)


def _fail(message: str) -> None:
    first_line = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"error: {first_line}", file=sys.stderr)
    sys.exit(2)


def _interrupted(code: int) -> None:
    # bench train continues only when asked (--resume), from its last saved state
    message = interrupts.TRAIN_MESSAGE if sys.argv[1:2] == ["train"] else interrupts.MESSAGE
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def main() -> None:
    """Entry point of the console script: BenchError, OSError and usage errors -> one line, exit 2;
    interrupts -> one line, 128 + signal."""
    interrupts.install()
    try:
        code = app(standalone_mode=False)
        interrupts.raise_held()  # a Ctrl-C that arrived during an import the command made
    except interrupts.Interrupted as exc:
        _interrupted(exc.exit_code)
    except BenchError as exc:
        _fail(str(exc))
    except click_exceptions.NoArgsIsHelpError as exc:
        # a bare `bench` shows the help, as `bench --help` does; that is not an error
        print(exc.ctx.get_help() if exc.ctx is not None else "")
        sys.exit(0)
    except click_exceptions.ClickException as exc:
        _fail(exc.format_message())
    except (typer.Abort, KeyboardInterrupt):
        _interrupted(130)
    except BrokenPipeError:  # `bench models | head`: the reader left, nothing to report
        sys.stderr.close()
        sys.exit(0)
    except OSError as exc:  # a user's path: permissions, not a directory, no space, file too large
        _fail(os_error_message(exc, action="access"))
    if isinstance(code, int) and code != 0:  # typer returns 130 for a KeyboardInterrupt it caught
        if code == 130:
            _interrupted(code)
        sys.exit(code)
