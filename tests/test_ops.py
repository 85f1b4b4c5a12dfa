"""model/ops.py: RMSNorm, ReLU squared and the rotary turn with hand-written backward passes give
PyTorch's values and gradients (gradcheck in float64; autograd through the plain expressions as
the reference in fp32 and bf16), and the model built with them trains as one built with
nn.RMSNorm, F.relu(x).square() and the rotary expression."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.config import MiniTuringConfig
from model.ops import RMSNorm, relu_squared, rms_norm, rotate
from model.transformer import MiniTuringModel, rotary_tables


def test_rms_norm_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.3 * torch.randn(8, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-5), (x, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_nn_rmsnorm(dtype):
    """Values and both gradients as nn.RMSNorm's autograd gives them, input in fp32 or bf16
    (the weight fp32); the forward pass is the same computation, bit for bit."""
    torch.manual_seed(0)
    ref = nn.RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        ref.weight.add_(0.3 * torch.randn(64))
    ours = RMSNorm(64, 1e-5)
    ours.load_state_dict(ref.state_dict())
    x = (3 * torch.randn(4, 16, 64)).to(dtype)
    grad = torch.randn(4, 16, 64).to(dtype)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yo = ref(xr), ours(xo)
    assert yo.dtype == yr.dtype == dtype
    assert torch.equal(yo, yr)
    yr.backward(grad), yo.backward(grad)
    assert xo.grad.dtype == dtype and ours.weight.grad.dtype == torch.float32
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(xo.grad, xr.grad, **tol)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)


def test_rotate_gradcheck_and_values():
    """The turn's gradient (the transposed turn) by gradcheck in float64, with a batch of
    tables; its values and gradient as autograd through x cos + roll(x) sin gives them: equal
    in float64, within a bf16 rounding in bf16 (the fused product and sum round once)."""
    torch.manual_seed(0)
    cos, sin = rotary_tables(torch.arange(7).expand(2, 7), 8, torch.float64)
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: rotate(x, cos, sin), (x,))
    for dtype, tol in ((torch.float64, 1e-12), (torch.bfloat16, 2e-2)):
        c, s = cos.to(dtype), sin.to(dtype)
        grad = torch.randn(2, 3, 7, 8).to(dtype)
        xr = x.detach().to(dtype).requires_grad_()
        xo = xr.detach().clone().requires_grad_()
        yr = xr * c + xr.roll(4, dims=-1) * s
        yo = rotate(xo, c, s)
        yr.backward(grad), yo.backward(grad)
        torch.testing.assert_close(yo, yr, rtol=tol, atol=tol)
        torch.testing.assert_close(xo.grad, xr.grad, rtol=tol, atol=tol)


def test_relu_squared_exact():
    """The same values and gradients as F.relu(x).square(), bit for bit (zero's sign aside),
    in fp32 and bf16, including exact zeros in the input."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(6, 50).to(dtype)
        x[0, :10] = 0
        grad = torch.randn(6, 50).to(dtype)
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, yo = F.relu(xr).square(), relu_squared(xo)
        assert torch.equal(yo, yr)
        yr.backward(grad), yo.backward(grad)
        assert torch.equal(xo.grad, xr.grad)


def test_model_with_ops_matches_plain_modules():
    """The model's loss and gradients with the ops equal those of the same weights with
    nn.RMSNorm, F.relu(x).square() and the rotary expression in their place (fp32 tolerance),
    and bf16 autocast training stays close."""
    config = MiniTuringConfig(
        vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64,
        max_position_embeddings=32, position="rope", norm="rmsnorm", ffn="relu2",
    )  # fmt: skip
    torch.manual_seed(0)
    ours = MiniTuringModel(config)
    plain = MiniTuringModel(config)
    plain.load_state_dict(ours.state_dict())
    for module in [plain.ln_f, *(m for b in plain.blocks for m in (b.ln1, b.ln2))]:
        module.forward = nn.RMSNorm.forward.__get__(module)
    for block in plain.blocks:
        block.ffn.forward = _plain_ffn.__get__(block.ffn)
    ids = torch.randint(10, 96, (3, 20))
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, -100)
    for autocast in (False, True):
        losses = []
        for model, turn in ((ours, rotate), (plain, _plain_rotate)):
            model.zero_grad()
            with (
                mock.patch("model.transformer.rotate", turn),
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
            ):
                loss = model(ids, labels=labels).loss
            loss.backward()
            losses.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        (lo, go), (lp, gp) = losses
        tol = dict(rtol=1e-4, atol=1e-5) if not autocast else dict(rtol=5e-2, atol=2e-2)
        torch.testing.assert_close(lo, lp, **tol)
        for a, b in zip(go, gp, strict=True):
            torch.testing.assert_close(a, b, **tol)


def _plain_ffn(self, x):
    return self.down(F.relu(self.up(x)).square())


def _plain_rotate(x, cos, sin):
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin
