"""Figures for the findings page: accuracy along a DEQ's dynamics (clean, ready-made, white-box, with
95 % Wilson bands) and the per-example gap between the two protocols (which examples only the white-box
attacks break). Drawn from the same pools the findings use, so the page and its figures agree."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from bench.errors import BenchError
from bench.report.findings import (
    ONLY_WHITE_BOX,
    Pool,
    figure_names,
    gap_examples,
    largest,
    state_masks,
    undefended_deqs,
)
from bench.report.plots import _new_figure, _state_axis, save_figure

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

FORMATS = ["png", "svg"]
SERIES = (
    ("clean", None, {"color": "black", "marker": "o", "linestyle": "-"}),
    ("ready-made", "ready-made", {"color": "tab:blue", "marker": "s", "linestyle": "--"}),
    ("white-box", "white-box", {"color": "tab:red", "marker": "^", "linestyle": "-"}),
)


def _wilson_band(hits: list[int], n: int) -> tuple[list[float], list[float]]:
    from bench.stats import wilson_interval

    bounds = [wilson_interval(int(k), n) for k in hits]
    return [100 * lo for lo, _ in bounds], [100 * hi for _, hi in bounds]


def draw_dynamics(pool: Pool) -> Figure:
    """Accuracy of every state z[t] (and the deployed readout, at the right) on clean inputs and on the
    worst-case inputs of each protocol, with 95 % Wilson bands."""
    from bench.spec import format_eps

    fig, ax = _new_figure()
    steps = 0
    for label, protocol, style in SERIES:
        masks = state_masks(pool, protocol)
        if masks is None:
            continue
        steps = masks.shape[1]
        hits = [int(v) for v in masks.sum(0)]
        lo, hi = _wilson_band(hits, pool.n)
        t = list(range(1, steps + 1))
        ax.plot(t, [100 * k / pool.n for k in hits], label=f"{label} z[t]", **style)
        ax.fill_between(t, lo, hi, color=style["color"], alpha=0.12, linewidth=0)
        final = pool.out.clean if protocol is None else pool.robust(protocol)
        k = int(final.sum())
        (flo,), (fhi,) = _wilson_band([k], pool.n)
        acc = 100 * k / pool.n
        ax.errorbar(
            [steps + 1], [acc], yerr=[[acc - flo], [fhi - acc]], color=style["color"], marker="D", capsize=3
        )
    _state_axis(ax, steps + 1)
    ax.set_xticks([*range(1, steps + 1), steps + 1], [*map(str, range(1, steps + 1)), "readout"])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    spec = pool.first.spec
    ax.set_title(
        f"{pool.model}: accuracy along the dynamics (bands: 95% Wilson)\n"
        f"{pool.first.dataset}, n={pool.n}, eps={format_eps(float(spec['eps']))}, suite {pool.suite}; "
        "attacks aim at the final readout",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="lower right")
    return fig


CATEGORIES = (
    ("clean wrong", "lightgrey"),
    ("both protocols break", "tab:gray"),
    ("only ready-made breaks", "tab:blue"),
    ("only white-box breaks", "tab:red"),
    ("robust to both", "tab:green"),
)


def draw_gap(pools: list[Pool]) -> Figure:
    """One bar per model: how its examples split between the protocols, McNemar's p in the label."""
    from bench.report.exports import p_text
    from bench.report.leaderboard import paired_pct

    gaps = gap_examples(pools)
    fig, ax = _new_figure()
    labels = []
    for row, (model, pool, _, _) in enumerate(gaps):
        rm, wb, clean = pool.robust("ready-made"), pool.robust("white-box"), pool.out.clean
        counts = [
            int((~clean).sum()),
            int((clean & ~rm & ~wb).sum()),
            int((wb & ~rm).sum()),
            int((rm & ~wb).sum()),
            int((rm & wb).sum()),
        ]
        left = 0.0
        for (name, color), count in zip(CATEGORIES, counts, strict=True):
            width = 100 * count / pool.n
            ax.barh(row, width, left=left, color=color, label=name if row == 0 else None, edgecolor="white")
            if count:
                ax.text(left + width / 2, row, str(count), ha="center", va="center", fontsize=8)
            left += width
        p = paired_pct(rm, wb)["p_value"]
        labels.append(f"{model}\nn={pool.n}, McNemar p={p_text(p)}")
    if not gaps:
        ax.text(0.5, 0.5, "no run with both protocols", ha="center", va="center", transform=ax.transAxes)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("examples (%)")
    ax.set_title("Per-example gap: ready-made vs white-box attacks\non the same examples", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3)
    return fig


BUILTIN_N = 1000  # the built-in Fashion-MNIST subset: the test split's first 1000 images
MAX_IMAGES = 24


def test_images(pool: Pool, indices: list[int]) -> np.ndarray | None:
    """(k, H, W) grey images at these test-set indices, when they can be read offline (the built-in
    Fashion-MNIST subset) and their labels agree with the record's; None otherwise (the page lists the
    indices either way)."""
    import numpy as np

    if pool.first.dataset != "fashion-mnist" or not indices or max(indices) >= BUILTIN_N:
        return None
    from bench.data import load_dataset

    try:
        data = load_dataset("fashion-mnist-builtin", "test", n_examples=BUILTIN_N)
    except BenchError:
        return None
    labels = dict(zip(pool.first.columns["index"], pool.first.columns["label"], strict=True))
    if any(int(data.y[i]) != int(labels[i]) for i in indices):
        return None
    return np.asarray(data.x[indices, 0].numpy())


def draw_only_white_box(pool: Pool, indices: list[int], images: np.ndarray) -> Figure:
    """The examples that only the white-box attacks break, as images with their test-set index."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = indices[:MAX_IMAGES]
    cols = min(8, len(shown))
    rows = (len(shown) + cols - 1) // cols
    fig = Figure(figsize=(max(1.1 * cols + 0.4, 4.0), 1.25 * rows + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    labels = dict(zip(pool.first.columns["index"], pool.first.columns["label"], strict=True))
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k < len(shown):
            ax.imshow(images[k], cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"#{shown[k]} (y={labels[shown[k]]})", fontsize=7)
    more = f", first {MAX_IMAGES} shown" if len(indices) > MAX_IMAGES else ""
    fig.suptitle(
        f"{pool.model}: {len(indices)} examples only the white-box attacks break\n(n={pool.n}{more})",
        fontsize=9,
    )
    return fig


def only_white_box_figures(pools: list[Pool]) -> dict[str, Figure]:
    """Stem -> figure of the examples only the white-box attacks break, per model where images exist."""
    out = {}
    for model, pool, only_wb, _ in gap_examples(pools):
        images = test_images(pool, only_wb[:MAX_IMAGES])
        if images is not None:
            out[f"{ONLY_WHITE_BOX}{model}"] = draw_only_white_box(pool, only_wb, images)
    return out


def draw_findings(pools: list[Pool], out_dir: Path) -> tuple[list[Path], dict[str, str]]:
    """Every figure of the findings page, written as PNG and SVG into out_dir: (files, stem -> caption
    of each figure drawn, for the page to link)."""
    written: list[Path] = []
    captions = figure_names(pools)
    for stem, fig in only_white_box_figures(pools).items():
        written += save_figure(fig, out_dir / stem, FORMATS)
        captions[stem] = f"{stem.removeprefix(ONLY_WHITE_BOX)}: the examples only the white-box attacks break"
    for stem in figure_names(pools):
        if stem == "findings-gap":
            fig = draw_gap(pools)
        else:
            model = stem.removeprefix("findings-dynamics-")
            members = [p for p in undefended_deqs(pools)[model] if state_masks(p, None) is not None]
            pool = largest(members)
            assert pool is not None
            fig = draw_dynamics(pool)
        written += save_figure(fig, out_dir / stem, FORMATS)
    return written, captions
