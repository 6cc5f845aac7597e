"""`python -m bench` and the `bench` console script (also what torchrun launches).

The stop signals are routed before anything heavy is imported, so Ctrl-C during start-up is the same clean
`error: interrupted` as Ctrl-C during a run (bench/interrupts.py)."""

from __future__ import annotations

import sys

from bench import interrupts


def main() -> None:
    interrupts.install()
    try:
        from bench.cli import main as cli_main

        interrupts.raise_held()
        cli_main()
    except (interrupts.Interrupted, KeyboardInterrupt) as exc:  # the CLI's own handling reports the rest
        print(f"error: {interrupts.MESSAGE}", file=sys.stderr)
        sys.exit(exc.exit_code if isinstance(exc, interrupts.Interrupted) else 130)
    finally:
        interrupts.stop_timer()


if __name__ == "__main__":
    main()
