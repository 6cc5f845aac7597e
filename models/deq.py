"""The DEQ protocol, as architectures import it (defined in bench.deq.protocol, beside the solvers)."""

from bench.deq.protocol import BATCHING_MODES, DeployConfig, DEQClassifier, flat_size, is_deq

__all__ = ["BATCHING_MODES", "DEQClassifier", "DeployConfig", "flat_size", "is_deq"]
