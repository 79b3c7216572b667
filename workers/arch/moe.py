"""Mixture-of-experts MLP (Qwen3-MoE, Qwen3-Next, Qwen3.5-MoE): a router and many SwiGLU experts,
each token computed by the few its router picks, plus (Qwen3-Next / 3.5) a shared expert every
token takes, scaled by a sigmoid gate.

Routing (as transformers' ``Qwen3MoeTopKRouter``): softmax over the router's logits in float32, the
``num_experts_per_tok`` largest probabilities, renormalised to sum to 1 when ``norm_topk_prob``
(always for Qwen3.5-MoE). Which layers have experts: ``ModelConfig.is_moe_layer`` (every
``decoder_sparse_step``-th layer not in ``mlp_only_layers``); the others keep a dense MLP.

Grouped compute (``grouped_experts``): the step's (token, expert) pairs are sorted by expert
(a stable sort, so each expert's tokens stay in batch order), ``bincount`` gives each expert's
run, and each *active* expert runs once over its contiguous run of gathered tokens: one
gate_up matmul, SwiGLU, one down matmul. Inactive experts cost nothing (the loop is over the
nonzero counts only, read back in one host sync). The routing weights scale the sorted rows in
one multiply and ``index_add_`` sums each token's experts back in one pass. A step of T tokens
with top-k costs about T*k rows of expert compute however many experts there are. Where torch has
a grouped matmul, it takes every expert's run in one call from the offsets (no host sync): on CUDA
(SM80+) always, where one launch per expert would dominate; on the CPU from ``GROUPED_MM_MIN_ROWS``
rows up, where it measured about 20% faster than the loop (128 experts, top-8, one thread: 0.9 vs
1.1 ms at 4 tokens, 4.6 vs 5.7 ms at 16), while the loop wins below (0.30 vs 0.43 ms at one token).
The loop remains the fallback wherever the grouped matmul refuses the inputs. One token on the CPU
(a one-sequence decode step) skips the grouping altogether (``_one_token``): its k experts one after
the other, from per-expert views of the stacked weights made once (``ExpertBank``), and the weighted
sum as one small matmul: about 3 ops per expert, where at one token the ops' dispatch, not the
arithmetic, is most of the time (the grouping costs ~12 fixed ops and ~7 per expert).

Packed experts on the native kernels (every expert's layers, under ``quantize``): the whole routed
compute of a step is one call into workers/kernels/moe.c (``Experts.forward``), which groups the
tokens by expert, runs each active expert's gathered rows through the same block products as the
loop above (so the same values per row), SwiGLU, and adds each token's k results with its routing
weights; its table of the experts' weights is built once. At one token the Python path's 3 calls
per expert (a few microseconds of dispatch each, more than the product at these sizes: 128
experts of 256 x 128 in bench/moe.py) were most of a decode step. The other paths remain for
float weights, other devices, and packed layers without native kernels. Qwen3-MoE's all-decode
steps go further: every layer, router included (``SparseMoeBlock.native_table``), in one call
(workers/arch/qwen3_moe.py, decode.c).

Tensor parallelism: every expert is split by its intermediate features, like a dense MLP; each
rank holds every expert's slice (``workers.sharding.ExpertLayout``), the shared expert is split
the same way, and the router and shared-expert gate are replicated (tiny: [experts, hidden] and
[1, hidden]), so every rank routes identically without talking. Neither down projection reduces
on its own: the block adds its routed and shared partial sums and all-reduces once. Chosen over
expert parallelism because it keeps every rank's work balanced whatever the router picks (expert
parallelism loads the ranks of popular experts and needs an all-to-all of tokens each layer), it
reuses the dense MLP's split and its one all-reduce, and the memory per rank is the same. It
needs ``moe_intermediate_size`` divisible by the ranks (768 or 512 in the Qwen models: up to 8
ranks, or more).

Weights: parameter names equal transformers 5's in-memory names (``mlp.gate.weight``,
``mlp.experts.gate_up_proj`` [experts, 2 * inter, hidden] with gate rows before up rows,
``mlp.experts.down_proj`` [experts, hidden, inter], ``mlp.shared_expert.{gate,up,down}_proj``,
``mlp.shared_expert_gate.weight``). Files come in two layouts and both load (each rank reading its
slices only): fused as above (Qwen3.5-MoE releases), or per expert
(``mlp.experts.{e}.{gate,up,down}_proj.weight``: what ``save_pretrained`` writes, converting back,
and what Qwen3-MoE / Qwen3-Next releases hold), and from GGUF files (workers/weights.py reads
llama.cpp's ``ffn_{gate,up,down}_exps`` under these names). Under ``quantize`` the routed experts
are packed like linear layers, one ``QuantLinear`` per expert and projection (``Experts.pack``): a
GGUF's Q4_0 / Q4_1 blocks kept as they are, its other quantized types int8, on the CPU where
"auto"; each runs on its expert's slice of the rows (the loop: the grouped matmul takes dense
stacks only). The shared expert's linears are packed like any other; the router and the
shared-expert gate stay dense.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from workers import native
from workers.arch.config import ModelConfig
from workers.parallel import ParallelLinear, TPGroup, fused
from workers.quant import Q4Blocks, QuantLinear
from workers.sharding import ExpertLayout, HeadLayout, Shard

log = logging.getLogger("cortex.worker")
_grouped_mm_failed = False  # set once torch's grouped matmul refused a step: the loop from then on
GROUPED_MM_MIN_ROWS = 32  # (token, expert) pairs from which the CPU takes the grouped matmul


class Replicated(nn.Module):
    """A small linear every rank holds whole and that always stays dense (router, shared-expert
    gate): quantizing a router would change which experts tokens go to."""

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.weight.shard = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of ``[rows, 2 * inter]`` (gate first); one native pass on the CPU."""
    kernels = native.for_tensor(gate_up)
    if kernels is not None:
        return kernels.swiglu(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class SharedExpert(nn.Module):
    """A SwiGLU MLP split by intermediate features whose down projection does not all-reduce: the
    MoE block adds it to the routed experts' partial sum and reduces once."""

    def __init__(self, hidden: int, layout: ExpertLayout, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        inter, start = layout.shared_inter, layout.shared_start
        self.gate_up_proj = fused(hidden, [("gate_proj", inter, start), ("up_proj", inter, start)], tp, dtype)
        self.down_proj = ParallelLinear(inter, hidden, Shard(1, start, inter), tp, reduce=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_up_proj(x)))


class Experts(nn.Module):
    """Every routed expert's slice of the intermediate features, stacked: ``gate_up_proj``
    [experts, 2 * inter, hidden] (this rank's gate rows, then its up rows) and ``down_proj``
    [experts, hidden, inter]. Each parameter's ``loader`` reads it from either file layout; its
    ``packer`` (under ``quantize``, see ``pack``) may replace it by one packed layer per expert."""

    def __init__(self, cfg: ModelConfig, layout: ExpertLayout, dtype: torch.dtype):
        super().__init__()
        n, h, i = cfg.num_experts, cfg.hidden_size, layout.inter
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * i, h, dtype=dtype), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(n, h, i, dtype=dtype), requires_grad=False)
        whole, start = cfg.moe_intermediate_size, layout.inter_start
        self.gate_up_proj.shard = self.down_proj.shard = None
        self.gate_up_proj.loader = lambda reader, name: _read_gate_up(reader, name, n, whole, start, i)
        self.down_proj.loader = lambda reader, name: _read_down(reader, name, n, start, i)
        self.gate_up_proj.packer = lambda reader, name, mode: self.pack("gate_up_proj", reader, name, mode)
        self.down_proj.packer = lambda reader, name, mode: self.pack("down_proj", reader, name, mode)
        self.whole, self.start, self.inter, self.hidden = whole, start, i, h
        # one packed layer per expert (workers/quant.py) where ``pack`` replaced a stacked weight
        self.gate_up_q: nn.ModuleList | None = None
        self.down_q: nn.ModuleList | None = None
        # (data pointers, per-expert views of the stacked weights, the native kernels' table or None)
        self._views: tuple | None = None

    native_experts = True  # tests turn it off to compare moe.c with the per-expert path

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        banks, table = self._banks()
        kernels = native.for_tensor(x) if table is not None and self.native_experts else None
        if kernels is not None:  # every expert packed for the native kernels: the step in one call
            return kernels.moe_experts(x, experts, weights, table)
        return grouped_experts(x, experts, weights, *banks)

    def native_table(self) -> native.Moe | None:
        """moe.c's table of the experts' packed weights (built once), or None where they are not
        all packed for the native kernels."""
        return self._banks()[1]

    def _banks(self) -> tuple:
        """(each projection as grouped_experts takes it, moe.c's table or None): the stacked tensor,
        or the packed layers; the stacked ones with a list of per-expert views made once (indexing
        costs an op per expert)."""
        gate_up = self.gate_up_q if self.gate_up_q is not None else self.gate_up_proj
        down = self.down_q if self.down_q is not None else self.down_proj
        ptrs = tuple(b.data_ptr() if isinstance(b, torch.Tensor) else id(b) for b in (gate_up, down))
        if self._views is None or self._views[0] != ptrs:  # rebuilt after a move to another device
            views = [ExpertBank(b) for b in (gate_up, down)]
            table = native.moe_table(gate_up, down) if all(v.direct is not None for v in views) else None
            self._views = (ptrs, views, table)
        return tuple(self._views[1]), self._views[2]

    def pack(self, which: str, reader, name: str, mode: str) -> str | None:
        """Replace stacked weight ``which`` by one packed layer per expert, as workers/weights.py packs
        a linear layer under ``mode`` ("file": a GGUF's Q4_0/Q4_1 blocks kept as they are, other
        quantized types int8, float tensors stay dense; "int8"; "int4"); the packed kind, or None
        where it stays dense. The router and the shared-expert gate never get here."""
        from workers.weights import WeightsError, plan_packing

        try:
            storage = reader.storage(name)
        except WeightsError:  # per-expert tensors (safetensors): their own types
            storage = "F32"
        gate_up = which == "gate_up_proj"
        shape = (2 * self.inter, self.hidden) if gate_up else (self.hidden, self.inter)  # each expert's
        kind = plan_packing(mode, [storage], *shape)
        if kind is None:
            return None
        layers = None
        if kind == "int4" and mode == "file":
            if gate_up:
                halves = [
                    _q4_experts(reader, name, Shard(1, s, self.inter)) for s in (self.start, self.whole + self.start)
                ]
                blocks = None if None in halves else [Q4Blocks.cat(list(p)) for p in zip(*halves, strict=True)]
            else:
                blocks = _q4_experts(reader, name, Shard(2, self.start, self.inter))
            if blocks is not None:
                layers = [QuantLinear.int4(b) for b in blocks]
        if layers is None:
            dense = getattr(self, which).loader(reader, name).float()
            if kind == "int4":
                layers = [QuantLinear.int4(Q4Blocks.quantize(w)) for w in dense]
            else:
                layers = [QuantLinear.int8(w) for w in dense]
        got = (len(layers), layers[0].out_features, layers[0].in_features)
        if got != tuple(getattr(self, which).shape):
            raise WeightsError(f"{name}: checkpoint experts {got} do not fit {tuple(getattr(self, which).shape)}")
        setattr(self, which, None)  # the dense stack is dropped: only the packed layers stay resident
        setattr(self, which.replace("_proj", "_q"), nn.ModuleList(layers))
        return kind


class ExpertBank:
    """One projection of every expert, as the expert compute takes it: ``layer(e, rows)`` is rows
    times expert e's weight (transposed), from a stacked tensor (``stacked``: the grouped matmul may
    take it whole) or a list of packed layers."""

    def __init__(self, weights):
        self.stacked = weights if isinstance(weights, torch.Tensor) else None
        self.experts = list(weights.unbind(0)) if self.stacked is not None else list(weights)
        # packed layers with native kernels: the kernel called directly on float32 rows (the layer's
        # forward adds reshapes and checks, a few us each, 16 times a layer at one token)
        self.direct = None
        first = None if self.stacked is not None else self.experts[0]
        if first is not None and first.impl == "native" and first.bias is None and not first.reduce:
            fn = first.kernels.q4_matmul if first.kind == "int4" else first.kernels.q8_matmul
            self.direct = [(fn, q.packed, q.scales) for q in self.experts]

    def __call__(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        if self.stacked is not None:
            return F.linear(rows, self.experts[e])
        if self.direct is not None and rows.dtype == torch.float32:
            fn, packed, scales = self.direct[e]
            return fn(rows, packed, scales)
        return self.experts[e](rows)


def grouped_experts(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up, down) -> torch.Tensor:
    """``sum_j weights[t, j] * expert_{experts[t, j]}(x[t])`` for every token t of ``x`` [T, hidden],
    each active expert run once over its gathered tokens (see the module docstring). ``gate_up``
    and ``down``: stacked tensors [experts, out, in], or ``ExpertBank``s."""
    gate_up, down = (b if isinstance(b, ExpertBank) else ExpertBank(b) for b in (gate_up, down))
    if x.shape[0] == 1 and x.device.type == "cpu":
        return _one_token(x, experts, weights, gate_up, down)
    k = experts.shape[1]
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)  # (token, choice) pairs grouped by expert
    tokens = order // k
    counts = torch.bincount(flat, minlength=len(gate_up.experts))
    rows = x.index_select(0, tokens)
    out = None
    if gate_up.stacked is not None and down.stacked is not None and _use_grouped_mm(rows):
        out = _grouped_mm(rows, counts, gate_up.stacked, down.stacked)
    if out is None:
        out = _expert_loop(rows, counts, gate_up, down)
    out *= weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, tokens, out)


def _one_token(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up, down) -> torch.Tensor:
    """One token (a decode step of one sequence): its k experts one after the other, no sort and no
    gather; the weighted sum as one [1, k] x [k, hidden] product. About 4 ops per expert instead of
    the grouping's ~15 fixed ops plus ~7 per expert: at one token the ops' dispatch, not the
    arithmetic, is most of the time."""
    ys = [down(e, swiglu(gate_up(e, x))) for e in experts.view(-1).tolist()]
    return torch.mm(weights.view(1, -1).to(x.dtype), torch.cat(ys))


def _expert_loop(rows: torch.Tensor, counts: torch.Tensor, gate_up, down) -> torch.Tensor:
    """Each active expert over its contiguous run of ``rows`` (sorted by expert)."""
    active = counts.nonzero().flatten()
    ids, sizes = torch.stack((active, counts[active])).tolist()  # the step's one host sync
    out = torch.empty_like(rows)
    start = 0
    for expert, n in zip(ids, sizes, strict=True):
        end = start + n
        out[start:end] = down(expert, swiglu(gate_up(expert, rows[start:end])))
        start = end
    return out


def _grouped_mm_fn():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _use_grouped_mm(rows: torch.Tensor) -> bool:
    if _grouped_mm_failed or _grouped_mm_fn() is None:
        return False
    if rows.device.type == "cuda":
        return torch.cuda.get_device_capability(rows.device) >= (8, 0)
    return rows.device.type == "cpu" and rows.shape[0] >= GROUPED_MM_MIN_ROWS


def _grouped_mm(
    rows: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor | None:
    """The same as ``_expert_loop`` in two grouped matmuls (no host sync), or None where torch's
    grouped matmul refuses these inputs (dtype, alignment): the caller loops instead."""
    global _grouped_mm_failed
    mm, offs = _grouped_mm_fn(), counts.cumsum(0, dtype=torch.int32)
    try:
        return mm(swiglu(mm(rows, gate_up.transpose(1, 2), offs=offs)), down.transpose(1, 2), offs=offs)
    except (RuntimeError, NotImplementedError) as exc:
        _grouped_mm_failed = True
        log.warning("grouped matmul unavailable (%s): experts run one by one", exc)
        return None


class SparseMoeBlock(nn.Module):
    """Router, routed experts and (when the model has one) the gated shared expert: one rank's
    partial sum of each, added, then one all-reduce."""

    def __init__(self, cfg: ModelConfig, layout: ExpertLayout, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.top_k, self.norm_topk, self.tp = cfg.num_experts_per_tok, cfg.norm_topk_prob, tp
        self.gate = Replicated(cfg.num_experts, cfg.hidden_size, dtype)
        self.experts = Experts(cfg, layout, dtype)
        self.shared_expert = self.shared_expert_gate = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = SharedExpert(cfg.hidden_size, layout, tp, dtype)
            self.shared_expert_gate = Replicated(1, cfg.hidden_size, dtype)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, experts), [T, top_k] each: softmax over the router logits in float32, top-k,
        renormalised when ``norm_topk_prob``; the weights in the activations' dtype. Renormalised,
        the weights are the softmax of the top-k logits alone (the full softmax's denominator
        cancels): top-k first, then a softmax over k values, one op less on the decode path."""
        logits = self.gate(x).float()
        if self.norm_topk:
            top, experts = torch.topk(logits, self.top_k, dim=-1)
            return F.softmax(top, dim=-1).to(x.dtype), experts
        weights, experts = torch.topk(F.softmax(logits, dim=-1), self.top_k, dim=-1)
        return weights.to(x.dtype), experts

    def native_table(self) -> native.Moe | None:
        """decode.c's table of this block: the router, ``top_k``, ``norm_topk`` and the experts'
        packed weights; None where it cannot run there (a shared expert, a router not float32 on
        the CPU, experts not all packed for the native kernels)."""
        router, experts = self.gate.weight.data, self.experts
        if self.shared_expert is not None or experts.native_table() is None:
            return None
        if router.dtype != torch.float32 or router.device.type != "cpu" or not router.is_contiguous():
            return None
        return native.moe_table(experts.gate_up_q, experts.down_q, router, self.top_k, self.norm_topk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        out = self.experts(x, experts, weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return self.tp.all_reduce(out)


def layer_mlp(cfg: ModelConfig, index: int, layout: HeadLayout, tp: TPGroup, dtype: torch.dtype) -> nn.Module:
    """Layer ``index``'s MLP: a SparseMoeBlock where ``cfg.is_moe_layer(index)``, else the dense
    SwiGLU MLP of workers/arch/llama.py."""
    if cfg.is_moe_layer(index):
        return SparseMoeBlock(cfg, ExpertLayout.for_rank(cfg, tp.rank, tp.world_size), tp, dtype)
    from workers.arch.llama import MLP

    return MLP(cfg, layout, tp, dtype)


# -- reading expert weights: fused [experts, ...] tensors, or one tensor per expert ------------------


def _read_gate_up(reader, name: str, experts: int, whole: int, start: int, n: int) -> torch.Tensor:
    """[experts, 2n, hidden]: rows [start, start + n) of each expert's gate, then of its up."""

    def fused() -> torch.Tensor:
        gate = reader.dense(name, Shard(1, start, n))
        return torch.cat((gate, reader.dense(name, Shard(1, whole + start, n))), dim=1)

    def per_expert() -> torch.Tensor:
        prefix = name.rsplit(".", 1)[0]
        parts = [
            torch.cat([reader.dense(f"{prefix}.{e}.{p}.weight", Shard(0, start, n)) for p in ("gate_proj", "up_proj")])
            for e in range(experts)
        ]
        return torch.stack(parts)

    return _either(name, fused, per_expert)


def _read_down(reader, name: str, experts: int, start: int, n: int) -> torch.Tensor:
    """[experts, hidden, n]: columns [start, start + n) of each expert's down projection."""
    prefix = name.rsplit(".", 1)[0]
    return _either(
        name,
        lambda: reader.dense(name, Shard(2, start, n)),
        lambda: torch.stack(
            [reader.dense(f"{prefix}.{e}.down_proj.weight", Shard(1, start, n)) for e in range(experts)]
        ),
    )


def _either(name: str, fused, per_expert) -> torch.Tensor:
    """The fused tensor if the file has it, else the per-expert ones; neither: an error naming both."""
    from workers.weights import WeightsError

    try:
        return fused()
    except WeightsError as missing:
        try:
            return per_expert()
        except WeightsError as also_missing:
            raise WeightsError(f"{name}: neither fused ({missing}) nor per expert ({also_missing})") from None


def _q4_experts(reader, name: str, shard: Shard):
    """The GGUF reader's per-expert 4-bit blocks (``GGUFReader.q4_experts``), or None. The hybrid
    models' name adapter (``CheckpointNames`` in workers/arch/qwen3_5.py) passes dense and q4 reads
    only: it is looked through, with its name mapping."""
    inner = getattr(reader, "reader", None)
    if inner is not None and hasattr(reader, "_name"):
        reader, name = inner, reader._name(name)
    fn = getattr(reader, "q4_experts", None)
    return None if fn is None else fn(name, shard)
