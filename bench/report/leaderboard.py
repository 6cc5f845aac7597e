"""`bench leaderboard`: rows comparable to the papers' tables, recomputed from per-example run records.

A row is one (data set, eps, model, training method, defense, readout). Every number is recomputed with
pandas from the per-example columns of the records (never from a record's `summary`):

    Clean  clean prediction == label
    PGD    robust under every attack column of group 'pgd', over all protocols (worst case over estimators)
    AA     robust under every column of group 'aa'
    All    robust under every column of every group and protocol (per-example AND)

Several runs for one row: runs that share the checkpoint, data, examples, solver settings and clean
predictions are merged into one per-example worst case (an example counts as robust only if no attack of
any of them broke it); otherwise the run (or merged pool) with the most examples is taken, ties going to
the run that finished last. "Last" is read from the record (its sessions' start + wall time), never from
the file's mtime, which a fresh checkout sets in checkout order. Reference rows from
bench/reference/paper_results.csv are marked "reported", and a measured row that matches one (data set,
eps, architecture name, defense, random-state training; readout "final") carries the difference
measured - reported.

Uncertainty: every accuracy carries its 95 % Wilson interval (`<key>_ci`); ready-made vs white-box on the
same examples is compared per example (`paired`: McNemar's exact p-value, the discordant counts and
Newcombe's interval for the gap). Views: main (one row per setting), gap (the two protocols side by side),
runs (every run and readout, nothing merged or dropped); findings lives in bench.report.findings.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.errors import BenchError, did_you_mean
from bench.paths import PACKAGE_DIR
from bench.records.schema import adversarial_entries
from bench.report.flags import INFO_FLAGS, MEASURED, REPORTED, classify_warning
from bench.spec import ZOO_PREFIX, Batching, DeploySpec, format_eps, parse_eps

if TYPE_CHECKING:
    import pandas as pd

REFERENCE_CSV = PACKAGE_DIR / "reference" / "paper_results.csv"
VIEWS = ("main", "gap", "runs", "findings")
LEVELS = ("protocol", "group", "attack", "estimator")


def arch_key(name: str) -> str:
    """Architecture names compared loosely: 'deq-large' == 'DEQ-Large', 'resnet-18' == 'ResNet-18'."""
    return re.sub(r"[^a-z0-9]", "", name.lower().removeprefix(ZOO_PREFIX))


def defense_name(spec: str) -> str:
    """'entropy-reduction:steps=5' -> 'entropy-reduction': papers name a defense, not its settings."""
    return spec.partition(":")[0].strip()


def base_dataset(name: str) -> str:
    """The built-in Fashion-MNIST subset is the full test set's first 1000 images: the same data set."""
    return name.removesuffix("-builtin")


def warning_flags(warnings: list[dict[str, Any]], readout: str) -> list[str]:
    """Flags of the record's warnings that concern this readout (warnings naming no readout concern all)."""
    flags = []
    for w in warnings:
        if w.get("readout") is not None and w["readout"] != readout:
            continue
        flags.append(classify_warning(str(w["message"])))
    return sorted(set(flags))


# ----- one run record -----------------------------------------------------------------------------------


@dataclass
class Outcomes:
    """Per-example outcomes of one readout: clean correctness, and one 'broken' column per attack run
    (columns: run, protocol, group, attack, estimator)."""

    clean: pd.Series
    broken: pd.DataFrame

    @property
    def n(self) -> int:
        return len(self.clean)

    def pct(self, mask: pd.Series) -> float:
        return 100.0 * float(mask.sum()) / self.n

    def robust(self, **levels: str) -> pd.Series | None:
        """Clean and unbroken by every column matching `levels` (e.g. group='pgd'); None if none match."""
        cols = self.broken
        for level, value in levels.items():
            cols = cols.loc[:, cols.columns.get_level_values(level) == value]
        if levels and cols.shape[1] == 0:
            return None
        return self.clean & ~cols.any(axis=1)


def _malformed(path: Path, what: str) -> BenchError:
    return BenchError(f"run record {path} is malformed: {what}")


def _recipe_from_record(doc: dict[str, Any]) -> dict[str, Any]:
    """The training recipe the evaluated checkpoint carries in its metadata (bench train writes it)."""
    spec = doc.get("spec", {})
    if spec.get("method"):
        return {"method": spec["method"], "random_state": spec.get("random_state", False)}
    meta = (doc.get("provenance") or {}).get("checkpoint_metadata") or {}
    recipe = meta.get("recipe") if isinstance(meta, dict) else None  # validated; provenance only
    if isinstance(recipe, str):
        try:
            recipe = json.loads(recipe)
        except json.JSONDecodeError:
            return {}
    return recipe if isinstance(recipe, dict) else {}


def training_recipe(doc: dict[str, Any]) -> dict[str, Any]:
    """The registry entry's recipe when the run evaluated the registered weights, else the record's own.

    A checkpoint given with --checkpoint is not the registered one, so its own metadata describes it
    better; a model missing from the registry (or a zoo model offline) falls back to the record.
    """
    from bench.registry import get_entry

    spec = doc.get("spec", {})
    own = _recipe_from_record(doc)
    name = str(spec.get("model", ""))
    if name.startswith(ZOO_PREFIX):  # zoo entries carry no recipe; looking one up loads the whole zoo
        return own
    try:
        entry = get_entry(name)
    except (BenchError, ImportError, OSError):
        return own
    registered = entry.recipe or {}
    ref_sha = entry.checkpoint.sha256
    evaluated_registered = bool(ref_sha) and ref_sha == spec.get("checkpoint_sha256")
    if registered.get("method") and (evaluated_registered or not own.get("method")):
        return registered
    return own


def method_label(recipe: dict[str, Any]) -> str:
    method = str(recipe.get("method") or "unknown")
    return f"{method}+random-states" if recipe.get("random_state") else method


@dataclass
class Run:
    """One finished run record and the facts the leaderboard groups it by."""

    path: Path
    doc: dict[str, Any]
    finished: float = 0.0  # when the run finished (finished_at); orders equal-size runs, newest first
    _outcomes: dict[str, Outcomes] = field(default_factory=dict, repr=False)

    @property
    def spec(self) -> dict[str, Any]:
        return self.doc["spec"]

    @property
    def columns(self) -> dict[str, Any]:
        return self.doc["results"]["columns"]

    @property
    def model(self) -> str:
        return str(self.spec["model"])

    @property
    def dataset(self) -> str:
        return base_dataset(str(self.spec["dataset"]))

    @property
    def eps(self) -> float:
        return float(self.spec["eps"])

    @property
    def defense(self) -> str:
        return str(self.spec.get("defense") or "none")

    @property
    def deploy(self) -> str:
        """The DEQ's deployed prediction (`fz`, `unroll:K:lam`); '' for a plain network."""
        return DeploySpec.describe(self.spec.get("deploy"))

    @property
    def batching(self) -> str:
        return str(self.spec.get("batching") or Batching.PER_EXAMPLE.value)

    @property
    def readouts(self) -> list[str]:
        return list(self.spec["plan"]["readouts"])

    @cached_property
    def recipe(self) -> dict[str, Any]:
        if self.spec.get("random_weights"):
            return {"method": "untrained"}
        return training_recipe(self.doc)

    @property
    def method(self) -> str:
        return method_label(self.recipe)

    def validate(self) -> Run:
        """The fields the leaderboard reads, checked once so a damaged file is one readable error."""
        try:
            spec, cols = self.spec, self.columns
            ok = all(k in spec for k in ("model", "dataset", "eps")) and bool(self.readouts)
            float(spec["eps"])
            n = len(cols["index"])
            ok = ok and len(cols["label"]) == n and isinstance(cols.get("attacks", []), list)
            ok = ok and all(
                isinstance(c, dict) and all(k in c for k in (*LEVELS, "readout", "broken"))
                for c in cols.get("attacks", [])
            )
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise _malformed(self.path, "spec or per-example columns missing or of the wrong shape")
        return self

    def identity(self) -> tuple[Any, ...]:
        """Runs with equal identity evaluated the same function on the same examples: mergeable."""
        sha = self.spec.get("checkpoint_sha256")
        if not sha or self.spec.get("random_weights"):
            return ("unique", str(self.path))
        return (
            sha,
            self.spec.get("data_sha256"),
            tuple(self.columns["index"]),
            json.dumps(self.spec.get("deploy"), sort_keys=True),
            self.dataset,
            round(self.eps, 9),
            self.defense,
            self.batching,
        )

    def outcomes(self, readout: str) -> Outcomes:
        if readout not in self._outcomes:
            self._outcomes[readout] = self._build_outcomes(readout)
        return self._outcomes[readout]

    def _build_outcomes(self, readout: str) -> Outcomes:
        import pandas as pd

        cols = self.columns
        try:
            index = pd.Index(cols["index"], name="example")
            labels = pd.Series(cols["label"], index=index)
            pred = pd.Series(cols["clean"][readout]["pred"], index=index)
        except (KeyError, TypeError, ValueError) as exc:
            raise _malformed(self.path, f"no clean columns for readout {readout!r} ({exc})") from None
        if not index.is_unique:
            raise _malformed(self.path, "repeated example indices")
        keys, data = [], []
        for col in cols.get("attacks", []):
            if col.get("readout") != readout:
                continue
            if len(col["broken"]) != len(index):
                raise _malformed(self.path, f"attack column {col.get('attack')} has a wrong length")
            keys.append(tuple(str(col[level]) for level in LEVELS))
            data.append([bool(v) for v in col["broken"]])
        columns = pd.MultiIndex.from_tuples(keys, names=LEVELS) if keys else _empty_columns()
        broken = pd.DataFrame(dict(enumerate(data)), index=index, dtype=bool)
        broken.columns = columns
        broken = pd.concat([broken], axis=1, keys=[self.path.name], names=["run"])
        return Outcomes(clean=pred == labels, broken=broken)

    def selection(self, protocol: str, readout: str) -> list[str]:
        return list(self.doc["results"].get("selection", {}).get(protocol, {}).get(readout, []))

    def flags(self, readout: str) -> list[str]:
        """Warnings about this readout, the record's sanity checks that fired, diverged solves."""
        flags = set(warning_flags(self.doc["results"].get("warnings", []), readout))
        if sanity := self.doc["results"].get("sanity"):
            from bench.sanity import flags_fired

            try:
                flags.update(flags_fired(sanity))
            except (KeyError, TypeError, AttributeError):
                raise _malformed(self.path, "unreadable sanity section") from None
        if _any_diverged(self.columns, readout):
            flags.add("solver-diverged")
        if any(c.get("readout") == readout and c.get("nonfinite_grad_rows") for c in self.columns["attacks"]):
            flags.add("nonfinite-grad")  # an estimator's gradient was dropped for some rows: weaker attack
        decided = self.doc["results"].get("sweep_decided_by", {})
        if any(isinstance(d, dict) and d.get(readout) == "order" for d in decided.values()):
            flags.add("sweep-tie")  # candidates tied on accuracy and margin: the first listed was taken
        return sorted(flags)


def _empty_columns() -> pd.MultiIndex:
    import pandas as pd

    return pd.MultiIndex.from_arrays([[] for _ in LEVELS], names=LEVELS)


def _any_diverged(columns: dict[str, Any], readout: str) -> bool:
    """A DEQ solve that diverged on a clean or worst-case input: its gradients are not to be trusted."""
    solvers = [columns.get("clean_solver")]
    solvers += [e.get("solver") for _, _, r, e in adversarial_entries(columns) if r == readout]
    return any(s and any(s.get("diverged", [])) for s in solvers)


def finished_at(doc: dict[str, Any], path: Path) -> float:
    """When the run finished: the latest session's start + wall seconds in the record's shard plan. A
    record without sessions (written by hand or by another tool) falls back to its file's mtime."""
    sessions = ((doc.get("provenance") or {}).get("shard_plan") or {}).get("sessions") or []
    ends = [
        float(s["started"]) + float(s.get("wall_seconds") or 0.0)
        for s in sessions
        if isinstance(s, dict) and isinstance(s.get("started"), int | float)
    ]
    return max(ends) if ends else path.stat().st_mtime


def load_runs(results_dir: str | Path) -> list[Run]:
    """Every finished run record in results_dir; a missing directory or none at all is the user's error."""
    from bench.records.read import iter_records

    runs = [Run(path, doc, finished_at(doc, path)).validate() for path, doc in iter_records(results_dir)]
    if not runs:
        raise BenchError(f"no run records in {results_dir}; run `bench evaluate` first")
    return runs


def load_run(path: str | Path) -> Run:
    from bench.records.read import read_record

    path = Path(path)
    if not path.is_file():
        raise BenchError(f"run record {path} does not exist")
    doc = read_record(path)
    return Run(path, doc, finished_at(doc, path)).validate()


# ----- rows -----------------------------------------------------------------------------------------------


def merge_outcomes(parts: list[Outcomes]) -> Outcomes | None:
    """The per-example worst case of runs over the same examples, or None when their clean predictions
    differ (then they did not evaluate the same function and must not be merged)."""
    import pandas as pd

    first = parts[0]
    for other in parts[1:]:
        if not other.clean.index.equals(first.clean.index) or not other.clean.equals(first.clean):
            return None
    return Outcomes(clean=first.clean, broken=pd.concat([p.broken for p in parts], axis=1))


def _round(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(value, 6)


def wilson_pct(mask: pd.Series) -> list[float] | None:
    """95 % Wilson interval of a per-example boolean column, in percent: what n examples can resolve."""
    from bench.stats import wilson_interval

    if len(mask) == 0:
        return None
    low, high = wilson_interval(int(mask.sum()), len(mask))
    return [round(100.0 * low, 6), round(100.0 * high, 6)]


def paired_pct(a: pd.Series, b: pd.Series) -> dict[str, Any]:
    """McNemar's exact test and Newcombe's interval for acc(a) - acc(b) on the same examples (percent).

    only_a / only_b count the discordant examples (right under a only / under b only): the evidence.
    """
    from bench.stats import compare_paired, paired_difference_interval

    if not a.index.equals(b.index):
        raise BenchError("a paired comparison needs the same examples on both sides")
    cmp = compare_paired([bool(v) for v in a], [bool(v) for v in b])
    low, high = paired_difference_interval(cmp)
    return {
        "n": cmp.n,
        "diff": _round(100.0 * (cmp.only_a - cmp.only_b) / cmp.n),
        "diff_ci": [_round(100.0 * low), _round(100.0 * high)],
        "only_a": cmp.only_a,
        "only_b": cmp.only_b,
        "p_value": cmp.p_value,
    }


def row_numbers(out: Outcomes) -> dict[str, Any]:
    """Clean/PGD/AA/All and per-protocol numbers of one row, in percent, from per-example outcomes, each
    with its 95 % Wilson interval (`<key>_ci`); ready-made vs white-box paired by McNemar (`paired`)."""
    masks: dict[str, Any] = {"clean": out.clean, "all": out.robust()}
    for group in ("pgd", "aa"):
        masks[group] = out.robust(group=group)
    nums: dict[str, Any] = {k: None if m is None else _round(out.pct(m)) for k, m in masks.items()}
    nums.update({f"{k}_ci": None if m is None else wilson_pct(m) for k, m in masks.items()})
    cols = out.broken.columns
    protocols: dict[str, Any] = {}
    for protocol in dict.fromkeys(cols.get_level_values("protocol")):
        groups = dict.fromkeys(cols.get_level_values("group")[cols.get_level_values("protocol") == protocol])
        robust = out.robust(protocol=protocol)
        protocols[protocol] = {
            "all": _round(out.pct(robust)),
            "all_ci": wilson_pct(robust),
            "groups": {g: _round(out.pct(out.robust(protocol=protocol, group=g))) for g in groups},
        }
    nums["protocols"] = protocols
    nums["paired"] = None
    if "ready-made" in protocols and "white-box" in protocols:
        nums["paired"] = paired_pct(out.robust(protocol="ready-made"), out.robust(protocol="white-box"))
    return nums


def strongest_estimator(out: Outcomes, selections: list[str]) -> str:
    """The white-box sweep's first choice if there was a sweep, else the estimator that broke most."""
    if selections:
        return selections[0]
    if out.broken.shape[1] == 0:
        return ""
    counts = out.broken.T.groupby(level="estimator", sort=False).any().sum(axis=1)
    return str(counts.idxmax())


def _pool_runs(runs: list[Run], readout: str) -> list[list[Run]]:
    """Partition runs into mergeable pools (same identity and the same clean predictions)."""
    by_identity: dict[tuple[Any, ...], list[Run]] = {}
    for run in runs:
        by_identity.setdefault(run.identity(), []).append(run)
    pools: list[list[Run]] = []
    for members in by_identity.values():
        if len(members) > 1 and merge_outcomes([r.outcomes(readout) for r in members]) is None:
            pools.extend([r] for r in members)
        else:
            pools.append(members)
    return pools


def measured_row(runs: list[Run], readout: str) -> dict[str, Any]:
    """One leaderboard row from a pool of mergeable runs (usually one)."""
    runs = sorted(runs, key=lambda r: (-r.finished, r.path.name))  # newest first: its selection leads
    out = merge_outcomes([r.outcomes(readout) for r in runs])
    assert out is not None
    first = runs[0]
    selections = list(dict.fromkeys(e for r in runs for e in r.selection("white-box", readout)))
    estimators = list(dict.fromkeys(out.broken.columns.get_level_values("estimator")))
    flags = set().union(*(r.flags(readout) for r in runs))
    nums = row_numbers(out)
    rm, wb = (nums["protocols"].get(p, {}).get("all") for p in ("ready-made", "white-box"))
    if rm is not None and wb is not None and wb > rm:
        flags.add("white-box-weaker")
    return {
        "dataset": first.dataset,
        "model": first.model,
        "method": first.method,
        "defense": first.defense,
        "readout": readout,
        **nums,
        "n_examples": out.n,
        "eps": first.eps,
        "eps_text": format_eps(first.eps),
        "estimator": strongest_estimator(out, selections),
        "estimators": estimators,
        "flags": sorted(flags),
        "unreliable": bool(set(flags) - INFO_FLAGS),
        "source": MEASURED,
        "random_states": bool(first.recipe.get("random_state", False)),
        "suite": "+".join(sorted({str(r.spec["plan"].get("suite", "")) for r in runs})),
        "deploy": first.deploy,
        "batching": first.batching,
        "runs": [r.path.name for r in runs],
        "checkpoint_sha256": first.spec.get("checkpoint_sha256"),
        "citation": None,
    }


def measured_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per (data set, eps, model, method, defense, readout): merged pool or largest run."""
    groups: dict[tuple[Any, ...], list[Run]] = {}
    for run in runs:
        for readout in run.readouts:
            setting = (run.model, run.method, run.defense, run.deploy, run.batching)
            key = (run.dataset, round(run.eps, 9), *setting, readout)
            groups.setdefault(key, []).append(run)
    rows = []
    for key, members in groups.items():
        readout = key[-1]
        pools = _pool_runs(members, readout)
        best = max(
            pools,
            key=lambda p: (p[0].outcomes(readout).n, max(r.finished for r in p), max(r.path.name for r in p)),
        )
        rows.append(measured_row(best, readout))
    return rows


def reference_rows(path: str | Path = REFERENCE_CSV) -> list[dict[str, Any]]:
    """The papers' published rows (percent), marked 'reported'; read with pandas, '#' lines are notes."""
    import pandas as pd

    try:
        table = pd.read_csv(path, comment="#", dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError) as exc:
        raise BenchError(f"cannot read reference results {path}: {exc}") from None

    def number(text: str) -> float | None:
        return float(text) if text.strip() else None

    rows = []
    for order, rec in enumerate(table.to_dict("records")):
        eps = parse_eps(rec["eps"])
        rows.append(
            {
                "dataset": rec["dataset"],
                "model": rec["architecture"],
                "method": rec["method"],
                "defense": rec.get("defense") or "none",
                "readout": "final",
                "clean": number(rec["clean"]),
                "pgd": number(rec["pgd"]),
                "aa": number(rec["aa"]),
                "all": number(rec["all"]),
                **{f"{k}_ci": None for k in ("clean", "pgd", "aa", "all")},  # the papers give no n
                "protocols": {},
                "paired": None,
                "n_examples": None,
                "eps": eps,
                "eps_text": format_eps(eps),
                "estimator": "",
                "estimators": [],
                "flags": [],
                "unreliable": False,
                "source": REPORTED,
                "random_states": rec.get("random_states", "").strip().lower() in ("true", "1", "yes"),
                "suite": "",
                "runs": [],
                "checkpoint_sha256": None,
                "citation": rec["source"],
                "order": order,
            }
        )
    return rows


def _same_setting(measured: dict[str, Any], reported: dict[str, Any]) -> bool:
    return (
        measured["dataset"] == reported["dataset"]
        and math.isclose(measured["eps"], reported["eps"], rel_tol=1e-6)
        and arch_key(measured["model"]) == arch_key(reported["model"])
        and defense_name(measured["defense"]) == defense_name(reported["defense"])
        and measured["random_states"] == reported["random_states"]
        and measured["readout"] == reported["readout"]
    )


def attach_deltas(rows: list[dict[str, Any]], reported: list[dict[str, Any]]) -> None:
    """Measured - reported (percentage points) where exactly one reported row has the same setting."""
    for row in rows:
        matches = [r for r in reported if _same_setting(row, r)]
        ref = matches[0] if len(matches) == 1 else None
        row["reference"] = (
            None
            if ref is None
            else {k: ref[k] for k in ("model", "method", "citation", "clean", "pgd", "aa", "all")}
        )
        for key in ("clean", "pgd", "aa", "all"):
            both = ref is not None and row[key] is not None and ref[key] is not None
            row[f"delta_{key}"] = _round(row[key] - ref[key]) if both else None


def run_row(run: Run, readout: str | None = None, reference_path: Path = REFERENCE_CSV) -> dict[str, Any]:
    """The row of one run alone (no merging) for one readout, with its reported counterpart if any."""
    readout = readout or ("final" if "final" in run.readouts else run.readouts[0])
    if readout not in run.readouts:
        raise BenchError(f"{run.path.name} has no readout {readout!r}{did_you_mean(readout, run.readouts)}")
    row = measured_row([run], readout)
    attach_deltas([row], reference_rows(reference_path))
    return row


def _sort_key(row: dict[str, Any]) -> tuple[Any, ...]:
    reported = row["source"] == REPORTED
    return (
        row["dataset"],
        arch_key(row["model"]),
        not reported,
        row.get("order", 0),
        row["method"],
        row["defense"],
        row["readout"],
        row["eps"],
    )


def leaderboard_rows(
    runs: list[Run], dataset: str | None = None, reference: bool = True, reference_path: Path = REFERENCE_CSV
) -> pd.DataFrame:
    """The main view: measured rows (+ deltas) and, unless asked not to, the reported rows, sorted."""
    import pandas as pd

    rows = measured_rows(runs)
    reported = reference_rows(reference_path)
    attach_deltas(rows, reported)
    if reference:
        for row in reported:
            row["reference"] = None
            row.update({f"delta_{k}": None for k in ("clean", "pgd", "aa", "all")})
        rows += reported
    if dataset is not None:
        available = sorted({r["dataset"] for r in rows})
        rows = [r for r in rows if r["dataset"] == base_dataset(dataset)]
        if not rows:
            raise BenchError(f"no rows for data set {dataset!r}{did_you_mean(dataset, available)}")
    rows.sort(key=_sort_key)
    for row in rows:
        row.pop("order", None)
    return pd.DataFrame(rows, dtype=object)


def gap_rows(main: pd.DataFrame) -> pd.DataFrame:
    """Ready-made vs white-box: robust accuracy (All) under each protocol alone and their difference.

    A positive gap is how much the ready-made attacks overestimate robustness (NeurIPS 2022's finding).
    """
    import pandas as pd

    rows = []
    for row in main[main["source"] == MEASURED].to_dict("records"):
        protos = row["protocols"]
        rm = protos.get("ready-made", {}).get("all")
        wb = protos.get("white-box", {}).get("all")
        paired = row.get("paired") if isinstance(row.get("paired"), dict) else None
        rows.append(
            {
                **{k: row[k] for k in ("dataset", "model", "method", "defense", "readout", "n_examples")},
                **{k: row[k] for k in ("eps", "eps_text", "clean", "estimator", "flags", "source")},
                **{k: row.get(k, "") for k in ("deploy", "batching", "suite", "runs")},
                "ready_made": rm,
                "ready_made_ci": protos.get("ready-made", {}).get("all_ci"),
                "white_box": wb,
                "white_box_ci": protos.get("white-box", {}).get("all_ci"),
                "gap": None if rm is None or wb is None else _round(rm - wb),
                # the same examples under both protocols: McNemar on who breaks which example
                "gap_ci": None if paired is None else paired["diff_ci"],
                "only_white_box": None if paired is None else paired["only_a"],
                "only_ready_made": None if paired is None else paired["only_b"],
                "p_value": None if paired is None else paired["p_value"],
                "protocols": protos,
            }
        )
    if not rows:
        raise BenchError("the gap view needs measured runs; none match")
    return pd.DataFrame(rows, dtype=object)


def runs_rows(
    runs: list[Run], dataset: str | None = None, reference_path: Path = REFERENCE_CSV
) -> pd.DataFrame:
    """Every run and readout on its own row (no merging, no choice of the largest): every protocol shows."""
    import pandas as pd

    rows = []
    for run in runs:
        if dataset is not None and run.dataset != base_dataset(dataset):
            continue
        for readout in run.readouts:
            row = measured_row([run], readout)
            row["run"] = run.path.name
            for key, protocol in (("ready_made", "ready-made"), ("white_box", "white-box")):
                row[key] = row["protocols"].get(protocol, {}).get("all")
            rows.append(row)
    if not rows:
        raise BenchError(f"no runs for data set {dataset!r}" if dataset else "no runs")
    attach_deltas(rows, reference_rows(reference_path))
    rows.sort(key=lambda r: (r["dataset"], arch_key(r["model"]), r["defense"], r["readout"], r["run"]))
    return pd.DataFrame(rows, dtype=object)


# ----- the command's work ------------------------------------------------------------------------------


def check_view(view: str) -> str:
    if view not in VIEWS:
        raise BenchError(f"unknown view {view!r}{did_you_mean(view, VIEWS)}")
    return view


def render_leaderboard(
    results_dir: str,
    dataset: str | None,
    fmt: str,
    view: str,
    run: str | None,
    readout: str | None,
    reference: bool,
    *,
    to_terminal: bool,
) -> str | None:
    """The leaderboard as text in `fmt`, or None when it was printed as tables (fmt table, no file)."""
    from bench.report import exports

    view = check_view(view)
    if fmt not in exports.FORMATS:
        raise BenchError(f"unknown format {fmt!r}{did_you_mean(fmt, exports.FORMATS)}")
    if fmt == "robustbench":
        if run is None:
            raise BenchError("--format robustbench exports one run: pass --run FILE")
        return exports.model_info_json(run_row(load_run(run), readout))
    runs = [load_run(run)] if run is not None else load_runs(results_dir)
    if view == "findings":  # its own page, above this module (bench.report.findings_page)
        raise BenchError("the findings view is rendered by bench.report.findings_page.findings_view")
    table = runs_rows(runs, dataset) if view == "runs" else leaderboard_rows(runs, dataset, reference)
    if view == "gap":
        table = gap_rows(table)
    if fmt == "table" and to_terminal:
        exports.print_tables(table, view)
        return None
    return exports.render(table, fmt, view)
