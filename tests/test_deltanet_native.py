"""The native Gated DeltaNet decode step (workers/kernels/deltanet.c) computes what the PyTorch path
of workers/arch/deltanet.py computes, from the fused input projection to the gated norm's output,
with the conv and delta states updated in place:

- one row and several, in any order of state slots (not a contiguous range), from fresh (zero)
  states and continuing ones, over several steps;
- value heads sharing key heads (Qwen3-Next's 16 key / 32 value heads) and as many of each
  (Qwen3.5-0.8B), head sizes that are no multiple of the vector width;
- a step that mixes prompt chunks (the chunked rule, in PyTorch) with single tokens (native);
- a whole model decodes the same greedy tokens, logits within float tolerance, as with the PyTorch
  path (and tests/test_qwen3_5.py holds both to transformers);
- a bfloat16 layer keeps the PyTorch path;
- the zero-centred norms' cached ``1 + w`` follows a weight loaded again in place.
"""

from __future__ import annotations

import pytest
import torch

from tests.checkpoints import make_hybrid_checkpoint
from workers import native
from workers.arch import ModelConfig, model_class
from workers.arch import deltanet as deltanet_module
from workers.arch import qwen3_5 as qwen3_5_module
from workers.arch.deltanet import GatedDeltaNet, LinearLayout, RecurrentStatePool, StateBatch
from workers.arch.qwen3_5 import HybridRunner
from workers.parallel import TPGroup
from workers.weights import load_weights

pytestmark = pytest.mark.skipif(native.kernels() is None, reason="no native kernels on this CPU")

CPU = torch.device("cpu")
# relative to the largest value compared: the same float32 arithmetic, only the order of the sums
# (S^T k over 128 rows, the conv's taps, the norms) differs; measured up to 3.4e-7
SAME = 1e-5
# (key heads, value heads, key dim, value dim)
SHAPES = {
    "grouped": (2, 4, 16, 24),  # each key head serves two value heads; 24 is no multiple of 8 or 16
    "qwen3_5_0_8b": (16, 16, 128, 128),  # Qwen3.5-0.8B's linear layers
}


def _config(hk: int, hv: int, dk: int, dv: int) -> ModelConfig:
    return ModelConfig(
        arch="qwen3_5", vocab_size=64, hidden_size=96, intermediate_size=64, num_layers=1, num_heads=2,
        num_kv_heads=1, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=512,
        tie_word_embeddings=False, layer_types=["linear_attention"], linear_conv_kernel=4,
        linear_num_key_heads=hk, linear_num_value_heads=hv, linear_key_head_dim=dk, linear_value_head_dim=dv,
    )  # fmt: skip


def _layer(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> GatedDeltaNet:
    """A layer with random weights in the ranges a trained one has: decays near 1, so the state
    carries far and its old values matter to each step."""
    layer = GatedDeltaNet(cfg, LinearLayout.for_rank(cfg, 0, 1), TPGroup(), dtype, interleaved=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name == "A_log":
                p.copy_(torch.empty(p.shape).uniform_(0.02, 0.6, generator=g).log())
            elif name == "dt_bias":
                p.copy_(-1.5 + 0.5 * torch.randn(p.shape, generator=g))
            elif name == "norm.weight":
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:  # projections and conv taps, scaled by fan-in
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return layer


def _pool(cfg: ModelConfig, slots: int, fresh: bool) -> RecurrentStatePool:
    channels = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim
    channels += cfg.linear_num_value_heads * cfg.linear_value_head_dim
    pool = RecurrentStatePool(
        1, slots, channels, cfg.linear_conv_kernel, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
        cfg.linear_value_head_dim, torch.float32, CPU,
    )  # fmt: skip
    if not fresh:  # states a sequence could have left behind
        g = torch.Generator().manual_seed(1)
        pool.conv.copy_(torch.randn(pool.conv.shape, generator=g))
        pool.delta.copy_(0.3 * torch.randn(pool.delta.shape, generator=g))
    return pool


def _reference(layer: GatedDeltaNet, x: torch.Tensor, pool: RecurrentStatePool, seqs: StateBatch) -> torch.Tensor:
    """The PyTorch path for every row of the step."""
    return layer.out_proj(layer._mix(layer.in_proj(x), pool, 0, seqs))


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.isfinite(got).all()
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert err < SAME, f"relative error {err:.2e}"


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
@pytest.mark.parametrize("slots", [[0], [2], [5, 1, 3]], ids=["1-row", "1-row-slot2", "3-rows"])
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "continuing"])
def test_native_decode_step_equals_the_pytorch_path(shape, slots, fresh):
    cfg = _config(*SHAPES[shape])
    layer = _layer(cfg)
    native_pool, torch_pool = _pool(cfg, 6, fresh), _pool(cfg, 6, fresh)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):  # the states each step leaves are the next one's input
        seqs = StateBatch.build([1] * len(slots), slots, [False] * len(slots), CPU)
        x = torch.randn(len(slots), cfg.hidden_size, generator=g)
        assert layer._native(layer.in_proj(x), native_pool) is not None
        got, want = layer(x, native_pool, 0, seqs), _reference(layer, x, torch_pool, seqs)
        _close(got, want)
        _close(native_pool.delta, torch_pool.delta)
        _close(native_pool.conv, torch_pool.conv)
    untouched = [s for s in range(6) if s not in slots]
    assert torch.equal(native_pool.delta[:, untouched], _pool(cfg, 6, fresh).delta[:, untouched])


def test_a_step_mixing_prompt_chunks_and_single_tokens_equals_the_pytorch_path():
    """Prompt rows take the chunked rule (PyTorch), single tokens the native step, in one call."""
    cfg = _config(*SHAPES["grouped"])
    layer = _layer(cfg)
    native_pool, torch_pool = _pool(cfg, 4, False), _pool(cfg, 4, False)
    # a single token, a 5-token chunk continuing slot 0, a single token, a fresh 3-token prompt
    lengths, slots, fresh = [1, 5, 1, 3], [3, 0, 1, 2], [False, False, False, True]
    seqs = StateBatch.build(lengths, slots, fresh, CPU)
    for pool in (native_pool, torch_pool):
        pool.zero(seqs.fresh_slots)  # what the model does before its layers
    x = torch.randn(sum(lengths), cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    _close(layer(x, native_pool, 0, seqs), _reference(layer, x, torch_pool, seqs))
    _close(native_pool.delta, torch_pool.delta)
    _close(native_pool.conv, torch_pool.conv)


def test_a_bfloat16_layer_keeps_the_pytorch_path():
    cfg = _config(*SHAPES["grouped"])
    layer = _layer(cfg, torch.bfloat16)
    pool = _pool(cfg, 1, True)
    assert layer._native(torch.zeros(1, 8, dtype=torch.bfloat16), pool) is None


class _NoKernels:
    """``workers.native`` as the layers see it where no kernels load (``CORTEX_NATIVE_KERNELS=0``)."""

    @staticmethod
    def for_tensor(x: torch.Tensor) -> None:
        return None


def _greedy(model, prompt: list[int], tokens: int) -> tuple[list[int], torch.Tensor]:
    run = HybridRunner(model, CPU)
    logits = [run.step(0, prompt, 0)]
    out = [int(logits[-1].argmax())]
    for i in range(tokens - 1):
        logits.append(run.step(0, [out[-1]], len(prompt) + i))
        out.append(int(logits[-1].argmax()))
    return out, torch.stack(logits)


def test_a_model_decodes_the_same_greedy_tokens_as_on_the_pytorch_path(tmp_path, monkeypatch):
    path = make_hybrid_checkpoint(tmp_path, tied=True)
    cfg = ModelConfig.from_hf_dir(path)
    model = model_class(cfg)(cfg)
    load_weights(model, "safetensors", [str(f) for f in sorted(path.glob("*.safetensors"))])
    prompt = torch.randint(3, 512, (11,), generator=torch.Generator().manual_seed(4)).tolist()
    tokens, logits = _greedy(model, prompt, 12)
    for module in (deltanet_module, qwen3_5_module):
        monkeypatch.setattr(module, "native", _NoKernels)
    want_tokens, want_logits = _greedy(model, prompt, 12)
    assert tokens == want_tokens
    _close(logits, want_logits)


def test_a_zero_centred_norm_follows_its_weight_when_it_is_loaded_again():
    """The norm keeps ``1 + w`` between steps; an in-place load of ``w`` must not leave it stale."""
    norm = qwen3_5_module.ZeroCentredRMSNorm(32, 1e-6, torch.float32)
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(5))
    for w in (0.0, 0.5):
        with torch.no_grad():
            norm.weight.fill_(w)
        want = torch.rms_norm(x, (32,), eps=1e-6) * (1 + w)
        _close(norm(x), want)
        _close(norm.add_forward(x, x)[1], torch.rms_norm(2 * x, (32,), eps=1e-6) * (1 + w))
