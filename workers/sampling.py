"""Pick the next token from one sequence's logits, in vLLM's order: logit bias and penalties, then
temperature, then top-k / top-p / min-p, then a draw from the sequence's own seeded generator (so a
seeded request is reproducible whatever else shares its steps). Temperature 0 is greedy."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

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


def adjust(logits: torch.Tensor, params: SamplingParams, prompt: Sequence[int], output: Sequence[int]) -> torch.Tensor:
    """Logit bias and penalties. Presence and frequency penalties count generated tokens (OpenAI);
    the repetition penalty covers prompt and output alike (HF / vLLM)."""
    if not (params.logit_bias or params.needs_history):
        return logits
    logits = logits.clone()
    for token, bias in (params.logit_bias or {}).items():
        if 0 <= int(token) < logits.shape[-1]:
            logits[int(token)] += float(bias)
    if params.repetition_penalty != 1:
        seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long, device=logits.device)
        if seen.numel():
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if output and (params.presence_penalty or params.frequency_penalty):
        counts = Counter(output)
        ids = torch.tensor(list(counts), dtype=torch.long, device=logits.device)
        freq = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
        logits[ids] -= params.frequency_penalty * freq + params.presence_penalty
    return logits


def token_logprobs(logits: torch.Tensor, token: int, k: int, vocab_limit: int) -> list:
    """[logprob of ``token``, [[id, logprob] of the ``k`` most likely]] under the model's own
    distribution (before temperature, penalties and truncation, as OpenAI reports them)."""
    if 0 < vocab_limit < logits.shape[-1]:
        logits = logits[:vocab_limit]
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logp, min(k, logp.shape[-1])) if k > 0 else None
    pairs = [] if top is None else [[int(i), float(v)] for v, i in zip(top.values, top.indices, strict=True)]
    return [float(logp[token]), pairs]


def allowed_mask(bitmask: bytes, size: int, device: torch.device) -> torch.Tensor:
    """The leader's bitmask (bit i of byte i // 8) as a bool tensor of ``size`` token ids."""
    bits = torch.frombuffer(bytearray(bitmask), dtype=torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8)
    mask = ((bits[:, None] >> shifts) & 1).flatten().bool()
    if mask.numel() < size:
        mask = torch.cat([mask, mask.new_zeros(size - mask.numel())])
    return mask[:size].to(device)


def greedy(logits: torch.Tensor) -> int:
    """The most likely token: the first of equal maxima (a NaN counts as the maximum), as
    ``torch.argmax``. On the CPU through NumPy: its single-threaded SIMD scan of a 49k vocabulary
    takes about 7 us, torch.argmax 50-90 us (a parallel reduction, on the decode's critical path)."""
    return greedy_rows(logits[None], 0)[0]


def plain_greedy(params: SamplingParams, allowed: bytes | None = None) -> bool:
    """Whether the token is the logits' first maximum and nothing more: greedy, with no bias,
    penalty, grammar mask (``allowed``) or log-probabilities to apply."""
    return (
        params.temperature < GREEDY_BELOW
        and params.logprobs < 0
        and not params.logit_bias
        and not params.needs_history
        and allowed is None
    )


def greedy_rows(logits: torch.Tensor, vocab_limit: int) -> list[int]:
    """``greedy`` of every row of ``logits`` [S, vocab] below ``vocab_limit`` (0: all), in one scan
    (NumPy's on the CPU: see ``greedy``)."""
    if 0 < vocab_limit < logits.shape[-1]:
        logits = logits[:, :vocab_limit]
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return logits.numpy().argmax(axis=1).tolist()
    return torch.argmax(logits, dim=-1).tolist()


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    vocab_limit: int,
    prompt: Sequence[int] = (),
    output: Sequence[int] = (),
    allowed: bytes | None = None,
) -> int:
    """``logits``: fp32 [vocab]. Ids >= ``vocab_limit`` (padding rows the tokenizer cannot decode)
    are never chosen, nor ids outside ``allowed`` (a grammar's bitmask) when given."""
    if 0 < vocab_limit < logits.shape[-1]:
        logits = logits[:vocab_limit]
    logits = adjust(logits, params, prompt, output)  # read only: no copy of a long history per token
    if allowed is not None:
        # before temperature and truncation, so top-k / top-p choose among grammatical tokens only
        logits = logits.masked_fill(~allowed_mask(allowed, logits.shape[-1], logits.device), float("-inf"))
    if generator is None:
        return greedy(logits)
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # drop a token when the mass before it already reaches top_p; the top token always stays
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        drop[0] = False  # even top_p = 0 keeps the most likely token (it means greedy, not nothing)
        probs = probs.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), 0.0)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))
