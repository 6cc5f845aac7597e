"""Output for people and programs: rich tables in a terminal, plain text when piped, JSON on request."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A rich table on a terminal; tab-separated lines with a header when piped (easy to grep or cut)."""
    if stdout_is_terminal():
        table = Table(title=escape(title))  # names like "pgd [exact]" or "z[t]" are not markup
        for col in columns:
            table.add_column(col)
        for row in rows:
            table.add_row(*(escape(str(v)) for v in row))
        Console().print(table)
        return
    print("\t".join(columns))
    for row in rows:
        print("\t".join(str(v) for v in row))


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=1, sort_keys=True))
