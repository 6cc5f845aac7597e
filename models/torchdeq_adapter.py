"""Evaluate a torchdeq-built DEQ (locuslab/torchdeq) with deq-bench's solvers, trajectories and estimators.

A torchdeq model's forward hides the fixed point inside `self.deq(func, z0)`; in eval mode it returns z*
without any gradient path to the input, so attacking that forward measures nothing. The adapter takes the
pieces a torchdeq model is written from (its injection, its cell f, its head) plus the torchdeq core, and
presents them as the DEQ protocol of bench/deq/protocol.py: the harness then solves, unrolls and
differentiates f itself, and torchdeq's solver is used only as the reference the deployed prediction
must equal.

torchdeq pairs each iterate f^k(z0) with the residual of the iterate before it and returns the iterate
with the lowest such residual, after `eval_f_max_iter` f-evaluations (stopping when the whole batch is below
`f_tol`). The same prediction in our schedule (z[t] paired with its own residual) is `max_iter = K - 1`
states and `refine_apply_f` (one f on our z*): f(z[t*]) = f^{t*+1}(z0). The two agree exactly whenever the
lowest residual is not the very first one, per example; `check_forward` measures it on given inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from bench.deq.protocol import DeployConfig, DEQClassifier

# torchdeq solver function name -> ours (simple_fixed_point_iter never stops early: tol 0)
SOLVERS = {
    "fixed_point_iter": "fixed_point",
    "simple_fixed_point_iter": "fixed_point",
    "anderson_solver": "anderson",
    "broyden_solver": "broyden",
}

State = Tensor | list[Tensor]


def find_deq_core(model: nn.Module) -> nn.Module:
    """The one torchdeq core (DEQBase) inside `model`; an error if there is none or more than one."""
    cores = [m for m in model.modules() if _is_torchdeq_core(m)]
    if len(cores) != 1:
        raise ValueError(
            f"expected exactly one torchdeq DEQ core (get_deq(...)) in the model, found {len(cores)}"
        )
    return cores[0]


def _is_torchdeq_core(module: nn.Module) -> bool:
    return any(c.__module__.startswith("torchdeq") and c.__name__ == "DEQBase" for c in type(module).__mro__)


def deploy_from_torchdeq(deq: nn.Module) -> DeployConfig:
    """Our DeployConfig that predicts what torchdeq's eval forward predicts (see the module docstring)."""
    name = getattr(deq.f_solver, "__name__", "")
    if name not in SOLVERS:
        raise ValueError(
            f"torchdeq solver {name!r} has no deq-bench counterpart; known: {', '.join(SOLVERS)}"
        )
    steps = int(deq.eval_f_max_iter)
    if steps < 2:
        raise ValueError(f"torchdeq's eval_f_max_iter must be >= 2 to be solved here, got {steps}")
    grad = deq.args.get("grad", 1)
    grad = int(grad[0] if isinstance(grad, list | tuple) else grad)
    return DeployConfig(
        solver=SOLVERS[name],
        max_iter=steps - 1,
        tol=0.0 if name == "simple_fixed_point_iter" else float(deq.f_tol),
        stop_mode=str(deq.f_stop_mode),
        refine_apply_f=True,
        refine_steps=0,
        refine_lambda=1.0,
        train_unroll_steps=max(grad - 1, 0),
        train_lambda=float(deq.args.get("tau", 1.0)),
    )


def training_gradient(deq: nn.Module) -> str:
    """The estimator spec of the gradient the torchdeq core trains with (the ready-made attacker's)."""
    if deq.args.get("ift", False) or deq.args.get("hook_ift", False):
        return f"exact:{int(deq.b_max_iter)}:{float(deq.b_tol):g}"
    grad = deq.args.get("grad", 1)
    grad = int(grad[0] if isinstance(grad, list | tuple) else grad)
    return f"unroll:{max(grad - 1, 0)}:{float(deq.args.get('tau', 1.0)):g}"


class TorchDEQAdapter(DEQClassifier):
    """A torchdeq-built classifier as a DEQ protocol module.

    `model` is the user's module (its forward, torchdeq's solve, is the reference); `inject(x) -> u`,
    `f(z, u) -> z` and `head(z) -> logits` are the callables its forward is made of, with z in the user's
    layout (a tensor (B, ...) or a list of them, as torchdeq's func takes it); `init(u) -> z0` defaults to
    zeros shaped like u. `deq` is the torchdeq core (default: the one inside `model`); `deploy` overrides the
    settings derived from it (then `check_forward` compares with a torchdeq solve the user configured alike).
    """

    wraps_user_module = True  # checkpoints load into, and records hash, the user's module (`inner`)

    def __init__(
        self,
        model: nn.Module,
        *,
        inject: Callable[[Tensor], Any],
        f: Callable[[State, Any], State],
        head: Callable[[State], Tensor],
        init: Callable[[Any], State] | None = None,
        deq: nn.Module | None = None,
        deploy: DeployConfig | None = None,
    ) -> None:
        super().__init__()
        self.inner = model  # registered: parameters, buffers, .to() and .eval() follow the user's module
        # a tuple, not attributes: a module passed as a callable (inject=net.inj) must not be registered
        # twice, or the state dict would hold its weights under two names
        self._parts = (inject, f, head, init if init is not None else torch.zeros_like)
        core = deq if deq is not None else find_deq_core(model)
        self.deploy = deploy if deploy is not None else deploy_from_torchdeq(core)
        self.training_grad = training_gradient(core)
        self._layout: tuple[bool, tuple[torch.Size, ...]] | None = None  # (is a list, per-example shapes)

    # ----- state layout: the user's tensor or list of tensors <-> our (B, D) -----

    def _flatten(self, z: State) -> Tensor:
        parts = list(z) if isinstance(z, list | tuple) else [z]
        shapes = tuple(p.shape[1:] for p in parts)
        if self._layout is None:
            self._layout = (isinstance(z, list | tuple), shapes)
        elif shapes != self._layout[1]:
            raise ValueError(f"f changed the state layout from {list(self._layout[1])} to {list(shapes)}")
        return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)

    def _unflatten(self, z: Tensor) -> State:
        assert self._layout is not None, "init_state runs before f and head"
        is_list, shapes = self._layout
        parts, start = [], 0
        for s in shapes:
            n = math.prod(s)
            parts.append(z[:, start : start + n].reshape(z.shape[0], *s))
            start += n
        return parts if is_list else parts[0]

    @property
    def state_layout(self) -> list[tuple[int, ...]] | None:
        """Per-example shapes of the user's state parts (known after the first init_state)."""
        return None if self._layout is None else [tuple(s) for s in self._layout[1]]

    # ----- the DEQ protocol -----

    def inject(self, x: Tensor) -> Any:
        return self._parts[0](x)

    def init_state(self, u: Any) -> Tensor:
        return self._flatten(self._parts[3](u))

    def f(self, z: Tensor, u: Any) -> Tensor:
        return self._flatten(self._parts[1](self._unflatten(z), u))

    def head(self, z: Tensor) -> Tensor:
        return self._parts[2](self._unflatten(z))

    # ----- parity with torchdeq's own forward -----

    @torch.no_grad()
    def reference_logits(self, x: Tensor) -> Tensor:
        """torchdeq's eval-mode forward of the user's module, one example at a time.

        One at a time because torchdeq stops a batch when its largest residual is below tol, so its
        prediction for an example depends on the batch; per example it is the deployed function.
        """
        outs = []
        for i in range(x.shape[0]):
            out = self.inner(x[i : i + 1])
            outs.append(out[0] if isinstance(out, tuple | list) else out)
        return torch.cat(outs)

    def check_forward(self, x: Tensor) -> dict[str, float]:
        """Our deployed logits against torchdeq's on `x` (eval mode): max |difference| and agreement."""
        was_training = self.training
        self.eval()
        try:
            ours = self(x)
            ref = self.reference_logits(x)
        finally:
            self.train(was_training)
        if ours.shape != ref.shape:
            raise ValueError(
                f"torchdeq's forward returns {tuple(ref.shape)}, the adapter's head {tuple(ours.shape)}"
            )
        return {
            "max_abs_diff": float((ours - ref).abs().max()),
            "scale": float(ref.abs().max()),
            "agreement": float((ours.argmax(1) == ref.argmax(1)).float().mean()),
        }
