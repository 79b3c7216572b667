"""Sampling for a whole batch on the device, with no host sync inside: the step's only transfer is
the chosen token ids (and requested log-probabilities), copied once, after this returns.

Same rules and order as workers/sampling.py (which samples one row at a time on the host's
schedule): logit bias, repetition penalty over prompt and output, presence and frequency penalties
over the output, the grammar mask, then greedy rows take the argmax and the others apply
temperature, top-k, top-p and min-p and draw. Every parameter is a per-row tensor, so rows with
different settings share one pass, and nothing depends on a Python value read from the device.

The draw is the exponential race: ``argmax(p_i / E_i)`` with ``E_i`` independent Exp(1) picks
token ``i`` with probability ``p_i``, exactly. The noise comes from a counter-based hash of (the
row's seed, the row's step, the token id) computed with integer tensor ops, so a seeded row is
reproducible whatever else shares its steps and a CUDA graph can replay it (per-row
``torch.Generator`` objects can be neither batched nor captured). The caller advances ``step``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rpc.messages import SamplingParams

GREEDY_BELOW = 1e-5  # workers/sampling.py's threshold: temperature 0 means argmax
_MASK32 = 0xFFFFFFFF


@dataclass
class SamplingTensors:
    """Per-row parameters of one batch, [B] each, on the logits' device. Optional [B, V] tensors
    are None when no row uses them (a pass over the vocabulary saved)."""

    temperature: torch.Tensor  # float32; < GREEDY_BELOW: greedy
    top_p: torch.Tensor  # float32; 1: off
    top_k: torch.Tensor  # int64; 0: off
    min_p: torch.Tensor  # float32; 0: off
    presence_penalty: torch.Tensor  # float32
    frequency_penalty: torch.Tensor  # float32
    repetition_penalty: torch.Tensor  # float32; 1: off
    seed: torch.Tensor  # int64, in [0, 2**32)
    step: torch.Tensor  # int64: the row's draw counter (the caller adds 1 after each step)
    output_counts: torch.Tensor | None = None  # [B, V] float32: times each token was generated
    prompt_mask: torch.Tensor | None = None  # [B, V] bool: tokens of the prompt (repetition penalty)
    logit_bias: torch.Tensor | None = None  # [B, V] float32, dense or sparse COO
    allowed: torch.Tensor | None = None  # [B, V] bool: the grammar's mask (True: allowed)
    all_greedy: bool = False  # known on the host from the requests: skips the sort and the draw

    @classmethod
    def build(
        cls, params: list[SamplingParams], seeds: list[int], device: torch.device, steps: list[int] | None = None
    ) -> SamplingTensors:
        """The scalar parameters of ``params`` (one per row) as tensors, ``seeds`` for the draws
        (a request's own seed, else one drawn once for it on the host), ``steps`` the rows' draw
        counters (zeros when None). Two copies to the device, neither waiting for it. Penalty
        counts, bias and masks are the caller's [B, V] tensors, kept on the device between steps."""

        def cols(*names: str) -> list[list]:
            return [[getattr(p, name) for p in params] for name in names]

        floats = to_device(
            cols("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"),
            torch.float32,
            device,
        )
        seeds = [s & _MASK32 for s in seeds]
        ints = to_device([*cols("top_k"), seeds, steps or [0] * len(params)], torch.int64, device)
        return cls(
            temperature=floats[0],
            top_p=floats[1],
            top_k=ints[0],
            min_p=floats[2],
            presence_penalty=floats[3],
            frequency_penalty=floats[4],
            repetition_penalty=floats[5],
            seed=ints[1],
            step=ints[2],
            all_greedy=all(p.temperature < GREEDY_BELOW for p in params),
        )


def to_device(values: list | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values on ``device`` in one copy that does not wait for the device: on CUDA staged in
    pinned memory and copied asynchronously (a blocking copy synchronises the stream: a host sync)."""
    cuda = device.type == "cuda"
    host = torch.as_tensor(values, dtype=dtype)
    return (host.pin_memory() if cuda else host).to(device, non_blocking=cuda)


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # [B] int64
    logprob: torch.Tensor | None = None  # [B] the chosen token's log-probability (model's distribution)
    top_ids: torch.Tensor | None = None  # [B, k] the k most likely tokens
    top_logprobs: torch.Tensor | None = None  # [B, k]


def sample(logits: torch.Tensor, t: SamplingTensors, vocab_limit: int = 0, logprobs: int | None = None) -> SampleOutput:
    """``logits``: [B, V]. Ids >= ``vocab_limit`` (when > 0) are never chosen. ``logprobs``: None,
    or k >= 0 for the chosen token's log-probability and the k most likely (the largest k any row
    asked for; log-probabilities are of the model's own distribution, as OpenAI reports them)."""
    if 0 < vocab_limit < logits.shape[-1]:
        logits = logits[:, :vocab_limit]
    raw = logits.float()
    adjusted = _adjust(raw, t)
    greedy = adjusted.argmax(-1)
    if t.all_greedy:
        return _with_logprobs(greedy, raw, logprobs)
    probs = _truncate(torch.softmax(_top_k(adjusted / t.temperature.clamp_min(GREEDY_BELOW)[:, None], t.top_k), -1), t)
    drawn = (probs / exponential_noise(t.seed, t.step, probs.shape[-1])).argmax(-1)
    return _with_logprobs(torch.where(t.temperature < GREEDY_BELOW, greedy, drawn), raw, logprobs)


def _with_logprobs(tokens: torch.Tensor, raw: torch.Tensor, logprobs: int | None) -> SampleOutput:
    if logprobs is None:
        return SampleOutput(tokens)
    logp = torch.log_softmax(raw, -1)
    top = torch.topk(logp, min(logprobs, logp.shape[-1]), dim=-1)
    return SampleOutput(tokens, logp.gather(1, tokens[:, None])[:, 0], top.indices, top.values)


def _adjust(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Bias, penalties and the grammar mask, in workers/sampling.py's order."""
    if t.logit_bias is not None:
        if t.logit_bias.is_sparse:  # duplicates add up, as a dense bias would
            logits = logits.index_put(tuple(t.logit_bias._indices()), t.logit_bias._values().float(), accumulate=True)
        else:
            logits = logits + t.logit_bias
    if t.prompt_mask is not None or t.output_counts is not None:
        seen = t.prompt_mask if t.prompt_mask is not None else torch.zeros_like(logits, dtype=torch.bool)
        if t.output_counts is not None:
            seen = seen | (t.output_counts > 0)
        r = t.repetition_penalty[:, None]
        penalized = torch.where(logits > 0, logits / r, logits * r)
        logits = torch.where(seen, penalized, logits)
    if t.output_counts is not None:
        counts = t.output_counts.float()
        logits = logits - t.frequency_penalty[:, None] * counts - t.presence_penalty[:, None] * (counts > 0)
    if t.allowed is not None:
        logits = logits.masked_fill(~t.allowed, float("-inf"))
    return logits


def _top_k(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep each row's ``k`` largest (ties with the k-th kept, as workers/sampling.py does)."""
    vocab = logits.shape[-1]
    on = (k > 0) & (k < vocab)
    ranked = logits.sort(-1, descending=True).values
    kth = ranked.gather(1, (k.clamp(1, vocab) - 1)[:, None])
    return logits.masked_fill(on[:, None] & (logits < kth), float("-inf"))


def _truncate(probs: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Top-p (drop a token once the mass before it reaches top_p; the top token always stays) and
    min-p (drop tokens below min_p times the row's largest probability)."""
    ordered, order = probs.sort(-1, descending=True)
    drop = (ordered.cumsum(-1) - ordered) >= t.top_p[:, None]
    drop[:, 0] = False
    drop &= (t.top_p < 1.0)[:, None]
    probs = probs.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), 0.0)
    below = probs < t.min_p[:, None] * probs.amax(-1, keepdim=True)
    return probs.masked_fill(below & (t.min_p > 0)[:, None], 0.0)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors holding values below 2**32: products wrap
    in int64, and their low 32 bits, the only ones kept, are exact."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def exponential_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] independent Exp(1) variates, a pure function of (seed, step, token id)."""
    row = _mix32(_mix32(seed & _MASK32) ^ (step & _MASK32))
    ids = torch.arange(vocab, dtype=torch.int64, device=seed.device)
    bits = _mix32(_mix32(row[:, None] ^ ids[None, :]) ^ (row[:, None] * 0x9E3779B1 & _MASK32))
    u = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))  # 24 bits: exact in float32, never 0 or 1
    return -torch.log(u)
