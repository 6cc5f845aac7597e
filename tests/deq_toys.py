"""Toy DEQ classifiers with known answers, implementing the DEQ protocol of models/deq.py.

LinearDEQ: f(z, u) = W z + u, u = U x, head z -> H z + c, with ||W||_2 < 1, so z* = (I - W)^-1 U x and the
implicit input gradient of <l, logits> is U^T (I - W)^-T H^T l in closed form. TanhDEQ: f = tanh(W z + u).
All products go through `bi_matmul` (elementwise products and a pairwise sum), so every row's result is
bit-identical whatever the batch: torch's matmul is not (gemv for one row, gemm for several), and the
per-example tests must test the solver, not BLAS.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bench.deq.solvers import rowsum
from models.deq import DeployConfig, DEQClassifier

DTYPE = torch.float64


def bi_matmul(z: Tensor, w: Tensor) -> Tensor:
    """z (B, n) @ w.T for w (m, n), with per-row results independent of the batch."""
    return rowsum(z[:, None, :] * w[None])


def contraction(dim: int, eigenvalues: Tensor, seed: int) -> Tensor:
    """A symmetric matrix Q diag(eigenvalues) Q^T with a random orthogonal Q (spectral norm = max |eig|)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=DTYPE))
    return q @ torch.diag(eigenvalues.to(DTYPE)) @ q.T


class _ToyDEQ(DEQClassifier):
    def __init__(self, w: Tensor, n_in: int, n_classes: int, seed: int, deploy: DeployConfig) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed + 1)
        dim = w.shape[0]
        self.W = nn.Parameter(w.clone())
        self.U = nn.Parameter(torch.randn(dim, n_in, generator=gen, dtype=DTYPE) / n_in**0.5)
        self.H = nn.Parameter(torch.randn(n_classes, dim, generator=gen, dtype=DTYPE) / dim**0.5)
        self.c = nn.Parameter(torch.randn(n_classes, generator=gen, dtype=DTYPE) * 0.1)
        self.deploy = deploy
        self.begin_calls = 0

    def inject(self, x: Tensor) -> Tensor:
        return bi_matmul(x.flatten(1), self.U)

    def init_state(self, u: Tensor) -> Tensor:
        return u.new_zeros(u.shape[0], self.W.shape[0])

    def head(self, z: Tensor) -> Tensor:
        return bi_matmul(z, self.H) + self.c

    def begin_forward(self, batch_size: int) -> None:
        self.begin_calls += 1


class LinearDEQ(_ToyDEQ):
    def f(self, z: Tensor, u: Tensor) -> Tensor:
        return bi_matmul(z, self.W) + u

    def fixed_point(self, x: Tensor) -> Tensor:
        """(I - W)^-1 U x, in closed form."""
        eye = torch.eye(self.W.shape[0], dtype=DTYPE)
        return torch.linalg.solve(eye - self.W, (x.flatten(1) @ self.U.T).T).T

    def input_gradient(self, logit_grad: Tensor) -> Tensor:
        """d<l, head(z*(x))>/dx = U^T (I - W)^-T H^T l, per row of l (B, classes)."""
        eye = torch.eye(self.W.shape[0], dtype=DTYPE)
        a = logit_grad @ self.H  # (B, D): H^T l per row
        w = torch.linalg.solve((eye - self.W).T, a.T).T
        return w @ self.U


class TanhDEQ(_ToyDEQ):
    def f(self, z: Tensor, u: Tensor) -> Tensor:
        return torch.tanh(bi_matmul(z, self.W) + u)


def exact_deploy(**changes) -> DeployConfig:
    """A deploy config predicting from z* itself (no refinement) with an accurate solve."""
    base = dict(solver="broyden", max_iter=60, tol=1e-12, refine_apply_f=False, refine_steps=0)
    base.update(changes)
    return DeployConfig(**base)


def linear_toy(dim: int = 8, n_in: int = 5, n_classes: int = 4, rho: float = 0.7, seed: int = 0, **deploy):
    """A LinearDEQ whose W has eigenvalues over [0.05, rho] (examples converge at different speeds)."""
    eigs = torch.linspace(0.05, rho, dim)
    return LinearDEQ(contraction(dim, eigs, seed), n_in, n_classes, seed, exact_deploy(**deploy))


def tanh_toy(dim: int = 8, n_in: int = 5, n_classes: int = 4, rho: float = 0.8, seed: int = 0, **deploy):
    eigs = torch.linspace(-rho, rho, dim)
    return TanhDEQ(contraction(dim, eigs, seed), n_in, n_classes, seed, exact_deploy(**deploy))


def inputs(batch: int, n_in: int = 5, seed: int = 3) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, n_in, generator=gen, dtype=DTYPE)
