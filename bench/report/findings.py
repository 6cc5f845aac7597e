"""`bench leaderboard --view findings`: each claim of the two papers beside what this project's records
measure, with intervals, McNemar p-values and a plain verdict.

Every comparison is paired: both sides are per-example results on the same example indices (and, where
the claim is about one model, the same checkpoint sha256), so McNemar's exact test applies and only the
discordant examples carry evidence. Two runs of different sizes and the same suite are compared on the
examples both hold (a defended run on the first 200 images beside an undefended one on the first 1000):
under the default per-example batching an example's outcome does not depend on which other examples its
run held, and either way the pair stays on identical examples. Numbers are recomputed from
per-example columns (bench.report.leaderboard's Outcomes), never read from a record's summary. Verdicts:

    reproduced               the claimed direction with p < ALPHA (or, for "not worse" claims, the 95 %
                             interval of the difference lies above -MARGIN points)
    not reproduced           the opposite direction with p < ALPHA (or the interval lies below -MARGIN)
    inconclusive at this n   neither: the interval says which effects this n cannot exclude
    no run                   the records hold no pair of runs that answers the claim

The early-exit / ensemble claims need a run that attacks that readout directly; the states finding uses
the final readout's worst-case inputs (the states themselves unattacked, best state Bonferroni-adjusted).
Below the claims the page lists every pair of runs on the same examples that differs in one factor
(`all_pairs`). The findings are data: `findings()` returns them, the renderers format them, and
bench.report.findings_page writes the page with the figures it links (bench.report.findings_plots).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from bench.errors import BenchError
from bench.records.schema import adversarial_entries
from bench.report.leaderboard import (
    REFERENCE_CSV,
    Outcomes,
    Run,
    _pool_runs,
    base_dataset,
    defense_name,
    merge_outcomes,
    paired_pct,
    reference_rows,
    wilson_pct,
)

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

ALPHA = 0.05
MARGIN = 5.0  # points: a "not worse" / "competitive" claim tolerates a loss smaller than this
NEURIPS = "NeurIPS 2022"
ICML = "ICML 2023"
FINDINGS_FORMATS = ("md", "table", "json")
FIGURE_DIR = "plots"
ONLY_WHITE_BOX = (
    "findings-only-white-box-"  # stem prefix of a model's grid of the examples only white-box breaks
)


# ----- pools of runs ----------------------------------------------------------------------------------------


def registry_facts(model: str) -> dict[str, Any]:
    """family / architecture / parameters of a registered model ({} for one the registry lacks)."""
    from bench.registry import get_entry

    try:
        entry = get_entry(model)
    except (BenchError, ImportError, OSError, KeyError, ValueError):
        return {}
    return {k: getattr(entry, k, None) for k in ("family", "architecture", "parameters")}


@dataclass
class Pool:
    """Runs of one setting merged on the same examples (bench.report.leaderboard's pools), one readout."""

    runs: list[Run]
    readout: str
    out: Outcomes
    cut: bool = False  # restricted to the examples another pool shares (`on`)

    @property
    def first(self) -> Run:
        return self.runs[0]

    @property
    def model(self) -> str:
        return self.first.model

    @property
    def defense(self) -> str:
        return self.first.defense

    @property
    def sha(self) -> str | None:
        return self.first.spec.get("checkpoint_sha256")

    def on(self, index: pd.Index) -> Pool:
        """This pool restricted to some of its examples (outcomes are per example, so a subset is exact)."""
        out = Outcomes(self.out.clean.loc[index], self.out.broken.loc[index])
        return Pool(self.runs, self.readout, out, cut=len(index) < self.n)

    @property
    def n(self) -> int:
        return self.out.n

    @property
    def suite(self) -> str:
        return "+".join(sorted({str(r.spec["plan"].get("suite", "")) for r in self.runs}))

    @property
    def random_state(self) -> bool:
        return bool(self.first.recipe.get("random_state", False))

    @cached_property
    def facts(self) -> dict[str, Any]:
        return registry_facts(self.model)

    @property
    def is_deq(self) -> bool:
        family = self.facts.get("family")
        return family == "deq" if family else "clean_states" in self.first.columns

    @property
    def names(self) -> list[str]:
        return [r.path.name for r in self.runs]

    @property
    def newest(self) -> float:
        return max(r.finished for r in self.runs)

    def protocols(self) -> set[str]:
        return set(self.out.broken.columns.get_level_values("protocol"))

    def robust(self, protocol: str | None = None) -> pd.Series:
        mask = self.out.robust() if protocol is None else self.out.robust(protocol=protocol)
        assert mask is not None
        return mask


def build_pools(runs: list[Run]) -> list[Pool]:
    """Every mergeable pool of every setting and readout (not only the largest: pairing needs them all)."""
    groups: dict[tuple[Any, ...], list[Run]] = {}
    for run in runs:
        for readout in run.readouts:
            key = (run.dataset, round(run.eps, 9), run.model, run.method, run.defense, run.deploy, readout)
            groups.setdefault(key, []).append(run)
    pools = []
    for key, members in groups.items():
        readout = key[-1]
        for part in _pool_runs(members, readout):
            part = sorted(part, key=lambda r: (-r.finished, r.path.name))
            out = merge_outcomes([r.outcomes(readout) for r in part])
            if out is not None and out.n > 0:
                pools.append(Pool(part, readout, out))
    return pools


def on_shared(a: Pool, b: Pool) -> tuple[Pool, Pool] | None:
    """a and b on the examples both hold (same data set and eps), in a's order; None if they share none.

    Pools on other example sets must also share the suite: cut down to a few examples, a small run under
    another protocol would otherwise pair with every large one.
    """
    if a.first.dataset != b.first.dataset or not math.isclose(a.first.eps, b.first.eps, rel_tol=1e-9):
        return None
    ia, ib = a.out.clean.index, b.out.clean.index
    if ia.equals(ib):
        return a, b
    if a.suite != b.suite:
        return None
    shared = ia[ia.isin(ib)]
    return (a.on(shared), b.on(shared)) if len(shared) else None


def shared_note(a: Pool, b: Pool, *before: str) -> str:
    """`before` joined by '; ', then 'on the n examples both runs hold' when the pair was cut to them."""
    cut = f"on the {a.n} examples both runs hold" if a.cut or b.cut else ""
    return "; ".join(part for part in (*before, cut) if part)


def best_pair(pairs: list[tuple[Pool, Pool]]) -> tuple[Pool, Pool] | None:
    """The pair on the most examples; then the same suite on both sides (like attacks), then the newest."""
    if not pairs:
        return None
    return max(pairs, key=lambda p: (p[0].n, p[0].suite == p[1].suite, max(p[0].newest, p[1].newest)))


def largest(pools: list[Pool]) -> Pool | None:
    return max(pools, key=lambda p: (p.n, p.newest)) if pools else None


def undefended_deqs(pools: list[Pool]) -> dict[str, list[Pool]]:
    """Undefended final-readout pools of each DEQ model."""
    out: dict[str, list[Pool]] = {}
    for pool in pools:
        if pool.is_deq and pool.defense == "none" and pool.readout == "final":
            out.setdefault(pool.model, []).append(pool)
    return dict(sorted(out.items()))


# ----- per-state robustness along the dynamics ------------------------------------------------------------


def state_masks(pool: Pool, protocol: str | None) -> np.ndarray | None:
    """(n, T) bools: z[t]'s prediction right on the clean input and, with a protocol, on every worst-case
    input of that protocol's groups (the inputs crafted against this pool's readout). None if absent."""
    import numpy as np

    total = None
    for run in pool.runs:
        cols = run.columns
        labels = np.asarray(cols["label"])
        states = (cols.get("clean_states") or {}).get("pred")
        try:
            ok = np.asarray(states) == labels[:, None]
        except (TypeError, ValueError, IndexError):
            return None
        if ok.ndim != 2 or ok.shape[0] != len(labels):
            return None
        if protocol is not None:
            entries = [e for p, _, r, e in adversarial_entries(cols) if p == protocol and r == pool.readout]
            if not entries:
                return None
            for entry in entries:
                pred = np.asarray(entry.get("states_pred"))
                if pred.shape != ok.shape:
                    return None
                ok &= pred == labels[:, None]
        total = ok if total is None else (total & ok if total.shape == ok.shape else None)
        if total is None:
            return None
    return total


# ----- findings ---------------------------------------------------------------------------------------------


@dataclass
class Finding:
    """One claim beside one measurement. a and b are per-example booleans on the same examples."""

    key: str
    paper: str
    claim: str
    reported: str
    measured: str
    kind: str = "greater"  # greater: a > b is claimed; not-worse: a >= b - MARGIN is claimed
    a_label: str = ""
    b_label: str = ""
    a: pd.Series | None = None
    b: pd.Series | None = None
    runs: list[str] = field(default_factory=list)
    note: str = ""
    tests: int = 1  # comparisons the best was chosen from: the p-value is Bonferroni-adjusted by this

    def row(self) -> dict[str, Any]:
        """The finding as plain data: accuracies with Wilson intervals, the paired test, the verdict."""
        row: dict[str, Any] = {
            k: getattr(self, k)
            for k in ("key", "paper", "claim", "reported", "measured", "kind", "a_label", "b_label", "runs")
        }
        row["note"] = self.note
        row["tests"] = self.tests
        if self.a is None or self.b is None:
            row.update(n=None, a=None, a_ci=None, b=None, b_ci=None, paired=None, verdict="no run")
            return row
        paired = paired_pct(self.a, self.b)
        paired["p_value"] = min(1.0, paired["p_value"] * self.tests)
        row.update(
            n=paired["n"],
            a=round(100.0 * float(self.a.mean()), 6),
            a_ci=wilson_pct(self.a),
            b=round(100.0 * float(self.b.mean()), 6),
            b_ci=wilson_pct(self.b),
            paired=paired,
            verdict=verdict(self.kind, paired),
        )
        return row


def verdict(kind: str, paired: dict[str, Any]) -> str:
    """The plain verdict of one paired comparison (rules in the module docstring)."""
    diff, (low, high), p = paired["diff"], paired["diff_ci"], paired["p_value"]
    if kind == "not-worse":
        if low > -MARGIN:
            return "reproduced"
        if high < -MARGIN:
            return "not reproduced"
        return "inconclusive at this n"
    if p < ALPHA:
        return "reproduced" if diff > 0 else "not reproduced"
    return "inconclusive at this n"


def _reported() -> dict[str, dict[str, Any]]:
    """The papers' CIFAR-10 rows by role (base DEQ, + entropy reduction, + random states, + both, ResNet)."""
    roles: dict[str, dict[str, Any]] = {}
    for row in reference_rows(REFERENCE_CSV):
        if row["dataset"] != "cifar10":
            continue
        if not row["model"].lower().startswith("deq"):
            roles.setdefault("cnn", row)
            continue
        defended = row["defense"] != "none"
        role = {(False, False): "base", (True, False): "er", (False, True): "ris", (True, True): "both"}[
            (defended, bool(row["random_states"]))
        ]
        roles.setdefault(role, row)
    return roles


def _ref_text(roles: dict[str, dict[str, Any]], a: str, b: str, key: str) -> str:
    if a not in roles or b not in roles or roles[a][key] is None or roles[b][key] is None:
        return "not in the reference table"
    ra, rb = roles[a], roles[b]
    name = {"clean": "clean", "all": "All"}[key]
    return (
        f"{ra['model']} {ra['method']} {name} {ra[key]:.2f} vs {rb['model']} {rb['method']} {rb[key]:.2f} "
        f"({ra[key] - rb[key]:+.2f})"
    )


def overestimate_findings(pools: list[Pool]) -> list[Finding]:
    """NeurIPS 2022: ready-made attacks overestimate DEQ robustness (same run, same examples).

    One finding per model on the final readout and, where the records have them, one per other readout
    (an early exit, a state ensemble: the ready-made attacks still differentiate the final state there).
    With several readouts the p-values are Bonferroni-adjusted by their number, so that a model measured
    under three readouts does not get three chances at p < 0.05.
    """
    claim = "Ready-made attacks overestimate DEQ robustness: white-box attacks through the states break more"
    out = []
    for model, members in undefended_deqs(pools).items():
        shas = {p.sha for p in members}
        by_readout: dict[str, list[Pool]] = {"final": members}
        for p in pools:
            if p.model == model and p.defense == "none" and p.readout != "final" and p.sha in shas:
                by_readout.setdefault(p.readout, []).append(p)
        family = []
        for readout, candidates in by_readout.items():
            pool = largest([p for p in candidates if {"ready-made", "white-box"} <= p.protocols()])
            if readout != "final" and pool is None:
                continue
            where = "" if readout == "final" else f" ({readout} readout)"
            f = Finding(
                "overestimate",
                NEURIPS,
                claim,
                "not in the reference table",
                f"{model}{where}: ready-made All vs white-box All",
                a_label="ready-made All",
                b_label="white-box All",
            )
            if pool is not None:
                f.a, f.b, f.runs = pool.robust("ready-made"), pool.robust("white-box"), pool.names
                f.note = f"suite {pool.suite}; A only = examples only the white-box attacks break"
                family.append(f)
            out.append(f)
        if len(family) > 1:
            for f in family:
                f.tests = len(family)
                f.note += f"; p Bonferroni x{len(family)} over this model's readouts"
    return out


def states_findings(pools: list[Pool]) -> list[Finding]:
    """NeurIPS 2022: intermediate states differ in robustness (on the final readout's worst-case inputs)."""
    claim = "Intermediate states differ in robustness: an earlier state survives attacks on the final state"
    out = []
    for model, members in undefended_deqs(pools).items():
        f = Finding(
            "states-differ",
            NEURIPS,
            claim,
            "not in the reference table",
            f"{model}: best intermediate z[t] vs the final readout, on the white-box worst-case inputs",
            b_label="final readout (white-box All)",
        )
        # the white-box protocol's worst-case inputs if any run has them, else the ready-made ones
        protocol = next(
            (q for q in ("white-box", "ready-made") if any(state_masks(p, q) is not None for p in members)),
            "white-box",
        )
        pool = largest([p for p in members if state_masks(p, protocol) is not None])
        if pool is not None:
            import pandas as pd

            masks = state_masks(pool, protocol)
            assert masks is not None
            final = pool.robust(protocol)
            f.b_label = f"final readout ({protocol} All)"
            f.measured = (
                f"{model}: best intermediate z[t] vs the final readout, on the {protocol} worst-case inputs"
            )
            steps = masks.shape[1] - 1  # intermediate states z[1..T-1]
            if steps >= 1:
                best = max(range(steps), key=lambda t: (int(masks[:, t].sum()), -t))
                f.a = pd.Series(masks[:, best], index=final.index)
                f.b = final
                f.a_label = f"z[{best + 1}] of {masks.shape[1]}"
                f.tests = steps
                f.runs = pool.names
                f.note = (
                    f"suite {pool.suite}; the states were not attacked themselves (inputs crafted against "
                    f"the final readout); best of {steps} states chosen on these examples, "
                    f"p Bonferroni x{steps}"
                )
        out.append(f)
    return out


def readout_findings(pools: list[Pool], key: str, readouts: tuple[str, ...], claim: str) -> list[Finding]:
    """A readout (early exit, state ensemble) attacked directly vs the final readout of the same checkpoint
    on the same examples: All vs All."""
    out = []
    for model, members in undefended_deqs(pools).items():
        others = [
            p
            for p in pools
            if p.model == model
            and p.defense == "none"
            and (p.readout in readouts or any(p.readout.startswith(r) for r in readouts if r.endswith(":")))
        ]
        pairs = [s for o in others for m in members if o.sha == m.sha and (s := on_shared(o, m))]
        pair = best_pair(pairs)
        f = Finding(key, NEURIPS, claim, "not in the reference table", f"{model}: readout vs final, All")
        f.b_label = "final readout All"
        if pair is None:
            names = [r + "t" if r.endswith(":") else r for r in readouts]
            f.a_label = " or ".join(names)
            f.note = f"needs a run with --readouts {' or '.join(names)} on the same examples and checkpoint"
        else:
            o, m = pair
            f.a, f.b, f.a_label = o.robust(), m.robust(), f"{o.readout} All"
            f.runs = list(dict.fromkeys(o.names + m.names))
            f.note = shared_note(o, m)
        out.append(f)
    return out


def same_arch(a: Pool, b: Pool) -> bool:
    """Same architecture and size, and the same training recipe but for the random states: only then is
    the difference the random-state loss's (a DEQ trained with another gradient is not)."""
    fa, fb = a.facts, b.facts
    keys = ("architecture", "parameters")
    same_recipe = all(a.first.recipe.get(k) == b.first.recipe.get(k) for k in ("method", "grad"))
    return bool(fa) and bool(fb) and all(fa.get(k) == fb.get(k) for k in keys) and same_recipe


def pair_kind(a: Pool, b: Pool) -> str | None:
    """What differs between two pools when exactly one factor does: 'defense', 'readout' (both on one
    checkpoint) or 'random states' (same architecture and recipe); else None."""
    if a.sha == b.sha and a.readout == b.readout and a.defense != "none" and b.defense == "none":
        return "defense"
    if a.sha == b.sha and a.defense == b.defense and a.readout != "final" and b.readout == "final":
        return "readout"
    same_setting = a.defense == b.defense and a.readout == b.readout
    if same_setting and a.random_state and not b.random_state and same_arch(a, b):
        return "random states"
    return None


def all_pairs(pools: list[Pool]) -> list[dict[str, Any]]:
    """Every pair of pools on the same examples that differ in one factor, All vs All with McNemar's
    test: the comparisons the findings choose from, none left out. Runs of different sizes enter on the
    examples they share when no pair of the same sides and suites has as many examples (the findings'
    choice is there; the smaller restrictions would only repeat it)."""
    rows: list[dict[str, Any]] = []
    partial: list[dict[str, Any]] = []
    for a in pools:
        for b in pools:
            kind = None if a is b else pair_kind(a, b)
            shared = None if kind is None else on_shared(a, b)
            if kind is None or shared is None:
                continue
            cut = shared[0].cut or shared[1].cut
            (partial if cut else rows).append(_pair_row(kind, *shared))

    def key(r: dict[str, Any]) -> tuple[str, ...]:
        return (r["kind"], r["shared"], r["a"], r["b"], r["suites"])

    most: dict[tuple[str, ...], int] = {}
    for r in rows:
        most[key(r)] = max(most.get(key(r), 0), r["paired"]["n"])
    for r in sorted(partial, key=lambda r: -r["paired"]["n"]):
        if r["paired"]["n"] > most.get(key(r), 0):
            most[key(r)] = r["paired"]["n"]
            rows.append(r)
    return sorted(rows, key=lambda r: (r["kind"], r["shared"], -r["paired"]["n"], r["a"], r["runs"]))


def _pair_row(kind: str, a: Pool, b: Pool) -> dict[str, Any]:
    side = {
        "defense": lambda p: defense_name(p.defense),
        "readout": lambda p: p.readout,
        "random states": lambda p: p.model,
    }[kind]
    shared = {
        "defense": f"{b.model}, readout {b.readout}",
        "readout": f"{b.model}, defense {defense_name(b.defense)}",
        "random states": f"defense {defense_name(b.defense)}, readout {b.readout}",
    }[kind]
    return {
        "kind": kind,
        "shared": shared,
        "a": side(a),
        "b": side(b),
        "a_all": round(100.0 * float(a.robust().mean()), 6),
        "a_ci": wilson_pct(a.robust()),
        "b_all": round(100.0 * float(b.robust().mean()), 6),
        "b_ci": wilson_pct(b.robust()),
        "paired": paired_pct(a.robust(), b.robust()),
        "suites": f"{a.suite} / {b.suite}",
        "runs": list(dict.fromkeys(a.names + b.names)),
    }


def ris_findings(pools: list[Pool], roles: dict[str, dict[str, Any]]) -> list[Finding]:
    """ICML 2023: the loss from random intermediate states: clean accuracy up, robustness kept."""
    deqs = [p for ps in undefended_deqs(pools).values() for p in ps]
    ris = [p for p in deqs if p.random_state]
    base = [p for p in deqs if not p.random_state]

    pair = best_pair([s for r in ris for b in base if same_arch(r, b) and (s := on_shared(r, b))])
    specs = [
        ("clean", "greater", "Random-state training raises clean accuracy", "clean"),
        (
            "all",
            "not-worse",
            f"Random-state training keeps robustness (All not worse by {MARGIN:g} points or more)",
            "all",
        ),
    ]
    out = []
    for metric, kind, claim, ref_key in specs:
        f = Finding(
            f"ris-{metric}",
            ICML,
            claim,
            _ref_text(roles, "ris", "base", ref_key),
            "RIS-trained DEQ vs the same architecture without, "
            + ("clean accuracy" if metric == "clean" else "All"),
            kind=kind,
        )
        if pair is not None:
            r, b = pair
            f.measured = f"{r.model} vs {b.model}: " + ("clean" if metric == "clean" else "All")
            f.a_label, f.b_label = r.model, b.model
            f.a, f.b = (r.out.clean, b.out.clean) if metric == "clean" else (r.robust(), b.robust())
            f.runs = list(dict.fromkeys(r.names + b.names))
            suites = f"suites {r.suite} / {b.suite}" if r.suite != b.suite else f"suite {r.suite}"
            f.note = shared_note(r, b, suites)
        out.append(f)
    return out


def entropy_findings(pools: list[Pool], roles: dict[str, dict[str, Any]]) -> list[Finding]:
    """ICML 2023: input entropy reduction raises robust accuracy (same checkpoint, same examples)."""
    out = []
    for model, members in undefended_deqs(pools).items():
        defended = [p for p in pools if p.model == model and p.defense != "none" and p.readout == "final"]
        pairs = [s for d in defended for m in members if d.sha == m.sha and (s := on_shared(d, m))]
        pair = best_pair(pairs)
        rs = any(p.random_state for p in members)
        f = Finding(
            "entropy-reduction",
            ICML,
            "Input entropy reduction raises robust accuracy",
            _ref_text(roles, "both", "ris", "all") if rs else _ref_text(roles, "er", "base", "all"),
            f"{model}: with vs without the defense, All",
            a_label="entropy-reduction All",
            b_label="undefended All",
        )
        if pair is not None:
            d, m = pair
            f.a, f.b = d.robust(), m.robust()
            f.runs = list(dict.fromkeys(d.names + m.names))
            suites = (
                f"suites {d.suite} / {m.suite}: the attacks differ, compare with care"
                if d.suite != m.suite
                else f"suite {d.suite}; the defended side's All includes transfer, BPDA and adaptive attacks"
            )
            f.note = shared_note(d, m, suites)
        else:
            f.note = "needs a run with --defense entropy-reduction on the same examples"
        out.append(f)
    return out


def competitive_findings(pools: list[Pool], roles: dict[str, dict[str, Any]]) -> list[Finding]:
    """Both papers: a DEQ's robustness is competitive with a similar-size ResNet (same examples)."""
    cnns = [p for p in pools if not p.is_deq and p.defense == "none" and p.readout == "final"]

    def similar_size(a: Pool, b: Pool) -> bool:
        pa, pb = a.facts.get("parameters"), b.facts.get("parameters")
        return bool(pa) and bool(pb) and max(pa, pb) <= 2 * min(pa, pb)

    out = []
    for model, members in undefended_deqs(pools).items():
        pairs = [s for m in members for c in cnns if similar_size(m, c) and (s := on_shared(m, c))]
        pair = best_pair(pairs)
        f = Finding(
            "competitive",
            f"{NEURIPS} / {ICML}",
            f"DEQ robustness is competitive with a similar-size ResNet (All not worse by {MARGIN:g} points)",
            _ref_text(roles, "base", "cnn", "all"),
            f"{model} vs a CNN within 2x its parameters, All",
            kind="not-worse",
            a_label=model,
            b_label="CNN",
        )
        if pair is not None:
            m, c = pair
            f.a, f.b, f.b_label = m.robust(), c.robust(), c.model
            f.runs = list(dict.fromkeys(m.names + c.names))
            f.note = shared_note(
                m, c, f"parameters {m.facts.get('parameters')} vs {c.facts.get('parameters')}"
            )
        out.append(f)
    return out


def findings(runs: list[Run]) -> list[Finding]:
    """Every claim, one finding per model it concerns, from whatever records exist."""
    pools = build_pools(runs)
    roles = _reported()
    return [
        *overestimate_findings(pools),
        *states_findings(pools),
        *readout_findings(
            pools,
            "early-exit",
            ("early", "state:"),
            "An early exit can be more robust than the final state (the early state attacked directly)",
        ),
        *readout_findings(
            pools,
            "state-ensemble",
            ("ensemble-state", "ensemble-logit"),
            "A state ensemble is more robust than the final state (attacked directly)",
        ),
        *ris_findings(pools, roles),
        *entropy_findings(pools, roles),
        *competitive_findings(pools, roles),
    ]


# ----- rendering --------------------------------------------------------------------------------------------


def _pct(value: float | None, ci: list[float] | None) -> str:
    if value is None:
        return "–"
    return f"{value:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else f"{value:.1f}"


def _md(text: Any) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|")


RULES = (
    f"Each claim of the two papers beside what this project measures on its own models. A and B are "
    f"accuracies (percent) on the same examples with 95% Wilson intervals; A − B with Newcombe's paired "
    f"95% interval; 'A only / B only' count the discordant examples (right under one side only), the "
    f"evidence McNemar's exact test uses. Verdict: **reproduced** = the claimed direction with p < {ALPHA} "
    f"(for 'not worse' claims: the interval of A − B lies above −{MARGIN:g} points); **not reproduced** = "
    f"the opposite with p < {ALPHA} (or the interval lies below −{MARGIN:g}); **inconclusive at this n** = "
    f"neither (the interval shows what this n cannot exclude); **no run** = no pair of records answers "
    f"the claim. Pairs use identical example indices (and the same checkpoint where the claim is about one "
    f"model); numbers are recomputed from per-example columns."
)


def figure_names(pools: list[Pool]) -> dict[str, str]:
    """Figure stem -> caption, for the figures the page links to (bench.report.findings_plots draws them)."""
    names = {"findings-gap": "Per-example gap: which examples only the white-box attacks break"}
    for model, members in undefended_deqs(pools).items():
        if largest([p for p in members if state_masks(p, None) is not None]) is not None:
            names[f"findings-dynamics-{model}"] = f"{model}: accuracy along the dynamics (95% Wilson bands)"
    return names


def gap_examples(pools: list[Pool]) -> list[tuple[str, Pool, list[int], list[int]]]:
    """(model, pool, indices only white-box breaks, indices only ready-made breaks) per DEQ and CNN."""
    out = []
    by_model: dict[str, list[Pool]] = {}
    for p in pools:
        if p.defense == "none" and p.readout == "final" and {"ready-made", "white-box"} <= p.protocols():
            by_model.setdefault(p.model, []).append(p)
    for model, members in sorted(by_model.items()):
        pool = largest(members)
        assert pool is not None
        rm, wb = pool.robust("ready-made"), pool.robust("white-box")
        only_wb = [int(i) for i in rm.index[rm & ~wb]]
        only_rm = [int(i) for i in rm.index[wb & ~rm]]
        out.append((model, pool, only_wb, only_rm))
    return out


def _indices(indices: list[int]) -> str:
    if not indices:
        return "no example"
    return f"{len(indices)} (test-set indices {', '.join(map(str, indices))})"


def scope(pools: list[Pool]) -> str:
    """What the records measure, so nobody reads Fashion-MNIST numbers as CIFAR-10 ones."""
    from bench.spec import format_eps

    settings = sorted({f"{p.first.dataset} at eps {format_eps(p.first.eps)}" for p in pools})
    models = sorted({p.model for p in pools})
    return (
        f"Scope: the records measure {', '.join(models) or 'no model'} on "
        f"{', '.join(settings) or 'nothing'}; "
        "the reported numbers are the papers' CIFAR-10 models at 8/255, so compare the direction of an "
        "effect and its verdict, not the values."
    )


def summary_line(r: dict[str, Any]) -> str:
    """One finding in a sentence: the verdict first, then the evidence."""
    from bench.report.exports import p_text

    paired = r["paired"]
    if paired is None:
        return f"**no run**: {r['claim']} ({r['measured']}; {r['note'] or 'no pair of records answers it'})."
    lo, hi = paired["diff_ci"]
    adjusted = f" (Bonferroni x{r['tests']})" if r["tests"] > 1 else ""
    return (
        f"**{r['verdict']}**: {r['claim']}. {r['measured']}: {r['a_label']} {r['a']:.1f}% vs "
        f"{r['b_label']} {r['b']:.1f}%, difference {paired['diff']:+.1f} points (95% CI {lo:+.1f} to "
        f"{hi:+.1f}), {paired['only_a']} vs {paired['only_b']} discordant examples, McNemar p = "
        f"{p_text(paired['p_value'])}{adjusted}, n = {paired['n']}."
    )


def render_markdown(runs: list[Run], figures: dict[str, str] | None = None) -> str:
    """The findings page: the claims table, the per-example gap, the figures, the reported reference rows."""
    from bench.report.exports import p_text

    pools = build_pools(runs)
    rows = [f.row() for f in findings(runs)]
    figures = figure_names(pools) if figures is None else figures
    lines = [
        "# Findings: the papers' claims vs this project's measurements",
        "",
        "Generated from the run records by `bench leaderboard --view findings --format md --output "
        "results/findings.md` (which also draws the figures under `results/plots/`); do not edit by hand.",
        "",
        RULES,
        "",
        scope(pools),
        "",
        "## In short",
        "",
        *(f"- {summary_line(r)}" for r in rows),
        "",
        "## Claims and measurements",
        "",
        "| Paper | Claim | Reported (CIFAR-10) | Measured | A | B | A − B [95% CI] | A only / B only "
        "| McNemar p | n | Verdict |",
        "|---|---|---|---|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        paired = r["paired"]
        a = f"{_md(r['a_label'])}: {_pct(r['a'], r['a_ci'])}" if r["a_label"] else "–"
        b = f"{_md(r['b_label'])}: {_pct(r['b'], r['b_ci'])}" if r["b_label"] else "–"
        if paired is None:
            a, b = (f"{_md(r['a_label'])}: no run", f"{_md(r['b_label'])}: –")
            diff = counts = p = n = "–"
        else:
            lo, hi = paired["diff_ci"]
            diff = f"{paired['diff']:+.1f} [{lo:+.1f}, {hi:+.1f}]"
            counts = f"{paired['only_a']} / {paired['only_b']}"
            p, n = p_text(paired["p_value"]), str(paired["n"])
        measured = _md(r["measured"]) + (f" ({_md(r['note'])})" if r["note"] else "")
        lines.append(
            f"| {r['paper']} | {_md(r['claim'])} | {_md(r['reported'])} | {measured} | {a} | {b} | {diff} "
            f"| {counts} | {p} | {n} | **{r['verdict']}** |"
        )
    lines += [
        "",
        "## Every paired comparison in the records",
        "",
        "Every pair of runs on the same examples that differ in one factor (the defense or the readout "
        "on one checkpoint; random-state training on one architecture and recipe), All vs All; the "
        "findings above use the largest of each. A smaller run enters on the examples it shares with a "
        "larger one of the same suite (outcomes are per example).",
        "",
        "| Differs in | Shared | A | B | A All | B All | A − B [95% CI] | A only / B only | McNemar p | n "
        "| Suites | Runs |",
        "|---|---|---|---|---|---|---|---:|---:|---:|---|---|",
    ]
    pairs = all_pairs(pools)
    for r in pairs:
        paired = r["paired"]
        lo, hi = paired["diff_ci"]
        lines.append(
            f"| {r['kind']} | {_md(r['shared'])} | {_md(r['a'])} | {_md(r['b'])} | "
            f"{_pct(r['a_all'], r['a_ci'])} | {_pct(r['b_all'], r['b_ci'])} | "
            f"{paired['diff']:+.1f} [{lo:+.1f}, {hi:+.1f}] | {paired['only_a']} / {paired['only_b']} | "
            f"{p_text(paired['p_value'])} | {paired['n']} | {_md(r['suites'])} | {', '.join(r['runs'])} |"
        )
    if not pairs:
        lines.append("| – | no pair of runs on the same examples differs in one factor | | | | | | | | | | |")
    lines += ["", "## Per-example gap: which examples only the white-box attacks break", ""]
    gaps = gap_examples(pools)
    if not gaps:
        lines.append("No run has both the ready-made and the white-box protocol (suite `full` or `lite`).")
    for model, pool, only_wb, only_rm in gaps:
        lines.append(
            f"- **{_md(model)}** (n = {pool.n}, {', '.join(pool.names)}): only the white-box attacks break "
            f"{_indices(only_wb)}; only the ready-made attacks break {_indices(only_rm)}."
        )
    lines += ["", "## Figures", ""]
    for stem, caption in figures.items():
        lines.append(f"- {caption}: [PNG]({FIGURE_DIR}/{stem}.png), [SVG]({FIGURE_DIR}/{stem}.svg)")
        lines.append(f"  ![{caption}]({FIGURE_DIR}/{stem}.png)")
    lines += [
        "",
        "## Reported numbers (CIFAR-10, L-inf 8/255; reference rows)",
        "",
        "| Model | Method | Defense | Random states | Clean | PGD | AA | All | Source |",
        "|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for ref in reference_rows(REFERENCE_CSV):
        nums = " | ".join("–" if ref[k] is None else f"{ref[k]:.2f}" for k in ("clean", "pgd", "aa", "all"))
        lines.append(
            f"| {_md(ref['model'])} | {_md(ref['method'])} | {_md(ref['defense'])} | "
            f"{'yes' if ref['random_states'] else 'no'} | {nums} | {_md(ref['citation'])} |"
        )
    lines += ["", "## Runs behind each finding", ""]
    for r in rows:
        lines.append(f"- {_md(r['measured'])}: {', '.join(r['runs']) if r['runs'] else 'no run'}")
    return "\n".join(lines) + "\n"


def filter_runs(runs: list[Run], dataset: str | None) -> list[Run]:
    if dataset is None:
        return runs
    kept = [r for r in runs if r.dataset == base_dataset(dataset)]
    if not kept:
        raise BenchError(f"no runs for data set {dataset!r}")
    return kept


def render_findings(
    runs: list[Run], fmt: str, dataset: str | None = None, figures: dict[str, str] | None = None
) -> str:
    """The findings as Markdown (md, table; linking `figures`, stem -> caption) or JSON."""
    if fmt not in FINDINGS_FORMATS:
        raise BenchError(f"--view findings renders {', '.join(FINDINGS_FORMATS)}, not {fmt!r}")
    runs = filter_runs(runs, dataset)
    if fmt == "json":
        return (
            json.dumps([f.row() for f in findings(runs)], indent=1, sort_keys=True, ensure_ascii=False) + "\n"
        )
    return render_markdown(runs, figures)
