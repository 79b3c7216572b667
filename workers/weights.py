"""Fill a model's parameters from checkpoint files, reading only this rank's slice of each tensor.

safetensors: tensors are read through ``get_slice`` so no rank materialises a whole sharded weight.
GGUF: tensors are dequantized at load to the configured dtype; q/k rows are un-permuted because
llama.cpp's converter reorders them for its interleaved RoPE on Llama models.
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

from workers.gguf_file import GGUFFile, gguf_name
from workers.parallel import Shard

log = logging.getLogger("cortex.worker")

Progress = Callable[[int, int], None]


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
    param.copy_(value.to(param.dtype))


def _index(files: list[Path]) -> dict[str, Path]:
    """Tensor name -> file, from model.safetensors.index.json when present, else file headers."""
    from safetensors import safe_open

    index_files = [f for f in files if f.name.endswith(".index.json")]
    if index_files:
        weight_map = json.loads(index_files[0].read_text())["weight_map"]
        return {k: index_files[0].parent / v for k, v in weight_map.items()}
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():  # noqa: SIM118 (safe_open is not iterable)
                out[k] = f
    return out


def load_safetensors(model: nn.Module, files: list[Path], progress: Progress | None = None) -> None:
    from safetensors import safe_open

    where = _index(files)
    params = list(_params(model))
    handles: dict[Path, object] = {}
    try:
        for i, (name, p) in enumerate(params):
            f = where.get(name)
            if f is None:
                raise WeightsError(f"tensor {name!r} is missing from the checkpoint")
            h = handles.get(f) or handles.setdefault(f, safe_open(str(f), framework="pt", device="cpu"))
            sl = h.get_slice(name)
            shard: Shard | None = getattr(p, "shard", None)
            if shard is None:
                value = sl[:]
            else:
                idx = [slice(None)] * len(sl.get_shape())
                idx[shard.dim] = slice(shard.start, shard.start + shard.length)
                value = sl[tuple(idx)]
            _copy(name, p.data, value)
            if progress:
                progress(i + 1, len(params))
    finally:
        handles.clear()


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs back to rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(model: nn.Module, path: Path, progress: Progress | None = None) -> None:
    import gguf

    f = GGUFFile(path)
    cfg = model.cfg
    params = list(_params(model))
    for i, (name, p) in enumerate(params):
        t = f.tensors.get(gguf_name(name))
        if t is None:
            raise WeightsError(f"tensor {gguf_name(name)!r} ({name}) is missing from {path.name}")
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost first
        if cfg.arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = _unpermute(w, cfg.num_heads if "q_proj" in name else cfg.num_kv_heads)
        shard: Shard | None = getattr(p, "shard", None)
        if shard is not None and shard.length != w.shape[shard.dim]:
            w = np.take(w, range(shard.start, shard.start + shard.length), axis=shard.dim)
        _copy(name, p.data, torch.from_numpy(np.array(w, dtype=np.float32)))  # a writable copy
        if progress:
            progress(i + 1, len(params))


def load_weights(model: nn.Module, fmt: str, files: list[str], progress: Progress | None = None) -> float:
    """Load and return seconds taken."""
    t0 = time.monotonic()
    paths = [Path(f) for f in files]
    if fmt == "safetensors":
        load_safetensors(model, paths, progress)
    elif fmt == "gguf":
        load_gguf(model, paths[0], progress)
    else:
        raise WeightsError(f"unknown weights format {fmt!r}")
    return time.monotonic() - t0
