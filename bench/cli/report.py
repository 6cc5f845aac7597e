"""`bench leaderboard`, `bench plot`, `bench check` and `bench merge`: flags -> the report and record code."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def leaderboard_command(
    results_dir: Annotated[str, typer.Option(help="Where the run records are.")] = "results",
    dataset: Annotated[str | None, typer.Option(help="Only rows of this data set.")] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="table | md | csv | latex | html | json | robustbench")
    ] = "table",
    output: Annotated[str | None, typer.Option(help="Write to this file instead of stdout.")] = None,
    view: Annotated[
        str,
        typer.Option(
            help="main (Clean/PGD/AA/All) | gap (ready-made vs white-box) | runs (every run) | findings "
            "(the papers' claims vs the records; with --output also draws its figures beside it)."
        ),
    ] = "main",
    run: Annotated[
        str | None, typer.Option(help="Use this one run record instead of the results directory.")
    ] = None,
    readout: Annotated[
        str | None, typer.Option(help="Readout for --format robustbench (default: final).")
    ] = None,
    reference: Annotated[
        bool, typer.Option(help="Show the papers' reported rows beside the measured ones.")
    ] = True,
) -> None:
    """Leaderboard from per-example records with 95% intervals: main, gap, runs, or the papers' findings."""
    from bench.io import atomic_write_text
    from bench.report.leaderboard import render_leaderboard

    if view == "findings":
        from bench.report.findings_page import findings_view

        for line in findings_view(results_dir, run, dataset, "md" if fmt == "table" else fmt, output):
            print(line, end="" if line.endswith("\n") else "\n")
        return
    text = render_leaderboard(
        results_dir, dataset, fmt, view, run, readout, reference, to_terminal=output is None
    )
    if text is None:
        return
    if output is None:
        print(text, end="" if text.endswith("\n") else "\n")
    else:
        atomic_write_text(output, text)
        print(f"wrote {output}")


def plot_command(
    results_dir: Annotated[str, typer.Option(help="Where the run records are.")] = "results",
    run: Annotated[str | None, typer.Option(help="Plot this one run record only.")] = None,
    out: Annotated[
        str | None, typer.Option(help="Folder for the figures (default: plots/ beside the records).")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="Comma-separated image formats: png, svg, pdf.")] = (
        "png,svg"
    ),
) -> None:
    """Figures of the DEQ dynamics, clean vs adversarial: accuracy, residual and entropy along the solver."""
    from bench.report.plots import plot_records

    for line in plot_records(results_dir, run, out, fmt):
        print(line)


def check_command(
    baseline: Annotated[
        Path | None, typer.Option(help="Expected-results file (results/expected/*.json) to check against.")
    ] = None,
    read: Annotated[
        Path | None,
        typer.Option("--read", help="Compare this finished record instead of re-running the evaluation."),
    ] = None,
    tolerance: Annotated[
        float | None,
        typer.Option(help="Allowed deviation in points (default: 2 binomial std errors, >= 1 example)."),
    ] = None,
    write_baseline_to: Annotated[
        Path | None,
        typer.Option("--write-baseline", help="Write an expected-results file from the --read record."),
    ] = None,
    checkpoint: Annotated[
        str | None, typer.Option(help="Check these weights instead of the baseline's checkpoint.")
    ] = None,
    results_dir: Annotated[
        str, typer.Option(help="Where the re-run's record goes (reused if there).")
    ] = "results",
    data_dir: Annotated[str | None, typer.Option(help="Where the data set's files are.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Fail (exit 1) when clean, robust or All accuracy moved beyond tolerance from expected results."""
    from bench.check import run_check

    passed = run_check(
        baseline, read, tolerance, write_baseline_to, checkpoint, results_dir, data_dir, device
    )
    if not passed:
        raise SystemExit(1)  # 1: the gate failed; 2 (BenchError) stays for bad input


def merge_command(
    results_dir: Annotated[str, typer.Option(help="The results directory the shards wrote to.")] = "results",
    run_id: Annotated[
        str | None, typer.Option(help="Which unfinished run (default: the only one there).")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="Print only the record's path.")] = False,
) -> None:
    """Assemble a sharded run (SLURM array, --shard) from its batch files once every shard has finished."""
    from bench.records.assemble import merge_run
    from bench.report.summary import print_summary

    document, path, reused = merge_run(results_dir, run_id)
    if quiet:
        print(path)
        return
    print_summary(document, path, reused)
