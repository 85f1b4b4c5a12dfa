"""RMSNorm, ReLU squared and the rotary turn with hand-written backward passes.

Eager PyTorch on a CPU runs each elementwise operation as its own pass over memory, and
autograd differentiates a composite operation piece by piece: RMSNorm is a power, a mean, a
reciprocal square root and two products (PyTorch 2.13 has no fused RMSNorm kernel for CPUs);
ReLU squared's backward makes a copy, two products and a mask; the rotary turn's product and
sum, two passes, can be one (addcmul). The functions here compute the same values in fewer
passes (docs/performance.md, "Fewer passes over memory"). ``torch.compile`` fuses them too, but
compiles for every new batch shape, which a few CPU-minutes cannot afford.
"""

from __future__ import annotations

import torch
from torch import nn


class _RMSNorm(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) * weight over the last dimension, in fp32 (or x's dtype,
    if wider), returned in x's dtype. Saves the normalised x and the reciprocal root for the
    backward pass."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.input_dtype = x.dtype
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        normed = x * rstd
        ctx.save_for_backward(normed, rstd, weight)
        return (normed * weight).to(ctx.input_dtype)

    @staticmethod
    def backward(ctx, grad):
        normed, rstd, weight = ctx.saved_tensors
        w, d = weight.to(normed.dtype), normed.shape[-1]
        # p = grad * normed serves both gradients: the weight's is its sum over the rows, and
        # the row's dot product with the weight is sum(grad * weight * normed).
        p = grad * normed
        rows = p.reshape(-1, d)
        grad_weight = rows.sum(0).to(weight.dtype)
        dot = (rows @ w).reshape(*p.shape[:-1], 1).div_(d)
        gx = torch.addcmul(grad * w, normed, dot, value=-1).mul_(rstd)
        return gx.to(ctx.input_dtype), grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of ``x``'s last dimension: ``nn.RMSNorm``'s values (computed in fp32, returned
    in x's dtype), its gradients to rounding."""
    return _RMSNorm.apply(x, weight, eps)


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (the same parameter, the same state dict) through ``rms_norm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class _ReluSquared(torch.autograd.Function):
    """relu(x)^2. The gradient 2 relu(x) * grad is zero where x <= 0, so the saved relu(x) is
    the only mask needed."""

    @staticmethod
    def forward(ctx, x):
        r = torch.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return grad * (r + r)


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """``F.relu(x).square()`` with the same values and gradients (up to the sign of zeros)."""
    return _ReluSquared.apply(x)


class _Rotate(torch.autograd.Function):
    """x cos + roll(x) sin, roll shifting the last dimension by half its size. The gradient is
    the transposed turn, grad cos + roll(grad sin): rolling by half twice is the identity."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        turned = (grad * sin).roll(grad.shape[-1] // 2, dims=-1)
        return torch.addcmul(turned, grad, cos), None, None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Queries or keys x (..., positions, head_dim) turned by their positions' angles, with the
    tables of ``transformer.rotary_tables`` (they broadcast to x): (x1, x2) -> (x1 cos - x2 sin,
    x2 cos + x1 sin), the halves swapped by one roll and the sign in the sine's first half. The
    product and the sum are fused (addcmul: rounded once). The tables get no gradient."""
    return _Rotate.apply(x, cos, sin)
