"""What attacks see of a defended DEQ: readouts on the defended states, and the three attack modes.

    transfer   examples crafted on the undefended model (bench.deq.view.AttackView), then judged by the
               defended prediction: `judge` / `defended_logits`. The paper's PGD.
    BPDAView   value = defended logits; gradient = the estimator's surrogate on the defended trajectory,
               with the purifier x -> x~ replaced by the identity in the backward pass (Athalye et al.'s
               BPDA): the classifier's gradient at the input it actually classified. `injection="given"`
               uses the injection of x instead of x~: the gradient of the paper's AutoAttack run.
    AdaptiveView  value = defended logits; gradient end to end through the defense: the purified inputs
               are rebuilt from x with their recorded sign directions held constant (the exact derivative
               almost everywhere: sign is piecewise constant), then either the estimator's surrogate at the
               anchor stage's purified injection, or (`estimator="bptt"`) autograd through every Broyden
               step of every stage, which is the exact almost-everywhere gradient of the defended prediction.

Every view returns value + (surrogate - surrogate.detach()) with value the no-grad defended readout, so an
attack's success checks see the defended prediction bit for bit. Non-finite input-gradient entries (a
Broyden secant division, a diverged row) are zeroed on the way back to x.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bench.defenses.entropy import DefendedResult, EntropyReduction, parse_defense
from bench.deq.estimators import Estimator, parse_estimator
from bench.deq.readouts import (
    EnsembleLogitReadout,
    EnsembleStateReadout,
    FinalReadout,
    Readout,
    StateReadout,
    parse_readout,
)
from bench.deq.view import straight_through
from bench.errors import BenchError

BPTT = "bptt"
INJECTIONS = ("purified", "given")


def _as_defense(defense: EntropyReduction | str) -> EntropyReduction:
    parsed = parse_defense(defense) if isinstance(defense, str) else defense
    if not isinstance(parsed, EntropyReduction):
        raise BenchError(f"expected an input-purification defense, got {defense!r}")
    return parsed


def defended_readout(readout: Readout | str, defense: EntropyReduction) -> Readout:
    """The readout, checked against the defended trajectory's N T_f states."""
    parsed = parse_readout(readout) if isinstance(readout, str) else readout
    if isinstance(parsed, StateReadout) and parsed.t > defense.n_states:
        raise BenchError(
            f"readout {parsed.spec!r} needs state {parsed.t} but the defense {defense.spec!r} has "
            f"{defense.n_states} states"
        )
    return parsed


def _average(tensors: list[Tensor]) -> Tensor:
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t
    return total / len(tensors)


def readout_logits(model: Any, states: list[Tensor], readout: Readout) -> Tensor:
    """A readout on the defended states z[1..N T_f] (differentiable when the states are).

    final = head(z[N T_f]), the paper's reported state (not its unpurified "final" entry); state:t =
    head(z[t]); the ensembles average the N T_f defended states (ensemble-state) or their logits
    (ensemble-logit): unlike the undefended ensembles there is no refined final member.
    """
    if isinstance(readout, FinalReadout):
        return model.head(states[-1])
    if isinstance(readout, StateReadout):
        if readout.t > len(states):
            raise BenchError(f"readout {readout.spec!r} needs state {readout.t}; there are {len(states)}")
        return model.head(states[readout.t - 1])
    if isinstance(readout, EnsembleStateReadout):
        return model.head(_average(states))
    if isinstance(readout, EnsembleLogitReadout):
        return _average([model.head(z) for z in states])
    raise BenchError(f"readout {readout.spec!r} has no defended version")


def defended_logits(
    model: Any, defense: EntropyReduction | str, x: Tensor, readout: Readout | str = "final"
) -> Tensor:
    """The defended prediction's logits (no gradient)."""
    defense = _as_defense(defense)
    parsed = defended_readout(readout, defense)
    result = defense.run(model, x)
    with torch.no_grad():
        return readout_logits(model, result.states, parsed)


def judge(
    model: Any, defense: EntropyReduction | str, x_adv: Tensor, y: Tensor, readout: Readout | str = "final"
) -> Tensor:
    """(B,) bool: the defended prediction on x_adv is wrong (the transfer mode's verdict)."""
    return defended_logits(model, defense, x_adv, readout).argmax(dim=1) != y


def _finite_grad(x: Tensor) -> Tensor:
    """x itself, whose incoming gradient has its non-finite entries zeroed."""
    if not x.requires_grad:
        return x
    out = x.view_as(x)
    out.register_hook(lambda g: torch.where(torch.isfinite(g), g, torch.zeros_like(g)))
    return out


class _DefendedView(nn.Module):
    """Shared parts: the defended value, stats, and the straight-through combination."""

    def __init__(self, model: nn.Module, defense: EntropyReduction | str, readout: Readout | str) -> None:
        super().__init__()
        self.model = model
        self.defense = _as_defense(defense)
        self.readout = defended_readout(readout, self.defense)
        self.last_result: DefendedResult | None = None
        self.last_stats: dict[str, Any] = {}
        self.nonfinite_rows = 0  # rows whose surrogate was not finite (their gradient is dropped), summed

    def _record(self, result: DefendedResult) -> None:
        self.last_result = result
        last = len(result.states) - 1
        self.last_stats = {
            "nsteps": result.nsteps,
            "residual": (result.rel_residual if result.stop_mode == "rel" else result.abs_residual)[:, last],
            "diverged": result.diverged,
            "f_evals": result.f_evals,
            "f_backward": result.f_backward,
        }

    def _combine(self, value: Tensor, surrogate: Tensor) -> Tensor:
        out, dropped = straight_through(value, surrogate)
        self.nonfinite_rows += dropped
        return out

    def forward(self, x: Tensor) -> Tensor:
        with self.model.weights_cached():  # one weight-norm computation for the defense and surrogate
            return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _check_estimator(self, estimator: Estimator) -> Estimator:
        estimator.check_steps(self.defense.n_states)
        return estimator

    def _anchor_stage(self, estimator: Estimator) -> int:
        """The stage whose input the estimator's anchor state was solved with."""
        need = estimator.needed_states()
        return (max(need) - 1) // self.defense.solver_steps if need else self.defense.stages - 1


class BPDAView(_DefendedView):
    """Forward through the defense; backward through the estimator with the purifier as the identity.

    injection="purified" (default, Athalye et al.'s BPDA): surrogate = estimator on the defended trajectory
    with u = inject(x~_s + (x - x.detach())), x~_s the input of the stage the estimator's anchor state
    belongs to (the last stage for exact/unroll/neumann). injection="given": u = inject(x), the gradient of
    the paper's AutoAttack run (which, unlike here, also judged success on that unrolled output).
    Memory: the estimator's f applications (Estimator.f_evals_with_grad) plus one inject.
    """

    def __init__(
        self,
        model: nn.Module,
        defense: EntropyReduction | str,
        readout: Readout | str = "final",
        estimator: Estimator | str = "exact",
        injection: str = "purified",
    ) -> None:
        super().__init__(model, defense, readout)
        if injection not in INJECTIONS:
            raise BenchError(f"BPDA injection must be 'purified' or 'given', got {injection!r}")
        self.estimator = self._check_estimator(
            parse_estimator(estimator) if isinstance(estimator, str) else estimator
        )
        self.injection = injection

    def memory_cost(self) -> dict[str, int]:
        """Per example: f applications and injections in the autograd graph, and the estimator's backward
        work (VJPs on a detached copy, Estimator.cost())."""
        cost = self.estimator.cost()
        return {
            "f_in_graph": cost["f_evals_with_grad"],
            "inject_in_graph": 1,
            "backward_vjps": cost["backward_vjps"],
            "backward_f_evals": cost["backward_f_evals"],
        }

    def _forward(self, x: Tensor) -> Tensor:
        model = self.model
        result = self.defense.run(model, x)
        self._record(result)
        with torch.no_grad():
            value = readout_logits(model, result.states, self.readout)
        if not torch.is_grad_enabled():
            return value
        x = _finite_grad(x)
        if self.injection == "given":
            x_in = x
        else:
            x_in = result.stage_inputs[self._anchor_stage(self.estimator)] + (x - x.detach())
        surrogate = self.estimator.surrogate(model, model.inject(x_in), result.trajectory())
        return self._combine(value, surrogate)


class AdaptiveView(_DefendedView):
    """Differentiates end to end through the defense (see the module docstring).

    The purified inputs x~_s(x) are rebuilt from x with the recorded signs (elementwise ops only; their
    x-dependence through the ball projection is real). estimator="bptt": the whole defended forward is
    re-run with autograd (the sign directions constant), the value taken from that same run. Otherwise the
    estimator's surrogate at the anchor stage's injection inject(x~_s(x)).
    Memory per example (`memory_cost`): bptt keeps N (1 + T_f) f applications, N injections, about
    2 N T_f Broyden vectors and (N-1) R input-sized steps in the graph (12 f's, 4 injections and 30 steps
    with the paper's values); an estimator keeps its own f applications, one injection and the R s input
    steps up to its anchor stage s.
    """

    def __init__(
        self,
        model: nn.Module,
        defense: EntropyReduction | str,
        readout: Readout | str = "final",
        estimator: Estimator | str = BPTT,
    ) -> None:
        super().__init__(model, defense, readout)
        if estimator == BPTT:
            self.estimator: Estimator | None = None
        else:
            self.estimator = self._check_estimator(
                parse_estimator(estimator) if isinstance(estimator, str) else estimator
            )

    def memory_cost(self) -> dict[str, int]:
        """Per example: f applications, injections, Broyden vectors and input-sized replay steps kept in
        the autograd graph, and the estimator's backward work (VJPs on a detached copy)."""
        d = self.defense
        if self.estimator is None:
            return {
                "f_in_graph": d.stages * (1 + d.solver_steps),
                "inject_in_graph": d.stages,
                "broyden_vectors_in_graph": 2 * d.n_states,
                "input_steps_in_graph": d.n_input_steps,
                "backward_vjps": 0,
                "backward_f_evals": 0,
            }
        cost = self.estimator.cost()
        return {
            "f_in_graph": cost["f_evals_with_grad"],
            "inject_in_graph": 1,
            "broyden_vectors_in_graph": 0,
            "input_steps_in_graph": self._anchor_stage(self.estimator) * d.steps,
            "backward_vjps": cost["backward_vjps"],
            "backward_f_evals": cost["backward_f_evals"],
        }

    def _forward(self, x: Tensor) -> Tensor:
        model = self.model
        if not torch.is_grad_enabled():
            result = self.defense.run(model, x)
            self._record(result)
            return readout_logits(model, result.states, self.readout)
        x = _finite_grad(x)
        if self.estimator is None:
            result = self.defense.run(model, x, track_grad=True)
            self._record(result)
            surrogate = readout_logits(model, result.states, self.readout)
            return self._combine(surrogate.detach(), surrogate)
        result = self.defense.run(model, x)
        self._record(result)
        with torch.no_grad():
            value = readout_logits(model, result.states, self.readout)
        stage = self._anchor_stage(self.estimator)
        x_in = self.defense.replay(x, result.signs, stage + 1)[stage]
        surrogate = self.estimator.surrogate(model, model.inject(x_in), result.trajectory())
        return self._combine(value, surrogate)
