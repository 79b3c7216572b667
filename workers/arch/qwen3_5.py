"""Qwen3.5 / Qwen3.6 (``qwen3_5``, ``qwen3_5_text``), Qwen3-Next (``qwen3_next``) and Qwen3.5-MoE
(``qwen3_5_moe``, run as ``qwen3_5`` with experts; MLPs: workers/arch/moe.py): a hybrid
decoder whose layers are either gated full attention or Gated DeltaNet linear attention, as
``cfg.layer_types`` says (by default three linear layers before each full one).

How it differs from Llama/Qwen3 (workers/arch/llama.py):

- every RMSNorm but the DeltaNet's output norm is zero-centred: ``norm(x) * (1 + w)``;
- full attention: ``q_proj`` yields ``[query | gate]`` per head, the output is multiplied by
  ``sigmoid(gate)`` before ``o_proj``; q/k norms; RoPE on the first ``head_dim *
  partial_rotary_factor`` dims only (Qwen3.5's interleaved M-RoPE equals plain RoPE when all three
  position components are the text position, which is the case for text);
- linear attention: a Gated DeltaNet layer (workers/arch/deltanet.py) with a fixed-size state per
  sequence instead of KV.

Engine interface (what the worker and the leader must do for this model):

- **Load.** ``kv_shape()`` counts full-attention layers only: the paged KV pool holds those (KV layer
  i is the i-th full-attention layer). ``new_state_pool(slots, device)`` allocates the
  ``RecurrentStatePool`` for ``slots`` concurrent sequences; ``cfg.state_slot_bytes(world_size,
  dtype)`` (torch-free) is one slot's bytes per rank, for the leader's memory accounting.
- **Step.** ``model(batch, kv, pool, StateBatch.build(lengths, slots, fresh, device))``: for each
  sequence of the step, in ``StepBatch`` order, its number of new tokens, its state slot and whether
  it starts fresh (its slot is zeroed first: the step that computes position 0). A slot appears at
  most once per step. The slot holds the state after the last token computed, so prompt chunks and
  decode steps simply continue it.
- **Slots** are the engine's, like KV blocks: allocate one at admission, free it at finish or
  cancel. A state cannot be rebuilt from KV blocks, so a sequence whose computation restarts (a
  preemption that frees its blocks) restarts at position 0 with ``fresh``; prefix-cache hits must be
  off for these models (a hit skips positions whose state is not stored) until states are
  checkpointed at block boundaries (``pool.copy`` into a spare slot). ``n > 1``: prefill once, then
  ``pool.copy(src, dsts)`` and copy or share the prompt's KV blocks.

Tensor parallelism (the layouts are built per rank, the loader reads slices): full attention splits
by query head (each head's query and gate rows stay together) and KV head as in Llama; DeltaNet
splits by key-head group, a key head and the ``v_heads / k_heads`` value heads that read it, so each
rank holds its q and k channels, the value/z/b/a of its value heads, those conv channels, and the
conv and delta states of those channels and heads; ``out_proj`` is row-parallel (one all-reduce).

Weights: the names of ``Qwen3_5ForCausalLM`` (``model.*``) or of the VLM-shaped checkpoint
(``model.language_model.*``; vision tower and MTP head skipped), see ``CheckpointNames``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workers import native
from workers.arch.config import ModelConfig
from workers.arch.deltanet import GatedDeltaNet, LinearLayout, RecurrentStatePool, StateBatch
from workers.arch.llama import Rotary, apply_rotary
from workers.arch.moe import layer_mlp
from workers.attention import attend
from workers.kv_cache import BLOCK_SIZE, PagedKVCache, StepBatch
from workers.parallel import TPGroup, fused, row
from workers.sharding import HeadLayout

log = logging.getLogger("cortex.worker")


class ZeroCentredRMSNorm(nn.Module):
    """``norm(x) * (1 + w)`` in float32, cast back after the multiply (the checkpoint stores w ~ 0:
    loading it into a plain RMSNorm would silently scale by ~0)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype), requires_grad=False)
        self.weight.shard = None
        self.eps = eps
        self._scale: tuple[tuple[int, int], torch.Tensor] | None = None  # (weight's identity, 1 + w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = native.for_tensor(x)
        if kernels is not None:  # one call instead of PyTorch's six ops (about 70 us a norm at decode)
            return kernels.rms_norm(x, self.scale(), self.eps)
        return torch.rms_norm(x.float(), self.weight.shape, self.scale(), self.eps).to(x.dtype)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + delta, norm(x + delta))``: a residual add and this norm, fused where possible."""
        kernels = native.for_tensor(x)
        if kernels is not None and delta.dtype == x.dtype:
            return kernels.add_rms_norm(x, delta, self.scale(), self.eps)
        total = x + delta
        return total, self(total)

    def scale(self) -> torch.Tensor:
        """``1 + w`` in float32, made once per weight: keyed by its storage and version counter, so
        loading (an in-place copy) or moving the weight makes it anew. Every decode step reads the
        49 norms of a 24-layer model, and each op there costs tens of microseconds."""
        w = self.weight
        if w.is_inference():  # no version counter to tell a changed weight by: made every call
            return w.float() + 1
        key = (w.data_ptr(), w._version)
        if self._scale is None or self._scale[0] != key:
            self._scale = (key, w.float() + 1)
        return self._scale[1]


class GatedAttention(nn.Module):
    """Full attention over the paged KV cache, with an output gate per head and partial RoPE."""

    def __init__(self, cfg: ModelConfig, layout: HeadLayout, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        hd, hidden = cfg.head_dim, cfg.hidden_size
        self.head_dim, self.q_heads, self.kv_heads = hd, layout.q_heads, layout.kv_heads
        self.rot = int(hd * cfg.partial_rotary_factor)
        self.q_rows = q_rows = 2 * hd if cfg.attn_output_gate else hd  # per head: [query | gate]
        parts = [
            ("q_proj", layout.q_heads * q_rows, layout.q_start * q_rows),
            ("k_proj", layout.kv_heads * hd, layout.kv_start * hd),
            ("v_proj", layout.kv_heads * hd, layout.kv_start * hd),
        ]
        self.qkv_proj = fused(hidden, parts, tp, dtype, cfg.attention_bias)
        self.o_proj = row(layout.q_heads * hd, hidden, layout.q_start * hd, tp, dtype)
        self.q_norm = ZeroCentredRMSNorm(hd, cfg.rms_norm_eps, dtype)
        self.k_norm = ZeroCentredRMSNorm(hd, cfg.rms_norm_eps, dtype)

    def forward(self, x: torch.Tensor, step: _Step, kv_layer: int) -> torch.Tensor:
        T, hd = x.shape[0], self.head_dim
        qg, k, v = self.qkv_proj(x).split((self.q_heads * self.q_rows, self.kv_heads * hd, self.kv_heads * hd), dim=-1)
        qg = qg.view(T, self.q_heads, self.q_rows)
        q, gate = qg[..., :hd], qg[..., hd:]
        q = self._rope(self.q_norm(q), step)
        k = self._rope(self.k_norm(k.view(T, self.kv_heads, hd)), step)
        k_pool, v_pool = step.kv.k_layers[kv_layer], step.kv.v_layers[kv_layer]
        k_pool.index_copy_(0, step.batch.slots, k.to(k_pool.dtype))  # the pool may be narrower
        v_pool.index_copy_(0, step.batch.slots, v.view(T, self.kv_heads, hd).to(v_pool.dtype))
        out = attend(q, step.kv, kv_layer, step.batch)  # [T, q_heads, hd]
        if gate.shape[-1]:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out.reshape(T, self.q_heads * hd))

    def _rope(self, x: torch.Tensor, step: _Step) -> torch.Tensor:
        """Rotate the first ``rot`` dims of each head; the rest pass through."""
        turned = apply_rotary(x[..., : self.rot], step.cos, step.sin)
        return torch.cat((turned, x[..., self.rot :]), dim=-1)


class HybridLayer(nn.Module):
    """Norm, token mixer (``self_attn`` or ``linear_attn``), residual; norm, MLP, residual. ``index``
    numbers the layer among those of its kind: its KV layer or its state layer. ``mlp``: dense, or
    a mixture of experts (workers/arch/moe.py: Qwen3-Next, Qwen3.5-MoE)."""

    def __init__(
        self, cfg: ModelConfig, kind: str, index: int, layouts, tp: TPGroup, dtype: torch.dtype, mlp: nn.Module
    ):
        super().__init__()
        head_layout, linear_layout = layouts
        self.kind, self.index = kind, index
        self.input_layernorm = ZeroCentredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if kind == "full_attention":
            self.self_attn = GatedAttention(cfg, head_layout, tp, dtype)
        else:
            self.linear_attn = GatedDeltaNet(cfg, linear_layout, tp, dtype, interleaved=cfg.arch == "qwen3_next")
        self.post_attention_layernorm = ZeroCentredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, step: _Step) -> torch.Tensor:
        h = self.input_layernorm(x)
        if self.kind == "full_attention":
            h = self.self_attn(h, step, self.index)
        else:
            h = self.linear_attn(h, step.states, self.index, step.seqs)
        x, h = self.post_attention_layernorm.add_forward(x, h)
        return x + self.mlp(h)


@dataclass
class _Step:
    """What every layer of one step reads."""

    batch: StepBatch
    kv: PagedKVCache
    states: RecurrentStatePool
    seqs: StateBatch
    cos: torch.Tensor
    sin: torch.Tensor


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, layouts, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        )
        self.embed_tokens.weight.requires_grad_(False)
        self.embed_tokens.weight.shard = None
        seen = {"full_attention": 0, "linear_attention": 0}
        layers = []
        for i, kind in enumerate(cfg.layer_types):
            mlp = layer_mlp(cfg, i, layouts[0], tp, dtype)
            layers.append(HybridLayer(cfg, kind, seen[kind], layouts, tp, dtype, mlp))
            seen[kind] += 1
        self.layers = nn.ModuleList(layers)
        self.norm = ZeroCentredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class Qwen3_5Model(nn.Module):
    """The hybrid causal LM. ``forward`` runs one step of many sequences against the KV pool (full
    attention layers) and the state pool (linear attention layers)."""

    recurrent = True  # the worker must hand it a RecurrentStatePool and a StateBatch every step

    def __init__(
        self, cfg: ModelConfig, tp: TPGroup | None = None, dtype: torch.dtype = torch.float32, name: str = "model"
    ):
        super().__init__()
        self.cfg, self.tp, self.dtype = cfg, tp or TPGroup(), dtype
        self.layout = HeadLayout.for_rank(cfg, self.tp.rank, self.tp.world_size, name)
        self.linear_layout = LinearLayout.for_rank(cfg, self.tp.rank, self.tp.world_size, name)
        self.model = Backbone(cfg, (self.layout, self.linear_layout), self.tp, dtype)
        # RoPE over the rotated dims only; llama's Rotary also brings its linear/llama3 scaling
        self.rotary = Rotary(dataclasses.replace(cfg, head_dim=int(cfg.head_dim * cfg.partial_rotary_factor)))
        self.lm_head = None
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)
            self.lm_head.weight.requires_grad_(False)
            self.lm_head.weight.shard = None

    def kv_shape(self) -> tuple[int, int, int, torch.dtype]:
        """(full-attention layers, local KV heads, head_dim, dtype) of this rank's KV cache."""
        return self.cfg.kv_layers, self.layout.kv_heads, self.cfg.head_dim, self.dtype

    def new_state_pool(self, slots: int, device: torch.device) -> RecurrentStatePool:
        """This rank's recurrent states for ``slots`` sequences."""
        cfg, lay = self.cfg, self.linear_layout
        channels = 2 * lay.k_heads * cfg.linear_key_head_dim + lay.v_heads * cfg.linear_value_head_dim
        return RecurrentStatePool(
            cfg.linear_layers,
            slots,
            channels,
            cfg.linear_conv_kernel,
            lay.v_heads,
            cfg.linear_key_head_dim,
            cfg.linear_value_head_dim,
            self.dtype,
            device,
        )

    def adapt_reader(self, reader):
        """The checkpoint reader, seen under this model's parameter names."""
        return CheckpointNames(reader)

    @torch.inference_mode()
    def forward(
        self,
        batch: StepBatch,
        kv: PagedKVCache,
        states: RecurrentStatePool,
        seqs: StateBatch,
        all_logits: bool = False,
        hidden: bool = False,
    ) -> torch.Tensor:
        """Run one step; return fp32 logits of each sequence's last token ([S, vocab]), or of every
        token ([T, vocab]) when ``all_logits``; with ``hidden``, the final norm's output instead."""
        if seqs.fresh_slots is not None:
            states.zero(seqs.fresh_slots)
        cos, sin = self.rotary(batch.positions, self.dtype)
        step = _Step(batch, kv, states, seqs, cos, sin)
        x = self.model.embed_tokens(batch.tokens)
        for layer in self.model.layers:
            x = layer(x, step)
        x = self.model.norm(x if all_logits else x[batch.last_rows])
        if hidden:
            return x
        if self.lm_head is None:  # tied, dense
            return F.linear(x, self.model.embed_tokens.weight).float()
        return self.lm_head(x).float()


class CheckpointNames:
    """A safetensors reader seen under our parameter names (``model.*``, ``lm_head.*``), whether the
    checkpoint is text-only (``Qwen3_5ForCausalLM``: the same names) or VLM-shaped
    (``Qwen3_5ForConditionalGeneration``: the text model under ``model.language_model.*``). The
    vision tower (``model.visual.*``) and the multi-token-prediction head (``mtp.*``) are not read."""

    VLM = "model.language_model."

    def __init__(self, reader):
        from workers.weights import WeightsError

        where = getattr(reader, "where", None)
        if where is None:
            raise WeightsError("Qwen3.5 / Qwen3-Next weights load from safetensors only")
        self.reader = reader
        self.vlm = any(n.startswith(self.VLM) for n in where)
        vision = sum(n.startswith("model.visual.") for n in where)
        mtp = sum(n.startswith("mtp.") for n in where)
        if vision or mtp:
            log.info("text model only: skipping %d vision tower and %d MTP tensors", vision, mtp)

    def _name(self, name: str) -> str:
        return self.VLM + name.removeprefix("model.") if self.vlm and name.startswith("model.") else name

    def storage(self, name: str) -> str:
        return self.reader.storage(self._name(name))

    def dense(self, name: str, shard):
        return self.reader.dense(self._name(name), shard)

    def q4(self, name: str, shard):
        return self.reader.q4(self._name(name), shard)

    def close(self) -> None:
        self.reader.close()


class HybridRunner:
    """Drive a hybrid model without a leader, for tests and benchmarks: a KV block table and a state
    slot per sequence id (fresh when a sequence is stepped at position 0), as the engine would."""

    def __init__(self, model: Qwen3_5Model, device: torch.device, num_blocks: int = 256, num_slots: int = 8):
        self.model, self.device = model, device
        layers, kv_heads, head_dim, dtype = model.kv_shape()
        self.cache = PagedKVCache(layers, kv_heads, head_dim, dtype, device, num_blocks)
        self.states = model.new_state_pool(num_slots, device)
        self.tables: dict[int, list[int]] = {}
        self.slots: dict[int, int] = {}
        self.free_blocks = list(range(num_blocks))

    def _slot(self, seq_id: int) -> int:
        if seq_id not in self.slots:
            free = sorted(set(range(self.states.num_slots)) - set(self.slots.values()))
            if not free:
                raise RuntimeError("HybridRunner: out of state slots")
            self.slots[seq_id] = free[0]
        return self.slots[seq_id]

    def _blocks(self, seq_id: int, positions: int) -> list[int]:
        table = self.tables.setdefault(seq_id, [])
        while len(table) * BLOCK_SIZE < positions:
            if not self.free_blocks:
                raise RuntimeError("HybridRunner: out of KV blocks")
            table.append(self.free_blocks.pop(0))
        return table

    def step(self, seq_id: int, tokens: list[int], start_pos: int, all_logits: bool = False) -> torch.Tensor:
        """Logits of the last token ([vocab]) or of every new token ([n, vocab])."""
        logits = self.step_many([(seq_id, tokens, start_pos)], all_logits)
        return logits if all_logits else logits[0]

    def step_many(self, seqs: list[tuple[int, list[int], int]], all_logits: bool = False) -> torch.Tensor:
        rows = [(tokens, start, self._blocks(seq_id, start + len(tokens))) for seq_id, tokens, start in seqs]
        batch = StepBatch.build(rows, BLOCK_SIZE, self.device)
        slots = [self._slot(seq_id) for seq_id, _, _ in seqs]
        state = StateBatch.build([len(t) for _, t, _ in seqs], slots, [start == 0 for _, _, start in seqs], self.device)
        return self.model(batch, self.cache, self.states, state, all_logits=all_logits)

    def fork(self, src: int, dst: int) -> None:
        """Sequence ``dst`` continues from where ``src`` is: its KV blocks and its state, copied."""
        table = self.tables[src]
        self.tables[dst] = []
        new = self._blocks(dst, len(table) * BLOCK_SIZE)
        for pool in (self.cache.k, self.cache.v):
            view = pool.view(pool.shape[0], -1, BLOCK_SIZE, *pool.shape[2:])
            view[:, new] = view[:, table]
        self.states.copy(self.slots[src], [self._slot(dst)])

    def release(self, seq_id: int) -> None:
        self.free_blocks += self.tables.pop(seq_id, [])
        self.slots.pop(seq_id, None)
