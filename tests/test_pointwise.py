"""Row-wise layer ops on the CPU (workers/kernels/pointwise.c): the native RMSNorm computes what
PyTorch's ``rms_norm`` computes, alone and fused with the residual add, and the native SwiGLU what
``silu(gate) * up`` computes, for any width; a row's result does not depend on the other rows."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import needs_native_kernels
from workers import native
from workers.arch.llama import RMSNorm

pytestmark = needs_native_kernels


@pytest.mark.parametrize("width", [576, 64, 100, 7])  # vector body, and tails the vectors do not cover
def test_native_rms_norm_matches_pytorch(width):
    assert native.kernels() is not None
    g = torch.Generator().manual_seed(width)
    x, delta = torch.randn(5, 3, width, generator=g) * 4, torch.randn(5, 3, width, generator=g)
    norm = RMSNorm(width, 1e-5, torch.float32)
    norm.weight.data.copy_(torch.rand(width, generator=g) + 0.5)
    want = torch.rms_norm(x, (width,), norm.weight, 1e-5)
    assert torch.allclose(norm(x), want, rtol=1e-5, atol=1e-6)
    total, normed = norm.add_forward(x, delta)
    assert torch.equal(total, x + delta)
    assert torch.allclose(normed, torch.rms_norm(x + delta, (width,), norm.weight, 1e-5), rtol=1e-5, atol=1e-6)
    assert torch.equal(norm(x)[2:3], norm(x[2:3]))  # rows are independent


def test_other_dtypes_keep_the_reference_arithmetic():
    """bfloat16 (the GPU dtype) normalizes in float32 and casts back before the weight multiply."""
    norm = RMSNorm(16, 1e-6, torch.bfloat16)
    norm.weight.data.fill_(1.5)
    x = torch.randn(4, 16).to(torch.bfloat16)
    x32 = x.float()
    want = 1.5 * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(norm(x), want)
    total, normed = norm.add_forward(x, x)
    assert torch.equal(total, x + x) and torch.equal(normed, norm(x + x))


@pytest.mark.parametrize("inter", [1536, 20, 3])
def test_native_swiglu_matches_silu_times_up(inter):
    g = torch.Generator().manual_seed(inter)
    gate_up = torch.randn(6, 2 * inter, generator=g) * 6  # large negative and positive gates too
    gate_up[0, :3] = torch.tensor([-100.0, 100.0, 0.0])[: min(3, inter)]
    got = native.kernels().swiglu(gate_up)
    gate, up = gate_up.split(inter, dim=-1)
    assert torch.allclose(got, torch.nn.functional.silu(gate) * up, rtol=1e-5, atol=1e-6)
    assert torch.equal(native.kernels().swiglu(gate_up[3:4]), got[3:4])
