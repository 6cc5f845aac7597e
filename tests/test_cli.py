"""The CLI's contract: one error line + exit 2 for bad input, tables for people, JSON for programs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run_bench(*args: str, cwd=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_and_version():
    proc = run_bench("--help")
    assert proc.returncode == 0 and "models" in proc.stdout
    proc = run_bench("version")
    assert proc.returncode == 0 and "torch 2.14.1" in proc.stdout


def test_models_json_lists_the_registry():
    proc = run_bench("models", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert {"resnet-18", "wrn-34-10"} <= set(rows)
    for row in rows.values():
        assert row["checkpoint"] in {"present", "missing", "hash mismatch", "not registered"}
        assert row["parameters"] > 0 and row["threat_model"] == "Linf"


def test_models_piped_is_plain_text():
    proc = run_bench("models")
    assert proc.returncode == 0
    header = proc.stdout.splitlines()[0].split("\t")
    assert header[:3] == ["name", "family", "dataset"]
    assert "│" not in proc.stdout and "\x1b[" not in proc.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [(("nonsense",), "No such command"), (("models", "--bogus"), "No such option")],
)
def test_usage_errors_are_one_line(args, fragment):
    assert_one_line_error(run_bench(*args), fragment)
