"""Weight-only quantized linear layers for the CPU: 4- and 8-bit weights, float32 in and out.

Decode on a CPU is memory-bandwidth bound, so the bytes of weight read per token set the speed.
Two implementations of each kind (``impl``):

``native`` (workers/native.py, the default where it builds): llama.cpp's block formats kept as
they are, 32 inputs per block. ``int4``: 4-bit values with a scale ``d`` and offset ``m`` per block
(``w = d * q + m``: Q4_1; Q4_0 has ``m = -8 d``), so a file's blocks are used exactly. ``int8``:
int8 values with a scale per block (Q8_0; a Q8_0 tensor is re-derived exactly from its dequantized
values). Scales and offsets are float16, as GGUF stores them: at one decoding row the kernels read
every byte of the weights once per token, and float32 scales made a Q4 block 24 bytes instead of
20 (SmolLM2's layers 79.6 MB instead of 66.4, about 0.5 ms a token at this machine's bandwidth).
Weights we quantize ourselves round their scales to float16 before choosing the values, as
llama.cpp does. Activations are quantized per row and block to int16 inside the kernel;
products are exact integer dot products, so a row's result does not depend on the batch.

``torch`` (the fallback without a C compiler or AVX2): two of PyTorch's CPU kernels, both fast only
with bfloat16 activations (the fp32 variants are scalar code, slower than a dense fp32 GEMM):

- ``int4``: ``_weight_int4pack_mm_for_cpu``, 4-bit values in groups of 32 along the input dimension,
  each group with a scale and a zero: ``w = (q - 8) * scale + zero``. llama.cpp's Q4_1 blocks
  (``w = d * q + m``) map onto it with ``scale = d``, ``zero = m + 8 d``, and Q4_0 (``w = d * (q - 8)``)
  with ``zero = 0``: the 4-bit values are kept as they are; scale and zero are rounded to bfloat16.
- ``int8``: ``_weight_int8pack_mm``, 8-bit values with one scale per output row: ``w = q * scale``.

The torch layer casts its input to bfloat16 and its output back. Either way norms, attention, the
residual stream and the KV cache stay in the model's dtype; row-parallel layers all-reduce in it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from workers import native

GROUP = 32  # int4 group size along the input features; llama.cpp's block size
INT4_N_MULTIPLE = 16  # the int4 packing needs the output features to be a multiple of this
ACT_DTYPE = torch.bfloat16
KINDS = ("int4", "int8")
IMPLS = ("native", "torch")


def best_impl() -> str:
    return "native" if native.kernels() is not None else "torch"


class Q4Blocks:
    """4-bit weights as llama.cpp stores them, unpacked: ``w = d * q + m`` per block of 32 inputs.

    ``q``: uint8 [N, K] in 0..15; ``d`` and ``m``: float32 [N, K / 32], each a float16 value.
    """

    def __init__(self, q: np.ndarray, d: np.ndarray, m: np.ndarray):
        self.q, self.d, self.m = q, d, m

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    @classmethod
    def from_gguf(cls, raw: np.ndarray, type_name: str, rows: int, cols: int) -> Q4Blocks:
        """Decode Q4_0 / Q4_1 rows (``raw``: uint8 [rows, bytes per row]) without dequantizing."""
        head = {"Q4_0": 2, "Q4_1": 4}[type_name]  # fp16 d, then fp16 m for Q4_1
        blocks = np.ascontiguousarray(raw).reshape(rows, cols // GROUP, head + GROUP // 2)

        def fp16(at: int) -> np.ndarray:
            return blocks[..., at : at + 2].copy().view(np.float16)[..., 0].astype(np.float32)

        d = fp16(0)
        m = fp16(2) if type_name == "Q4_1" else -8.0 * d  # Q4_0: w = d * (q - 8)
        qs = blocks[..., head:]
        # byte j of a block holds element j (low nibble) and element j + 16 (high nibble)
        q = np.concatenate((qs & 0x0F, qs >> 4), axis=-1).reshape(rows, cols)
        return cls(q, d, m)

    @classmethod
    def quantize(cls, w: torch.Tensor) -> Q4Blocks:
        """Asymmetric min/max 4-bit quantization in groups of 32 (what llama.cpp's Q4_1 does), the
        scale and offset rounded to float16 first (the values are chosen for the stored ones)."""
        n, k = w.shape
        g = w.detach().float().reshape(n, k // GROUP, GROUP)
        lo, hi = _half(g.amin(-1)), g.amax(-1)
        d = _half((hi - lo) / 15)
        safe = torch.where(d > 0, d, torch.ones_like(d))
        q = ((g - lo[..., None]) / safe[..., None]).round().clamp(0, 15).to(torch.uint8)
        return cls(q.reshape(n, k).numpy(), d.numpy(), lo.numpy())

    def rows(self, start: int, length: int) -> Q4Blocks:
        return Q4Blocks(self.q[start : start + length], self.d[start : start + length], self.m[start : start + length])

    def cols(self, start: int, length: int) -> Q4Blocks:
        g0, g1 = start // GROUP, (start + length) // GROUP
        return Q4Blocks(self.q[:, start : start + length], self.d[:, g0:g1], self.m[:, g0:g1])

    @staticmethod
    def cat(parts: list[Q4Blocks]) -> Q4Blocks:
        return Q4Blocks(*(np.concatenate([getattr(p, a) for p in parts]) for a in ("q", "d", "m")))

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        q = torch.from_numpy(self.q.astype(np.float32)).reshape(n, k // GROUP, GROUP)
        w = q * torch.from_numpy(self.d)[..., None] + torch.from_numpy(self.m)[..., None]
        return w.reshape(n, k)


def _pair_interleave(q: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Int8 blocks ``q`` [N, K/32, 32] as the native kernel reads them, [N, K]: each full pair of
    blocks interleaved by eights (b0 0-7, b1 0-7, b0 8-15, ...), so one sign-extending load gives
    eight inputs of both blocks; an odd last block stays as it is. ``inverse``: back to blocks."""
    n, nb = q.shape[0], q.shape[1]
    pairs = nb // 2
    head, tail = q[:, : 2 * pairs], q[:, 2 * pairs :]
    shape = (n, pairs, 4, 2, 8) if inverse else (n, pairs, 2, 4, 8)
    head = head.reshape(shape).transpose(2, 3).reshape(n, 2 * pairs, GROUP)
    out = torch.cat((head, tail), dim=1)
    return out if inverse else out.reshape(n, nb * GROUP)


def _half(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest float16 (kept float32): the scales the kernels store."""
    return x.to(torch.float16).float()


def int4_fits(out_features: int, in_features: int) -> bool:
    return out_features % INT4_N_MULTIPLE == 0 and in_features % GROUP == 0


class QuantLinear(nn.Module):
    """``y = x @ w.T (+ bias)`` with ``w`` packed (see the module docstring). Built by ``int4`` or
    ``int8``; ``reduce`` and ``tp`` as in ``ParallelLinear`` (sum partial outputs across ranks)."""

    def __init__(
        self,
        kind: str,
        packed: torch.Tensor,
        scales: torch.Tensor,
        in_features: int,
        out_features: int,
        bias: torch.Tensor | None = None,
        reduce: bool = False,
        tp=None,
        impl: str = "torch",
    ):
        super().__init__()
        if kind not in KINDS or impl not in IMPLS:
            raise ValueError(f"unknown quantized layer {kind!r} ({impl!r})")
        self.kind, self.impl, self.in_features, self.out_features = kind, impl, in_features, out_features
        self.kernels = native.kernels() if impl == "native" else None
        if impl == "native" and self.kernels is None:
            raise RuntimeError("native kernels are not available on this machine")
        self.packed = nn.Parameter(packed, requires_grad=False)
        self.scales = nn.Parameter(scales, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.reduce, self.tp = reduce, tp
        self.parts = self.sizes = None  # a fused layer's part names and output sizes (set by the loader)

    @classmethod
    def int4(cls, blocks: Q4Blocks, impl: str | None = None, **kw) -> QuantLinear:
        n, k = blocks.shape
        if not int4_fits(n, k):
            raise ValueError(f"int4 needs out features % {INT4_N_MULTIPLE} == 0 and in features % {GROUP} == 0")
        impl = impl or best_impl()
        d, m = torch.from_numpy(blocks.d), torch.from_numpy(blocks.m)
        if impl == "native":
            # byte j of a block: element j in the low nibble, element j + 16 in the high one (GGUF's order)
            q = np.ascontiguousarray(blocks.q).reshape(n, k // GROUP, GROUP)
            packed = torch.from_numpy(np.ascontiguousarray(q[..., : GROUP // 2] | (q[..., GROUP // 2 :] << 4)))
            # scales [2, N, K/32]: d, then the offsets m by blocks of 16 rows, each block transposed
            # ([N/16, K/32, 16]): the kernel adds them eight outputs at a time (qmatmul.c's `offsets`)
            m_t = m.view(n // INT4_N_MULTIPLE, INT4_N_MULTIPLE, k // GROUP).transpose(1, 2).contiguous().view(n, -1)
            return cls("int4", packed, torch.stack((d, m_t)).to(torch.float16).contiguous(), k, n, impl=impl, **kw)
        q = torch.from_numpy(np.ascontiguousarray(blocks.q)).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        # (q - 8) * scale + zero == d * q + m
        scales = torch.stack((d, m + 8 * d), dim=-1).transpose(0, 1).contiguous().to(ACT_DTYPE)  # [K/32, N, 2]
        return cls("int4", packed, scales, k, n, impl=impl, **kw)

    @classmethod
    def int8(cls, w: torch.Tensor, impl: str | None = None, **kw) -> QuantLinear:
        """Symmetric quantization of a dense weight [N, K]: per block of 32 inputs (native; a Q8_0
        tensor's own values come back exactly) or per output row (torch)."""
        w = w.detach().float()
        n, k = w.shape
        impl = impl or best_impl()
        if impl == "native" and k % GROUP == 0:
            g = w.reshape(n, k // GROUP, GROUP)
            d = _half(g.abs().amax(-1) / 127)  # a Q8_0 file's own d: amax is 127 d, and d a float16
            q = (g / torch.where(d > 0, d, 1)[..., None]).round().clamp(-127, 127).to(torch.int8)
            return cls("int8", _pair_interleave(q), d.to(torch.float16).contiguous(), k, n, impl="native", **kw)
        scale = w.abs().amax(dim=1) / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        return cls("int8", q, scale.to(ACT_DTYPE), k, n, impl="torch", **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "native":  # few ops: at one row, per-op dispatch costs as much as the product
            rows = x.reshape(-1, self.in_features)
            if rows.dtype != torch.float32:
                rows = rows.float()
            if self.kind == "int4":
                y = self.kernels.q4_matmul(rows, self.packed, self.scales.data)
            else:
                y = self.kernels.q8_matmul(rows, self.packed, self.scales)
            if x.dim() != 2:
                y = y.view(*x.shape[:-1], self.out_features)
            if x.dtype != torch.float32:
                y = y.to(x.dtype)
        elif self.kind == "int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(ACT_DTYPE), self.packed, GROUP, self.scales).to(x.dtype)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x.to(ACT_DTYPE), self.packed, self.scales).to(x.dtype)
        if self.reduce:
            y = self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        """The weight this layer computes with, as float32 [N, K] (for tests and references)."""
        n, k = self.out_features, self.in_features
        if self.impl == "native":
            if self.kind == "int8":
                q = _pair_interleave(self.packed.view(n, k // GROUP, GROUP), inverse=True)
                return (q.float().view(n, k // GROUP, GROUP) * self.scales.float()[..., None]).view(n, k)
            q = torch.cat((self.packed & 0x0F, self.packed >> 4), dim=-1).float()
            b = INT4_N_MULTIPLE
            scales = self.scales.float()
            m = scales[1].reshape(n // b, k // GROUP, b).transpose(1, 2).reshape(n, k // GROUP)
            return (q * scales[0][..., None] + m[..., None]).view(n, k)
        if self.kind == "int8":
            return self.packed.float() * self.scales.float()[:, None]
        eye = torch.eye(self.in_features, dtype=ACT_DTYPE)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, GROUP, self.scales).float().T

    def extra_repr(self) -> str:
        return (
            f"{self.kind} ({self.impl}), in_features={self.in_features}, out_features={self.out_features}, "
            f"reduce={self.reduce}"
        )
