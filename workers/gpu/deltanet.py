"""Gated DeltaNet decode steps on the GPU: the recurrent delta rule and the causal conv1d update, one
new token per sequence, reading and writing each sequence's state slot of the pool in place.

workers/arch/deltanet.py's PyTorch decode gathers the step's states (``index_select``), updates
the copy and scatters it back, unless the slots happen to be contiguous; at 16 sequences of a
0.8B-shaped model that is 2 x 16 MB of float32 state moved per layer on top of the update's own
passes. These kernels take the slot indices instead: each program loads its slot's tile, applies
the token and stores it back, one read and one write of the state. The indices are a device
tensor, so a CUDA graph captures the step with the slots among its static inputs and replays it
for whichever sequences fill them.

- ``delta_rule_decode``: one program per (sequence, value head, tile of value columns). The state
  columns are independent in the delta rule (``S^T k`` and ``S^T q`` are per column), so splitting
  ``dv`` across programs needs no communication. Value head ``h`` reads key head ``h // (H / Hk)``
  (Qwen3.5's GQA-style grouping), so q and k may be passed with their own head count, un-repeated.
- ``conv_decode``: one program per (sequence, tile of channels): the output is the filter over the
  ``kernel - 1`` held inputs and the new one, and the held inputs shift by one.

Padding rows of a graph's bucket may all name one scratch slot; their programs then race on it.
What they write is still a delta-rule update of finite values, and their outputs are dropped.

``fla-core`` (flash-linear-attention) has a fused recurrent gated-delta-rule kernel, but 0.6.0
returns a new final state rather than updating slots in place (a gather and scatter again), and
under ``TRITON_INTERPRET=1`` on CPU tensors it returned NaN even for zero inputs, so it cannot be
tested here; these kernels are ours, tested against the PyTorch reference under the interpreter.
Like workers/gpu/paged_attention.py they reduce with ``tl.reduce`` and the library's combine
functions, which run under the interpreter whenever Triton was imported.
"""

from __future__ import annotations

import functools

import torch

from workers.gpu.paged_attention import available, interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU hosts without Triton: ``wanted`` says no and the PyTorch path runs
    triton = tl = None

VALUE_TILE = 32  # value columns per delta-rule program: a [128, 32] float32 tile is 16 KB of registers
CHANNEL_TILE = 128  # channels per conv program


def wanted(t: torch.Tensor) -> bool:
    """Whether a step on ``t``'s device runs these kernels: CUDA tensors with Triton installed; on
    the CPU only under the test hook (``CORTEX_FORCE_GPU_PATH=1``) with the interpreter on."""
    if not available():
        return False
    if t.is_cuda:
        return True
    from workers.gpu import forced

    return forced() and interpreting()


def _delta_kernel(
    State,
    Slots,
    Q,
    K,
    V,
    G,
    Beta,
    Out,
    stride_ss,
    stride_sh,
    stride_sk,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_vb,
    stride_vh,
    stride_gb,
    stride_bb,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    DK_PAD: tl.constexpr,
    TILE: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    kh = h // GROUP
    slot = tl.load(Slots + b).to(tl.int64)
    i = tl.arange(0, DK_PAD)
    j = tl.program_id(2) * TILE + tl.arange(0, TILE)
    i_ok, j_ok = i < DK, j < DV
    q = tl.load(Q + b * stride_qb + kh * stride_qh + i, mask=i_ok, other=0.0).to(tl.float32)
    k = tl.load(K + b * stride_kb + kh * stride_kh + i, mask=i_ok, other=0.0).to(tl.float32)
    v = tl.load(V + b * stride_vb + h * stride_vh + j, mask=j_ok, other=0.0).to(tl.float32)
    decay = tl.exp(tl.load(G + b * stride_gb + h).to(tl.float32))
    beta = tl.load(Beta + b * stride_bb + h).to(tl.float32)
    at = State + slot * stride_ss + h * stride_sh + i[:, None] * stride_sk + j[None, :]
    ok = i_ok[:, None] & j_ok[None, :]
    s = tl.load(at, mask=ok, other=0.0).to(tl.float32)  # [DK_PAD, TILE]
    read_k = tl.reduce(s * k[:, None], 0, tl.standard._sum_combine)  # S^T k, this tile's columns
    read_q = tl.reduce(s * q[:, None], 0, tl.standard._sum_combine)
    u = beta * (v - decay * read_k)  # what the decayed state did not already predict for k
    # o = S'^T q without reading S' back: exp(g) S^T q + (k . q) u
    out = decay * read_q + tl.reduce(k * q, 0, tl.standard._sum_combine) * u
    tl.store(Out + b * stride_ob + h * stride_oh + j, out.to(Out.dtype.element_ty), mask=j_ok)
    tl.store(at, (decay * s + k[:, None] * u[None, :]).to(State.dtype.element_ty), mask=ok)


def _conv_kernel(
    X,
    State,
    Slots,
    W,
    Out,
    C,
    stride_xb,
    stride_ss,
    stride_sc,
    stride_wc,
    stride_ob,
    KERNEL: tl.constexpr,
    K_PAD: tl.constexpr,
    TILE: tl.constexpr,
):
    b = tl.program_id(0)
    c = tl.program_id(1) * TILE + tl.arange(0, TILE)
    t = tl.arange(0, K_PAD)
    c_ok = c < C
    slot = tl.load(Slots + b).to(tl.int64)
    x = tl.load(X + b * stride_xb + c, mask=c_ok, other=0.0).to(tl.float32)
    held = State + slot * stride_ss + c[:, None] * stride_sc
    # the window [held inputs | new input], and the held inputs after this token (shifted by one)
    window = tl.load(held + t[None, :], mask=c_ok[:, None] & (t[None, :] < KERNEL - 1), other=0.0).to(tl.float32)
    window = tl.where(t[None, :] == KERNEL - 1, x[:, None], window)
    later = tl.load(held + t[None, :] + 1, mask=c_ok[:, None] & (t[None, :] < KERNEL - 2), other=0.0)
    later = tl.where(t[None, :] == KERNEL - 2, x[:, None], later.to(tl.float32))
    taps = tl.load(W + c[:, None] * stride_wc + t[None, :], mask=c_ok[:, None] & (t[None, :] < KERNEL), other=0.0)
    out = tl.reduce(window * taps.to(tl.float32), 1, tl.standard._sum_combine)
    tl.store(Out + b * stride_ob + c, out.to(Out.dtype.element_ty), mask=c_ok)
    tl.debug_barrier()  # every thread has read the held inputs before any is overwritten
    tl.store(held + t[None, :], later.to(State.dtype.element_ty), mask=c_ok[:, None] & (t[None, :] < KERNEL - 1))


@functools.cache
def _compiled(kernel: str, interpret: bool):
    """``interpret`` only keys the cache: triton.jit reads TRITON_INTERPRET itself, at this call."""
    return triton.jit({"delta": _delta_kernel, "conv": _conv_kernel}[kernel])


def _last_contiguous(*ts: torch.Tensor) -> None:
    if any(t.stride(-1) != 1 for t in ts):
        raise ValueError("the Gated DeltaNet kernels need the last dimension contiguous")


def delta_rule_decode(
    state: torch.Tensor,
    slots: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
) -> torch.Tensor:
    """One token for each of B sequences, as workers/arch/deltanet.py's ``delta_rule_step``.
    ``state`` [slots, H, dk, dv] (one layer's pool, float32), rows ``slots`` [B] updated in place;
    ``q`` (already scaled), ``k`` [B, Hk, dk] with H a multiple of Hk; ``v`` [B, H, dv]; ``g``,
    ``beta`` [B, H]. Returns the output [B, H, dv] in ``v``'s dtype. No host sync."""
    B, H, dv = v.shape
    Hk, dk = k.shape[1], k.shape[2]
    if H % Hk or q.shape != k.shape or state.shape[1:] != (H, dk, dv):
        raise ValueError(f"state {tuple(state.shape)} does not fit q/k {tuple(k.shape)} and v {tuple(v.shape)}")
    out = torch.empty_like(v)
    if B == 0:
        return out
    _last_contiguous(q, k, v, g, beta, state)
    tile = min(VALUE_TILE, triton.next_power_of_2(dv))
    _compiled("delta", interpreting())[(B, H, triton.cdiv(dv, tile))](
        state, slots, q, k, v, g, beta, out,
        state.stride(0), state.stride(1), state.stride(2),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        g.stride(0), beta.stride(0), out.stride(0), out.stride(1),
        GROUP=H // Hk, DK=dk, DV=dv, DK_PAD=triton.next_power_of_2(dk), TILE=tile,
    )  # fmt: skip
    return out


def conv_decode(x: torch.Tensor, state: torch.Tensor, slots: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The causal depthwise convolution for one new input per sequence, before the activation.
    ``x`` [B, C]; ``state`` [slots, C, kernel - 1] (one layer's held inputs), rows ``slots`` [B]
    shifted in place to end with ``x``; ``weight`` [C, kernel]. Returns [B, C] in ``x``'s dtype,
    summed in float32."""
    B, C = x.shape
    kernel = weight.shape[-1]
    if state.shape[1:] != (C, kernel - 1) or weight.shape[0] != C or kernel < 2:
        raise ValueError(
            f"conv state {tuple(state.shape)} and weight {tuple(weight.shape)} do not fit x {tuple(x.shape)}"
        )
    out = torch.empty_like(x)
    if B == 0:
        return out
    _last_contiguous(x, weight, state)
    tile = min(CHANNEL_TILE, triton.next_power_of_2(C))
    _compiled("conv", interpreting())[(B, triton.cdiv(C, tile))](
        x, state, slots, weight, out, C,
        x.stride(0), state.stride(0), state.stride(1), weight.stride(0), out.stride(0),
        KERNEL=kernel, K_PAD=triton.next_power_of_2(kernel), TILE=tile,
    )  # fmt: skip
    return out
