"""The layering the architecture doc promises: no import cycles, no import from a higher layer, the doc's
module graph up to date, and no spec string parsed below the CLI edge."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import module_graph  # noqa: E402


def test_no_import_cycles_and_no_upward_imports():
    g = module_graph.graph()
    assert len(g) > 40  # the whole package was read
    assert module_graph.cycles(g) == []
    assert module_graph.upward_imports(g) == []


def test_layer_check_catches_an_upward_import():
    g = {"bench.deq.solvers": {"bench.evaluate.job"}, "bench.evaluate.job": {"bench.deq.solvers"}}
    assert module_graph.upward_imports(g) == ["bench.deq.solvers -> bench.evaluate.job"]
    assert module_graph.cycles(g) == [["bench.deq.solvers", "bench.evaluate.job"]]


def test_architecture_doc_shows_the_current_graph():
    text = module_graph.DOC.read_text()
    block = text[text.index(module_graph.BEGIN) : text.index(module_graph.END) + len(module_graph.END)]
    assert block == module_graph.markdown(module_graph.graph()), "run: python scripts/module_graph.py --write"


# Ways the code once took spec strings apart below the CLI: defense modes out of estimator labels, record
# keys joined with '|', warnings read back with a regex.
SPEC_PARSING = [
    re.compile(r"""\.r?partition\(\s*["']@["']"""),
    re.compile(r"""\.split\(\s*["']@["']"""),
    re.compile(r"""["']@["']\s+in\b"""),
    re.compile(r"""startswith\(\s*f?["'](transfer|bpda|adaptive)@"""),
    re.compile(r"""\.split\(\s*["']\|["']"""),
    re.compile(r"""startswith\(\s*["']adjoint"""),
    re.compile(r"""\.match\(\s*(text|message|w)\b"""),
]
# the spec module, the CLI edge, and the schema module's upgrade of older records
ALLOWED = {"bench/spec.py", "bench/records/schema.py"}


def test_no_spec_string_is_parsed_below_the_cli_edge():
    offenders = []
    for path in sorted((ROOT / "bench").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in ALLOWED or rel.startswith("bench/cli/"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if any(p.search(line) for p in SPEC_PARSING):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert offenders == []


def test_the_grep_finds_what_it_looks_for():
    lines = ['mode, _, est = estimator.rpartition("@")', 'if est.startswith("transfer@"):', 'k.split("|")']
    assert all(any(p.search(line) for p in SPEC_PARSING) for line in lines)
