"""Input entropy reduction (Yang, Li, Pang, Liu, ICML 2023, Sec. 3.2) for any DEQClassifier.

The defense purifies the input along the DEQ's own dynamics, greedily, stage by stage:

    stage 0:      u = inject(x); Broyden for T_f steps from z = 0 (fresh memory)
    stage s >= 1: R signed-gradient steps x~ <- P(x~ - alpha sign(grad_x~ H(head(f(z_s; x~))))), with z_s the
                  previous stage's result held fixed, H the prediction entropy and P the projection to the
                  L-inf ball of radius eps around the GIVEN input x and to [0, 1] (x~ accumulates);
                  u = inject(x~); the Broyden memory is "lifted" to the new input; T_f Broyden steps from z_s.

The defended states are the N * T_f Broyden iterates z[1..N T_f]; the defended prediction is head(z[N T_f]),
the state the paper reports (z[8] for N = 4, T_f = 2).

The Broyden stage is the papers' good Broyden without line search, written here (per example) because its
first step uses carried memory: that step is z - B_lift g(z), with B_lift the previous stage's inverse-
Jacobian estimate whose last rank-one column is recomputed with the residual under the new input (the
lift: dg' = dg + g_new(z_s) - g_old(z_s)). The later steps of a stage use fresh memory (the papers'
Broyden resets its step counter, so in-stage updates overwrite the carried columns). The stage's
lowest-residual iterate is carried to the next stage. Differences to the paper's code (docs/defenses.md,
docs/fidelity.md): per example (the default), norms, stops and lowest-residual picks are per row and the
lift's shift uses g_old at the carried state (theirs: batch-global, and g_old at the last iterate: the
same unless a row carries an earlier one); with the model's DeployConfig.batching = "papers" all three
are the papers' (a stage the whole batch stops early ends there, as theirs does, but its last iterate
repeats so that N T_f states remain; theirs then lists fewer). In both modes the last stage's input steps
and lift, which influence no state, are skipped, and the lift's f(z_s; x~) doubles as the next stage's
initial f (their code evaluates it twice).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

from bench.defenses.specs import GRAMMAR, parse_count, parse_number, parse_options
from bench.deq.solvers import REL_EPS, STOP_MODES, StopRule, per_example_of, rowdot, rownorm, rowsum
from bench.deq.trajectory import Trajectory
from bench.errors import BenchError
from bench.numbers import format_fraction


def prediction_entropy(logits: Tensor) -> Tensor:
    """(B,) Shannon entropy of softmax(logits) per example (pairwise sum: batch-independent bits)."""
    return -rowsum(torch.softmax(logits, dim=-1) * torch.log_softmax(logits, dim=-1))


def _finite_or_zero(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


# ----- one Broyden stage with optional carried memory ---------------------------------------------------


def _matvec(us: list[Tensor], vs: list[Tensor], x: Tensor) -> Tensor:
    """B x with B = -I + sum_j u_j v_j^T (per row)."""
    out = -x
    for u, v in zip(us, vs, strict=True):
        out = out + u * rowdot(v, x)[:, None]
    return out


def _rmatvec(us: list[Tensor], vs: list[Tensor], x: Tensor) -> Tensor:
    """x^T B with B = -I + sum_j u_j v_j^T (per row)."""
    out = -x
    for u, v in zip(us, vs, strict=True):
        out = out + v * rowdot(u, x)[:, None]
    return out


def _rank_one(us: list[Tensor], vs: list[Tensor], dz: Tensor, dg: Tensor) -> tuple[Tensor, Tensor]:
    """The good-Broyden column (u, v) making B_new dg = dz; non-finite entries zeroed as in the papers.

    A zero denominator (a frozen row's zero secant pair) gives a zero column without ever dividing by
    zero, so a backward pass through it stays finite.
    """
    vt = _rmatvec(us, vs, dz)
    den = rowdot(vt, dg)[:, None]
    ok = den != 0
    u = (dz - _matvec(us, vs, dg)) / torch.where(ok, den, torch.ones_like(den))
    return torch.where(ok, _finite_or_zero(u), torch.zeros_like(u)), _finite_or_zero(vt)


@dataclass
class _Stage:
    """What one Broyden stage leaves behind: its iterates, its memory and its last secant pair."""

    states: list[Tensor]
    abs_residual: Tensor  # (B, T_f)
    rel_residual: Tensor  # (B, T_f)
    result: Tensor  # lowest-residual iterate per row, the next stage's start
    pick: Tensor  # (B,) 0-based index of that iterate within the stage
    steps: Tensor  # (B,) steps each row took
    diverged: Tensor  # (B,)
    us: list[Tensor]
    vs: list[Tensor]
    dz: Tensor  # last step's z difference
    dg: Tensor  # last step's residual difference (old input)
    g_old: Tensor  # the lift's old residual: at the carried iterate (per example) or the last (papers)

    def lifted_memory(self, g_new_at_result: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """The memory with its last column recomputed after shifting the last residual difference by the
        change of the carried state's residual under the new input.

        The paper's code shifts by g_new(z_carried) - g_old(z_last): the same when the carried state is
        the last iterate; when a row carries an earlier one, theirs nearly cancels dg and the column
        explodes, so per example g_old(z_carried) is used (with batching "papers", theirs: `g_old` holds
        g at the last iterate; their batch-wide pick carries an earlier one in many batches).
        """
        us, vs = self.us[:-1], self.vs[:-1]
        u, v = _rank_one(us, vs, self.dz, self.dg + (g_new_at_result - self.g_old))
        return [*us, u], [*vs, v]


def _broyden_stage(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    fz0: Tensor,
    carry: tuple[list[Tensor], list[Tensor]] | None,
    steps: int,
    tol: float,
    stop_mode: str,
    per_example: bool = True,
) -> _Stage:
    """`steps` good-Broyden steps from z0 (f(z0) = fz0 given), the first with the carried memory.

    The stop rule is the forward solver's (StopRule): per row, a row stops (and is frozen) when its
    residual falls below tol, becomes non-finite or exceeds PROTECT times the stage's first residual, and a
    frozen row's zero secant pair adds a zero column; batch-wide (the papers'), the same test on the norm
    over the whole batch stops every row at once, and the stage ends there as in their code (its last
    iterate repeats). f is evaluated on the whole batch (it is per example in eval mode), so autograd may
    run through everything.
    """
    batch = z0.shape[0]
    z, fz, g = z0, fz0, fz0 - z0
    update = -_matvec(*carry, g) if carry is not None else g
    rule = StopRule(tol, stop_mode, per_example, broyden_guards=True)
    us: list[Tensor] = []
    vs: list[Tensor] = []
    states: list[Tensor] = []
    abs_cols: list[Tensor] = []
    rel_cols: list[Tensor] = []
    active = torch.ones(batch, dtype=torch.bool, device=z0.device)
    taken = torch.zeros(batch, dtype=torch.long, device=z0.device)
    diverged = torch.zeros_like(active)
    result, g_result = z0, g
    pick = torch.zeros(batch, dtype=torch.long, device=z0.device)
    dz = dg = torch.zeros_like(z0)
    for step in range(steps):
        keep = active[:, None]
        z_new = torch.where(keep, z + update, z)
        fz_new = torch.where(keep, f(z_new), fz)
        g_new = fz_new - z_new
        abs_t = rownorm(g_new)
        fz_norm = rownorm(fz_new)
        rel_t = abs_t / (fz_norm + REL_EPS)
        abs_cols.append(abs_t)
        rel_cols.append(rel_t)
        trace = torch.stack(rel_cols if stop_mode == "rel" else abs_cols, dim=1).detach()
        stop, improve, protect = rule(trace, abs_t.detach(), fz_norm.detach(), active)
        result = torch.where(improve[:, None], z_new, result)
        g_result = torch.where(improve[:, None], g_new, g_result)
        pick = torch.where(improve, step, pick)
        taken = taken + active.long()
        diverged = diverged | (active & (protect | ~torch.isfinite(trace[:, -1])))
        active = active & ~stop
        dz, dg = z_new - z, g_new - g
        u, v = _rank_one(us, vs, dz, dg)
        us, vs = [*us, u], [*vs, v]
        update = -_matvec(us, vs, g_new)
        z, fz, g = z_new, fz_new, g_new
        states.append(z)
        if not per_example and not bool(active.any()):  # the papers' break: no further step
            break
    while len(states) < steps:
        states.append(z)
        abs_cols.append(abs_cols[-1])
        rel_cols.append(rel_cols[-1])
    return _Stage(
        states=states,
        abs_residual=torch.stack(abs_cols, dim=1).detach(),
        rel_residual=torch.stack(rel_cols, dim=1).detach(),
        result=result,
        pick=pick,
        steps=taken,
        diverged=diverged,
        us=us,
        vs=vs,
        dz=dz,
        dg=dg,
        g_old=g_result if per_example else g,
    )


# ----- the defended forward -----------------------------------------------------------------------------


@dataclass
class DefendedResult:
    """One defended forward: the defended states z[1..N T_f] and what produced them.

    `states` are detached unless the run tracked gradients. `stage_inputs[s]` is the input stage s solved
    with (x itself for s = 0); `x_purified` is the last one, the input behind the reported state. `signs`
    holds every input step's sign direction ((N-1) R, *x.shape, int8), so the purified inputs can be
    rebuilt from x with autograd (`EntropyReduction.replay`). `entropy_before/after[:, s-1]` is stage s's
    objective H(head(f(z_s; x~))) before and after its R input steps.
    """

    states: list[Tensor]
    stage_inputs: list[Tensor]
    signs: Tensor
    abs_residual: Tensor  # (B, N T_f)
    rel_residual: Tensor  # (B, N T_f)
    nsteps: Tensor  # (B,) Broyden steps taken over all stages
    stage_picks: Tensor  # (B, N) per stage, the 0-based index of the lowest-residual iterate carried on
    diverged: Tensor  # (B,)
    entropy_before: Tensor  # (B, N-1)
    entropy_after: Tensor  # (B, N-1)
    initial: Tensor  # z[0]
    f_evals: int  # batched f calls (forward)
    f_backward: int  # f backward passes (input steps)
    stop_mode: str = "rel"
    solver_steps: int = 2
    per_example: bool = True  # False: the papers' batch-wide stops and picks (DeployConfig.batching)

    @property
    def x_purified(self) -> Tensor:
        return self.stage_inputs[-1]

    def trajectory(self) -> Trajectory:
        """The defended states as a Trajectory for estimators: result = z[N T_f], the reported state."""
        last = len(self.states)
        batch = self.initial.shape[0]
        return Trajectory(
            states=[z.detach() for z in self.states],
            abs_residual=self.abs_residual,
            rel_residual=self.rel_residual,
            nsteps=self.nsteps,
            lowest_index=torch.full((batch,), last - 1, dtype=torch.long, device=self.initial.device),
            result=self.states[-1].detach(),
            diverged=self.diverged,
            f_evals=self.f_evals,
            initial=self.initial.detach(),
            stop_mode=self.stop_mode,
            per_example=self.per_example,
        )

    def stats(self) -> dict[str, Any]:
        """Per-example statistics for records (plain lists) and the f-evaluations spent per example."""
        last = len(self.states) - 1
        return {
            "f_evals": self.f_evals,
            "f_backward": self.f_backward,
            "nsteps": self.nsteps.tolist(),
            "diverged": self.diverged.tolist(),
            "rel_residual": self.rel_residual[:, last].tolist(),
            "abs_residual": self.abs_residual[:, last].tolist(),
            "entropy_before": self.entropy_before.tolist(),
            "entropy_after": self.entropy_after.tolist(),
        }


@dataclass(frozen=True)
class EntropyReduction:
    """The defense's parameters (paper defaults) and its forward `run`. Build from a spec with `parse`."""

    stages: int = 4  # N: N = F_THRES // T_f in the paper's code
    steps: int = 10  # R input steps per stage
    alpha: float = 2 / 255  # input step size
    eps: float = 8 / 255  # L-inf radius around the given input
    solver_steps: int = 2  # T_f Broyden steps per stage
    tol: float = 1e-3  # in-stage stop (the papers' Broyden eps)
    stop_mode: str = "rel"

    name: ClassVar[str] = "entropy-reduction"
    # spec key -> field name
    _keys: ClassVar[dict[str, str]] = {
        "stages": "stages",
        "steps": "steps",
        "alpha": "alpha",
        "eps": "eps",
        "solver_steps": "solver_steps",
        "tol": "tol",
        "stop": "stop_mode",
    }

    def __post_init__(self) -> None:
        for key, low in (("stages", 1), ("steps", 0), ("solver_steps", 1)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise BenchError(f"entropy-reduction {key} must be an integer >= {low}, got {value!r}")
        for key in ("alpha", "eps", "tol"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and 0 <= value < float("inf")):
                raise BenchError(f"entropy-reduction {key} must be a finite number >= 0, got {value!r}")
        if self.stop_mode not in STOP_MODES:
            raise BenchError(f"entropy-reduction stop must be 'rel' or 'abs', got {self.stop_mode!r}")

    # ----- spec strings ---------------------------------------------------------------------------------

    @classmethod
    def parse(cls, spec: str) -> EntropyReduction:
        """`entropy-reduction` (paper defaults) or `entropy-reduction:stages=4,steps=10,alpha=2/255,...`."""
        if not isinstance(spec, str):
            raise BenchError("defense spec must be a string, e.g. 'entropy-reduction:steps=10'")
        raw = parse_options(spec, cls.name, cls._keys)
        values: dict[str, Any] = {}
        for key, text in raw.items():
            if key in ("stages", "solver_steps"):
                values[cls._keys[key]] = parse_count(text, key, spec, 1)
            elif key == "steps":
                values[key] = parse_count(text, key, spec, 0)
            elif key == "stop":
                if text not in STOP_MODES:
                    raise BenchError(f"bad defense {spec!r}: stop must be 'rel' or 'abs', got {text!r}")
                values["stop_mode"] = text
            else:
                values[key] = parse_number(text, key, spec)
        return cls(**values)

    @property
    def spec(self) -> str:
        """Canonical spec with every parameter (parse(spec) rebuilds an equal defense)."""
        parts = [
            f"stages={self.stages}",
            f"steps={self.steps}",
            f"alpha={format_fraction(self.alpha)}",
            f"eps={format_fraction(self.eps)}",
            f"solver_steps={self.solver_steps}",
            f"tol={format_fraction(self.tol)}",
            f"stop={self.stop_mode}",
        ]
        return f"{self.name}:{','.join(parts)}"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def n_states(self) -> int:
        """Number of defended states N T_f."""
        return self.stages * self.solver_steps

    @property
    def n_input_steps(self) -> int:
        """Input updates that influence a defended state: R per stage after the first."""
        return (self.stages - 1) * self.steps

    def cost(self) -> dict[str, int]:
        """Work per defended example (= batched calls): every stage's initial f plus T_f steps, and per
        input step one inject + f + head forward and backward; one head per later stage for the record."""
        later = self.stages - 1
        return {
            "f_forward": self.stages * (1 + self.solver_steps) + self.n_input_steps,
            "f_backward": self.n_input_steps,
            "inject_forward": self.stages + self.n_input_steps,
            "inject_backward": self.n_input_steps,
            "head_forward": later * (self.steps + 1),
            "head_backward": self.n_input_steps,
        }

    # ----- the defended forward -------------------------------------------------------------------------

    def project(self, y: Tensor, x: Tensor) -> Tensor:
        """Clip to the L-inf ball of radius eps around x, then to [0, 1] (the paper's order)."""
        return torch.min(torch.max(y, x - self.eps), x + self.eps).clamp(0, 1)

    def input_step(self, xt: Tensor, sign: Tensor, x: Tensor) -> Tensor:
        """One entropy-descent step with a given sign direction; differentiable in xt and x."""
        return self.project(xt - self.alpha * sign.to(xt.dtype), x)

    def replay(self, x: Tensor, signs: Tensor, stages: int | None = None) -> list[Tensor]:
        """The inputs of stages 0..stages-1 (all by default) rebuilt from x with recorded sign directions.

        Bit-identical to the run's inputs for the same x; differentiable in x, with the signs held
        constant: the exact derivative of the purified inputs almost everywhere (sign is piecewise
        constant), through the projections.
        """
        inputs, xt = [x], x
        for s in range(1, self.stages if stages is None else stages):
            for r in range(self.steps):
                xt = self.input_step(xt, signs[(s - 1) * self.steps + r], x)
            inputs.append(xt)
        return inputs

    def _purify(
        self, model: Any, f: Any, z: Tensor, xt: Tensor, x: Tensor
    ) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """R steps lowering H(head(f(z; x~))) with z fixed: (new x~, the signs, the entropy before)."""
        signs: list[Tensor] = []
        before = None
        for _ in range(self.steps):
            with torch.enable_grad():
                xg = xt.detach().requires_grad_(True)
                entropy = prediction_entropy(model.head(f(z.detach(), model.inject(xg))))
                (grad,) = torch.autograd.grad(entropy.sum(), xg)
            if before is None:
                before = entropy.detach()
            sign = grad.sign().to(torch.int8)
            signs.append(sign)
            xt = self.input_step(xt, sign, x)
        return xt, signs, before

    def run(self, model: Any, x: Tensor, *, track_grad: bool = False) -> DefendedResult:
        """The defended forward of a DEQClassifier in eval mode on inputs x in [0, 1].

        With track_grad the states keep their autograd graph to x (through the injections, the Broyden
        steps and the purified inputs, whose sign directions count as constants); otherwise all is detached.
        The Broyden stages batch as model.deploy.batching says (per example, or the papers' batch-wide).
        """
        if getattr(model, "training", False):
            raise BenchError("entropy reduction needs the model in eval mode (call model.eval())")
        if torch.is_inference_mode_enabled():
            raise BenchError(
                "entropy reduction differentiates its input steps: run it outside inference_mode"
            )
        x = x if track_grad else x.detach()
        per_example = per_example_of(getattr(model, "deploy", None))
        model.begin_forward(x.shape[0])
        counts = {"f": 0}

        def f(z: Tensor, u: Any) -> Tensor:
            counts["f"] += 1
            return model.f(z, u)

        grad_mode = torch.enable_grad() if track_grad else torch.no_grad()
        with grad_mode, model.weights_cached():  # weight-normed weights once per defended forward, not per f
            xt = x
            inputs, signs = [x], []
            before, after = [], []
            u = model.inject(xt)
            z0 = model.init_state(u)
            z, fz = z0, f(z0, u)
            carry = None
            stages: list[_Stage] = []
            for s in range(self.stages):
                if s > 0:
                    xt, stage_signs, h_before = self._purify(model, f, z, xt, x)
                    signs += stage_signs
                    inputs.append(xt)
                    u = model.inject(xt)
                    fz = f(z, u)
                    with torch.no_grad():
                        h_after = prediction_entropy(model.head(fz))
                    before.append(h_after if h_before is None else h_before)
                    after.append(h_after)
                    carry = stages[-1].lifted_memory(fz - z)
                stage = _broyden_stage(
                    lambda v, u=u: f(v, u),
                    z,
                    fz,
                    carry,
                    self.solver_steps,
                    self.tol,
                    self.stop_mode,
                    per_example,
                )
                stages.append(stage)
                z = stage.result
        empty = x.new_zeros(x.shape[0], 0)
        no_signs = torch.zeros(0, *x.shape, dtype=torch.int8, device=x.device)
        return DefendedResult(
            states=[state for st in stages for state in st.states],
            stage_inputs=inputs,
            signs=torch.stack(signs) if signs else no_signs,
            abs_residual=torch.cat([st.abs_residual for st in stages], dim=1),
            rel_residual=torch.cat([st.rel_residual for st in stages], dim=1),
            nsteps=sum(st.steps for st in stages),
            stage_picks=torch.stack([st.pick for st in stages], dim=1),
            diverged=torch.stack([st.diverged for st in stages]).any(dim=0),
            entropy_before=torch.stack(before, dim=1) if before else empty,
            entropy_after=torch.stack(after, dim=1) if after else empty,
            initial=z0.detach(),
            f_evals=counts["f"],
            f_backward=len(signs),
            stop_mode=self.stop_mode,
            solver_steps=self.solver_steps,
            per_example=per_example,
        )


def parse_defense(spec: str | None) -> EntropyReduction | None:
    """The defense a spec names, or None for `none` (no defense)."""
    if spec is None or (isinstance(spec, str) and spec.strip() == "none"):
        return None
    if not isinstance(spec, str):
        raise BenchError(f"defense spec must be a string; grammar: {GRAMMAR}")
    return EntropyReduction.parse(spec)
