"""Gated DeltaNet: the linear-attention layer of Qwen3.5 / Qwen3-Next, and the state it keeps.

A Gated DeltaNet layer has no KV cache. Each sequence carries, per layer, a fixed-size state:

- a **conv state** ``[channels, kernel - 1]``: the last inputs of the depthwise causal convolution
  over q, k and v (so the next token's convolution sees them);
- a **delta state** ``[v_heads, k_dim, v_dim]`` (float32): per value head, a matrix that maps keys to
  values. Each token decays it by ``exp(g)`` (g <= 0) and then corrects it towards the token's value
  (the delta rule)::

      S = exp(g) * S
      S = S + beta * k (v - S^T k)^T        # write only what S did not already predict for k
      o = S^T q

Prompt chunks use the chunked form of the same recurrence (``delta_rule_chunked``): within a chunk of
L tokens the corrections ``u`` of all tokens solve one unit lower-triangular system, so a chunk costs
a few [L, L] and [L, d] matrix products instead of L sequential rank-1 updates. Single-token steps
use the recurrence directly (``delta_rule_step``), batched over sequences. On the CPU in float32 the
whole single-token step of a layer, conv to gated norm, is one native call (workers/kernels/
deltanet.c: about forty PyTorch ops fewer per layer, and one pass over the state instead of three);
the PyTorch path stays the reference and serves prompt chunks, other dtypes and devices.

The states of all sequences live in a ``RecurrentStatePool`` indexed by *state slot*, as KV lives in
blocks; ``StateBatch`` says which slot each sequence of a step uses and whether it starts fresh.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workers import gpu, native
from workers.parallel import TPGroup, fused, row
from workers.sharding import Shard

CHUNK = 64  # tokens per block of the chunked delta rule: [64, 64] triangular solves


class RecurrentStatePool:
    """Conv and delta states of every linear-attention layer, for ``slots`` sequences:
    ``conv`` [layers, slots, channels, kernel - 1] in the model's dtype, ``delta``
    [layers, slots, v_heads, k_dim, v_dim] in float32 (it accumulates over the whole sequence).

    Allocated once, like the KV pool. The engine owns which sequence holds which slot; a slot holds
    the state after the last token the sequence computed, so it carries across prompt chunks and
    decode steps. ``layers`` counts linear-attention layers only (numbered in model order)."""

    def __init__(
        self,
        layers: int,
        slots: int,
        channels: int,
        kernel: int,
        v_heads: int,
        k_dim: int,
        v_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        state_dtype: torch.dtype = torch.float32,
    ):
        self.num_slots = slots
        self.conv = torch.zeros(layers, slots, channels, kernel - 1, dtype=dtype, device=device)
        self.delta = torch.zeros(layers, slots, v_heads, k_dim, v_dim, dtype=state_dtype, device=device)
        # one view per layer, made once (as PagedKVCache does)
        self.conv_layers, self.delta_layers = list(self.conv.unbind(0)), list(self.delta.unbind(0))

    def zero(self, slots: list[int] | torch.Tensor | None = None) -> None:
        """Reset ``slots`` (every slot when None) in every layer: a sequence starting from nothing."""
        if slots is None:
            self.conv.zero_()
            self.delta.zero_()
            return
        ids = torch.as_tensor(slots, dtype=torch.long, device=self.conv.device)
        self.conv.index_fill_(1, ids, 0)
        self.delta.index_fill_(1, ids, 0)

    def copy(self, src: int, dst: list[int]) -> None:
        """Copy slot ``src`` into each of ``dst``: siblings of a prompt sampled n times, or a saved
        checkpoint of a prefix."""
        ids = torch.as_tensor(dst, dtype=torch.long, device=self.conv.device)
        for pool in (self.conv, self.delta):
            source = pool[:, src : src + 1].clone()  # never read from what is being written
            pool.index_copy_(1, ids, source.expand(-1, len(dst), *pool.shape[2:]))

    def slot_bytes(self) -> int:
        """One sequence's state, every layer (what ``ModelConfig.state_slot_bytes`` says torch-free)."""
        return sum(pool[:, 0].numel() * pool.element_size() for pool in (self.conv, self.delta))

    def nbytes(self) -> int:
        return self.num_slots * self.slot_bytes()


@dataclass
class StateBatch:
    """Which state slot each sequence of a step uses. Sequences are in ``StepBatch`` order: the flat
    batch holds each one's new tokens contiguously, in the order the sequences were given."""

    fresh_slots: torch.Tensor | None  # slots to zero before the step: their sequences start here
    runs: list[tuple[int, int, int]]  # (first row, end row, slot) of sequences with several new tokens
    single_rows: torch.Tensor | None  # [B] rows of one-token sequences, stepped together, by ascending slot
    single_slots: torch.Tensor | None  # [B] their slots, ascending
    # (first, end) when single_slots are exactly first..end-1: the step then updates the pool's own
    # rows in place instead of gathering them and scattering them back (at 16 sequences of a
    # 0.8B-shaped model that was 2 x 16 MB of delta state copied per layer)
    single_span: tuple[int, int] | None = None

    @classmethod
    def one_run(cls, n: int, slot: int) -> StateBatch:
        """One sequence of ``n`` tokens (rows 0..n-1) continuing in ``slot``."""
        return cls(None, [(0, n, slot)], None, None)

    @classmethod
    def build(cls, lengths: list[int], slots: list[int], fresh: list[bool], device: torch.device) -> StateBatch:
        """``lengths``: new tokens of each sequence; ``slots``: its state slot; ``fresh``: True on the
        step that computes its position 0. Built from host lists only (no device round trip)."""
        if not len(lengths) == len(slots) == len(fresh):
            raise ValueError(f"{len(lengths)} sequences but {len(slots)} slots and {len(fresh)} fresh flags")
        if len(set(slots)) != len(slots):
            raise ValueError("two sequences of one step share a state slot")
        runs, singles = [], []
        start = 0
        for n, slot in zip(lengths, slots, strict=True):
            if n == 1:
                singles.append((slot, start))
            else:
                runs.append((start, start + n, slot))
            start += n
        singles.sort()  # by slot: the rows of a contiguous run of slots line up with a view of the pool
        single_slots, single_rows = [s for s, _ in singles], [r for _, r in singles]
        span = None
        if singles and single_slots[-1] - single_slots[0] == len(singles) - 1:
            span = (single_slots[0], single_slots[-1] + 1)
        t = lambda x: torch.tensor(x, dtype=torch.long, device=device) if x else None  # noqa: E731
        starting = [s for s, f in zip(slots, fresh, strict=True) if f]
        return cls(t(starting), runs, t(single_rows), t(single_slots), span)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(|x|^2 + eps) over the last dim (the eps inside the root, as the reference has it)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def delta_rule_step(
    state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token for each of B sequences. ``state`` [B, H, dk, dv] float32, updated in place (and
    returned); ``q``, ``k`` [B, H, dk] (q already scaled); ``v`` [B, H, dv]; ``g``, ``beta`` [B, H].
    Returns (output [B, H, dv], state).

    The state is the big operand (16 heads of 128 x 128 floats per layer and sequence) and the step
    is bound by passes over it, so it makes three and allocates none of its size: one product reads
    S^T k and S^T q together, then the decay and the rank-1 correction are applied in place. The
    output follows from those two products, without reading the new state:
    ``o = S'^T q = exp(g) S^T q + (k.q) u`` with ``u = beta (v - exp(g) S^T k)``."""
    decay = g.exp()
    read = torch.matmul(torch.stack((k, q), dim=-2), state)  # [B, H, 2, dv]: S^T k, S^T q
    u = (v - decay[..., None] * read[..., 0, :]) * beta[..., None]  # what S did not already predict for k
    out = decay[..., None] * read[..., 1, :] + (k * q).sum(-1, keepdim=True) * u
    state.mul_(decay[..., None, None]).addcmul_(k[..., :, None], u[..., None, :])
    return out, state


def delta_rule_chunked(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    chunk: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """n tokens of one sequence, ``chunk`` at a time. ``state`` [H, dk, dv] (not modified); ``q``, ``k``
    [H, n, dk]; ``v`` [H, n, dv]; ``g``, ``beta`` [H, n]. Returns (output [H, n, dv], state after the
    last token).

    With c_t the cumulative log decay from a chunk's start through token t, the state after token t
    is ``exp(c_t) S + sum_{j<=t} exp(c_t - c_j) k_j u_j^T``, where u_j is the correction token j
    writes: ``u_j = beta_j (v_j - [state before j, decayed]^T k_j)``. Expanding that state gives, for
    all j at once, ``(I + A) U = beta V - (beta exp(c) K) S`` with A strictly lower triangular,
    ``A[t, j] = beta_t exp(c_t - c_j) k_t.k_j``: one triangular solve, ``U = W_v - W_k S``.

    Everything but the state's own recurrence is independent of S, so it is computed for all chunks
    at once (one batched solve); the loop over chunks is then five matrix products each. The last
    chunk is padded with tokens that change nothing (k = v = beta = 0, decay 1); a piece shorter
    than ``chunk`` is one chunk of its own length, rounded up to a multiple of 8."""
    H, n, dk = k.shape
    dv = v.shape[-1]
    # a piece shorter than a chunk is one chunk of its own length (to a multiple of 8), not padded to
    # a whole one: the [L, L] work and the products with S shrink with L (20 tokens: 3x less time)
    chunk = min(chunk, -(-n // 8) * 8)
    pad = -n % chunk
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    N, L = (n + pad) // chunk, chunk
    q, k, v = q.view(H, N, L, dk), k.view(H, N, L, dk), v.view(H, N, L, dv)
    c = g.view(H, N, L).cumsum(-1)  # [H, N, L]
    beta = beta.view(H, N, L)
    lower = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()  # j <= t
    # decay from j to t where j <= t; masked before exp so nothing above the diagonal can overflow
    decay = (c[..., :, None] - c[..., None, :]).masked_fill(~lower, float("-inf")).exp()  # [H, N, L, L]
    kb = k * beta[..., None]
    A = ((kb @ k.transpose(-1, -2)) * decay).tril(-1)
    eye = torch.eye(L, dtype=q.dtype, device=q.device)
    rhs = torch.cat((v * beta[..., None], kb * c.exp()[..., None]), dim=-1)
    w = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    w_v, w_k = w.split((dv, dk), dim=-1)
    q_start = q * c.exp()[..., None]  # reads the state as it was at the chunk's start
    inner = (q @ k.transpose(-1, -2)) * decay  # [H, N, L, L]: what the chunk's own tokens add
    k_end = (k * (c[..., -1:] - c).exp()[..., None]).transpose(-1, -2)  # [H, N, dk, L], decayed to the end
    to_end = c[..., -1].exp()[..., None, None]  # [H, N, 1, 1]: the whole chunk's decay
    out = torch.empty(H, N, L, dv, dtype=q.dtype, device=q.device)
    S = state
    for i in range(N):
        u = w_v[:, i] - w_k[:, i] @ S  # [H, L, dv]
        out[:, i] = q_start[:, i] @ S + inner[:, i] @ u
        S = torch.baddbmm(S * to_end[:, i], k_end[:, i], u)
    return out.view(H, N * L, dv)[:, :n], S


@dataclass(frozen=True)
class LinearLayout:
    """This rank's share of a Gated DeltaNet layer: whole key-head groups (a key head and the value
    heads that read it), so the delta rule of a head never needs another rank."""

    k_heads: int  # local
    v_heads: int  # local
    k_start: int
    v_start: int

    @classmethod
    def for_rank(cls, cfg, rank: int, world_size: int, model_name: str = "model") -> LinearLayout:
        from workers.sharding import ShardingError

        hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        if hk % world_size or hv % hk:
            raise ShardingError(
                f"{model_name}: linear_num_key_heads={hk} (value heads {hv}) cannot split across tensor_parallel={world_size}"
            )
        k, v = hk // world_size, hv // world_size
        return cls(k, v, rank * k, rank * v)


def _separate_parts(cfg, lay: LinearLayout) -> list[tuple[str, int, int]]:
    """Qwen3.5: ``in_proj_qkv`` ([q | k | v], each all heads), ``in_proj_z``, ``in_proj_b``, ``in_proj_a``."""
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    key_dim = cfg.linear_num_key_heads * dk
    nk, nv = lay.k_heads * dk, lay.v_heads * dv
    return [
        ("in_proj_qkv", nk, lay.k_start * dk),
        ("in_proj_qkv", nk, key_dim + lay.k_start * dk),
        ("in_proj_qkv", nv, 2 * key_dim + lay.v_start * dv),
        ("in_proj_z", nv, lay.v_start * dv),
        ("in_proj_b", lay.v_heads, lay.v_start),
        ("in_proj_a", lay.v_heads, lay.v_start),
    ]


def _interleaved_parts(cfg, lay: LinearLayout) -> list[tuple[str, int, int]]:
    """Qwen3-Next: ``in_proj_qkvz`` holds per key head ``[q | k | v of its group | z of its group]``
    and ``in_proj_ba`` ``[b of its group | a of its group]``. Reading each piece as its own part
    puts them in the Qwen3.5 order, so one forward serves both checkpoints."""
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    r = cfg.linear_num_value_heads // cfg.linear_num_key_heads
    group, groups = 2 * dk + 2 * r * dv, range(lay.k_start, lay.k_start + lay.k_heads)
    q = [("in_proj_qkvz", dk, h * group) for h in groups]
    k = [("in_proj_qkvz", dk, h * group + dk) for h in groups]
    v = [("in_proj_qkvz", r * dv, h * group + 2 * dk) for h in groups]
    z = [("in_proj_qkvz", r * dv, h * group + 2 * dk + r * dv) for h in groups]
    b = [("in_proj_ba", r, h * 2 * r) for h in groups]
    a = [("in_proj_ba", r, h * 2 * r + r) for h in groups]
    return q + k + v + z + b + a


class GatedRMSNorm(nn.Module):
    """RMSNorm over each value head, then times silu(z): ``weight * norm(x) * silu(z)`` (a plain
    weight, not the zero-centred 1 + w of the model's other norms)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype), requires_grad=False)
        self.weight.shard = None  # the same for every head, so every rank holds all of it
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        normed = torch.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)
        return (self.weight * normed * F.silu(z.float())).to(x.dtype)


class GatedDeltaNet(nn.Module):
    """The ``linear_attn`` of a layer. All input projections are one fused matmul whose output is
    ``[q | k | v | z | b | a]`` for this rank's heads; the conv weight holds this rank's q, k and v
    channels; ``out_proj`` is row-parallel over its value heads."""

    def __init__(self, cfg, lay: LinearLayout, tp: TPGroup, dtype: torch.dtype, interleaved: bool):
        super().__init__()
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.k_heads, self.v_heads = lay.k_heads, lay.v_heads
        self.key, self.value = lay.k_heads * self.dk, lay.v_heads * self.dv  # local widths
        parts = (_interleaved_parts if interleaved else _separate_parts)(cfg, lay)
        self.in_proj = fused(cfg.hidden_size, parts, tp, dtype)
        key_dim = cfg.linear_num_key_heads * self.dk
        self.conv1d = DepthwiseConv(
            [
                Shard(0, lay.k_start * self.dk, self.key),
                Shard(0, key_dim + lay.k_start * self.dk, self.key),
                Shard(0, 2 * key_dim + lay.v_start * self.dv, self.value),
            ],
            cfg.linear_conv_kernel,
            dtype,
        )
        heads = Shard(0, lay.v_start, lay.v_heads)
        self.A_log = nn.Parameter(torch.empty(lay.v_heads, dtype=dtype), requires_grad=False)
        self.dt_bias = nn.Parameter(torch.empty(lay.v_heads, dtype=dtype), requires_grad=False)
        self.A_log.shard = self.dt_bias.shard = heads
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps, dtype)
        self.out_proj = row(self.value, cfg.hidden_size, lay.v_start * self.dv, tp, dtype)

    def forward(self, x: torch.Tensor, pool: RecurrentStatePool, layer: int, seqs: StateBatch) -> torch.Tensor:
        proj = self.in_proj(x)
        kernels = self._native(proj, pool)
        if kernels is None or seqs.single_rows is None:
            return self.out_proj(self._mix(proj, pool, layer, seqs))
        # single tokens: one native call per layer (deltanet.c) instead of about forty PyTorch ops
        out = proj.new_empty(proj.shape[0], self.value)
        weights = (self.conv1d.weight, self.A_log, self.dt_bias, self.norm.weight, self.norm.eps)
        states = (pool.conv_layers[layer], pool.delta_layers[layer])
        dims = (self.k_heads, self.v_heads, self.dk, self.dv)
        kernels.deltanet_decode(proj, seqs.single_rows, seqs.single_slots, weights, states, dims, out)
        for start, end, slot in seqs.runs:  # prompt chunks of the same step: the chunked rule
            out[start:end] = self._mix(proj[start:end], pool, layer, StateBatch.one_run(end - start, slot))
        return self.out_proj(out)

    def _native(self, proj: torch.Tensor, pool: RecurrentStatePool) -> native.NativeKernels | None:
        """The native kernels when this layer's decode step can run on them: float32 on the CPU,
        weights and both states included (a bfloat16 model takes the PyTorch path)."""
        kernels = native.for_tensor(proj)
        if kernels is None or proj.stride(-1) != 1 or self.A_log.dtype != torch.float32:
            return None
        if not self.conv1d.weight.is_contiguous():  # the kernel reads it as [channels, kernel]
            return None
        if pool.conv.dtype != torch.float32 or pool.delta.dtype != torch.float32:
            return None
        return kernels

    def _mix(self, proj: torch.Tensor, pool: RecurrentStatePool, layer: int, seqs: StateBatch) -> torch.Tensor:
        """The PyTorch path from the fused projection ``proj`` [T, width] to the gated norm's output
        [T, value]: the reference, and what prompt chunks, other dtypes and devices run."""
        T = proj.shape[0]
        channels = 2 * self.key + self.value
        qkv, z, b, a = proj.split((channels, self.value, self.v_heads, self.v_heads), dim=-1)
        qkv = F.silu(self.conv1d(qkv, pool.conv_layers[layer], seqs))
        q, k, v = qkv.float().split((self.key, self.key, self.value), dim=-1)
        rep = self.v_heads // self.k_heads  # each key head serves ``rep`` value heads
        q = l2_normalize(q.view(T, self.k_heads, self.dk)) * self.dk**-0.5
        k = l2_normalize(k.view(T, self.k_heads, self.dk))
        if rep > 1:  # Qwen3.5-0.8B has as many key heads as value heads: no copy for it
            q, k = q.repeat_interleave(rep, dim=1), k.repeat_interleave(rep, dim=1)
        v = v.view(T, self.v_heads, self.dv)
        beta = b.float().sigmoid()
        # the decay in float32 whatever the model's dtype: exp(A_log) in half precision can overflow
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        out = _delta_rule(pool.delta_layers[layer], q, k, v, g, beta, seqs)
        out = self.norm(out.to(proj.dtype), z.view(T, self.v_heads, self.dv))
        return out.reshape(T, self.value)


def _delta_rule(states: torch.Tensor, q, k, v, g, beta, seqs: StateBatch) -> torch.Tensor:
    """The delta rule over a step's rows ([T, H, ...]), reading and writing each sequence's slot of
    one layer's ``states`` [slots, H, dk, dv]: prompt chunks one by one, single tokens together."""
    out = torch.empty_like(v)
    for start, end, slot in seqs.runs:
        heads_first = [x[start:end].transpose(0, 1) for x in (q, k, v, g, beta)]  # [H, n, ...]
        o, final = delta_rule_chunked(states[slot].float(), *heads_first)
        states[slot] = final
        out[start:end] = o.transpose(0, 1)
    if seqs.single_rows is not None:
        rows, slots = seqs.single_rows, seqs.single_slots
        args = (q[rows], k[rows], v[rows], g[rows], beta[rows])
        kernels = _gpu_kernels(states)
        if kernels is not None:  # the slots updated in place by one kernel: no gather, no scatter
            o = kernels.delta_rule_decode(states, slots, *args)
        elif seqs.single_span is not None and states.dtype == torch.float32:
            o, _ = delta_rule_step(states[seqs.single_span[0] : seqs.single_span[1]], *args)  # in the pool
        else:
            o, new = delta_rule_step(states.index_select(0, slots).float(), *args)
            states.index_copy_(0, slots, new.to(states.dtype))
        out[rows] = o
    return out


class DepthwiseConv(nn.Module):
    """The causal depthwise convolution over q, k and v (one filter per channel, ``kernel`` taps), with
    each sequence's last ``kernel - 1`` inputs kept in its conv state. ``weight`` is
    [channels, 1, kernel] as in the checkpoint; ``weight.parts`` are this rank's q, k, v channels."""

    def __init__(self, shards: list[Shard], kernel: int, dtype: torch.dtype):
        super().__init__()
        channels = sum(s.length for s in shards)
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel, dtype=dtype), requires_grad=False)
        self.weight.parts = [("conv1d", s) for s in shards]  # read and concatenated by the loader

    def forward(self, x: torch.Tensor, states: torch.Tensor, seqs: StateBatch) -> torch.Tensor:
        """``x`` [T, channels] -> [T, channels] (before the activation); updates ``states``
        [slots, channels, kernel - 1] of the step's sequences."""
        kernel = self.weight.shape[-1]
        taps = self.weight[:, 0].float()  # [C, kernel]
        out = torch.empty_like(x)
        for start, end, slot in seqs.runs:
            # tokens along dim 0, channels contiguous: the filter is ``kernel`` multiply-adds over
            # shifted views of the window, in float32. F.conv1d's depthwise path (oneDNN) took about
            # twice as long here (6,144 channels, 256 tokens) and needed two transposes around it.
            n = end - start
            window = torch.cat((states[slot].T, x[start:end].to(states.dtype)), dim=0).float()  # [keep + n, C]
            acc = window[:n] * taps[:, 0]
            for j in range(1, kernel):
                acc.addcmul_(window[j : j + n], taps[:, j])
            out[start:end] = acc
            states[slot] = window[n:].T.to(states.dtype)
        if seqs.single_rows is not None:
            rows, slots, span = seqs.single_rows, seqs.single_slots, seqs.single_span
            kernels = _gpu_kernels(states)
            if kernels is not None:
                out[rows] = kernels.conv_decode(x[rows], states, slots, self.weight[:, 0])
                return out
            held = states[span[0] : span[1]] if span is not None else states.index_select(0, slots)  # [B, C, keep]
            window = torch.cat((held, x[rows, :, None].to(states.dtype)), dim=-1)  # [B, C, kernel]
            out[rows] = (window.to(x.dtype) * self.weight[:, 0]).sum(-1)  # [B, C, kernel] -> [B, C]
            if span is not None:
                held.copy_(window[..., 1:])  # the pool's own rows: no scatter
            else:
                states.index_copy_(0, slots, window[..., 1:])
        return out


def _gpu_kernels(t: torch.Tensor):
    """workers/gpu/deltanet.py when its decode kernels take ``t`` (CUDA; on the CPU the test hook
    under Triton's interpreter), else None. Imported on first use: Triton slows a CPU worker's start."""
    if not t.is_cuda and not gpu.forced():
        return None
    from workers.gpu import deltanet

    return deltanet if deltanet.wanted(t) else None
