"""Llama-family decoder: RMSNorm, GQA attention with NeoX-style RoPE, SwiGLU MLP.

Parameter names equal the Hugging Face checkpoint names, so the loader maps files to modules by
name, except the fused projections (``qkv_proj``, ``gate_up_proj``: one matmul instead of three or
two), whose ``weight.parts`` name the checkpoint tensors the loader concatenates. On the CPU the
loader may replace linear layers by packed ``workers.quant.QuantLinear`` ones. Each rank builds only its slice of the attention heads and MLP features (workers/parallel.py).
"""

from __future__ import annotations

import ctypes
import math

import torch
import torch.nn.functional as F
from torch import nn

from workers import native
from workers.arch.config import ModelConfig
from workers.attention import attend
from workers.kv_cache import PagedKVCache, StepBatch
from workers.parallel import TPGroup, fused, row
from workers.sharding import HeadLayout


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype), requires_grad=False)
        self.weight.shard = None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one op (native on the CPU); the same arithmetic as below for fp32
            kernels = native.for_tensor(x)
            if kernels is not None:
                return kernels.rms_norm(x, self.weight, self.eps)
            return torch.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Variance in fp32, then cast back *before* the weight multiply, as the reference does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + delta, norm(x + delta))``: a residual add and this norm, fused where possible."""
        kernels = native.for_tensor(x)
        if kernels is not None:
            return kernels.add_rms_norm(x, delta, self.weight, self.eps)
        total = x + delta
        return total, self(total)


class Rotary(nn.Module):
    """NeoX-style rotary embedding (rotate halves), with linear and llama3 frequency scaling."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        scaling = cfg.rope_scaling or {}
        kind = scaling.get("rope_type") or scaling.get("type") or "default"
        if kind == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif kind == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}  # CPU only: see forward
        self._longest = cfg.max_position_embeddings  # tables grow to this at most (positions past it still work)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and a signed sin per position, [T, 1, head_dim] each, for ``apply_rotary``. On the
        CPU they are rows of a table made once (and again, twice as long, when a position passes its
        end): six small tensor ops a step took about 0.1 ms of a 4 ms one-stream decode step, time
        in which the step's other threads wait. The same values: each row is computed exactly as
        ``_angles`` computes it for that one position (elementwise ops)."""
        if positions.device.type != "cpu" or not positions.numel():
            return self._angles(positions, dtype)  # a device computes them in the step (or its graph)
        cos, sin = self.table(int(positions.max()), dtype)
        return cos[positions], sin[positions]

    def table(self, top: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The CPU tables of cos and signed sin, [N, 1, head_dim] each, row p for position p, for
        positions 0 .. ``top`` at least (the native decode step reads its rows from them)."""
        table = self._tables.get(dtype)
        if table is None or table[0].shape[0] <= top:
            # twice what is needed, up to the model's longest context; past it, twice again (a
            # position beyond it must not rebuild the table on every step)
            size = min(max(256, 2 * (top + 1)), self._longest) if top < self._longest else 2 * (top + 1)
            table = self._tables[dtype] = self._angles(torch.arange(size, device=self.inv_freq.device), dtype)
        return table

    def _angles(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        sin = freqs.sin()
        return torch.cat((freqs, freqs), dim=-1).cos().to(dtype)[:, None], torch.cat((-sin, sin), -1).to(dtype)[:, None]


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotation of ``x`` [T, heads, head_dim]: x * cos + rotate_half(x) * sin, where
    rotate_half(x) = (-x2, x1) is x rolled by half a head with the sign folded into the sin."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layout: HeadLayout, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        hd, hidden, bias = cfg.head_dim, cfg.hidden_size, cfg.attention_bias
        self.head_dim, self.q_heads, self.kv_heads = hd, layout.q_heads, layout.kv_heads
        q, kv = layout.q_heads * hd, layout.kv_heads * hd
        parts = [
            ("q_proj", q, layout.q_start * hd),
            ("k_proj", kv, layout.kv_start * hd),
            ("v_proj", kv, layout.kv_start * hd),
        ]
        self.qkv_proj = fused(hidden, parts, tp, dtype, bias)  # q, k and v in one matmul
        self.o_proj = row(layout.q_heads * hd, hidden, layout.q_start * hd, tp, dtype)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: PagedKVCache, layer: int, batch: StepBatch
    ) -> torch.Tensor:
        T = x.shape[0]
        heads = self.qkv_proj(x).view(T, self.q_heads + 2 * self.kv_heads, self.head_dim)
        if self.q_norm is not None:  # Qwen3: per-head norm after projection, before RoPE
            q, k, v = heads.split((self.q_heads, self.kv_heads, self.kv_heads), dim=1)
            heads = torch.cat((self.q_norm(q), self.k_norm(k), v), dim=1)
        q = self._rope_and_store(heads, cos, sin, kv, layer, batch)
        out = attend(q, kv, layer, batch)
        return self.o_proj(out.reshape(T, self.q_heads * self.head_dim))

    def _rope_and_store(
        self, heads: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: PagedKVCache, layer: int, batch: StepBatch
    ) -> torch.Tensor:
        """Rotate q and k, write k and v to their slots; return q. One native pass on the CPU."""
        k_pool, v_pool = kv.k_layers[layer], kv.v_layers[layer]
        fits = k_pool.dtype in native.POOL_DTYPES and self.head_dim % 16 == 0
        kernels = native.for_tensor(heads) if fits else None
        if kernels is not None:
            return kernels.rope_store(heads, cos, sin, batch.slots, k_pool, v_pool, self.q_heads)
        qk, v = heads.split((self.q_heads + self.kv_heads, self.kv_heads), dim=1)
        q, k = apply_rotary(qk, cos, sin).split((self.q_heads, self.kv_heads), dim=1)  # q and k in one go
        k_pool.index_copy_(0, batch.slots, k.to(k_pool.dtype))  # the pool may be narrower (kv_cache_dtype)
        v_pool.index_copy_(0, batch.slots, v.to(v_pool.dtype))
        return q


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layout: HeadLayout, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        hidden = cfg.hidden_size
        self.inter = layout.inter
        parts = [("gate_proj", layout.inter, layout.inter_start), ("up_proj", layout.inter, layout.inter_start)]
        self.gate_up_proj = fused(hidden, parts, tp, dtype)  # gate and up in one matmul
        self.down_proj = row(layout.inter, hidden, layout.inter_start, tp, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        kernels = native.for_tensor(x)
        if kernels is not None:  # one pass instead of split, silu and multiply
            return self.down_proj(kernels.swiglu(gate_up))
        gate, up = gate_up.split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layout: HeadLayout, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, layout, tp, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, layout, tp, dtype)

    def forward(self, x, cos, sin, kv: PagedKVCache, layer: int, batch: StepBatch) -> torch.Tensor:
        x, h = self.post_attention_layernorm.add_forward(
            x, self.self_attn(self.input_layernorm(x), cos, sin, kv, layer, batch)
        )
        return x + self.mlp(h)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, layout: HeadLayout, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dtype,
            _weight=torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype),
        )
        self.embed_tokens.weight.requires_grad_(False)
        self.embed_tokens.weight.shard = None
        self.layers = nn.ModuleList(DecoderLayer(cfg, layout, tp, dtype) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class LlamaModel(nn.Module):
    """Decoder-only causal LM. ``forward`` runs one sequence's new tokens against its KV cache."""

    def __init__(
        self, cfg: ModelConfig, tp: TPGroup | None = None, dtype: torch.dtype = torch.float32, name: str = "model"
    ):
        super().__init__()
        self.cfg, self.tp = cfg, tp or TPGroup()
        self.layout = HeadLayout.for_rank(cfg, self.tp.rank, self.tp.world_size, name)
        self.model = Backbone(cfg, self.layout, self.tp, dtype)
        self.rotary = Rotary(cfg)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)
            self.lm_head.weight.requires_grad_(False)
            self.lm_head.weight.shard = None
        self.dtype = dtype

    def kv_shape(self) -> tuple[int, int, int, torch.dtype]:
        """(layers, local KV heads, head_dim, dtype) of this rank's KV cache."""
        return self.cfg.num_layers, self.layout.kv_heads, self.cfg.head_dim, self.dtype

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's weights under Hugging Face names: fused projections split into their parts,
        packed layers dequantized to float32 (the values they compute with), no packed tied head."""
        from workers.quant import QuantLinear

        out = {}
        for name, module in self.named_modules():
            prefix, parent = (f"{name}." if name else ""), name.rsplit(".", 1)[0]
            params = dict(module.named_parameters(recurse=False))
            if isinstance(module, QuantLinear):
                params = {"weight": module.dequantized().to(self.dtype), "bias": module.bias}
                if name == "lm_head" and self.cfg.tie_word_embeddings:
                    continue  # the head is a packed copy of the embedding
            parts = getattr(module, "parts", None)  # fused: ["q_proj", "k_proj", ...]
            for leaf, value in params.items():
                if value is None:
                    continue
                if parts is None:
                    out[prefix + leaf] = value.data
                else:
                    for part, piece in zip(parts, value.data.split(module.sizes), strict=True):
                        out[f"{parent}.{part}.{leaf}"] = piece
        return out

    native_decode = True  # tests turn it off to compare with the layer-by-layer path
    native_head = True  # and this, to compare the head in the native step with the head below

    def _native_layers(self, batch: StepBatch, kv: PagedKVCache):
        """The layers' weights as decode.c takes them, when this step can run there: every row
        decodes, one rank, float32 on the CPU, every linear in a native block format without a
        bias. Built once (weights do not move once loaded)."""
        if not self.native_decode or batch.prefills or batch.decode_rows is None:
            return None
        if kv.k.dtype not in native.POOL_DTYPES:
            return None
        if not hasattr(self, "_layer_table"):
            self._layer_table = _layer_table(self)
        return self._layer_table

    def _native_head(self) -> tuple | None:
        """(final norm weight, head ``native.Linear``) for decode.c to go on to the logits in the
        step's call (one parallel region, no Python between the last layer and the head), or None
        where the head is not a packed native linear (dense, or tied and dense). Built once."""
        if not self.native_head:
            return None
        if not hasattr(self, "_head_table"):
            linear = native.linear_of(self.lm_head) if self.lm_head is not None else None
            fits = linear is not None and not getattr(self.lm_head, "reduce", False)
            self._head_table = (self.model.norm.weight, linear) if fits else None
        return self._head_table

    def _native_mlp(self, mlp: nn.Module) -> tuple | None:
        """(gate_up, down, moe) of a layer's MLP as decode.c's ``layer_t`` takes them (``moe``: a
        ``native.Moe`` for a mixture of experts, whose model overrides this), or None where it
        cannot run there."""
        parts = [native.linear_of(m) for m in (mlp.gate_up_proj, mlp.down_proj)]
        return None if any(p is None for p in parts) else (*parts, None)

    @torch.inference_mode()
    def forward(
        self, batch: StepBatch, kv: PagedKVCache, all_logits: bool = False, hidden: bool = False
    ) -> torch.Tensor:
        """Run one step; return fp32 logits of each sequence's last token ([S, vocab]), or of every
        token ([T, vocab]) when ``all_logits``. With ``hidden``, the final norm's output instead of
        logits ([S, hidden] or [T, hidden]), as the model computes it: what embeddings pool."""
        x = self.model.embed_tokens(batch.tokens)
        layers = self._native_layers(batch, kv)
        if layers is not None:  # every row decodes: all layers in one native call, same arithmetic
            x = x.contiguous()
            dims = (self.layout.q_heads, self.layout.kv_heads, self.cfg.head_dim, self.layout.inter)
            head = None if all_logits or hidden else self._native_head()  # and the head, when it can
            cos, sin = self.rotary.table(batch.top_position, self.dtype)  # rows read in the call
            logits = native.kernels().decode_layers(x, layers, dims, self.cfg.rms_norm_eps, cos, sin, kv, batch, head)
            if logits is not None:
                return logits
        else:
            cos, sin = self.rotary(batch.positions, self.dtype)
            for i, layer in enumerate(self.model.layers):
                x = layer(x, cos, sin, kv, i, batch)
        x = x if all_logits else x[batch.last_rows]
        x = self.model.norm(x)
        if hidden:
            return x
        if self.lm_head is None:  # tied, dense
            return F.linear(x, self.model.embed_tokens.weight).float()
        return self.lm_head(x).float()  # nn.Linear, or a packed QuantLinear (tied ones too)


def _layer_table(model: LlamaModel):
    """ctypes ``Layer`` array for decode.c, or None when a layer cannot run there."""
    kernels = native.kernels()
    if kernels is None or model.tp.world_size != 1 or model.dtype != torch.float32 or model.cfg.head_dim % 16:
        return None
    table = (native.Layer * len(model.model.layers))()
    moes = []  # the experts' tables the entries point to, kept alive with the array
    for entry, layer in zip(table, model.model.layers, strict=True):
        attn = layer.self_attn
        parts = [native.linear_of(m) for m in (attn.qkv_proj, attn.o_proj)]
        mlp = model._native_mlp(layer.mlp)
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        if any(p is None for p in (*parts, mlp)) or any(n.weight.device.type != "cpu" for n in norms):
            return None
        entry.input_norm, entry.post_norm = (n.weight.data_ptr() for n in norms)
        if attn.q_norm is not None:
            entry.q_norm, entry.k_norm = attn.q_norm.weight.data_ptr(), attn.k_norm.weight.data_ptr()
        entry.qkv, entry.o = parts
        gate_up, down, moe = mlp
        if moe is None:
            entry.gate_up, entry.down = gate_up, down
        else:
            entry.moe = ctypes.addressof(moe)
            moes.append(moe)
    table._keep = moes
    return table
