"""Pick the next token from one sequence's logits: greedy, or temperature + top-k + top-p with a
per-sequence seeded generator (so a seeded request is reproducible whatever else runs)."""

from __future__ import annotations

import torch

from rpc.messages import SamplingParams

GREEDY_BELOW = 1e-5  # OpenAI's temperature 0 means "always the most likely token"


def new_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.temperature < GREEDY_BELOW:
        return None
    g = torch.Generator(device=device)
    if params.seed is not None:
        g.manual_seed(params.seed)
    else:
        g.seed()
    return g


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None, vocab_limit: int) -> int:
    """``logits``: fp32 [vocab]. Ids >= ``vocab_limit`` (padding rows the tokenizer cannot decode)
    are never chosen."""
    if 0 < vocab_limit < logits.shape[-1]:
        logits = logits[:vocab_limit]
    if generator is None:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p; the top token always stays
        drop = (cum - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
