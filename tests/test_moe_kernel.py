"""The native mixture-of-experts kernels (workers/kernels/moe.c, and decode.c's whole-step path for
Qwen3-MoE) compute what the Python path computes, on tiny random Qwen3-MoE checkpoints packed as
int8 and int4 (every linear and expert on the native kernels).

- Experts packed for the native kernels run a whole step's routed compute in one call: the same
  values as the per-expert path (``grouped_experts``: one block product per expert and projection),
  for one token and for batches, few or many experts per token, experts no token picked.
- The native router picks the experts ``SparseMoeBlock.route`` picks, with its weights,
  renormalised (``norm_topk_prob``) or not.
- An all-decode step of a packed Qwen3-MoE runs every layer, dense and MoE, in one native call
  (decode.c): the same greedy tokens as the layer-by-layer Python path, logits close to its.
- Float experts keep the Python path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.checkpoints import make_moe_checkpoint
from workers import native
from workers.arch import ModelConfig, model_class
from workers.arch import moe as moe_module
from workers.arch.llama import _layer_table
from workers.kv_cache import LocalRunner
from workers.weights import load_weights

pytestmark = pytest.mark.skipif(native.kernels() is None, reason="no native kernels on this CPU")

CPU = torch.device("cpu")
SAME = 1e-5  # relative: the same block products per row; only the weighted sum's order differs
# relative, the whole step against the layer-by-layer path: the router's float32 sums are ordered
# differently (1e-7), and where that moves an activation across an int16 rounding step of the next
# block product (1 / 32767 of its block's largest value) the difference grows to a few 1e-5
WHOLE = 1e-3
CHECKPOINTS = {
    "16x4": {},  # top-4 of 16, renormalised; layer 1 dense (mlp_only_layers)
    "8x2-every2nd": dict(
        num_experts=8, num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[], norm_topk_prob=False
    ),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(key: str) -> Path:
        if key not in made:
            made[key] = make_moe_checkpoint(tmp_path_factory.mktemp(key), "qwen3_moe", **CHECKPOINTS[key])
        return made[key]

    return get


def _load(path: Path, quantize: str = "none"):
    cfg = ModelConfig.from_hf_dir(path)
    model = model_class(cfg)(cfg)
    load_weights(model, "safetensors", [str(f) for f in sorted(path.glob("*.safetensors"))], quantize=quantize)
    return model


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.fixture(scope="module")
def packed(checkpoints):
    """mode -> the 16-expert model packed so (loaded once)."""
    return {mode: _load(checkpoints("16x4"), mode) for mode in ("int8", "int4")}


@pytest.mark.parametrize("tokens", [1, 3, 17])
@pytest.mark.parametrize("k", [2, 8])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_packed_experts_run_a_step_in_one_native_call_as_the_per_expert_path(packed, monkeypatch, mode, k, tokens):
    """Every (token, choice) pair's expert, weighted and summed per token, in one call: no Python
    grouping, the same sums as ``grouped_experts`` within float rounding. Experts 0-3 are never
    picked (no tokens: skipped); with 17 tokens of 8 choices, most experts take several tokens."""
    experts = packed[mode].model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(tokens * 10 + k)
    x = torch.randn(tokens, experts.hidden, generator=g)
    ids = torch.stack([4 + torch.randperm(12, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g)
    assert experts.native_table() is not None
    with monkeypatch.context() as m:  # the per-expert path is not reached
        m.setattr(moe_module, "grouped_experts", None)
        got = experts(x, ids, weights)
    monkeypatch.setattr(moe_module.Experts, "native_experts", False)
    want = experts(x, ids, weights)
    assert got.shape == want.shape == x.shape
    assert _rel(got, want) < SAME


def test_a_token_sums_the_same_alone_or_in_a_batch(packed):
    """Each token's k results are added in the order of its choices, whatever else the step holds:
    a decode stream gets the same values alone or batched (the same bits on one machine)."""
    experts = packed["int8"].model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, experts.hidden, generator=g)
    ids = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(9)])
    weights = torch.rand(9, 4, generator=g)
    batch = experts(x, ids, weights)
    for t in (0, 4, 8):
        assert _rel(experts(x[t : t + 1], ids[t : t + 1], weights[t : t + 1])[0], batch[t]) < 1e-6


def test_an_expert_id_out_of_range_is_refused(packed):
    experts = packed["int8"].model.layers[0].mlp.experts
    with pytest.raises(IndexError):
        experts(torch.zeros(1, experts.hidden), torch.tensor([[3, 16]]), torch.ones(1, 2))


def test_float_experts_keep_the_python_path(checkpoints):
    """Dense float32 experts have no native table: they take the grouped / per-expert path, and a
    float model's decode steps run layer by layer."""
    model = _load(checkpoints("16x4"))
    assert model.model.layers[0].mlp.experts.native_table() is None
    assert model.model.layers[0].mlp.native_table() is None
    assert _layer_table(model) is None


@pytest.mark.parametrize("key", list(CHECKPOINTS))
def test_the_native_router_picks_what_route_picks(checkpoints, key):
    """Softmax, top-k and (``norm_topk_prob``) renormalisation as transformers' Qwen3-MoE router:
    the same experts in the same order, the same weights within float rounding."""
    model = _load(checkpoints(key), "int8")
    block = next(layer.mlp for layer in model.model.layers if isinstance(layer.mlp, moe_module.SparseMoeBlock))
    h = torch.randn(13, model.cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    want_w, want_ids = block.route(h)
    got_w, got_ids = native.kernels().moe_route(h, block.native_table())
    assert torch.equal(got_ids, want_ids)
    assert (got_w - want_w).abs().max() < 1e-6
    if block.norm_topk:
        assert torch.allclose(got_w.sum(-1), torch.ones(13))


def _greedy(model, prompts: dict[int, list[int]], steps: int) -> tuple[dict[int, list[int]], torch.Tensor]:
    """Each prompt prefilled (one step), then ``steps`` decode steps of all together: (greedy tokens
    per sequence, the decode steps' logits [steps, sequences, vocab])."""
    run = LocalRunner(model, CPU)
    last = run.step_many([(s, p, 0) for s, p in prompts.items()])
    tokens, rows = {s: [] for s in prompts}, []
    for i in range(steps):
        for s, row in zip(prompts, last, strict=True):
            tokens[s].append(int(row.argmax()))
        last = run.step_many([(s, [tokens[s][-1]], len(p) + i) for s, p in prompts.items()])
        rows.append(last)
    return tokens, torch.stack(rows)


@pytest.mark.parametrize("key", list(CHECKPOINTS))
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_decode_step_of_a_packed_qwen3_moe_runs_in_one_native_call(checkpoints, monkeypatch, key, mode):
    """Three sequences decoding together: every layer (attention, router, experts, dense MLPs) in
    decode.c, no Python MoE block reached; the greedy tokens are the layer-by-layer Python path's
    (with the per-expert loop), the logits close to its."""
    model = _load(checkpoints(key), mode)
    lengths = {0: 7, 1: 12, 2: 3}
    prompts = {
        s: torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(s)).tolist() for s, n in lengths.items()
    }
    real_forward = moe_module.SparseMoeBlock.forward

    def prefill_only(block, x):
        assert x.shape[0] > len(prompts), "a decode step reached the Python MoE block"
        return real_forward(block, x)

    monkeypatch.setattr(moe_module.SparseMoeBlock, "forward", prefill_only)
    got_tokens, got = _greedy(model, prompts, steps=8)
    assert model._layer_table is not None and any(entry.moe for entry in model._layer_table)
    monkeypatch.setattr(moe_module.SparseMoeBlock, "forward", real_forward)
    monkeypatch.setattr(model, "native_decode", False)
    monkeypatch.setattr(moe_module.Experts, "native_experts", False)
    want_tokens, want = _greedy(model, prompts, steps=8)
    assert got_tokens == want_tokens
    assert _rel(got, want) < WHOLE
