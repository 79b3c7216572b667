"""Qwen3-MoE (``qwen3_moe``, e.g. Qwen3-30B-A3B): Qwen3's decoder (workers/arch/llama.py: GQA
attention with q/k norms, RMSNorm, RoPE) whose MLPs are mixtures of experts
(workers/arch/moe.py) in the layers ``ModelConfig.is_moe_layer`` names, dense SwiGLU elsewhere.

The Llama classes build a dense MLP in every layer; this one builds them with no intermediate
features (zero-sized, nothing allocated) and then gives each layer its own MLP, so a large model
never allocates dense MLPs it does not have. The all-layers-in-one-call native decode
(``decode.c``) runs these layers too when every linear and expert is packed for the native kernels:
the router (float32, softmax, top-k, renormalised as ``SparseMoeBlock.route``) and the experts
(moe.c) in C as well, so a one-sequence decode step is one call for all its layers.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from workers.arch.config import ModelConfig
from workers.arch.llama import LlamaModel
from workers.arch.moe import SparseMoeBlock, layer_mlp
from workers.parallel import TPGroup
from workers.sharding import HeadLayout


class Qwen3MoeModel(LlamaModel):
    def __init__(
        self, cfg: ModelConfig, tp: TPGroup | None = None, dtype: torch.dtype = torch.float32, name: str = "model"
    ):
        super().__init__(dataclasses.replace(cfg, intermediate_size=0), tp, dtype, name)  # MLPs: below
        self.cfg = cfg
        self.layout = HeadLayout.for_rank(cfg, self.tp.rank, self.tp.world_size, name)
        for i, layer in enumerate(self.model.layers):
            layer.mlp = layer_mlp(cfg, i, self.layout, self.tp, dtype)

    def _native_mlp(self, mlp: nn.Module) -> tuple | None:
        """A layer with experts as decode.c takes it (its router and experts' table), or the dense
        MLP's linears."""
        if not isinstance(mlp, SparseMoeBlock):
            return super()._native_mlp(mlp)
        table = mlp.native_table()
        return None if table is None else (None, None, table)
