"""Qwen3.5 / dense Qwen3-Next (workers/arch/qwen3_5.py, deltanet.py) compute what transformers
computes, in float32, on tiny random checkpoints saved by transformers itself: a whole prompt, the
same prompt in chunks then decoded token by token with the state carried in its slot, and sequences
of different kinds stepped together in distinct state slots."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from tests.checkpoints import hf_hybrid_model, make_hybrid_checkpoint
from workers.arch import ModelConfig, model_class
from workers.arch.deltanet import StateBatch, delta_rule_chunked, delta_rule_step
from workers.arch.qwen3_5 import HybridRunner, Qwen3_5Model
from workers.parallel import ParallelLinear
from workers.quant import QuantLinear
from workers.weights import load_weights

TOL = 1e-4  # against transformers (measured: about 1e-5 on 70-150 tokens)
SAME = 1e-5  # our own paths, the same arithmetic batched or not: only summation order differs
REGROUPED = 5e-5  # the delta rule split elsewhere (chunks vs recurrence): equivalent algebra, other roundings
# quantize = "int8" against float32 on the same int8-rounded weights, as a share of the largest logit:
# the activations' rounding only (int16 per block on the native kernels: measured 0.004-0.005;
# bfloat16 activations and outputs on the torch fallback: 0.04)
INT8_SAME = {"native": 0.02, "torch": 0.08}
CPU = torch.device("cpu")


def _load(path: Path, quantize: str = "none") -> Qwen3_5Model:
    cfg = ModelConfig.from_hf_dir(path)
    model = model_class(cfg)(cfg)
    load_weights(model, "safetensors", [str(f) for f in sorted(path.glob("*.safetensors"))], quantize=quantize)
    return model


def _prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_logits(ref, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory) -> Path:
    return make_hybrid_checkpoint(tmp_path_factory.mktemp("qwen3_5"))


@pytest.fixture(scope="module")
def model(text_ckpt) -> Qwen3_5Model:
    return _load(text_ckpt)


@pytest.mark.parametrize(
    "arch, vlm, tied",
    [("qwen3_5", False, False), ("qwen3_5", False, True), ("qwen3_5", True, False), ("qwen3_next", False, False)],
    ids=["text", "text-tied", "vlm", "next-dense"],
)
def test_whole_prompt_matches_transformers(tmp_path, arch, vlm, tied):
    path = make_hybrid_checkpoint(tmp_path, arch=arch, vlm=vlm, tied=tied)
    ids = _prompt(70)  # past one 64-token chunk of the delta rule
    got = HybridRunner(_load(path), CPU).step(0, ids, 0, all_logits=True)
    want = _hf_logits(hf_hybrid_model(path), ids)
    assert want.std() > 0.3, "logits are flat: the checkpoint was not re-randomised"
    assert (got - want).abs().max() < TOL


def test_chunked_prefill_then_decode_matches_one_forward_and_transformers(text_ckpt, model):
    prompt, steps = _prompt(15, seed=1), 6
    run = HybridRunner(model, CPU)
    got, pos = [], 0
    for n in (5, 7, 3):  # the conv and delta states carry from chunk to chunk in the slot
        got.append(run.step(0, prompt[pos : pos + n], pos, all_logits=True))
        pos += n
    ids = list(prompt)
    for _ in range(steps):  # greedy, one token per step
        ids.append(int(got[-1][-1].argmax()))
        got.append(run.step(0, ids[-1:], len(ids) - 1)[None])
    got = torch.cat(got)[:-1]  # logits at every position but the one after the last token

    whole = HybridRunner(model, CPU).step(0, ids[:-1], 0, all_logits=True)
    assert (got - whole).abs().max() < REGROUPED

    ref = hf_hybrid_model(text_ckpt)
    assert (got - _hf_logits(ref, ids[:-1])).abs().max() < TOL
    with torch.no_grad():  # transformers' own decode (its recurrent form) picks the same tokens
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False)
    assert out[0].tolist() == ids


def _prefill_then_decode(model: Qwen3_5Model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Logits of every prompt position (one step), then of each token decoded one per step."""
    run = HybridRunner(model, CPU)
    out = [run.step(0, prompt, 0, all_logits=True)]
    for i, tok in enumerate(tokens):
        out.append(run.step(0, [tok], len(prompt) + i)[None])
    return torch.cat(out)


def _with_weights_of(dense: Qwen3_5Model, packed: Qwen3_5Model) -> Qwen3_5Model:
    """``dense`` computing in float32 on ``packed``'s int8 weights (dequantized): what int8 should
    compute but for the activations' rounding."""
    layers = dict(dense.named_modules())
    with torch.no_grad():
        for name, q in packed.named_modules():
            if isinstance(q, QuantLinear) and name != "lm_head":
                layers[name].weight.copy_(q.dequantized())
        dense.lm_head = torch.nn.Linear(dense.cfg.hidden_size, dense.cfg.vocab_size, bias=False)
        dense.lm_head.weight.copy_(packed.lm_head.dequantized())
    return dense


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_int8_packs_every_linear_and_computes_on_its_rounded_weights(tmp_path, tied):
    """quantize = "int8" (models.toml) on a hybrid: every linear is packed, the Gated DeltaNet's fused
    in_proj and its out_proj included, and the head (a packed copy of a tied embedding). A prompt
    then decoded token by token (the state carried in its slot) gives the float32 model's logits on
    the int8-rounded weights (INT8_SAME), and stays near transformers' on the original ones (the
    weights' rounding, carried along by the recurrent state: measured cos 0.998, max 0.09-0.11 of
    the largest logit, argmax agreeing on 88-99% of positions)."""
    path = make_hybrid_checkpoint(tmp_path, tied=tied)
    packed = _load(path, "int8")
    assert not any(isinstance(m, (ParallelLinear, torch.nn.Linear)) for m in packed.modules())
    mixer = packed.model.layers[0].linear_attn
    assert isinstance(mixer.in_proj, QuantLinear) and isinstance(mixer.out_proj, QuantLinear)
    assert isinstance(packed.lm_head, QuantLinear)
    assert {m.kind for m in packed.modules() if isinstance(m, QuantLinear)} == {"int8"}

    prompt, steps = _prompt(70), [5, 300, 17, 42]  # past one 64-token chunk of the delta rule
    got = _prefill_then_decode(packed, prompt, steps)
    rounded = _prefill_then_decode(_with_weights_of(_load(path), packed), prompt, steps)
    assert (got - rounded).abs().max() < INT8_SAME[packed.lm_head.impl] * rounded.abs().max()

    want = _hf_logits(hf_hybrid_model(path), prompt + steps)
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.995
    assert (got - want).abs().max() < 0.2 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8


def test_sequences_stepped_together_get_what_each_gets_alone(model):
    """One step: a prompt chunk of a new sequence between two decodes, each in its own slot (slots
    out of order on purpose), against each sequence stepped alone in a runner of its own."""
    a, b, c = _prompt(9, seed=2), _prompt(6, seed=3), _prompt(20, seed=4)
    together = HybridRunner(model, CPU)
    together.step(5, c[:-1], 0)  # takes slot 0
    together.step(7, a[:-1], 0)  # slot 1
    got = together.step_many([(7, a[-1:], len(a) - 1), (9, b, 0), (5, c[-1:], len(c) - 1)], all_logits=True)

    want = []
    for ids, kind in ((a, "decode"), (b, "prefill"), (c, "decode")):
        alone = HybridRunner(model, CPU)
        if kind == "decode":
            alone.step(0, ids[:-1], 0)
            want.append(alone.step(0, ids[-1:], len(ids) - 1)[None])
        else:
            want.append(alone.step(0, ids, 0, all_logits=True))
    assert got.shape == (1 + len(b) + 1, 512)
    assert (got - torch.cat(want)).abs().max() < SAME


def test_a_fresh_sequence_in_a_used_slot_forgets_the_old_one(model):
    run = HybridRunner(model, CPU, num_slots=1)
    run.step(1, _prompt(30, seed=5), 0)
    run.release(1)  # slot 0 is free again, its state left as it was
    ids = _prompt(8, seed=6)
    got = run.step(2, ids, 0, all_logits=True)  # fresh: the slot is zeroed first
    want = HybridRunner(model, CPU).step(2, ids, 0, all_logits=True)
    assert torch.equal(got, want)


def test_a_forked_sequence_continues_from_the_copied_state(model):
    """n > 1: the prompt computed once, its KV and state copied; each branch then equals a sequence
    computed from scratch."""
    prompt = _prompt(11, seed=7)
    run = HybridRunner(model, CPU)
    run.step(0, prompt[:-1], 0)
    run.fork(0, 1)
    branches = {0: [prompt[-1], 17, 40], 1: [prompt[-1], 99, 3]}
    for seq, extra in branches.items():
        for i, tok in enumerate(extra):
            got = run.step(seq, [tok], len(prompt) - 1 + i)
        want = HybridRunner(model, CPU).step(0, prompt[:-1] + extra, 0)
        assert (got - want).abs().max() < REGROUPED


@pytest.mark.parametrize("n", [1, 5, 64, 150])
def test_chunked_delta_rule_equals_the_recurrence(n):
    g = torch.Generator().manual_seed(n)
    H, dk, dv = 3, 8, 5
    q, k = torch.randn(H, n, dk, generator=g), torch.nn.functional.normalize(torch.randn(H, n, dk, generator=g), dim=-1)
    v = torch.randn(H, n, dv, generator=g)
    decay, beta = -torch.rand(H, n, generator=g) * 0.3, torch.rand(H, n, generator=g)
    state0 = torch.randn(H, dk, dv, generator=g)
    out, state = delta_rule_chunked(state0, q, k, v, decay, beta, chunk=16)
    s, want = state0[None], []
    for t in range(n):
        o, s = delta_rule_step(s, q[None, :, t], k[None, :, t], v[None, :, t], decay[None, :, t], beta[None, :, t])
        want.append(o[0])
    assert (out - torch.stack(want, dim=1)).abs().max() < 1e-4
    assert (state - s[0]).abs().max() < 1e-4


def test_vlm_checkpoint_loads_the_text_model_and_skips_the_rest(tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    path = make_hybrid_checkpoint(tmp_path, vlm=True)
    weights = load_file(path / "model.safetensors")
    assert any(k.startswith("model.language_model.") for k in weights)
    weights["mtp.fc.weight"] = torch.zeros(4, 4)  # real checkpoints carry a multi-token-prediction head
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    cfg = ModelConfig.from_hf_dir(path)
    assert cfg.arch == "qwen3_5" and cfg.hidden_size == 64 and cfg.linear_value_head_dim == 24
    with caplog.at_level(logging.INFO, logger="cortex.worker"):
        _load(path)
    vision = sum(k.startswith("model.visual.") for k in weights)
    assert f"skipping {vision} vision tower and 1 MTP tensors" in caplog.text


def test_config_shapes_and_state_bytes(text_ckpt, model):
    cfg = model.cfg
    assert model_class(cfg) is Qwen3_5Model
    assert (cfg.kv_layers, cfg.linear_layers) == (1, 3)
    assert model.kv_shape()[0] == 1
    pool = model.new_state_pool(3, CPU)
    assert pool.conv.shape == (3, 3, 2 * 2 * 16 + 4 * 24, 3)
    assert pool.delta.shape == (3, 3, 4, 16, 24)
    assert cfg.state_slot_bytes(1, "float32") == pool.slot_bytes()
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_layer_types_default_to_every_fourth_layer_full(text_ckpt):
    raw = json.loads((text_ckpt / "config.json").read_text())
    del raw["layer_types"]
    cfg = ModelConfig.from_hf({**raw, "num_hidden_layers": 8})
    assert cfg.layer_types == ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + [
        "full_attention"
    ]


def test_qwen3_next_with_experts_reads_its_mixture_of_experts_layers(text_ckpt):
    """(Their computation: tests/test_moe.py.)"""
    raw = json.loads((text_ckpt / "config.json").read_text()) | {"model_type": "qwen3_next", "num_experts": 8}
    moe = ModelConfig.from_hf({**raw, "moe_intermediate_size": 32})
    assert (moe.num_experts, moe.moe_layers, moe.norm_topk_prob) == (8, 4, True)
    dense = ModelConfig.from_hf({**raw, "moe_intermediate_size": 32, "mlp_only_layers": [0, 1, 2, 3]})
    assert dense.arch == "qwen3_next" and dense.moe_layers == 0


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_next"])
def test_two_ranks_split_each_mixer_and_its_state(tmp_path, arch):
    """Tensor parallelism, layer by layer in one process (no all-reduce: each rank's row-parallel
    output is its partial sum): the two ranks' slices of each token mixer add up to the whole one,
    and their delta states are the whole one's split by value head."""
    from workers.arch.qwen3_5 import _Step
    from workers.kv_cache import BLOCK_SIZE, PagedKVCache, StepBatch
    from workers.parallel import TPGroup

    path = make_hybrid_checkpoint(tmp_path, arch=arch)
    cfg = ModelConfig.from_hf_dir(path)
    files = [str(f) for f in sorted(path.glob("*.safetensors"))]
    models = [_load(path)]
    for rank in range(2):
        models.append(Qwen3_5Model(cfg, TPGroup(rank, 2)))
        load_weights(models[-1], "safetensors", files)
    tokens = [_prompt(8, seed=8), [5]]
    batch = StepBatch.build([(tokens[0], 0, [0]), (tokens[1], 0, [1])], BLOCK_SIZE, CPU)
    x = torch.randn(9, cfg.hidden_size, generator=torch.Generator().manual_seed(9))
    outs, states = [], []
    for m in models:
        kv = PagedKVCache(*m.kv_shape(), CPU, 2)
        pool = m.new_state_pool(2, CPU)
        seqs = StateBatch.build([8, 1], [0, 1], [True, True], CPU)
        step = _Step(batch, kv, pool, seqs, *m.rotary(batch.positions, torch.float32))
        linear, full = m.model.layers[0], m.model.layers[1]
        outs.append((linear.linear_attn(x, pool, 0, seqs), full.self_attn(x, step, 0)))
        states.append(pool.delta[0])
    for i in range(2):
        assert (outs[1][i] + outs[2][i] - outs[0][i]).abs().max() < SAME
    assert (torch.cat(states[1:], dim=1) - states[0]).abs().max() < SAME  # [slots, heads, dk, dv]
