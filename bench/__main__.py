"""`python -m bench` runs the CLI (also what torchrun launches)."""

from bench.cli import main

if __name__ == "__main__":
    main()
