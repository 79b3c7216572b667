"""Mixture-of-experts models (workers/arch/moe.py) compute what transformers 5.17 computes, in
float32, on tiny random checkpoints saved by transformers itself: Qwen3-MoE (``Qwen3MoeForCausalLM``,
with dense layers through ``mlp_only_layers`` or ``decoder_sparse_step``), Qwen3-Next with MoE
layers and a gated shared expert (``Qwen3NextForCausalLM``) and Qwen3.5-MoE
(``Qwen3_5MoeForConditionalGeneration``, VLM-shaped); from per-expert files (what
``save_pretrained`` writes) and from fused ones (what transformers 5 holds in memory).

Each active expert runs once per step over its gathered tokens; two tensor-parallel ranks, each
holding every expert's half of the intermediate features, compute what one computes; a served model
streams transformers' greedy text, and packed int8 (decode steps in one native call) the Python
path's; the memory estimate counts every expert."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import openai
import pytest
import torch

from tests.checkpoints import hf_hybrid_model, make_moe_checkpoint, write_chatml_tokenizer_config
from tests.conftest import Server, train_tiny_tokenizer
from tests.tp_harness import rel_err, run_tp_steps
from workers.arch import ModelConfig, model_class
from workers.arch import moe as moe_module
from workers.arch.moe import SparseMoeBlock, grouped_experts
from workers.arch.qwen3_5 import HybridRunner
from workers.kv_cache import LocalRunner
from workers.sharding import ShardingError, check_split
from workers.weights import WeightsError, load_weights

TOL = 1e-4  # against transformers: same arithmetic, other summation orders (measured: about 1e-5)
SAME = 1e-5  # relative, TP=2 against TP=1: the all-reduce only reorders the down projections' sums
CPU = torch.device("cpu")
DECODES = 8

# id -> (arch, config overrides, fused file); the layers with experts, as transformers builds them
CHECKPOINTS = {
    "qwen3_moe-16x4": ("qwen3_moe", {}, False),  # layer 1 dense (mlp_only_layers)
    "qwen3_moe-8x2-every2nd": (
        "qwen3_moe",
        dict(num_experts=8, num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[], norm_topk_prob=False),
        False,
    ),
    "qwen3_moe-fused": ("qwen3_moe", {}, True),
    "qwen3_moe-inter64": ("qwen3_moe", dict(moe_intermediate_size=64), False),  # each rank's half: whole blocks
    "qwen3_next": ("qwen3_next", {}, False),  # layer 2 dense; a shared expert behind a sigmoid gate
    "qwen3_5_moe-vlm": ("qwen3_5_moe", {}, False),
    "qwen3_5_moe-fused": ("qwen3_5_moe", {}, True),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each checkpoint made once per module, on first use."""
    made: dict[str, Path] = {}

    def get(key: str) -> Path:
        if key not in made:
            arch, overrides, fused = CHECKPOINTS[key]
            made[key] = make_moe_checkpoint(tmp_path_factory.mktemp(key), arch, fused=fused, **overrides)
        return made[key]

    return get


def _load(path: Path):
    cfg = ModelConfig.from_hf_dir(path)
    model = model_class(cfg)(cfg)
    load_weights(model, "safetensors", [str(f) for f in sorted(path.glob("*.safetensors"))])
    return model


def _runner(model):
    return HybridRunner(model, CPU) if getattr(model, "recurrent", False) else LocalRunner(model, CPU)


def _prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_logits(ref, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0]


def _hf_moe_layers(ref) -> list[bool]:
    layers = ref.model.language_model.layers if hasattr(ref.model, "language_model") else ref.model.layers
    return [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in layers]


@pytest.mark.parametrize("key", list(CHECKPOINTS))
def test_prefill_and_greedy_decode_match_transformers(checkpoints, key):
    """A 33-token prefill, then 8 greedy decode steps, each against transformers' forward over the
    whole sequence; the MoE layers are the ones transformers builds."""
    path = checkpoints(key)
    model, ref = _load(path), hf_hybrid_model(path)
    assert [model.cfg.is_moe_layer(i) for i in range(model.cfg.num_layers)] == _hf_moe_layers(ref)
    assert model.cfg.moe_layers > 0
    ids = _prompt(33)
    run = _runner(model)
    got = run.step(0, ids, 0, all_logits=True)
    want = _hf_logits(ref, ids)
    assert want.std() > 0.3, "logits are flat: the checkpoint was not re-randomised"
    err = (got - want).abs().max().item()
    for _ in range(DECODES):
        ids.append(int(got.reshape(-1, got.shape[-1])[-1].argmax()))
        got = run.step(0, ids[-1:], len(ids) - 1)
        err = max(err, (got - _hf_logits(ref, ids)[-1]).abs().max().item())
    assert err < TOL


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3_5_moe"])
def test_fused_and_per_expert_files_load_the_same_weights(checkpoints, arch):
    per_expert = _load(checkpoints("qwen3_moe-16x4" if arch == "qwen3_moe" else "qwen3_5_moe-vlm"))
    fused = _load(checkpoints(f"{arch}-fused"))
    a, b = dict(per_expert.named_parameters()), dict(fused.named_parameters())
    assert a.keys() == b.keys() and any(".experts.gate_up_proj" in n for n in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_missing_expert_tensor_is_named(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    src = checkpoints("qwen3_moe-16x4")
    for f in src.iterdir():
        (tmp_path / f.name).symlink_to(f)
    weights = load_file(src / "model.safetensors")
    del weights["model.layers.2.mlp.experts.5.up_proj.weight"]
    (tmp_path / "model.safetensors").unlink()
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        _load(tmp_path)


def test_each_active_expert_runs_once_over_its_tokens(monkeypatch):
    """The grouped compute equals a per-token loop over each token's chosen experts, and computes
    the SwiGLU of each expert that some token chose exactly once (never an inactive one)."""
    g = torch.Generator().manual_seed(0)
    experts, hidden, inter, tokens, k = 16, 8, 6, 5, 2
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g)
    down = torch.randn(experts, hidden, inter, generator=g)
    x = torch.randn(tokens, hidden, generator=g)
    chosen = torch.tensor([[3, 7], [7, 3], [12, 3], [0, 7], [12, 0]])  # 4 of 16 experts active
    weights = torch.rand(tokens, k, generator=g)
    calls = []
    swiglu = moe_module.swiglu
    monkeypatch.setattr(moe_module, "_use_grouped_mm", lambda _rows: False)  # the loop (small batches)
    monkeypatch.setattr(moe_module, "swiglu", lambda t: calls.append(t.shape[0]) or swiglu(t))
    got = grouped_experts(x, chosen, weights, gate_up, down)

    def expert(e: int, row: torch.Tensor) -> torch.Tensor:
        gate, up = (gate_up[e] @ row).chunk(2)
        return down[e] @ (torch.nn.functional.silu(gate) * up)

    want = torch.stack([sum(weights[t, j] * expert(int(chosen[t, j]), x[t]) for j in range(k)) for t in range(tokens)])
    assert (got - want).abs().max() < 1e-5
    assert sorted(calls) == [2, 2, 3, 3]  # experts 0 and 12 have two tokens, 3 and 7 have three


@pytest.mark.skipif(moe_module._grouped_mm_fn() is None, reason="this torch has no grouped matmul")
def test_the_grouped_matmul_path_equals_the_loop(monkeypatch):
    """The grouped matmul (every expert in one call, no host sync: CUDA, and larger CPU batches)
    gives the same sums as the loop over active experts."""
    g = torch.Generator().manual_seed(1)
    gate_up, down = torch.randn(32, 12, 8, generator=g), torch.randn(32, 8, 6, generator=g)
    x, weights = torch.randn(9, 8, generator=g), torch.rand(9, 4, generator=g)
    chosen = torch.stack([torch.randperm(32, generator=g)[:4] for _ in range(9)])
    monkeypatch.setattr(moe_module, "_use_grouped_mm", lambda _rows: False)
    loop = grouped_experts(x, chosen, weights, gate_up, down)
    monkeypatch.setattr(moe_module, "_use_grouped_mm", lambda _rows: True)
    assert (grouped_experts(x, chosen, weights, gate_up, down) - loop).abs().max() < 1e-5


def test_one_token_runs_its_experts_directly(monkeypatch):
    """A single token (a one-sequence decode step) takes its k experts one after the other: no
    sort, no grouping; the same sum as the per-token definition."""
    g = torch.Generator().manual_seed(2)
    gate_up, down = torch.randn(16, 12, 8, generator=g), torch.randn(16, 8, 6, generator=g)
    x, weights, chosen = torch.randn(1, 8, generator=g), torch.rand(1, 3, generator=g), torch.tensor([[9, 2, 14]])

    def expert(e: int) -> torch.Tensor:
        gate, up = (gate_up[e] @ x[0]).chunk(2)
        return down[e] @ (torch.nn.functional.silu(gate) * up)

    want = sum(weights[0, j] * expert(int(chosen[0, j])) for j in range(3))
    monkeypatch.setattr(torch, "argsort", None)  # the grouping's first op: not reached
    assert (grouped_experts(x, chosen, weights, gate_up, down)[0] - want).abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_packs_every_expert(checkpoints, mode):
    """``quantize = "int8"`` / ``"int4"`` pack the routed experts as the linears are, one packed
    layer per expert (the dense stacks dropped), and the router stays dense; the logits stay near
    the dense model's, every linear being quantized too (measured on this checkpoint: int8 mean
    0.025, max 0.34, the same argmax everywhere; int4 mean 0.20, max 1.3, 75% the same argmax)."""
    path = checkpoints("qwen3_moe-16x4")
    dense, packed = _load(path), model_class(ModelConfig.from_hf_dir(path))(ModelConfig.from_hf_dir(path))
    load_weights(packed, "safetensors", [str(path / "model.safetensors")], quantize=mode)
    block = packed.model.layers[0].mlp
    assert block.experts.gate_up_proj is None and len(block.experts.down_q) == packed.cfg.num_experts
    assert {q.kind for q in [*block.experts.gate_up_q, *block.experts.down_q]} == {mode}
    assert isinstance(block.gate.weight, torch.nn.Parameter) and block.gate.weight.dtype == torch.float32
    ids = _prompt(12)
    want, got = _runner(dense).step(0, ids, 0, all_logits=True), _runner(packed).step(0, ids, 0, all_logits=True)
    assert (got - want).abs().mean() < {"int8": 0.05, "int4": 0.4}[mode]
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= {"int8": 0.9, "int4": 0.6}[mode]


@pytest.mark.parametrize("key", ["qwen3_moe-16x4", "qwen3_next", "qwen3_5_moe-vlm"])
def test_a_batch_of_sequences_in_uneven_chunks_matches_transformers(checkpoints, key):
    """Three sequences stepped together (their tokens routed and grouped by expert together): prompt
    chunks of uneven lengths, one sequence decoding while the others still prefill, then greedy
    decoding of all three; every logit row equals transformers' on that sequence alone."""
    path = checkpoints(key)
    model, ref = _load(path), hf_hybrid_model(path)
    prompts = {0: _prompt(21, seed=1), 1: _prompt(6, seed=2), 2: _prompt(30, seed=3)}
    chunks = {0: [5, 9, 7], 1: [6], 2: [11, 3, 16]}
    ids = {s: [] for s in prompts}
    rows: dict[int, list[torch.Tensor]] = {s: [] for s in prompts}
    run = _runner(model)
    for step in range(3 + DECODES):
        parts = []
        for s, prompt in prompts.items():
            if step < len(chunks[s]):
                new = prompt[sum(chunks[s][:step]) : sum(chunks[s][: step + 1])]
            else:  # greedy: the argmax of the sequence's last row
                new = [int(rows[s][-1][-1].argmax())]
            parts.append((s, new, len(ids[s])))
            ids[s] += new
        logits = run.step_many(parts, all_logits=True)
        for (s, _, _), out in zip(parts, logits.split([len(p[1]) for p in parts]), strict=True):
            rows[s].append(out)
    for s in prompts:
        got = torch.cat(rows[s])
        assert got.shape[0] == len(prompts[s]) + 3 + DECODES - len(chunks[s])
        assert (got - _hf_logits(ref, ids[s])).abs().max() < TOL, f"sequence {s}"


# -- tensor parallelism and memory ------------------------------------------------------------------


def _tp_plan(tokens: dict[int, list[int]] | None = None) -> list[list[tuple]]:
    """Two sequences in distinct state slots: uneven prompt chunks, then 6 greedy steps (None: the
    token rank 0 sampled for that sequence on its previous step; ``tokens`` fills them in)."""
    a, b = _prompt(11, seed=4), _prompt(19, seed=5)
    plan = [
        [(0, a[:7], 0, 2, False), (1, b[:7], 0, 0, False)],
        [(0, a[7:], 7, 2, True), (1, b[7:12], 7, 0, False)],
        [(0, None, 11, 2, True), (1, b[12:], 12, 0, True)],
    ]
    plan += [[(0, None, 11 + i, 2, True), (1, None, 18 + i, 0, True)] for i in range(1, 6)]
    if tokens is None:
        return plan
    last, out = {}, []
    for step, sampled in zip(plan, tokens, strict=True):
        out.append([(seq, [last[seq]] if t is None else t, *rest) for seq, t, *rest in step])
        last.update((seq, tok) for (seq, *_), tok in zip(step, sampled, strict=True) if tok >= 0)
    return out


@pytest.mark.parametrize("key", ["qwen3_moe-16x4", "qwen3_next", "qwen3_5_moe-vlm"])
def test_tp2_equals_tp1_and_each_rank_holds_half_of_every_expert(checkpoints, key):
    """Two worker processes (gloo), loaded and stepped through the leader's requests, give rank 0
    the logits one process gives, at every step; each rank's weights are half of the split ones plus
    the replicated ones, and the leader's memory estimate is within 1% of what each rank holds."""
    from cortex.models.memory import weight_bytes

    path = checkpoints(key)
    one = run_tp_steps(path, 1, _tp_plan(), state_slots=3)
    two = run_tp_steps(path, 2, _tp_plan(one.tokens), state_slots=3)
    assert torch.tensor(one.logits[-1]).std() > 0.3
    assert two.tokens == one.tokens
    for i, (a, b) in enumerate(zip(one.logits, two.logits, strict=True)):
        assert rel_err(a, b) < SAME, f"step {i}"

    cfg = ModelConfig.from_hf_dir(path)
    experts = cfg.moe_layers * cfg.num_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4
    assert one.param_bytes[0] - two.param_bytes[0] > experts // 2  # each rank: half of every expert
    assert two.param_bytes[0] == two.param_bytes[1]
    for world, run in ((1, one), (2, two)):
        estimate = weight_bytes(cfg, world, "float32")
        assert abs(estimate - run.param_bytes[0]) < 0.01 * run.param_bytes[0], world


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_packed_experts_under_tp2_equal_tp1(checkpoints, mode):
    """Packed experts (the native expert kernel on each rank's half of every expert's features, one
    all-reduce per block) give rank 0 the logits and greedy tokens one packed process gives. Each
    rank packs its own half, whose blocks of 32 are the whole model's (the split falls on a block
    boundary), so the only difference is the order of the down projections' sums."""
    path = checkpoints("qwen3_moe-inter64")
    one = run_tp_steps(path, 1, _tp_plan(), state_slots=3, quantize=mode)
    two = run_tp_steps(path, 2, _tp_plan(one.tokens), state_slots=3, quantize=mode)
    assert torch.tensor(one.logits[-1]).std() > 0.3
    assert two.tokens == one.tokens
    for i, (a, b) in enumerate(zip(one.logits, two.logits, strict=True)):
        assert rel_err(a, b) < 1e-4, f"step {i}"


def test_an_expert_split_that_does_not_divide_is_refused(checkpoints):
    cfg = ModelConfig.from_hf_dir(checkpoints("qwen3_next"))
    check_split(cfg, 2, "moe")
    with pytest.raises(ShardingError, match="moe: moe_intermediate_size=30 is not divisible by tensor_parallel=4"):
        check_split(dataclasses.replace(cfg, moe_intermediate_size=30, linear_num_key_heads=4), 4, "moe")


def test_moe_config_fields(checkpoints):
    """What ModelConfig reads: Qwen3-MoE's expert count (``num_local_experts`` in files transformers
    5 writes), Qwen3-Next's shared expert, Qwen3.5-MoE's always-renormalised router."""
    q = ModelConfig.from_hf_dir(checkpoints("qwen3_moe-8x2-every2nd"))
    assert (q.arch, q.num_experts, q.num_experts_per_tok, q.norm_topk_prob) == ("qwen3_moe", 8, 2, False)
    assert [q.is_moe_layer(i) for i in range(4)] == [False, True, False, True] and q.qk_norm
    n = ModelConfig.from_hf_dir(checkpoints("qwen3_next"))
    assert (n.arch, n.shared_expert_intermediate_size, n.mlp_only_layers, n.moe_layers) == ("qwen3_next", 48, [2], 3)
    v = ModelConfig.from_hf_dir(checkpoints("qwen3_5_moe-vlm"))
    assert (v.arch, v.intermediate_size, v.norm_topk_prob, v.moe_layers) == ("qwen3_5", 0, True, 4)
    assert ModelConfig.from_dict(v.to_dict()) == v
    block = _load(checkpoints("qwen3_5_moe-vlm")).model.layers[0].mlp
    assert isinstance(block, SparseMoeBlock) and block.shared_expert is not None


# -- served -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory, checkpoints):
    """Qwen3-MoE on one rank (float32, and packed int8: its decode steps in one native call) and
    Qwen3.5-MoE across two, each with a tiny trained tokenizer."""
    dirs = {"moe": checkpoints("qwen3_moe-16x4"), "moe-hybrid-tp2": checkpoints("qwen3_5_moe-vlm")}
    for d in dirs.values():
        train_tiny_tokenizer(d)
        write_chatml_tokenizer_config(d)
    dirs["moe-int8"] = dirs["moe"]
    models = "".join(
        f'[[models]]\nid = "{mid}"\npath = "{path}"\ntensor_parallel = {2 if "tp2" in mid else 1}\npreload = true\n'
        + ('quantize = "int8"\n' if "int8" in mid else "")
        + "\n"
        for mid, path in dirs.items()
    )
    engine = '[engine]\nmax_seqs = 4\nprefill_chunk = 16\nkv_cache_mb = 8\nkv_cache_dtype = "float32"\n'
    srv = Server(tmp_path_factory.mktemp("moe-srv"), models, engine, devices='["cpu", "cpu"]')
    try:
        srv.wait_healthy(timeout=300)
        yield srv, dirs
    finally:
        srv.stop()


@pytest.mark.parametrize("model_id", ["moe", "moe-hybrid-tp2"])
def test_a_served_moe_model_streams_transformers_greedy_text(served, model_id):
    """Through the openai SDK, streamed: the greedy text is transformers' greedy tokens on the same
    prompt ids (a prompt longer than one prefill chunk)."""
    from cortex.chat import prompt as chat_prompt
    from cortex.chat.tokenizer import token_bytes
    from cortex.models.source import _read_hf_dir

    srv, dirs = served
    messages = [{"role": "user", "content": "The capital of France is Paris. " * 3}]
    files = _read_hf_dir(dirs[model_id])
    ids = files.tokenizer.encode(chat_prompt.render(files.template, messages, None, None))
    assert len(ids) > 16
    ref, want, seq = hf_hybrid_model(dirs[model_id]), [], list(ids)
    with torch.no_grad():
        for _ in range(10):
            want.append(int(ref(torch.tensor([seq])).logits[0, -1, : files.tokenizer.vocab_size].argmax()))
            seq.append(want[-1])

    chunks = _stream_greedy(srv, model_id, messages)
    assert len(chunks) > 2  # streamed, not one answer
    got = [bytes(t.bytes) for c in chunks if c.logprobs for t in c.logprobs.content]
    assert got == [token_bytes(files.tokenizer.tokenizer, t) for t in want]  # token by token
    text = "".join(c.delta.content or "" for c in chunks)
    assert text and b"".join(got).decode(errors="replace").startswith(text)  # a cut-off UTF-8 tail is held back


def test_a_served_packed_moe_model_streams_the_python_paths_greedy_text(served, monkeypatch):
    """quantize = "int8": each decode step of the served Qwen3-MoE runs its layers, routers and
    experts in one native call (decode.c, moe.c); its streamed greedy tokens are those of the same
    packed weights run layer by layer in Python, each expert on its own."""
    from cortex.chat import prompt as chat_prompt
    from cortex.chat.tokenizer import token_bytes
    from cortex.models.source import _read_hf_dir

    srv, dirs = served
    messages = [{"role": "user", "content": "The capital of France is Paris. " * 3}]
    files = _read_hf_dir(dirs["moe-int8"])
    ids = files.tokenizer.encode(chat_prompt.render(files.template, messages, None, None))
    cfg = ModelConfig.from_hf_dir(dirs["moe-int8"])
    model = model_class(cfg)(cfg)
    load_weights(model, "safetensors", [str(dirs["moe-int8"] / "model.safetensors")], quantize="int8")
    monkeypatch.setattr(model, "native_decode", False)
    monkeypatch.setattr(moe_module.Experts, "native_experts", False)
    run, want = _runner(model), []
    logits = run.step(0, ids, 0)
    for i in range(10):
        want.append(int(logits[: files.tokenizer.vocab_size].argmax()))
        logits = run.step(0, [want[-1]], len(ids) + i)

    chunks = _stream_greedy(srv, "moe-int8", messages)
    got = [bytes(t.bytes) for c in chunks if c.logprobs for t in c.logprobs.content]
    assert got == [token_bytes(files.tokenizer.tokenizer, t) for t in want]


PICK = {
    "type": "object",
    # bounded values: a random model need never end a free string or number
    "properties": {"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}, "hourly": {"type": "boolean"}},
    "required": ["unit", "hourly"],
}


@pytest.mark.parametrize("model_id", ["moe", "moe-hybrid-tp2"])
def test_a_served_moe_model_makes_a_forced_tool_call_in_both_dialects(served, model_id):
    """Tools through both official SDKs, the openai one streamed: a forced call comes back whole,
    with arguments that fit the tool's schema, and the turn ends as a tool call."""
    import anthropic

    srv, _ = served
    ask = [{"role": "user", "content": "Forecast for Paris, please."}]
    tool = {"name": "forecast", "description": "The weather forecast", "parameters": PICK}
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model=model_id,
        messages=ask,
        tools=[{"type": "function", "function": tool}],
        tool_choice={"type": "function", "function": {"name": "forecast"}},
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=256,
        stream=True,
    )
    chunks = [c.choices[0] for c in stream if c.choices]
    calls = [tc for c in chunks for tc in (c.delta.tool_calls or [])]
    assert {tc.index for tc in calls} == {0}  # one call: parallel calls were turned off
    got = json.loads("".join(tc.function.arguments or "" for tc in calls))
    assert [tc.function.name for tc in calls if tc.function.name] == ["forecast"]
    assert got["unit"] in ("celsius", "fahrenheit") and isinstance(got["hourly"], bool)
    assert chunks[-1].finish_reason == "tool_calls"

    claude = anthropic.Anthropic(base_url=srv.url, api_key="unused", max_retries=0)
    msg = claude.messages.create(
        model=model_id,
        max_tokens=256,
        messages=ask,
        tools=[{"name": "forecast", "description": tool["description"], "input_schema": PICK}],
        tool_choice={"type": "tool", "name": "forecast", "disable_parallel_tool_use": True},
        extra_body={"temperature": 0},  # this SDK's signature no longer lists it; cortex reads it
    )
    (call,) = [b for b in msg.content if b.type == "tool_use"]
    assert call.name == "forecast" and call.input["unit"] in ("celsius", "fahrenheit") and msg.stop_reason == "tool_use"


def _stream_greedy(srv, model_id: str, messages: list[dict]) -> list:
    """The choices of a streamed greedy chat completion of 10 tokens (EOS ignored), with logprobs,
    through the openai SDK."""
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model=model_id,
        messages=messages,
        temperature=0,
        max_tokens=10,
        stream=True,
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    return [c.choices[0] for c in stream if c.choices]
