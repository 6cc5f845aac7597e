"""The findings view's one entry point: the page as text, or written with the figures it links to.

Above both bench.report.findings (the claims) and bench.report.findings_plots (the figures), so neither
imports the other's caller and the module graph stays acyclic.
"""

from __future__ import annotations

from pathlib import Path

from bench.report.findings import FIGURE_DIR, build_pools, filter_runs, render_findings
from bench.report.findings_plots import draw_findings
from bench.report.leaderboard import load_run, load_runs


def findings_view(
    results_dir: str, run: str | None, dataset: str | None, fmt: str, output: str | None
) -> list[str]:
    """The lines to print: the page itself, or (with `output`) what was written: the page and, for the
    Markdown page, its figures in plots/ beside it (so its relative links resolve)."""
    from bench.io import atomic_write_text

    runs = filter_runs([load_run(run)] if run is not None else load_runs(results_dir), dataset)
    if output is None or fmt == "json":
        text = render_findings(runs, fmt)
        if output is None:
            return [text]
        written: list[Path] = []
    else:
        written, figures = draw_findings(build_pools(runs), Path(output).parent / FIGURE_DIR)
        text = render_findings(runs, fmt, figures=figures)
    atomic_write_text(output, text)
    return [*(f"wrote {p}" for p in written), f"wrote {output}"]
