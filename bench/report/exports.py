"""Leaderboard rows rendered for people and programs: terminal, Markdown, CSV, LaTeX, HTML, JSON, and
RobustBench's model_info JSON.

Renderers only format: every number comes from bench.leaderboard, which recomputes it from per-example
records. Missing numbers (a group the run did not have, a PGD column the paper did not give) show as a
dash, never as 0.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import __version__
from bench.errors import BenchError
from bench.report.flags import INFO_FLAGS, REPORTED

if TYPE_CHECKING:
    import pandas as pd

FORMATS = ("table", "md", "csv", "latex", "html", "json", "robustbench")


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    kind: str = "text"  # text | pct | delta | int | ci | p | flags

    @property
    def numeric(self) -> bool:
        return self.kind in ("pct", "delta", "int", "ci", "p")


MAIN_COLUMNS = (
    Column("model", "Model"),
    Column("method", "Method"),
    Column("defense", "Defense"),
    Column("readout", "Readout"),
    Column("clean", "Clean", "pct"),
    Column("pgd", "PGD", "pct"),
    Column("aa", "AA", "pct"),
    Column("all", "All", "pct"),
    Column("delta_clean", "Δ Clean", "delta"),
    Column("delta_all", "Δ All", "delta"),
    Column("clean_ci", "Clean 95% CI", "ci"),
    Column("all_ci", "All 95% CI", "ci"),
    Column("n_examples", "n", "int"),
    Column("eps_text", "eps"),
    Column("suite", "Suite"),
    Column("deploy", "Deploy"),
    Column("estimator", "Estimator"),
    Column("source", "Source"),
    Column("flags", "Flags", "flags"),
)
_MAIN = {c.key: c for c in MAIN_COLUMNS}
RUNS_COLUMNS = (
    Column("run", "Run"),
    *(_MAIN[k] for k in ("model", "method", "defense", "readout", "suite", "clean", "clean_ci")),
    *(_MAIN[k] for k in ("pgd", "aa", "all", "all_ci")),
    Column("ready_made", "Ready-made All", "pct"),
    Column("white_box", "White-box All", "pct"),
    *(_MAIN[k] for k in ("n_examples", "eps_text", "deploy", "estimator", "flags")),
)
GAP_COLUMNS = (
    Column("model", "Model"),
    Column("method", "Method"),
    Column("defense", "Defense"),
    Column("readout", "Readout"),
    Column("clean", "Clean", "pct"),
    Column("ready_made", "Ready-made All", "pct"),
    Column("ready_made_ci", "Ready-made 95% CI", "ci"),
    Column("white_box", "White-box All", "pct"),
    Column("white_box_ci", "White-box 95% CI", "ci"),
    Column("gap", "Gap", "delta"),
    Column("gap_ci", "Gap 95% CI", "ci"),
    Column("only_white_box", "Only white-box breaks", "int"),
    Column("only_ready_made", "Only ready-made breaks", "int"),
    Column("p_value", "McNemar p", "p"),
    Column("n_examples", "n", "int"),
    Column("eps_text", "eps"),
    Column("suite", "Suite"),
    Column("deploy", "Deploy"),
    Column("estimator", "White-box estimator"),
    Column("flags", "Flags", "flags"),
)
LATEX_MAIN = ("model", "method", "defense", "readout", "clean", "pgd", "aa", "all", "delta_all", "n_examples")
LATEX_GAP = (
    "model",
    "method",
    "defense",
    "readout",
    "clean",
    "ready_made",
    "white_box",
    "gap",
    "gap_ci",
    "p_value",
    "n_examples",
)
LATEX_RUNS = ("run", "model", "defense", "readout", "suite", "clean", "all", "all_ci", "n_examples")
CSV_EXTRA = ("unreliable", "estimators", "suite", "batching", "runs", "citation")

DEFINITIONS = (
    "Accuracies in percent, recomputed from per-example records. Clean: clean prediction correct. "
    "PGD / AA: robust under every PGD / AutoAttack run of every protocol and gradient estimator. "
    "All: robust under every attack run (per-example worst case). "
    "Δ: measured minus the paper's reported number for the same setting. Deploy: the DEQ's deployed "
    "prediction (fz = f(z*); unroll:K:lam = f(z*) then K damped steps). 95% CI: Wilson score interval "
    "over the n examples. One row per setting: the largest run (or merged runs on the same examples); "
    "--view runs lists every run. Paired per-example tests (McNemar): --view gap (ready-made vs white-box) "
    "and --view findings (defended vs undefended, random states vs not, DEQ vs CNN)."
)
RUNS_DEFINITIONS = (
    "Every run record and readout on its own row (no merging), in percent, with 95% Wilson intervals. "
    "Ready-made / White-box All: robust under every attack of that protocol alone."
)
GAP_DEFINITIONS = (
    "Robust accuracy (All) under each protocol alone, in percent. Ready-made: the attacks with the "
    "model's own gradient at the final state. White-box: the estimators chosen by the development-set "
    "sweep. Gap = ready-made minus white-box: how much the ready-made evaluation overestimates robustness. "
    "Both protocols ran on the same examples, so the gap is tested per example: 'only white-box breaks' "
    "counts the examples robust to every ready-made attack that a white-box attack breaks, and McNemar's "
    "exact p-value says whether the two protocols differ; intervals are 95% (Wilson, Newcombe's paired "
    "interval for the gap)."
)


def columns_for(view: str) -> tuple[Column, ...]:
    return {"gap": GAP_COLUMNS, "runs": RUNS_COLUMNS}.get(view, MAIN_COLUMNS)


def note_for(view: str) -> str:
    return {"gap": GAP_DEFINITIONS, "runs": RUNS_DEFINITIONS}.get(view, DEFINITIONS)


def p_text(p: float) -> str:
    """A p-value people can read: three significant decimals, '<0.001' below that."""
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def cell(value: Any, kind: str, dash: str = "–") -> str:
    """One formatted cell: 2-decimal percentages, signed deltas, joined flags, a dash for missing."""
    if kind == "flags":
        return ", ".join(value) if isinstance(value, list | tuple) and value else ""
    if _missing(value) or value == "":
        return dash if kind != "text" else ""
    if kind == "pct":
        return f"{float(value):.2f}"
    if kind == "ci":
        low, high = value
        return f"[{float(low):.1f}, {float(high):.1f}]"
    if kind == "p":
        return p_text(float(value))
    if kind == "delta":
        return f"{float(value):+.2f}"
    if kind == "int":
        return str(int(value))
    return str(value)


def records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as plain dicts, NaN as None (JSON-safe)."""
    out = []
    for row in table.to_dict("records"):
        out.append({k: None if _missing(v) else v for k, v in row.items()})
    return out


def _by_dataset(table: pd.DataFrame) -> list[tuple[str, list[dict[str, Any]]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in records(table):
        groups.setdefault(str(row["dataset"]), []).append(row)
    return list(groups.items())


def render(table: pd.DataFrame, fmt: str, view: str = "main") -> str:
    """The table in one of FORMATS (except robustbench, which exports a single run)."""
    renderers = {
        "table": render_text,
        "md": render_markdown,
        "csv": render_csv,
        "latex": render_latex,
        "html": render_html,
        "json": render_json,
    }
    if fmt not in renderers:
        raise BenchError(f"format {fmt!r} cannot render a table; use one of {', '.join(renderers)}")
    return renderers[fmt](table, view)


# ----- plain text, terminal, Markdown, CSV, JSON -----------------------------------------------------------


def _title(dataset: str, rows: list[dict[str, Any]]) -> str:
    eps = ", ".join(dict.fromkeys(r["eps_text"] for r in rows))
    return f"{dataset} (L-inf, eps {eps})"


def print_tables(table: pd.DataFrame, view: str) -> None:
    """One rich table per data set on a terminal; piped, one tab-separated table with a Dataset column
    (bench.console's convention: easy to grep or cut)."""
    from bench.console import print_table, stdout_is_terminal

    cols = columns_for(view)
    if not stdout_is_terminal():
        rows = records(table)
        body = [[r["dataset"], *(cell(r.get(c.key), c.kind) for c in cols)] for r in rows]
        print_table("", ["Dataset", *(c.header for c in cols)], body)
        return
    for dataset, rows in _by_dataset(table):  # print_table escapes rich markup ("z[t]" stays "z[t]")
        body = [[cell(r.get(c.key), c.kind) for c in cols] for r in rows]
        print_table(_title(dataset, rows), [c.header for c in cols], body)


def _pad(text: str, width: int, col: Column) -> str:
    return text.rjust(width) if col.numeric else text.ljust(width)


def render_text(table: pd.DataFrame, view: str) -> str:
    cols = columns_for(view)
    parts = []
    for dataset, rows in _by_dataset(table):
        grid = [[c.header for c in cols]] + [[cell(r.get(c.key), c.kind) for c in cols] for r in rows]
        widths = [max(len(line[i]) for line in grid) for i in range(len(cols))]
        lines = [
            "  ".join(_pad(v, w, c) for v, w, c in zip(line, widths, cols, strict=True)) for line in grid
        ]
        parts.append(_title(dataset, rows) + "\n" + "\n".join(s.rstrip() for s in lines) + "\n")
    return "\n".join(parts)


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|")


def render_markdown(table: pd.DataFrame, view: str) -> str:
    cols = columns_for(view)
    parts = [f"{note_for(view)}\n"]
    for dataset, rows in _by_dataset(table):
        lines = [
            f"## {_md_escape(_title(dataset, rows))}",
            "",
            "| " + " | ".join(c.header for c in cols) + " |",
            "|" + "|".join("---:" if c.numeric else "---" for c in cols) + "|",
        ]
        for r in rows:
            lines.append("| " + " | ".join(_md_escape(cell(r.get(c.key), c.kind)) for c in cols) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def render_csv(table: pd.DataFrame, view: str) -> str:
    """Raw numbers (not rounded), lists joined with '; ', one header line."""
    keys = ["dataset", *(c.key for c in columns_for(view)), *CSV_EXTRA]
    keys = [k for k in dict.fromkeys(keys) if k in table.columns]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(keys)
    for row in records(table):
        values = []
        for k in keys:
            v = row.get(k)
            values.append("; ".join(map(str, v)) if isinstance(v, list) else "" if v is None else v)
        writer.writerow(values)
    return buf.getvalue()


def render_json(table: pd.DataFrame, view: str) -> str:
    return json.dumps(records(table), indent=1, sort_keys=True, ensure_ascii=False) + "\n"


# ----- LaTeX --------------------------------------------------------------------------------------------

_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "[": "{[}",  # a row starting with '[' would be read as the optional argument of the previous \\
    "]": "{]}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "Δ": r"$\Delta$",
    "–": "--",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in str(text))


def _latex_cell(row: dict[str, Any], col: Column) -> str:
    text = cell(row.get(col.key), col.kind, dash="--")
    if col.kind == "delta" and text != "--":
        text = f"${text}$"
    elif col.kind != "delta":
        text = latex_escape(text)
    if col.key == "all" and row.get("flags"):
        text += r"$^\ast$"
    if row.get("source") == REPORTED and text:
        text = rf"\textit{{{text}}}"
    return text


def render_latex(table: pd.DataFrame, view: str) -> str:
    """booktabs tables, one table float per data set; reported rows in italics."""
    keys = {"gap": LATEX_GAP, "runs": LATEX_RUNS}.get(view, LATEX_MAIN)
    by_key = {c.key: c for c in columns_for(view)}
    cols = [by_key[k] for k in keys]
    note = note_for(view)
    parts = ["% deq-bench leaderboard; needs \\usepackage{booktabs}\n"]
    for dataset, rows in _by_dataset(table):
        align = "".join("r" if c.numeric else "l" for c in cols)
        header = " & ".join(r"$n$" if c.key == "n_examples" else latex_escape(c.header) for c in cols)
        body = [" & ".join(_latex_cell(r, c) for c in cols) + r" \\" for r in rows]
        caption = latex_escape(f"{_title(dataset, rows)}. {note}")
        if any(r.get("source") == "reported" for r in rows):
            caption += " Italic rows: reported by the papers."
        if any(r.get("flags") for r in rows):
            caption += r" $^\ast$: sanity checks fired (see the leaderboard's flags)."
        label = "".join(ch if ch.isalnum() else "-" for ch in dataset)
        parts.append(
            "\n".join(
                [
                    r"\begin{table}[t]",
                    r"\centering",
                    r"\small",
                    rf"\begin{{tabular}}{{{align}}}",
                    r"\toprule",
                    header + r" \\",
                    r"\midrule",
                    *body,
                    r"\bottomrule",
                    r"\end{tabular}",
                    rf"\caption{{{caption}}}",
                    rf"\label{{tab:deq-bench-{label}-{view}}}",
                    r"\end{table}",
                ]
            )
            + "\n"
        )
    return "\n".join(parts)


# ----- HTML ---------------------------------------------------------------------------------------------


def _html_cell(row: dict[str, Any], col: Column) -> dict[str, Any]:
    """What the template shows in one cell (it escapes every value)."""
    flags = None
    if col.kind == "flags":
        flags = [{"name": f, "info": f in INFO_FLAGS} for f in row.get("flags") or []]
    return {
        "classes": " ".join([col.key] + (["num"] if col.numeric else [])),
        "text": cell(row.get(col.key), col.kind),
        "flags": flags,
        "title": str(row["citation"]) if col.key == "source" and row.get("citation") else None,
    }


def render_html(table: pd.DataFrame, view: str) -> str:
    """One self-contained page from templates/leaderboard.html.j2: inline CSS, no scripts, no external
    assets; one table per data set. Jinja2 escapes every value (model names are user input)."""
    import jinja2

    cols = columns_for(view)
    tables, citations = [], []
    for dataset, rows in _by_dataset(table):
        shown = []
        for row in rows:
            classes = [str(row.get("source", "measured"))] + (["unreliable"] if row.get("unreliable") else [])
            shown.append({"classes": " ".join(classes), "cells": [_html_cell(row, c) for c in cols]})
            if row.get("citation"):
                citations.append(str(row["citation"]))
        tables.append({"title": _title(dataset, rows), "rows": shown})
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).resolve().parent / "templates"),
        autoescape=True,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("leaderboard.html.j2").render(
        view=view,
        note=note_for(view),
        columns=cols,
        tables=tables,
        citations=list(dict.fromkeys(citations)),
        version=__version__,
    )


# ----- RobustBench model_info -----------------------------------------------------------------------------


def _pct_text(value: float | None) -> str | None:
    return None if value is None else f"{value:.2f}"


def model_info(row: dict[str, Any]) -> dict[str, Any]:
    """RobustBench's model_info JSON for one measured row (cifar10/Linf/<Name>.json conventions).

    autoattack_acc is standard AutoAttack with the model's own gradient (our ready-made 'aa' group) when
    the run has it, else the worst case over every AA run; external is our All (every attack, white-box
    estimators included) when it is lower. unreliable: a sanity check fired; the footnote says which.
    Bibliographic fields (name, authors, venue, link) are left for the curator to fill in.
    """
    ready_made_aa = row["protocols"].get("ready-made", {}).get("groups", {}).get("aa")
    aa = ready_made_aa if ready_made_aa is not None else row["aa"]
    if aa is None:
        raise BenchError(f"{row['model']}: the run has no AutoAttack ('aa') group; RobustBench needs one")
    ref = row.get("reference") or {}
    reported = ref.get("aa") if ref.get("aa") is not None else aa
    external = row["all"] if row["all"] is not None and row["all"] < aa else None
    notes = [
        f"Evaluated with deq-bench {__version__} on the first {row['n_examples']} {row['dataset']} test "
        f"examples, readout {row['readout']}, defense {row['defense']}."
    ]
    if ready_made_aa is not None:
        notes.append("AutoAttack: the standard attacks with the model's own gradient (ready-made protocol).")
    if external is not None:
        notes.append(
            f"{external:.2f}% is the per-example worst case over every attack run, "
            f"gradient estimators {', '.join(row['estimators'])}."
        )
    if row["flags"]:
        notes.append(f"Sanity checks that fired: {', '.join(row['flags'])}.")
    if ref:
        notes.append(f"Reported: {ref.get('citation')}, {ref.get('method')}.")
    info: dict[str, Any] = {
        "link": "",
        "name": row["model"],
        "authors": "",
        "additional_data": False,
        "number_forward_passes": 1 if row["defense"] == "none" else None,
        "dataset": row["dataset"],
        "venue": "",
        "architecture": ref.get("model") or row["model"],
        "eps": row["eps_text"],
        "clean_acc": _pct_text(row["clean"]),
        "reported": _pct_text(reported),
        "autoattack_acc": _pct_text(aa),
    }
    if external is not None:
        info["external"] = _pct_text(external)
    info["footnote"] = " ".join(notes)
    info["unreliable"] = bool(row["unreliable"])
    return info


def model_info_json(row: dict[str, Any]) -> str:
    return json.dumps(model_info(row), indent=2) + "\n"
