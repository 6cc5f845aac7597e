"""The docs and the CLI cannot drift apart: runnable examples run, the rest parse, every flag is documented.

A shell block in README.md or docs/*.md preceded by `<!-- runnable -->` is executed (offline, in a
temporary folder holding a copy of the committed results/, so reused records keep it fast) and, when a
```text block follows it, every line of that block must appear in what it printed (a line ending in
"..." as the start of a printed line). A block marked
`<!-- flags-only -->` (GPU, CIFAR-10, hours of CPU, or the internet) is only parsed by the CLI.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import cli_reference  # noqa: E402

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(
    r"<!-- (runnable|flags-only) -->\n```bash\n(.*?)\n```(?:\s*\n```text\n(.*?)\n```)?", flags=re.S
)


def _commands(script: str) -> list[str]:
    """The command lines of a block: continuations joined, comments and blank lines dropped."""
    joined = script.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def _examples(kind: str) -> list[tuple[str, str, str | None]]:
    found = []
    for doc in DOCS:
        for m in BLOCK.finditer(doc.read_text()):
            if m.group(1) == kind:
                for command in _commands(m.group(2)):
                    found.append((f"{doc.name}: {command}", command, m.group(3)))
    return found


RUNNABLE = _examples("runnable")
FLAGS_ONLY = _examples("flags-only")


def _normalise(line: str) -> str:
    return " ".join(line.replace("|", " ").split())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder like a user's checkout: results/ copied (records, sweeps, baselines), `bench` on PATH."""
    root = tmp_path_factory.mktemp("docs")
    shutil.copytree(ROOT / "results", root / "results", ignore=shutil.ignore_patterns(".partial", "plots"))
    bin_dir = root / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "bench"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m bench "$@"\n')
    shim.chmod(0o755)
    return root


def test_the_docs_have_runnable_examples():
    assert len(RUNNABLE) >= 4 and FLAGS_ONLY


@pytest.mark.parametrize(("label", "command", "expected"), RUNNABLE, ids=[r[0] for r in RUNNABLE])
def test_runnable_example_runs_and_prints_what_the_docs_show(workspace, label, command, expected):
    env = {
        **os.environ,
        "PATH": f"{workspace / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
    }
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        ["bash", "-c", command], cwd=workspace, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{label}\n{proc.stderr}"
    if expected:
        printed = [_normalise(line) for line in proc.stdout.splitlines()]
        for line in expected.splitlines():
            shown = _normalise(line.removesuffix("..."))
            if not shown:
                continue
            # a line the docs cut short with "..." (a run id, a long row) matches as a prefix
            found = any(p.startswith(shown) for p in printed) if line.endswith("...") else shown in printed
            assert found, f"{label}: the docs show {line!r}\n{proc.stdout}"


def _parse(command: str) -> None:
    """Let the CLI parse a `bench ...` command line without running it (click raises on a bad flag)."""
    args = shlex.split(command)
    assert args[0] == "bench" and len(args) > 1, command
    commands = cli_reference.subcommands()
    assert args[1] in commands, f"no subcommand {args[1]!r}"
    commands[args[1]].make_context(args[1], args[2:])


@pytest.mark.parametrize(("label", "command", "expected"), FLAGS_ONLY, ids=[r[0] for r in FLAGS_ONLY])
def test_flags_only_example_parses(label, command, expected):
    _parse(command)


def test_every_subcommand_is_in_the_readme_and_every_flag_in_the_reference():
    readme = (ROOT / "README.md").read_text()
    for name in cli_reference.subcommands():
        assert f"bench {name}" in readme, f"the README never shows `bench {name}`"
    assert (ROOT / "docs" / "cli.md").read_text() == cli_reference.markdown(), (
        "docs/cli.md is out of date: python scripts/cli_reference.py --write"
    )


def test_every_flag_the_readme_names_exists():
    known = {
        flag for command in cli_reference.subcommands().values() for flag in cli_reference.flags(command)
    }
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"`(--[a-z][a-z0-9-]*)", readme))
    assert named and named <= known, f"documented but not a flag of any command: {sorted(named - known)}"


def test_the_drift_checks_catch_drift():
    with pytest.raises(Exception, match="no-such-flag"):
        _parse("bench evaluate --model deq-tiny --no-such-flag 1")
    assert cli_reference.flags(cli_reference.subcommands()["evaluate"])  # flags are read from the CLI
