"""`bench plot`: figures of a DEQ's dynamics from per-example run records, clean vs adversarial.

    state-accuracy   accuracy of every solver state z[t]'s prediction (clean_states.pred and, per attack
                     group, adversarial[...].states_pred on that group's worst-case inputs)
    state-residual   median relative residual ||f(z)-z|| / ||f(z)|| at every step (needs the per-step
                     traces clean_solver.rel_trace and adversarial[...].solver.rel_trace)
    state-entropy    mean prediction entropy of every state (needs clean_states.entropy and
                     adversarial[...].states_entropy)
    final-residual   distribution of the returned iterate's relative residual (what every record has)

A figure whose arrays a record lacks is skipped with a message saying which arrays are missing. Figures
are drawn on matplotlib's Agg canvas (no display, no global pyplot state) and written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.errors import BenchError, did_you_mean
from bench.records.schema import adversarial_entries
from bench.spec import format_eps

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

IMAGE_FORMATS = ("png", "svg", "pdf")
_METADATA = {"png": {"Software": None}, "svg": {"Date": None}, "pdf": {"CreationDate": None}}


class Skip(Exception):
    """A figure cannot be drawn from this record; the message says why."""


def per_state(values: Any, n: int, what: str) -> np.ndarray:
    """An (n, T) array from a per-example-per-state column, or Skip if the layout is not that."""
    import numpy as np

    if values is None:
        raise Skip(f"the record has no {what}")
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise Skip(f"{what} is not one list of T values per example") from None
    if arr.ndim != 2 or arr.shape[0] != n or arr.shape[1] == 0:
        raise Skip(f"{what} has shape {arr.shape}, expected ({n}, T): one list of T values per example")
    return arr


def _adversarial(columns: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, entry) per attack group's worst-case inputs, e.g. 'white-box pgd' (+ readout if several)."""
    entries = list(adversarial_entries(columns))
    readouts = {readout for _, _, readout, _ in entries}
    out = []
    for protocol, group, readout, entry in entries:
        label = f"{protocol} {group}" + (f" [{readout}]" if len(readouts) > 1 else "")
        out.append((label, entry))
    return out


def state_accuracy(doc: dict[str, Any]) -> dict[str, np.ndarray]:
    """Percent accuracy per solver state: 'clean' and one series per attack group."""
    import numpy as np

    cols = doc["results"]["columns"]
    labels = np.asarray(cols["label"])
    n = len(labels)
    if "clean_states" not in cols:
        raise Skip("not a DEQ run (no per-state predictions)")
    clean = per_state(cols["clean_states"].get("pred"), n, "clean_states.pred")
    series = {"clean": 100.0 * (clean == labels[:, None]).mean(0)}
    for label, entry in _adversarial(cols):
        pred = per_state(entry.get("states_pred"), n, f"adversarial states_pred ({label})")
        series[label] = 100.0 * (pred == labels[:, None]).mean(0)
    return series


def _traces(
    doc: dict[str, Any], clean: tuple[str, str], adv: tuple[str, ...], what: str
) -> dict[str, np.ndarray]:
    """(n, T) arrays of one per-step quantity: clean from columns[clean[0]][clean[1]], adversarial from the
    path `adv` inside each adversarial entry."""
    cols = doc["results"]["columns"]
    n = len(cols["label"])
    if "clean_states" not in cols:
        raise Skip("not a DEQ run (no per-state predictions)")
    out = {"clean": per_state(cols.get(clean[0], {}).get(clean[1]), n, f"{clean[0]}.{clean[1]} ({what})")}
    for label, entry in _adversarial(cols):
        node: Any = entry
        for key in adv:
            node = node.get(key) if isinstance(node, dict) else None
        out[label] = per_state(node, n, f"adversarial {'.'.join(adv)} ({what}, {label})")
    return out


def residual_traces(doc: dict[str, Any]) -> dict[str, np.ndarray]:
    return _traces(doc, ("clean_solver", "rel_trace"), ("solver", "rel_trace"), "per-step relative residual")


def entropy_traces(doc: dict[str, Any]) -> dict[str, np.ndarray]:
    return _traces(doc, ("clean_states", "entropy"), ("states_entropy",), "per-state prediction entropy")


def final_residuals(doc: dict[str, Any]) -> dict[str, np.ndarray]:
    import numpy as np

    cols = doc["results"]["columns"]
    if "clean_solver" not in cols:
        raise Skip("not a DEQ run (no solver statistics)")
    out = {"clean": np.asarray(cols["clean_solver"]["rel_residual"], dtype=float)}
    for label, entry in _adversarial(cols):
        if (entry.get("solver") or {}).get("rel_residual") is not None:
            out[label] = np.asarray(entry["solver"]["rel_residual"], dtype=float)
    return out


# ----- drawing --------------------------------------------------------------------------------------------


def _new_figure() -> tuple[Figure, Axes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _style(label: str) -> dict[str, Any]:
    if label == "clean":
        return {"color": "black", "linewidth": 2.2, "marker": "o", "zorder": 3}
    return {"linewidth": 1.4, "marker": ".", "linestyle": "--" if label.startswith("ready-made") else "-"}


def _subtitle(doc: dict[str, Any]) -> str:

    spec = doc["spec"]
    n = len(doc["results"]["columns"]["label"])
    return f"{spec['model']} on {spec['dataset']}, n={n}, eps={format_eps(float(spec['eps']))}"


def _state_axis(ax: Axes, steps: int) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("solver state t")
    ax.set_xlim(0.7, steps + 0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def draw_state_accuracy(doc: dict[str, Any]) -> Figure:
    series = state_accuracy(doc)
    fig, ax = _new_figure()
    for label, acc in series.items():
        ax.plot(range(1, len(acc) + 1), acc, label=label, **_style(label))
    _state_axis(ax, len(series["clean"]))
    ax.set_ylabel("accuracy of z[t]'s prediction (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(f"Accuracy along the dynamics\n{_subtitle(doc)}", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def draw_state_residual(doc: dict[str, Any]) -> Figure:
    import numpy as np

    traces = residual_traces(doc)
    fig, ax = _new_figure()
    for label, arr in traces.items():
        t = np.arange(1, arr.shape[1] + 1)
        lo, mid, hi = np.nanpercentile(np.maximum(arr, 1e-12), [25, 50, 75], axis=0)
        line = ax.plot(t, mid, label=f"{label} (median)", **_style(label))[0]
        ax.fill_between(t, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
    _state_axis(ax, max(a.shape[1] for a in traces.values()))
    ax.set_yscale("log")
    ax.set_ylabel("relative residual ||f(z)-z|| / ||f(z)||")
    ax.set_title(f"Convergence along the dynamics (band: 25-75 %)\n{_subtitle(doc)}", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def draw_state_entropy(doc: dict[str, Any]) -> Figure:
    traces = entropy_traces(doc)
    fig, ax = _new_figure()
    for label, arr in traces.items():
        ax.plot(range(1, arr.shape[1] + 1), arr.mean(0), label=label, **_style(label))
    _state_axis(ax, max(a.shape[1] for a in traces.values()))
    ax.set_ylabel("mean prediction entropy of z[t] (nats)")
    ax.set_title(f"Prediction entropy along the dynamics\n{_subtitle(doc)}", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def draw_final_residual(doc: dict[str, Any]) -> Figure:
    import numpy as np

    values = final_residuals(doc)
    everything = np.maximum(np.concatenate(list(values.values())), 1e-12)
    lo, hi = np.log10(everything.min()), np.log10(everything.max())
    bins = np.logspace(lo - 0.1, hi + 0.1, 30)
    fig, ax = _new_figure()
    for label, arr in values.items():
        style = _style(label)
        ax.hist(
            np.maximum(arr, 1e-12),
            bins=bins,
            histtype="step",
            label=label,
            color=style.get("color"),
            linewidth=style["linewidth"],
            linestyle=style.get("linestyle", "-"),
        )
    ax.set_xscale("log")
    ax.set_xlabel("relative residual of the returned iterate")
    ax.set_ylabel("examples")
    ax.set_title(f"Solver convergence, clean vs adversarial\n{_subtitle(doc)}", fontsize=10)
    ax.legend(fontsize=8)
    return fig


DRAW = {
    "state-accuracy": draw_state_accuracy,
    "state-residual": draw_state_residual,
    "state-entropy": draw_state_entropy,
    "final-residual": draw_final_residual,
}


def save_figure(fig: Figure, stem: Path, formats: list[str]) -> list[Path]:
    """Write the figure in every format, each atomically (a reader never sees half a file)."""
    import matplotlib

    from bench.io import atomic_write_bytes

    paths = []
    for fmt in formats:
        buf = io.BytesIO()
        with matplotlib.rc_context({"svg.hashsalt": "deq-bench"}):  # SVG element ids: fixed, not random
            fig.savefig(buf, format=fmt, metadata=_METADATA[fmt])
        path = stem.with_name(f"{stem.name}.{fmt}")
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths


def plot_run(
    path: Path, doc: dict[str, Any], out_dir: Path, formats: list[str]
) -> tuple[list[Path], list[str]]:
    """Every figure of one run: (files written, 'skipped ...' messages)."""
    if "clean_states" not in doc["results"]["columns"]:
        return [], [f"{path.name}: skipped: not a DEQ run (no per-state predictions)"]
    written: list[Path] = []
    skipped: list[str] = []
    for name, draw in DRAW.items():
        try:
            fig = draw(doc)
        except Skip as why:
            skipped.append(f"{path.name}: skipped {name}: {why}")
            continue
        written += save_figure(fig, out_dir / f"{path.stem}-{name}", formats)
    return written, skipped


def parse_formats(text: str) -> list[str]:
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    if not formats:
        raise BenchError("--format needs at least one of " + ", ".join(IMAGE_FORMATS))
    for fmt in formats:
        if fmt not in IMAGE_FORMATS:
            raise BenchError(f"unknown image format {fmt!r}{did_you_mean(fmt, IMAGE_FORMATS)}")
    return list(dict.fromkeys(formats))


def plot_records(results_dir: str, run: str | None, out: str | None, fmt: str) -> list[str]:
    """Every figure of the chosen records; returns the lines to print (skips, then files written)."""
    from bench.records.read import iter_records, read_record

    formats = parse_formats(fmt)
    if run is not None:
        if not Path(run).is_file():
            raise BenchError(f"run record {run} does not exist")
        runs = [(Path(run), read_record(run))]
    else:
        runs = list(iter_records(results_dir))
        if not runs:
            raise BenchError(f"no run records in {results_dir}; run `bench evaluate` first")
    out_dir = Path(out) if out is not None else (Path(run).parent if run else Path(results_dir)) / "plots"
    written: list[Path] = []
    skipped: list[str] = []
    for path, doc in runs:
        files, notes = plot_run(path, doc, out_dir, formats)
        written += files
        skipped += notes
    if not written:
        raise BenchError(f"no figures written: {skipped[0] if skipped else 'no runs'}")
    return [*skipped, *(f"wrote {path}" for path in written)]
