"""Tiny models and batches for the attack tests, with the optimal L-inf attack known in closed form.

For a linear classifier z = W x + b and inputs far enough from the [0,1] box that the box never binds,
the best L-inf attack of radius eps lowers the margin z_y - z_j by exactly eps * ||w_y - w_j||_1, so an
example is breakable iff min_j (z_y - z_j - eps * ||w_y - w_j||_1) < 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

SHAPE = (3, 4, 4)  # (C, H, W): square images, as Square needs
DIM = 3 * 4 * 4
EPS = 8 / 255


class LinearToy(nn.Module):
    """z = W flatten(x) + b: every example independent of the rest of its batch."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone())

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self.weight.T + self.bias


class RowCounter(nn.Module):
    """Records how many examples go through each forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.rows: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.rows.append(int(x.shape[0]))
        return self.model(x)


class NoisyToy(nn.Module):
    """A randomized defence: fresh noise on the logits at every forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        return out + 0.5 * torch.randn_like(out)


class SoftmaxToy(nn.Module):
    """Returns probabilities instead of logits (the mistake check_range_output exists for)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).softmax(1)


class FlatToy(nn.Module):
    """Constant logits through a dead ReLU: zero input gradient everywhere."""

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-1, 1, n_classes * DIM).reshape(n_classes, DIM))
        self.bias = nn.Parameter(torch.linspace(1, 0, n_classes))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x.flatten(1) - 2.0) @ self.weight.T + self.bias


def binary_problem(n: int = 16, eps: float = EPS, seed: int = 0) -> tuple[LinearToy, Tensor, Tensor, Tensor]:
    """A 2-class linear model and a batch whose margins are 0.5x (breakable) or 1.5x (not) the threshold.

    Returns (model, x, y, breakable); every example is classified correctly.
    """
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (DIM,), generator=gen).float() * 2 - 1
    weight = torch.stack([torch.zeros(DIM), signs])  # z0 = 0, z1 = w.x + b
    bias = torch.tensor([0.0, -0.5 * signs.sum().item()])
    threshold = eps * signs.abs().sum().item()
    y = torch.arange(n) % 2
    breakable = (torch.arange(n) // 2) % 2 == 0
    margin = torch.where(breakable, 0.5, 1.5) * threshold
    target = torch.where(y == 1, margin, -margin)  # desired w.x + b
    base = 0.45 + 0.1 * torch.rand((n, DIM), generator=gen)
    shift = (target - (base @ signs + bias[1])) / DIM
    x = (base + shift[:, None] * signs).reshape(n, *SHAPE)
    return LinearToy(weight, bias), x, y, breakable


def multiclass_problem(
    n: int = 24, n_classes: int = 10, eps: float = EPS, seed: int = 0
) -> tuple[LinearToy, Tensor, Tensor, Tensor]:
    """A random 10-class linear model and examples (labelled with its own prediction) whose closed-form
    breakability is at least 25% of the threshold away from the boundary. Returns (model, x, y, breakable)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn((n_classes, DIM), generator=gen)
    bias = -0.5 * weight.sum(1)
    model = LinearToy(weight, bias)
    pool = 0.04 + 0.92 * torch.rand((50 * n, DIM), generator=gen)
    with torch.no_grad():
        logits = model(pool)
    y = logits.argmax(1)
    diff_l1 = (weight[y][:, None, :] - weight[None, :, :]).abs().sum(2)  # (N, C): ||w_y - w_j||_1
    margins = logits.gather(1, y[:, None]) - logits  # (N, C): z_y - z_j
    slack = (margins - eps * diff_l1) / (eps * diff_l1 + 1e-12)
    slack[torch.arange(len(y)), y] = float("inf")
    worst = slack.min(1).values
    clear = worst.abs() > 0.25
    broke, kept = (clear & (worst < 0)).nonzero().squeeze(1), (clear & (worst > 0)).nonzero().squeeze(1)
    pick = torch.cat([broke[: n // 2], kept[: n - n // 2]])
    assert len(pick) == n, "not enough clear examples in the pool"
    return model, pool[pick].reshape(n, *SHAPE), y[pick], worst[pick] < 0
