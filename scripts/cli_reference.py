"""docs/cli.md, generated from the command line itself: every subcommand and every flag with its help.

    python scripts/cli_reference.py           # print it
    python scripts/cli_reference.py --write   # rewrite docs/cli.md

tests/test_docs.py fails when docs/cli.md is not what this prints, so a flag or subcommand added to the CLI
without its documentation is caught.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "cli.md"


def click_group():
    """The `bench` command as click sees it (typer builds it)."""
    from typer.main import get_command

    from bench.cli import app

    return get_command(app)


def subcommands() -> dict:
    return dict(sorted(click_group().commands.items()))


def flags(command) -> list[str]:
    """Every long flag of a subcommand (both names of a --x/--no-x pair), --help excluded."""
    out = []
    for param in command.params:
        for name in [*param.opts, *getattr(param, "secondary_opts", [])]:
            if name.startswith("--") and name != "--help":
                out.append(name)
    return out


def _default(param) -> str:
    default = param.default
    if default is None or (param.is_flag and default is False) or callable(default):
        return ""
    return f" (default: `{default}`)"


def markdown() -> str:
    lines = [
        "# Command-line reference",
        "",
        "Generated from the CLI by `python scripts/cli_reference.py --write`; the task-shaped guide is the",
        "README. Every command prints `error: ...` on one line and exits 2 on bad input.",
        "",
    ]
    for name, command in subcommands().items():
        summary = (command.help or "").strip().splitlines()[0] if command.help else ""
        lines += [f"## `bench {name}`", "", summary, ""]
        rows = []
        for param in command.params:
            names = [n for n in [*param.opts, *getattr(param, "secondary_opts", [])] if n != "--help"]
            if not names:
                continue
            help_text = " ".join((getattr(param, "help", "") or "").split()).replace("|", "\\|")
            rows.append(f"| `{' / '.join(names)}` | {help_text}{_default(param)} |")
        if rows:
            lines += ["| flag | meaning |", "|---|---|", *rows, ""]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write", action="store_true", help="rewrite docs/cli.md")
    args = parser.parse_args()
    text = markdown()
    if args.write:
        DOC.write_text(text)
        print(f"wrote {DOC}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
