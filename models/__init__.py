"""Architectures: the multiscale DEQ of the papers' code, and the deep-network baselines."""
