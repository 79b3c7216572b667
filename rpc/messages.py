"""Leader <-> worker messages: one request, one reply, matched by id.

Errors are replies (``Error``), never silence. Only small tensors' worth of data travels: token ids
in, sampled token ids out. Weights are read by each rank from the files named in ``LoadDenseShard``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from rpc.codec import Message, Part

# Tokens per KV block: the unit of the leader's block tables and of the workers' pools (one value
# for both sides of the wire, so it is declared here).
KV_BLOCK_SIZE = 16


class SamplingParams(Part):
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    logprobs: int = -1  # -1: none; k >= 0: the sampled token's log-probability and the k most likely

    @property
    def needs_history(self) -> bool:
        """Whether sampling depends on the tokens seen so far (the penalties)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


class ErrorKind(StrEnum):
    """Why a worker (or any RPC server) could not answer a message."""

    BAD_FRAME = "bad_frame"  # not a message this server knows, or not decodable at all
    UNKNOWN_MODEL = "unknown_model"  # the model is not loaded on this worker
    LOAD_FAILED = "load_failed"
    STEP_FAILED = "step_failed"
    INTERNAL = "internal"


class Error(Message):
    kind: ErrorKind
    message: str


# -- requests ------------------------------------------------------------------------------------


class Ping(Message):
    pass


class LoadDenseShard(Message):
    """Load this rank's slice of a model. ``config`` is the parsed ModelConfig as a map."""

    model_id: str
    format: str  # "safetensors" | "gguf"
    files: list[str]
    config: dict[str, Any]
    dtype: str  # "float32" | "bfloat16" | "float16"
    rank: int = 0
    world_size: int = 1
    dist_address: str = ""  # "host:port" rendezvous when world_size > 1
    group_timeout_s: float = 60.0  # the group must form within this, or the load fails
    vocab_limit: int = 0  # ids >= this are never sampled (the tokenizer's size); 0 = model vocab
    kv_blocks: int = 0  # KV cache blocks to allocate (the leader's block manager hands them out)
    quantize: str = "auto"  # auto | none | int8 | int4: weight-only packed linears on the CPU
    kv_dtype: str = ""  # the KV pool's dtype ("": the model's)
    # recurrent state slots to allocate (hybrid models: one per sequence the leader may run at once)
    state_slots: int = 0
    cuda_graphs: bool = True  # [engine] cuda_graphs: decode steps as CUDA graphs (a GPU worker only)
    max_seqs: int = 64  # the most sequences of one step ([engine] max_seqs): the largest graph bucket
    # bytes a GPU worker leaves free when it sizes the KV pool from the device's free memory after
    # the weights (workers/gpu/memory.py); the pool then holds at least kv_blocks. -1: kv_blocks exactly
    kv_headroom: int = -1


class SeqInput(Part):
    """One sequence's part of a step: ``tokens`` go at positions ``start_pos ..``; its KV lives in
    ``block_table`` (block ids, in position order), which covers at least ``start_pos + len(tokens)``."""

    seq_id: int
    tokens: list[int]
    start_pos: int
    sampling: SamplingParams
    block_table: list[int] = []
    sample: bool = True  # False for a prefill chunk that is not the prompt's last
    prompt: list[int] | None = None  # the whole prompt, sent once when a penalty needs it
    # constrained decoding (JSON schema, tool calls): the tokens allowed next, one bit per token id
    # (bit i of byte i // 8, little-endian), computed by the leader's grammar matcher. None: any.
    allowed: bytes | None = None
    # hybrid models: the recurrent state slot the sequence holds (-1: none). Its state starts from
    # zero on the step that computes position 0 (start_pos == 0), else it continues what the slot holds.
    state_slot: int = -1
    state_from: int = -1  # before the step, copy this slot (a saved prefix state) into state_slot
    state_save: int = -1  # after the step, copy state_slot into this slot (the prefix cache keeps it)
    # overlapped decode: the step was sent before the previous one's tokens returned, so its one
    # token is the one this worker sampled for the sequence last step (``tokens`` is a placeholder)
    follows: bool = False
    # multi-step decode: the token ids that end this sequence (EOS, stop_token_ids). A step of
    # several decode steps ends early once every sequence of it has sampled one of its own.
    stop_ids: list[int] | None = None


class GenerateStep(Message):
    """One step of a model: one forward of every sequence, each sampling where ``sample`` says.

    ``steps`` > 1 (every sequence decoding one token and sampling): that many forwards back to back,
    each sequence fed the token it sampled in the one before, at the next position (its block table
    covers them all). It ends early only once every sequence has sampled one of its ``stop_ids``, so
    a step the leader sent behind it (``follows``) knows where each sequence stands. One message and
    one reply for several tokens: the leader's and the front's work per token is what multi-step
    saves, which at one stream on a CPU is a tenth of the step."""

    model_id: str
    seqs: list[SeqInput]
    steps: int = 1


class EmbedStep(Message):
    """Final hidden states of whole sequences, no sampling (``POST /v1/embeddings``): each sequence's
    last-token state after the model's final norm, L2-normalised. The worker runs them against KV
    scratch of its own, freed when it answers, so the model's pool (and every sequence in it) is
    untouched; at most ``chunk_tokens`` tokens per forward (a longer sequence is run in pieces). Every
    rank of the model takes part (the model is sharded); rank 0 answers the vectors."""

    model_id: str
    seqs: list[list[int]]
    chunk_tokens: int = 0  # most tokens per forward; 0: each sequence whole


class ClearKvCache(Message):
    """Zero KV blocks of a model's pool: the listed ones, or the whole pool. The leader owns the
    block tables and sends this only for blocks no sequence holds (their prefix-cache names are
    dropped first): e.g. an operator's ``cortex-admin clear-cache``, so no cached prompt survives."""

    model_id: str
    blocks: list[int] | None = None  # None = every block


class ReleaseSequences(Message):
    """Forget finished sequences' sampling state (generator, penalty history). Their KV blocks are
    the leader's to hand out again (it may keep their contents for the prefix cache)."""

    model_id: str
    seq_ids: list[int] | None = None  # None = every sequence


class Unload(Message):
    model_id: str


# -- replies -------------------------------------------------------------------------------------


class Pong(Message):
    pid: int
    device: str
    models: list[str]
    memory_total: int = 0  # bytes: the GPU's memory, or the host's RAM for a CPU device
    memory_free: int = 0  # bytes free now: free VRAM, or the host's available RAM


class Loaded(Message):
    model_id: str
    param_bytes: int
    load_seconds: float
    kv_blocks: int = 0
    kv_bytes: int = 0
    state_bytes: int = 0  # the recurrent state pool (hybrid models), 0 for plain decoders
    graph_bytes: int = 0  # what the CUDA graphs hold (static buffers and memory pool); 0: none


class StepResult(Message):
    model_id: str
    tokens: list[int]  # one per SeqInput, -1 where nothing was sampled (or on ranks > 0)
    # per SeqInput, when its sampling asked for logprobs: [logprob of the sampled token,
    # [[token id, logprob], ...] of the most likely ones]; else None
    logprobs: list[list[Any] | None] | None = None
    # per SeqInput, why sampling its token failed ("" where it did not); None when nothing failed.
    # One sequence's bad distribution fails that request only, not the step's others.
    errors: list[str] | None = None
    # multi-step: per SeqInput, the tokens sampled after ``tokens``'s one (-1 after its sampling
    # failed); None for a single step. Every sequence has the same number: the forwards that ran.
    more: list[list[int]] | None = None


class Embeddings(Message):
    """Answer to ``EmbedStep``: ``vectors`` holds one unit vector of ``dim`` little-endian float32
    per sequence, in order (empty on ranks > 0)."""

    model_id: str
    dim: int
    vectors: bytes


class Ack(Message):
    pass
