"""What attacks see: a ViewSpec -> the module whose value is the readout and whose gradient the estimator's.

`Views` holds one model (with its defense, if any) and builds each view once. The `early` readout is a
name whose state the dev set chooses: a `Views` is built with that choice (`states`) and never changes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from bench.attacks import Attack
from bench.errors import BenchError
from bench.spec import AttackMode, ViewSpec


def is_deq(model: nn.Module) -> bool:
    from bench.deq.protocol import is_deq as protocol_is_deq

    return protocol_is_deq(model)


class Views:
    """The attacked views of one model; holds nothing batch-specific."""

    def __init__(
        self,
        model: nn.Module,
        eps: float,
        device: torch.device,
        defense: Any = None,
        states: Mapping[str, str] | None = None,
    ) -> None:
        self.model = model
        self.eps = eps
        self.device = device
        self.defense = defense  # an EntropyReduction, or None
        self.is_deq = is_deq(model)
        self.states = dict(states or {})  # readout name -> the readout it stands for ("early" -> "state:t")
        self._modules: dict[ViewSpec, nn.Module] = {}
        # inputs follow the model's floating dtype (data sets are stored in float32)
        self.dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

    def inputs(self, x: Tensor) -> Tensor:
        """Images on the model's device, in its floating dtype: the form every attack and pass gets."""
        return x.to(device=self.device, dtype=self.dtype)

    def with_states(self, states: Mapping[str, str]) -> Views:
        """The same model's views with named readouts resolved (the dev set's early state)."""
        return Views(self.model, self.eps, self.device, self.defense, {**self.states, **states})

    def resolve(self, readout: str) -> str:
        return self.states.get(readout, readout)

    def module(self, view: ViewSpec) -> nn.Module:
        """The module an attack sees for `view`: value = readout (defended in bpda/adaptive), gradient =
        the estimator's. Transfer mode is the undefended model: run_group judges it with the defense."""
        if not self.is_deq:
            return self.model
        if view not in self._modules:
            self._modules[view] = self._build(view)
        return self._modules[view]

    def _build(self, view: ViewSpec) -> nn.Module:
        readout = self.resolve(view.readout)
        if view.mode is not AttackMode.UNDEFENDED and self.defense is None:
            raise BenchError(f"view {view.label!r} names a defense attack mode but --defense is none")
        if view.mode is AttackMode.BPDA:
            from bench.defenses import BPDAView

            return BPDAView(self.model, self.defense, readout, view.estimator)
        if view.mode is AttackMode.ADAPTIVE:
            from bench.defenses import AdaptiveView

            return AdaptiveView(self.model, self.defense, readout, view.estimator)
        from bench.deq.view import AttackView

        return AttackView(self.model, readout=readout, estimator=view.estimator)

    def judge(self, readout: str) -> Any:
        """For transfer mode: (x_adv, y) -> broken by the defended prediction."""
        from bench.defenses import judge

        return lambda x_adv, y: judge(self.model, self.defense, x_adv, y, self.resolve(readout))

    @staticmethod
    def runs_of(attack: Attack, views: Iterable[ViewSpec]) -> list[ViewSpec]:
        """The views `attack` runs with: every one, or for a score-based attack (Square) the first of each
        distinct forward. Its queries see forward values only, and every view of a readout has the
        deployed prediction as its value (bpda and adaptive views the defended one), so a second run would
        repeat the same attack with another seed: extra restarts, not another estimator.
        """
        views = list(views)
        if attack.uses_gradient:
            return views
        first: dict[bool, ViewSpec] = {}
        for view in views:
            first.setdefault(view.mode.defended_forward, view)
        return list(first.values())

    def validate(self, views: Iterable[ViewSpec]) -> None:
        """Build every view up front so a bad readout or estimator fails before any work is done."""
        for view in views:
            self.module(view)

    @torch.no_grad()
    def clean_pass(self, x: Tensor, readouts: tuple[str, ...]) -> dict[str, Any]:
        """One solve (or one defended forward) feeds every readout: predictions per readout, per solver
        state, prediction entropies and solver stats."""
        if not self.is_deq:
            return {"readouts": {"final": self.model(x).argmax(1)}, "states": None, "solver": None}
        from bench.defenses import prediction_entropy

        if self.defense is not None:
            states_z, preds, stats, rel, abs_ = self._defended_pass(x, readouts)
        else:
            states_z, preds, stats, rel, abs_ = self._plain_pass(x, readouts)
        logits = [self.model.head(z) for z in states_z]
        stats["rel_trace"] = rounded(rel)  # (B, T): the residual along the dynamics, per example
        stats["abs_trace"] = rounded(abs_)
        return {
            "readouts": preds,
            "states": torch.stack([lg.argmax(1) for lg in logits], 1),
            "entropy": torch.stack([prediction_entropy(lg) for lg in logits], 1),
            "solver": stats,
        }

    def _defended_pass(self, x: Tensor, readouts: tuple[str, ...]) -> tuple[Any, ...]:
        from bench.defenses import defended_readout, readout_logits

        with torch.enable_grad():  # the defense's input steps need autograd
            result = self.defense.run(self.model, x)
        preds = {
            r: readout_logits(
                self.model, result.states, defended_readout(self.resolve(r), self.defense)
            ).argmax(1)
            for r in readouts
        }
        stats = result.stats()
        stats.pop("f_evals"), stats.pop("f_backward")
        return result.states, preds, stats, result.rel_residual, result.abs_residual

    def _plain_pass(self, x: Tensor, readouts: tuple[str, ...]) -> tuple[Any, ...]:
        from bench.deq.readouts import parse_readout, solve_model
        from bench.deq.solvers import SolverSettings

        model = self.model
        model.begin_forward(x.shape[0])
        u = model.inject(x)
        traj = solve_model(model, u, SolverSettings.from_deploy(model.deploy), keep=None)
        states_z = [traj.state(t) for t in range(1, traj.max_iter + 1)]
        preds = {r: parse_readout(self.resolve(r)).logits(model, traj, u).argmax(1) for r in readouts}
        return states_z, preds, traj.stats(), traj.rel_residual, traj.abs_residual


def rounded(t: Tensor, digits: int = 5) -> list[Any]:
    """Floats for records, rounded to keep them small (per-step traces are diagnostics, not results)."""
    return [[float(f"{v:.{digits}g}") for v in row] for row in t.detach().cpu().tolist()]


def tolist(t: Tensor) -> list[Any]:
    return t.detach().cpu().tolist()
