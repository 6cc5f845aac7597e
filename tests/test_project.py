"""The project's promises about itself: README commands, CI script, registry data."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)[:2]


def test_readme_starts_with_setup_and_test_commands():
    setup, tests = _readme_commands()
    assert "pip install" in setup and "-c constraints.txt" in setup and "bench " in setup
    assert "pytest" in tests


def test_ci_runs_exactly_the_readme_commands_and_fails_on_error():
    ci = (ROOT / ".ci" / "run").read_text()
    lines = [ln for ln in ci.splitlines() if ln and not ln.startswith("#")]
    for command in _readme_commands():
        assert command in lines, f"CI does not run the README command {command!r}"
    assert "set -euo pipefail" in ci  # pytest's exit 5 (no tests) fails CI like any other failure
    assert "|| true" not in ci


def test_constraints_pin_the_torch_pair():
    pins = (ROOT / "constraints.txt").read_text()
    assert "torch==2.14.1" in pins and "torchvision==0.29.1" in pins
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"torch==2.14.1"' in pyproject and '"torchvision==0.29.1"' in pyproject
