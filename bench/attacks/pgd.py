"""L-inf PGD, written here so that its randomness is per example and its cost falls only on robust examples.

Differences from the papers' evaluation PGD (white-box protocol §5.1, §9 item 11), all of which can only
make the attack stronger or the record more truthful:

* the random start U(-eps, eps) is clipped to [0,1] before the first gradient, so every forward the
  attack looks at is on a valid input;
* an example counts as broken as soon as the model's forward on an iterate misclassifies it (the
  papers look at the last iterate only), and that iterate is returned;
* with `early_stop` broken examples are frozen and dropped from further forward/backward work;
* the random start of example i comes from a generator seeded by (seeds[i], restart), so the result of
  an example does not depend on which other examples share its batch.

Preset (the papers'): `pgd-10` = 10 steps of eps/4 (2/255 at eps 8/255) from a random start.

What each step pays for (`loss_on`):

* `deployed` (default): the loss is on the model's forward value (for a DEQ the deployed prediction, whose
  gradient is the estimator's), so every step knows which examples are broken;
* `estimator`: the loss is on the estimator's own logits, as the papers' pgd() does
  (`AttackView.surrogate_forward`), and the deployed prediction is computed only for the rows the
  estimator says are broken, to confirm them (a confirmed row is broken with that iterate and leaves);
  the last iterate of every row is judged once, by the orchestrator's re-check on the deployed prediction
  (`AttackResult.last_iterate_unjudged`: the attack claims only the iterates it confirmed). A row the
  deployed prediction gets wrong while the estimator still gets it right is found only at the end. For a
  model without `surrogate_forward` (a plain network) both are the same attack.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.attacks import Attack, AttackResult, CallCounter, linf_distance, synchronize
from bench.errors import BenchError, did_you_mean
from bench.seeds import mix_seed

PGD_LOSSES = ("ce", "dlr", "margin")
LOSS_SOURCES = ("deployed", "estimator")  # which logits the loss is on (module docstring)
DEFAULT_STEPS = 10


def _other_max(logits: Tensor, y: Tensor) -> Tensor:
    """(B,) the largest logit among the wrong classes."""
    return logits.scatter(1, y[:, None], float("-inf")).amax(1)


def pgd_loss(name: str, logits: Tensor, y: Tensor) -> Tensor:
    """(B,) per-example loss the attack ascends: cross-entropy, untargeted DLR, or the CW margin."""
    if name == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    true = logits.gather(1, y[:, None]).squeeze(1)
    if name == "margin":
        return _other_max(logits, y) - true
    if name == "dlr":
        top = logits.sort(1, descending=True).values
        return (_other_max(logits, y) - true) / (top[:, 0] - top[:, 2] + 1e-12)
    raise BenchError(f"unknown PGD loss {name!r}{did_you_mean(name, PGD_LOSSES)}")


class PGD(Attack):
    """L-inf projected gradient descent with sign steps, random starts and restarts."""

    family = "pgd"

    def __init__(
        self,
        eps: float,
        steps: int = DEFAULT_STEPS,
        step_size: float | None = None,
        random_start: bool = True,
        restarts: int = 1,
        loss: str = "ce",
        early_stop: bool = True,
        loss_on: str = "deployed",
    ) -> None:
        if not 0.0 <= eps <= 1.0:
            raise BenchError(f"eps must lie in [0, 1] (pixel units), got {eps}")
        if steps < 1:
            raise BenchError(f"PGD needs at least 1 step, got {steps}")
        if restarts < 1:
            raise BenchError(f"PGD needs at least 1 restart, got {restarts}")
        if loss not in PGD_LOSSES:
            raise BenchError(f"unknown PGD loss {loss!r}{did_you_mean(loss, PGD_LOSSES)}")
        if step_size is not None and step_size <= 0:
            raise BenchError(f"PGD step size must be positive, got {step_size}")
        if loss_on not in LOSS_SOURCES:
            raise BenchError(f"PGD loss_on must be one of {LOSS_SOURCES}, got {loss_on!r}")
        self.eps = float(eps)
        self.steps = int(steps)
        self.step_size = float(step_size) if step_size is not None else self.eps / 4
        self._default_step = step_size is None
        self.random_start = random_start
        self.restarts = int(restarts)
        self.loss = loss
        self.early_stop = early_stop
        self.loss_on = loss_on

    @property
    def name(self) -> str:
        fields = [str(self.steps), self.loss, str(self.restarts), self.loss_on]
        defaults = [str(DEFAULT_STEPS), "ce", "1", LOSS_SOURCES[0]]
        while fields and fields[-1] == defaults[len(fields) - 1]:
            fields.pop()
        name = ":".join(["pgd", *fields])
        if not self._default_step:
            name += f"+step={self.step_size:.6g}"
        if not self.random_start:
            name += "+nostart"
        if not self.early_stop:
            name += "+noearlystop"
        return name

    def _start(self, x: Tensor, seeds: Tensor, restart: int) -> Tensor:
        """Random start drawn per example on the CPU, so it is the same whatever the batch and device."""
        if not self.random_start or self.eps == 0:
            return x.clone()
        noise = torch.empty((x.shape[0], *x.shape[1:]), dtype=torch.float32)
        for i, seed in enumerate(seeds.tolist()):
            gen = torch.Generator().manual_seed(mix_seed(seed, restart))
            noise[i] = torch.rand(x.shape[1:], generator=gen)
        return x + ((2 * noise - 1) * self.eps).to(device=x.device, dtype=x.dtype)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, seeds: Tensor) -> AttackResult:
        counter = CallCounter(model)
        x, y = x.detach(), y.detach().to(x.device)
        seeds = seeds.detach().to("cpu", torch.int64)
        x_adv = x.clone()
        broken = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        start = time.perf_counter()
        left = False
        for restart in range(self.restarts):
            active = (~broken).nonzero().squeeze(1)
            if active.numel() == 0:
                break
            left = self._restart(counter, x, y, seeds, restart, active, x_adv, broken)
        synchronize(x.device)
        return AttackResult(
            x_adv=x_adv,
            broken=broken,
            attacked=torch.ones_like(broken),
            linf=linf_distance(x_adv, x),
            seconds=time.perf_counter() - start,
            forwards=counter.forwards,
            backwards=counter.backwards,
            last_iterate_unjudged=left,
        )

    def _restart(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        seeds: Tensor,
        restart: int,
        active: Tensor,
        x_adv: Tensor,
        broken: Tensor,
    ) -> bool:
        """One run from a fresh random start over the rows `active`; fills x_adv and broken in place.

        Each step runs one forward (with grad) on the rows still in play: rows it misclassifies are
        recorded as broken with that iterate and, with early stop, leave before the next forward.
        With the loss on the estimator, the last restart's last iterate is not judged here: the caller's
        re-check on the deployed prediction (bench.attacks.orchestrator) is that judgment, so it is not
        paid twice. Returns True when it did so.
        """
        lo, hi = (x[active] - self.eps).clamp(min=0.0), (x[active] + self.eps).clamp(max=1.0)
        cur = torch.minimum(torch.maximum(self._start(x[active], seeds[active.cpu()], restart), lo), hi)
        split = self.loss_on == "estimator" and isinstance(model, CallCounter) and model.has_surrogate
        for step in range(self.steps + 1):
            last = step == self.steps
            if last and split and restart == self.restarts - 1:
                still = ~broken[active]
                x_adv[active[still]] = cur[still]
                return True
            xa = cur.detach().requires_grad_(not last)
            with torch.set_grad_enabled(not last):
                if split and not last:
                    logits, wrong = self._estimator_step(model, xa, y[active])
                else:
                    logits = model(xa)
                    wrong = logits.detach().argmax(1) != y[active]
                self._check_logits(logits, need_grad=not last)
                new = wrong & ~broken[active]
                x_adv[active[new]] = cur[new]
                broken[active[new]] = True
                if last:
                    still = ~broken[active]
                    x_adv[active[still]] = cur[still]
                    return False
                keep = ~wrong if self.early_stop else torch.ones_like(wrong)
                if not keep.any():
                    return False
                loss = pgd_loss(self.loss, logits[keep], y[active[keep]]).sum()
                grad = torch.autograd.grad(loss, xa)[0][keep]
            with torch.no_grad():
                active, lo, hi = active[keep], lo[keep], hi[keep]
                cur = torch.minimum(torch.maximum(cur[keep] + self.step_size * grad.sign(), lo), hi)

    @staticmethod
    def _estimator_step(model: CallCounter, xa: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The estimator's logits, and which rows are broken: those the estimator misclassifies, confirmed
        on the deployed prediction (computed for those rows only)."""
        logits, deployed = model.surrogate_forward(xa)
        wrong = logits.detach().argmax(1) != y
        if bool(wrong.any()):
            rows = wrong.nonzero()[:, 0]
            wrong[rows] = deployed(rows).argmax(1) != y[rows]
        return logits, wrong

    def _check_logits(self, logits: Tensor, need_grad: bool) -> None:
        if self.loss == "dlr" and logits.shape[1] < 3:
            raise BenchError(f"the DLR loss needs at least 3 classes; the model has {logits.shape[1]}")
        if need_grad and not logits.requires_grad:
            raise BenchError(
                "the model's output has no gradient with respect to its input (detached or solved under "
                "no_grad); attack it through an AttackView"
            )
