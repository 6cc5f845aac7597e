"""Inference-time defenses of DEQs and the modules attacks see of them.

Input entropy reduction (`EntropyReduction`, spec `entropy-reduction[:key=value,...]`) purifies the input
along the DEQ's dynamics; `defended_logits` / `judge` give its prediction (the transfer mode), `BPDAView`
and `AdaptiveView` attack it. The early-state and ensemble defenses are readouts (`state:t`,
`ensemble-state`, `ensemble-logit`) of bench.deq.readouts and need no code here; see docs/defenses.md.
"""

from bench.defenses.entropy import DefendedResult, EntropyReduction, parse_defense, prediction_entropy
from bench.defenses.specs import GRAMMAR
from bench.defenses.view import (
    BPTT,
    AdaptiveView,
    BPDAView,
    defended_logits,
    defended_readout,
    judge,
    readout_logits,
)

__all__ = [
    "BPTT",
    "GRAMMAR",
    "AdaptiveView",
    "BPDAView",
    "DefendedResult",
    "EntropyReduction",
    "defended_logits",
    "defended_readout",
    "judge",
    "parse_defense",
    "prediction_entropy",
    "readout_logits",
]
