"""One module per architecture. ``build_model`` picks the class from ``ModelConfig.arch``."""

from __future__ import annotations

from workers.arch.config import ModelConfig, UnsupportedModel


def model_class(cfg: ModelConfig):
    from workers.arch.llama import LlamaModel
    from workers.arch.qwen3 import Qwen3Model
    from workers.arch.qwen3_5 import Qwen3_5Model
    from workers.arch.qwen3_moe import Qwen3MoeModel

    classes = {
        "llama": LlamaModel,
        "qwen3": Qwen3Model,
        "qwen3_moe": Qwen3MoeModel,
        # hybrids; their MoE variants (Qwen3-Next, Qwen3.5-MoE) are the same class with experts
        "qwen3_5": Qwen3_5Model,
        "qwen3_next": Qwen3_5Model,
    }
    try:
        return classes[cfg.arch]
    except KeyError:
        raise UnsupportedModel(f"architecture {cfg.arch!r} is not supported (supported: {sorted(classes)})") from None


__all__ = ["ModelConfig", "UnsupportedModel", "model_class"]
