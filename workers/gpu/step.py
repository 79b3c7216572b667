"""The worker's GPU step: decode steps through CUDA graphs, and sampling for the whole batch on the
device with one host transfer per step.

``GpuPath.build`` decides at load time what a model gets: graphs when ``[engine] cuda_graphs`` is on
(a hybrid model's given its state pool, with one scratch slot for the padding rows; a
tensor-parallel rank's with the all-reduces inside), the device sampler on any GPU. On the CPU
it returns None and the worker's own path runs unchanged. ``CORTEX_FORCE_GPU_PATH=1`` is a test
hook: it builds the same path on the CPU (the graphs' padded step runs eagerly, as
``DecodeGraphs.run`` does without CUDA), so the wiring is tested where no GPU is lent.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch

from rpc.messages import LoadDenseShard, SamplingParams, SeqInput
from workers.arch.deltanet import RecurrentStatePool
from workers.gpu import forced
from workers.gpu.graphs import DecodeGraphs
from workers.gpu.sampling import SamplingTensors, sample, to_device
from workers.kv_cache import PagedKVCache
from workers.sampling import allowed_mask

log = logging.getLogger(__name__)
CPU = torch.device("cpu")


def wants_graphs(device: torch.device, msg: LoadDenseShard, model: object) -> bool:
    """Whether this load captures decode graphs: the switch is on, the device is a GPU (or the test
    hook forces it) and the step never reads the device from the host (mixture-of-experts routing
    reads each expert's token count back, which capture forbids). Every rank of a tensor-parallel
    group decides the same, from the same message. The caller then reserves one more KV block, and
    for a hybrid model one more state slot: the padding rows'."""
    experts = getattr(getattr(model, "cfg", None), "num_experts", 0)
    return (device.type == "cuda" or forced()) and msg.cuda_graphs and not experts


@dataclass
class _SeqState:
    """One sequence's sampling state, on the device between steps."""

    seed: int
    step: int = 0  # draws so far: the noise of draw n is a function of (seed, n)
    prompt: list[int] | None = None  # kept on the host until the first sample builds the mask
    prompt_mask: torch.Tensor | None = None  # [V] bool (repetition penalty)
    counts: torch.Tensor | None = None  # [V] float32: times each token was sampled (penalties)
    bias: torch.Tensor | None = None  # [V] float32 (logit bias)


class DeviceSampler:
    """Samples a step's rows in one ``workers.gpu.sampling.sample`` call and copies the chosen ids
    (and asked-for logprobs) to the host in one transfer. Per-sequence state (seed and draw
    counter, output counts, prompt mask, bias row) lives here until the leader releases the
    sequence. Same rules as the host sampler; seeded draws differ from it (another generator) but
    are reproducible whatever else shares the step."""

    def __init__(self, vocab: int, vocab_limit: int, device: torch.device):
        self.vocab = min(vocab, vocab_limit) if vocab_limit > 0 else vocab  # the ids that may be chosen
        self.device = device
        self.seqs: dict[int, _SeqState] = {}

    def release(self, seq_ids: list[int] | None) -> None:
        if seq_ids is None:
            self.seqs.clear()
        for s in seq_ids or ():
            self.seqs.pop(s, None)

    def sample(self, logits: torch.Tensor, seqs: list[SeqInput]) -> tuple[list[int], list, list[str]]:
        """(token, logprobs, error) per sequence: -1, None, "" where nothing is sampled. A failure
        fails the sampled rows of this step only."""
        for s in seqs:
            state = self._state(s)
            if s.prompt is not None:
                state.prompt = s.prompt
        rows = [i for i, s in enumerate(seqs) if s.sample]
        tokens, logprobs, errors = [-1] * len(seqs), [None] * len(seqs), [""] * len(seqs)
        if not rows:
            return tokens, logprobs, errors
        if len(rows) < len(seqs):  # prompt pieces that are not the prompt's last: no row of theirs
            logits = logits.index_select(0, to_device(rows, torch.int64, self.device))
        try:
            picked = self._sample_rows(logits, [seqs[i] for i in rows])
        except Exception as exc:  # the step's sampled requests fail; the worker goes on
            log.exception("sampling a batch of %d sequences failed", len(rows))
            errors = [f"{type(exc).__name__}: {exc}" if s.sample else "" for s in seqs]
            return tokens, logprobs, errors
        for i, (token, lp) in zip(rows, picked, strict=True):
            tokens[i], logprobs[i] = token, lp
        return tokens, logprobs, errors

    def _state(self, s: SeqInput) -> _SeqState:
        state = self.seqs.get(s.seq_id)
        if state is None:  # a request's own seed, else one drawn once for the sequence
            seed = s.sampling.seed if s.sampling.seed is not None else random.getrandbits(32)
            state = self.seqs[s.seq_id] = _SeqState(seed)
        return state

    def _sample_rows(self, logits: torch.Tensor, seqs: list[SeqInput]) -> list[tuple[int, list | None]]:
        states = [self.seqs[s.seq_id] for s in seqs]
        params = [s.sampling for s in seqs]
        t = SamplingTensors.build(params, [st.seed for st in states], self.device, [st.step for st in states])
        t.prompt_mask = self._rows(states, params, "prompt_mask", self._prompt_mask)
        t.output_counts = self._rows(states, params, "counts", self._zeros)
        t.logit_bias = self._rows(states, params, "bias", self._bias)
        if any(s.allowed is not None for s in seqs):  # unpacked on the host, copied in one go
            full = torch.ones(self.vocab, dtype=torch.bool)
            masks = [full if s.allowed is None else allowed_mask(s.allowed, self.vocab, CPU) for s in seqs]
            t.allowed = to_device(torch.stack(masks), torch.bool, self.device)
        want = max(p.logprobs for p in params)
        out = sample(logits, t, self.vocab, want if want >= 0 else None)
        if t.output_counts is not None:
            counts = t.output_counts.scatter_add_(1, out.tokens[:, None], torch.ones_like(t.output_counts[:, :1]))
            for i, st in enumerate(states):  # views of this step's stack: no copy per row
                if st.counts is not None:
                    st.counts = counts[i]
        for st in states:
            st.step += 1
        return self._to_host(out, params, want)

    def _rows(self, states: list[_SeqState], params: list[SamplingParams], name: str, make) -> torch.Tensor | None:
        """The rows' ``name`` state stacked [B, V], made on first use by ``make(state, params)``
        (None where a row needs none: zeros stand in); None when no row needs it."""
        for st, p in zip(states, params, strict=True):
            if getattr(st, name) is None:
                setattr(st, name, make(st, p))
        got = [getattr(st, name) for st in states]
        if all(g is None for g in got):
            return None
        zero = torch.zeros(self.vocab, dtype=next(g for g in got if g is not None).dtype, device=self.device)
        return torch.stack([zero if g is None else g for g in got])

    def _prompt_mask(self, state: _SeqState, p: SamplingParams) -> torch.Tensor | None:
        if p.repetition_penalty == 1:
            return None
        mask = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
        ids = [t for t in state.prompt or () if 0 <= t < self.vocab]
        if ids:
            mask[to_device(ids, torch.int64, self.device)] = True
        state.prompt = None  # the mask holds it now
        return mask

    def _zeros(self, _state: _SeqState, p: SamplingParams) -> torch.Tensor | None:
        return torch.zeros(self.vocab, dtype=torch.float32, device=self.device) if p.needs_history else None

    def _bias(self, _state: _SeqState, p: SamplingParams) -> torch.Tensor | None:
        bias = {int(t): float(b) for t, b in (p.logit_bias or {}).items() if 0 <= int(t) < self.vocab}
        if not bias:
            return None
        row = torch.zeros(self.vocab, dtype=torch.float32, device=self.device)
        row[to_device(list(bias), torch.int64, self.device)] = to_device(
            list(bias.values()), torch.float32, self.device
        )
        return row

    @staticmethod
    def _to_host(out, params: list[SamplingParams], want: int) -> list[tuple[int, list | None]]:
        """One transfer: ids and logprobs side by side in float64 (token ids are exact in it)."""
        if want < 0:
            return [(int(t), None) for t in out.tokens.tolist()]
        parts = [out.tokens[:, None], out.logprob[:, None], out.top_ids, out.top_logprobs]
        rows = torch.cat([x.double() for x in parts], 1).tolist()
        picked = []
        for row, p in zip(rows, params, strict=True):
            k = max(p.logprobs, 0)
            ids, lps = row[2 : 2 + want], row[2 + want :]
            lp = [row[1], [[int(i), v] for i, v in zip(ids[:k], lps[:k], strict=True)]] if p.logprobs >= 0 else None
            picked.append((int(row[0]), lp))
        return picked


class GpuPath:
    """A model's GPU step: graphs (or None: every step eager) and the device sampler."""

    def __init__(self, graphs: DecodeGraphs | None, sampler: DeviceSampler):
        self.graphs, self.sampler = graphs, sampler

    @classmethod
    def build(
        cls,
        device: torch.device,
        msg: LoadDenseShard,
        model: object,
        cache: PagedKVCache,
        vocab: int,
        graphs: bool,
        states: RecurrentStatePool | None = None,
    ) -> GpuPath | None:
        """The path for a loaded model (None on the CPU unless forced). With ``graphs``, ``cache``
        holds ``msg.kv_blocks`` + 1 blocks and the last is the padding rows' scratch block; a
        hybrid model's ``states`` hold ``msg.state_slots`` + 1 slots, the last the padding rows'
        (without ``states`` its decode steps stay eager)."""
        if device.type != "cuda" and not forced():
            return None
        sampler = DeviceSampler(vocab, msg.vocab_limit, device)
        if not graphs:
            return cls(None, sampler)
        if getattr(model, "recurrent", False) and states is None:
            log.info(
                "CUDA graphs: %s keeps recurrent state and no state pool was given: decode runs eagerly", msg.model_id
            )
            return cls(None, sampler)
        pad_block = cache.num_blocks - 1
        max_blocks = min(-(-model.cfg.max_position_embeddings // cache.block_size), pad_block)
        g = DecodeGraphs(model, cache, max(msg.max_seqs, 1), max(max_blocks, 1), vocab, pad_block, states=states)
        g.capture()
        return cls(g, sampler)

    def reserved_bytes(self) -> int:
        """Device memory the graphs hold: static buffers and the captured pool (the padding block
        is in the KV pool's bytes)."""
        return self.graphs.reserved_bytes() if self.graphs else 0

    def decode(self, seqs: list[SeqInput]) -> torch.Tensor | None:
        """The step's logits from a graph replay, or None when the step must run eagerly: a prompt
        piece in it, more rows than the largest bucket, or a position beyond the graphs' tables."""
        g = self.graphs
        if g is None or len(seqs) > g.max_batch:
            return None
        width = g.static.tables.shape[1]
        if any(len(s.tokens) != 1 or s.start_pos // g.block_size >= width for s in seqs):
            return None
        if g.states is not None and not all(_continues_state(s, g.pad_slot) for s in seqs):
            return None
        return g.run([(s.tokens[0], s.start_pos, s.block_table) for s in seqs], [s.state_slot for s in seqs])


def _continues_state(s: SeqInput, pad_slot: int) -> bool:
    """A hybrid decode row the graph can take: it continues the state in its own slot (not position
    0, which starts from zero; no saved state to restore or save; a slot below the scratch one). The
    eager step handles the rest, and checks the slots."""
    return s.start_pos > 0 and s.state_from < 0 and s.state_save < 0 and 0 <= s.state_slot < pad_slot
