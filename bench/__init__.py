"""deq-bench: honest white-box robustness evaluation of Deep Equilibrium Models."""

__version__ = "0.4.0"
