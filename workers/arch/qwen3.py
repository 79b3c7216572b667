"""Qwen3 dense: the Llama block plus an RMSNorm over each head of q and k (``qk_norm``).

The difference lives in ModelConfig (``qk_norm=True``, explicit ``head_dim``), so the layers are
shared; this class exists so the architecture has its own name and place to grow.
"""

from __future__ import annotations

from workers.arch.llama import LlamaModel


class Qwen3Model(LlamaModel):
    pass
