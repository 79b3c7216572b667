"""Fill a model's parameters from checkpoint files, reading only this rank's slice of each tensor.

safetensors: tensors are read through ``get_slice`` so no rank materialises a whole sharded weight.
GGUF: tensors are dequantized at load (to float32, one at a time); q/k rows are un-permuted because
llama.cpp's converter reorders them for its interleaved RoPE on Llama models.

Parameters are allocated on the model's device before loading (uninitialised) and filled one
checkpoint slice at a time: each slice is read on the host in its stored dtype (from safetensors, a
view of the mapped file), moved to the parameter's device and converted there (``_to_device``), so
the host never holds a copy of the model, nor a converted copy of any tensor. Fused layers
(``weight.parts``) are filled part by part, each into its rows of the fused parameter (no
concatenated copy on the host). A parameter with a ``loader`` reads its own sources (the stacked
expert weights of workers/arch/moe.py, assembled on the host one layer at a time: fused or
per-expert in the file; in a GGUF file llama.cpp's 3-D ``ffn_{gate,up,down}_exps``). With
``quantize`` (see ``QUANTIZE``) linear layers are then replaced by packed ``QuantLinear`` layers
(workers/quant.py): from a GGUF file's own Q4_0/Q4_1 blocks (4-bit values kept as they are), or by
quantizing the loaded weights; a parameter with a ``packer`` (the stacked experts) packs itself the
same way, one packed layer per expert.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from workers.gguf_file import EXPERT_PARTS, HYBRID_ARCHS, GGUFFile, gguf_name
from workers.parallel import ParallelLinear, Shard
from workers.quant import GROUP, Q4Blocks, QuantLinear, best_impl, int4_fits

log = logging.getLogger("cortex.worker")

Progress = Callable[[int, int], None]

# "auto": a GGUF file's quantized weights stay packed on the CPU ("file"), everything else "none";
# "none": dense weights in the model's dtype; "file": Q4_0/Q4_1 -> int4 (exact 4-bit values), other
# quantized types -> int8, float tensors dense; "int8": every linear and the lm_head int8 per row;
# "int4": linears int4 in groups of 32 (int8 where the shape does not allow it), lm_head int8.
QUANTIZE = ("auto", "none", "int8", "int4")
_Q4 = ("Q4_0", "Q4_1")
_FLOAT = ("F32", "F16", "BF16", "F64")


class WeightsError(ValueError):
    """Checkpoint files that do not match the model (missing tensor, wrong shape, unreadable file)."""


def _params(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, p in model.named_parameters():
        if name == "lm_head.weight" and model.lm_head is None:
            continue
        yield name, p


def _copy(name: str, param: torch.Tensor, value: torch.Tensor) -> None:
    if tuple(value.shape) != tuple(param.shape):
        raise WeightsError(f"{name}: checkpoint shape {tuple(value.shape)} does not fit {tuple(param.shape)}")
    param.copy_(_to_device(value, param.device))  # the dtype is converted on the device


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One checkpoint slice, read on the host, on ``device`` in its stored dtype. Converting there
    (by the caller's ``copy_``) keeps the host to one memcpy per slice: no converted host copy, and
    a bfloat16 file crosses the bus at 2 bytes per value."""
    return host.to(device)


def _fill_dense(name: str, param: torch.Tensor, reader, sources: list[tuple[str, Shard | None]]) -> None:
    """A dense parameter from its checkpoint slices; a fused one's parts each into its own rows."""
    if len(sources) == 1:
        _copy(name, param, reader.dense(*sources[0]))
        return
    row = 0
    for part, shard in sources:
        value = reader.dense(part, shard)
        rows = value.shape[0]
        if row + rows > param.shape[0]:
            raise WeightsError(f"{name}: its parts have more than the {param.shape[0]} rows it holds")
        _copy(part, param.narrow(0, row, rows), value)
        row += rows
    if row != param.shape[0]:
        raise WeightsError(f"{name}: its parts fill {row} of its {param.shape[0]} rows")


def _index(files: list[Path]) -> dict[str, Path]:
    """Tensor name -> file, from model.safetensors.index.json when present, else file headers."""

    index_files = [f for f in files if f.name.endswith(".index.json")]
    if index_files:
        weight_map = json.loads(index_files[0].read_text())["weight_map"]
        return {k: index_files[0].parent / v for k, v in weight_map.items()}
    out = {}
    for f in files:
        with _open(f) as h:
            for k in h.keys():  # noqa: SIM118 (safe_open is not iterable)
                out[k] = f
    return out


def _open(f: Path):
    """A safetensors file, or a WeightsError naming the file and what is wrong with it (a cut-short
    download, a file that is not safetensors): the operator must be able to find it."""
    from safetensors import safe_open

    try:
        return safe_open(str(f), framework="pt", device="cpu")
    except Exception as exc:
        raise WeightsError(f"{f}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None


class SafetensorsReader:
    """Tensors of safetensors files, each rank reading only its slice."""

    def __init__(self, files: list[Path]):
        self.where = _index(files)
        self.handles: dict[Path, object] = {}

    def _slice(self, name: str):
        f = self.where.get(name)
        if f is None:
            raise WeightsError(f"tensor {name!r} is missing from the checkpoint")
        h = self.handles.get(f) or self.handles.setdefault(f, _open(f))
        return h.get_slice(name)

    def storage(self, name: str) -> str:
        return str(self._slice(name).get_dtype())

    def dense(self, name: str, shard: Shard | None) -> torch.Tensor:
        sl = self._slice(name)
        if shard is None:
            return sl[:]
        idx = [slice(None)] * len(sl.get_shape())
        idx[shard.dim] = slice(shard.start, shard.start + shard.length)
        return sl[tuple(idx)]

    def q4(self, name: str, shard: Shard | None) -> Q4Blocks | None:
        return None

    def close(self) -> None:
        self.handles.clear()


class GGUFReader:
    """Tensors of a GGUF file by Hugging Face name: dequantized, or as Q4 blocks where stored so."""

    def __init__(self, path: Path, cfg):
        self.file, self.path, self.cfg = GGUFFile(path), path, cfg
        self.hybrid = HybridLayout(cfg) if cfg.arch in HYBRID_ARCHS else None
        # tensor name -> file, as SafetensorsReader has: the hybrid model's name adapter
        # (CheckpointNames in workers/arch/qwen3_5.py) looks there for VLM / vision / MTP names
        self.where = dict.fromkeys(self.file.tensors, path)
        # the last tensor read, whole: a fused layer reads its parts one after the other, and
        # Qwen3-Next's in_proj_qkvz is read in 4 pieces per key head; the stacked experts are read
        # in two row ranges (gate, up) of each expert
        self._last: tuple[str, np.ndarray] | None = None
        self._last_q: tuple[str, list[Q4Blocks]] | None = None

    def _tensor(self, name: str):
        if name.endswith("in_proj_qkvz.weight"):  # Qwen3-Next: stored split, see HybridLayout.qkvz
            name = name.replace("in_proj_qkvz", "in_proj_qkv")
        try:
            stored = gguf_name(name, self.cfg.arch)
        except KeyError:
            raise WeightsError(f"{name}: no such tensor in a GGUF file of {self.cfg.arch}") from None
        t = self.file.tensors.get(stored)
        if t is None:
            raise WeightsError(f"tensor {stored!r} ({name}) is missing from {self.path.name}")
        return t

    def _parts(self, name: str) -> list[str]:
        """The stored tensors a parameter is read from: itself, or for the stacked experts'
        gate_up_proj the converter's gate and up tensors (one merged tensor where the file has it)."""
        if not name.endswith("mlp.experts.gate_up_proj") or gguf_name(name, self.cfg.arch) in self.file.tensors:
            return [name]
        prefix = name.removesuffix("mlp.experts.gate_up_proj")
        return [prefix + part for part in EXPERT_PARTS]

    def storage(self, name: str) -> str:
        kinds = {self._tensor(part).tensor_type.name for part in self._parts(name)}
        return kinds.pop() if len(kinds) == 1 else "mixed: " + ", ".join(sorted(kinds))

    def _unpermute(self, name: str, w: np.ndarray) -> np.ndarray:
        if self.cfg.arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            return _unpermute(w, self.cfg.num_heads if "q_proj" in name else self.cfg.num_kv_heads)
        return w

    def _stored(self, name: str) -> np.ndarray:
        import gguf

        t = self._tensor(name)
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        return w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost first

    def _array(self, name: str) -> np.ndarray:
        """The whole tensor in the Hugging Face checkpoint's layout."""
        if self._last is None or self._last[0] != name:
            self._last = None  # freed before the next one is made
            self._last = (name, self._convert(name))
        return self._last[1]

    def _convert(self, name: str) -> np.ndarray:
        parts = self._parts(name)
        if len(parts) > 1:  # experts' [gate | up] rows, as our stacked gate_up_proj has them
            return np.concatenate([self._stored(part) for part in parts], axis=1)
        if name.endswith("shared_expert_gate.weight"):
            return self._stored(name).reshape(1, -1)  # [1, hidden], however many dims were written
        if self.hybrid is None:
            return self._unpermute(name, self._stored(name))
        if name.endswith("in_proj_qkvz.weight"):
            z = self._stored(name.replace("in_proj_qkvz", "in_proj_z"))
            return self.hybrid.qkvz(self._stored(name), z)
        return self.hybrid.to_hf(name, self._stored(name))

    def dense(self, name: str, shard: Shard | None) -> torch.Tensor:
        w = self._array(name)
        if shard is not None and shard.length != w.shape[shard.dim]:
            w = np.take(w, range(shard.start, shard.start + shard.length), axis=shard.dim)
        return torch.from_numpy(np.array(w, dtype=np.float32))  # a writable copy

    def q4(self, name: str, shard: Shard | None) -> Q4Blocks | None:
        """The tensor's own 4-bit blocks (this rank's slice), or None if it is not Q4_0/Q4_1 or the
        slice cuts through blocks."""
        if self.hybrid is not None and "linear_attn." in name:
            return None  # re-laid out by the converter: quantized again from the dense values
        t = self._tensor(name)
        if t.tensor_type.name not in _Q4 or len(t.shape) != 2:
            return None
        cols, rows = (int(d) for d in t.shape)
        b = self._unpermute(name, np.asarray(t.data).reshape(rows, -1))  # whole rows move: blocks stay intact
        b = Q4Blocks.from_gguf(b, t.tensor_type.name, rows, cols)
        if shard is None or shard.length == b.shape[shard.dim]:
            return b
        if shard.dim == 0:
            return b.rows(shard.start, shard.length)
        if shard.start % GROUP or shard.length % GROUP:
            return None
        return b.cols(shard.start, shard.length)

    def q4_experts(self, name: str, shard: Shard) -> list[Q4Blocks] | None:
        """Each expert's own 4-bit blocks of the stacked tensor ``name`` ([experts, rows, cols];
        gate_up_proj: gate rows, then up rows), this rank's slice along ``shard.dim`` (1: rows, 2:
        columns); None if it is not stored Q4_0/Q4_1 or the slice cuts through blocks."""
        tensors = [self._tensor(part) for part in self._parts(name)]
        if any(t.tensor_type.name not in _Q4 or len(t.shape) != 3 for t in tensors):
            return None
        if shard.dim == 2 and (shard.start % GROUP or shard.length % GROUP):
            return None
        if self._last_q is None or self._last_q[0] != name:
            self._last_q = None
            self._last_q = (name, self._expert_blocks(tensors))
        whole = self._last_q[1]
        if shard.length == whole[0].shape[shard.dim - 1]:
            return whole
        if shard.dim == 1:
            return [b.rows(shard.start, shard.length) for b in whole]
        return [b.cols(shard.start, shard.length) for b in whole]

    @staticmethod
    def _expert_blocks(tensors) -> list[Q4Blocks]:
        per_part = []
        for t in tensors:
            cols, rows, experts = (int(d) for d in t.shape)
            raw = np.asarray(t.data).reshape(experts, rows, -1)  # whole rows of each expert
            per_part.append([Q4Blocks.from_gguf(raw[e], t.tensor_type.name, rows, cols) for e in range(experts)])
        return [Q4Blocks.cat(list(blocks)) for blocks in zip(*per_part, strict=True)]

    def close(self) -> None:
        self._last = self._last_q = None


class HybridLayout:
    """Undo what llama.cpp's converter does to Qwen3.5 / Qwen3-Next tensors (convert_hf_to_gguf.py at
    ggml-org/llama.cpp 0024aa74: ``Qwen3NextModel.modify_tensors``, and for Qwen3.5 first
    ``_LinearAttentionVReorderBase.modify_tensors``):

    - zero-centred norms (all but ``linear_attn.norm``) are stored as ``1 + w``;
    - ``A_log`` is stored as ``-exp(A_log)`` (``ssm_a``), the conv weight squeezed to [channels, kernel];
    - Qwen3-Next: ``in_proj_qkvz`` (per key head ``[q | k | v group | z group]``) is stored as
      ``attn_qkv`` = [all q | all k | all v] and ``attn_gate`` = all z (see ``qkvz``);
    - Qwen3.5 with more value heads than key heads: every value-head axis (v rows of ``in_proj_qkv``
      and of the conv, ``in_proj_z/a/b`` rows, ``A_log``, ``dt_bias``, ``out_proj`` columns) is
      reordered from grouped by key head (k0v0 k0v1 k1v0 k1v1) to tiled (k0v0 k1v0 k0v1 k1v1), the
      order ggml's broadcast wants; our DeltaNet reads the grouped order."""

    def __init__(self, cfg):
        self.k_heads, self.v_heads = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.key_dim = self.k_heads * self.dk
        self.tiled = cfg.arch == "qwen3_5" and self.k_heads != self.v_heads

    def to_hf(self, name: str, w: np.ndarray) -> np.ndarray:
        if name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
            return w - 1
        if name.endswith("A_log"):
            w = np.log(-w)
        if self.tiled and "linear_attn." in name:
            w = self._untile(name, w)
        if name.endswith("conv1d.weight"):
            w = w[:, None, :]  # [channels, 1, kernel] as the checkpoint has it
        return w

    def _untile(self, name: str, w: np.ndarray) -> np.ndarray:
        leaf = name.rsplit(".", 2)[-2] if name.endswith(".weight") else name.rsplit(".", 1)[-1]
        if leaf in ("in_proj_qkv", "conv1d"):  # only the v rows (channels) after q and k
            qk = 2 * self.key_dim
            return np.concatenate((w[:qk], self._grouped(w[qk:], 0, self.dv)))
        if leaf == "in_proj_z":
            return self._grouped(w, 0, self.dv)
        if leaf == "out_proj":
            return self._grouped(w, 1, self.dv)
        if leaf in ("in_proj_a", "in_proj_b", "A_log", "dt_bias"):
            return self._grouped(w, 0, 1)
        return w  # norm: one weight shared by every head

    def _grouped(self, w: np.ndarray, axis: int, head_dim: int) -> np.ndarray:
        """Value heads along ``axis`` from tiled [per-group index, key head] back to grouped order."""
        shape = w.shape
        r = self.v_heads // self.k_heads
        tiled = w.reshape(*shape[:axis], r, self.k_heads, head_dim, *shape[axis + 1 :])
        return tiled.swapaxes(axis, axis + 1).reshape(shape)

    def qkvz(self, qkv: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Qwen3-Next's ``in_proj_qkvz`` from the converter's ``attn_qkv`` and ``attn_gate``: for each
        key head, its q, its k, then the v and the z of the value heads it serves."""
        hidden = qkv.shape[1]
        q, k, v = np.split(qkv, (self.key_dim, 2 * self.key_dim))
        per_head = [x.reshape(self.k_heads, -1, hidden) for x in (q, k, v, z)]
        return np.concatenate(per_head, axis=1).reshape(-1, hidden)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs back to rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _sources(name: str, p: torch.Tensor) -> list[tuple[str, Shard | None]]:
    """The checkpoint tensors (name, this rank's slice) that make up parameter ``name``."""
    parts = getattr(p, "parts", None)
    if parts is None:
        return [(name, getattr(p, "shard", None))]
    module, leaf = name.rsplit(".", 2)[0], name.rsplit(".", 1)[1]  # "model.layers.0.self_attn", "weight"
    return [(f"{module}.{part}.{leaf}", shard) for part, shard in parts]


def _dense(reader, sources: list[tuple[str, Shard | None]]) -> torch.Tensor:
    values = [reader.dense(n, s) for n, s in sources]
    return values[0] if len(values) == 1 else torch.cat(values)


def plan_packing(mode: str, storage: list[str], out_f: int, in_f: int, head: bool = False) -> str | None:
    """Which packed kind a linear layer gets: "int4", "int8", or None (stays dense)."""
    if mode == "none":
        return None
    if mode == "file":
        if any(s in _FLOAT for s in storage):
            return None
        return "int4" if all(s in _Q4 for s in storage) and int4_fits(out_f, in_f) else "int8"
    if mode == "int4" and not head and int4_fits(out_f, in_f):
        return "int4"
    return "int8"


def _pack(reader, kind: str, sources, dense: torch.Tensor | None = None, **kw) -> QuantLinear:
    if kind == "int4":
        blocks = [reader.q4(n, s) for n, s in sources]
        if all(b is not None for b in blocks):
            return QuantLinear.int4(Q4Blocks.cat(blocks), **kw)
        return QuantLinear.int4(Q4Blocks.quantize(dense if dense is not None else _dense(reader, sources)), **kw)
    return QuantLinear.int8(dense if dense is not None else _dense(reader, sources), **kw)


def resolve_quantize(mode: str, fmt: str, device: str) -> str:
    """The effective mode ("none", "file", "int8", "int4") for a model on a device type."""
    if mode not in QUANTIZE:
        raise WeightsError(f"quantize = {mode!r}: expected one of {', '.join(QUANTIZE)}")
    if mode == "auto":
        return "file" if fmt == "gguf" and device == "cpu" else "none"
    if mode != "none" and device != "cpu":
        raise WeightsError(f"quantize = {mode!r} runs on the CPU only (this model is placed on {device})")
    return mode


def _fill(model: nn.Module, reader, mode: str, progress: Progress | None) -> dict[str, int]:
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (ParallelLinear, nn.Linear))}
    params = list(_params(model))
    packed: dict[str, QuantLinear] = {}
    counts: dict[str, int] = {}
    for i, (name, p) in enumerate(params):
        sources = _sources(name, p)
        module_name, leaf = name.rsplit(".", 1)
        layer = linears.get(module_name)
        kind = None
        if layer is not None and leaf == "weight":
            storage = [reader.storage(n) for n, _ in sources]
            kind = plan_packing(mode, storage, p.shape[0], p.shape[1], head=module_name == "lm_head")
        if getattr(p, "loader", None) is not None:  # its own reading (stacked experts, workers/arch/moe.py)
            packer = getattr(p, "packer", None)  # packed per expert, as linears are under ``mode``
            kind = packer(reader, name, mode) if packer is not None and mode != "none" else None
            if kind is None:
                _copy(name, p.data, p.loader(reader, name))
            else:
                label = f"{kind} experts ({best_impl()} kernels)"
                counts[label] = counts.get(label, 0) + 1
        elif kind is None:
            _fill_dense(name, p.data, reader, sources)
        else:
            q = _pack(reader, kind, sources, reduce=getattr(layer, "reduce", False), tp=getattr(layer, "tp", None))
            if (q.out_features, q.in_features) != tuple(p.shape):
                raise WeightsError(
                    f"{name}: checkpoint shape {(q.out_features, q.in_features)} does not fit {tuple(p.shape)}"
                )
            q.parts, q.sizes = getattr(layer, "parts", None), getattr(layer, "sizes", None)  # fused: kept
            packed[module_name] = q
        if progress:
            progress(i + 1, len(params))
    for module_name, q in packed.items():  # swap in, with the dense layer's (already loaded) bias
        layer = linears[module_name]
        if layer.bias is not None:
            q.bias = nn.Parameter(layer.bias.data, requires_grad=False)
        parent, _, attr = module_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, q)
    if getattr(model, "lm_head", 0) is None:  # tied: a packed copy of the embedding as the head
        embed = model.model.embed_tokens.weight
        sources = [("model.embed_tokens.weight", None)]
        kind = plan_packing(mode, [reader.storage(sources[0][0])], *embed.shape, head=True)
        if kind is not None:
            model.lm_head = _pack(reader, kind, sources, dense=embed.data)
            packed["lm_head"] = model.lm_head
    for q in packed.values():
        label = f"{q.kind} ({q.impl} kernels)"
        counts[label] = counts.get(label, 0) + 1
    return counts


def load_weights(
    model: nn.Module,
    fmt: str,
    files: list[str],
    progress: Progress | None = None,
    quantize: str = "none",
    device: str = "cpu",
) -> float:
    """Load and return seconds taken. ``quantize``: one of ``QUANTIZE``; ``device``: the device type
    the model runs on (packed kernels exist for the CPU only)."""
    t0 = time.monotonic()
    mode = resolve_quantize(quantize, fmt, device)
    paths = [Path(f) for f in files]
    if fmt == "safetensors":
        reader = SafetensorsReader(paths)
    elif fmt == "gguf":
        reader = GGUFReader(paths[0], model.cfg)
    else:
        raise WeightsError(f"unknown weights format {fmt!r}")
    try:
        reader = getattr(model, "adapt_reader", lambda r: r)(reader)  # its own checkpoint names (Qwen3.5)
        counts = _fill(model, reader, mode, progress)
    finally:
        reader.close()
    if counts:
        log.info("packed linear layers (quantize = %s): %s", quantize, ", ".join(f"{n} {k}" for k, n in counts.items()))
    return time.monotonic() - t0
