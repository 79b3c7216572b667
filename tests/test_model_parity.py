"""The worker's model computes what HF transformers computes: fp32 logits on a prefill and 8 decode
steps, for Llama and Qwen3, tied and untied lm_head, single-file and sharded safetensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.checkpoints import hf_model, make_checkpoint
from workers.arch import ModelConfig, model_class
from workers.kv_cache import LocalRunner
from workers.weights import WeightsError, load_weights

TOL = 1e-4


def _load(path: Path):
    cfg = ModelConfig.from_hf_dir(path)
    model = model_class(cfg)(cfg)
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.index.json"))
    load_weights(model, "safetensors", [str(f) for f in files])
    return model


def _compare(path: Path, prompt_len: int, steps: int = 8) -> float:
    ours, ref = _load(path), hf_model(path)
    ids = torch.randint(3, 512, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)).tolist()
    run = LocalRunner(ours, torch.device("cpu"))
    got = run.step(0, ids, 0, all_logits=True)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    err = (got - want).abs().max().item()
    for _ in range(steps):  # each decode step against HF's forward over the whole sequence
        ids.append(int(got[-1].argmax()) if got.dim() == 2 else int(got.argmax()))
        got = run.step(0, ids[-1:], len(ids) - 1)
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0, -1]
        err = max(err, (got - want).abs().max().item())
    assert want.std() > 0.3, "logits are flat: the checkpoint was not re-randomised"
    return err


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("prompt_len", [1, 7, 33])
def test_logits_match_transformers(tmp_path, arch, tied, prompt_len):
    path = make_checkpoint(tmp_path, arch, tied)
    assert _compare(path, prompt_len) < TOL


def test_qwen3_head_dim_is_not_hidden_over_heads(tmp_path):
    cfg = ModelConfig.from_hf_dir(make_checkpoint(tmp_path, "qwen3", True))
    assert cfg.head_dim * cfg.num_heads != cfg.hidden_size and cfg.qk_norm


def test_sharded_checkpoint_with_index(tmp_path):
    path = make_checkpoint(tmp_path, "qwen3", tied=False, shard_size="60KB")
    assert (path / "model.safetensors.index.json").exists() and len(list(path.glob("*.safetensors"))) > 1
    assert _compare(path, 7) < TOL


def test_chunked_prefill_equals_one_prefill(tmp_path):
    model = _load(make_checkpoint(tmp_path, "qwen3", True))
    ids = list(range(3, 40))
    run = LocalRunner(model, torch.device("cpu"))
    whole = run.step(1, ids, 0, all_logits=True)
    run.step(2, ids[:20], 0)
    rest = run.step(2, ids[20:], 20, all_logits=True)
    assert (rest - whole[20:]).abs().max() < 1e-5


def test_sequences_stepped_together_get_what_each_gets_alone(tmp_path):
    """LocalRunner.step_many (bench/batched.py's driver): one decode step over three sequences of
    different lengths gives each the logits it gets when stepped by itself."""
    model = _load(make_checkpoint(tmp_path, "llama", True))
    alone, together = LocalRunner(model, torch.device("cpu")), LocalRunner(model, torch.device("cpu"))
    prompts = {1: [5, 6, 7, 8], 2: list(range(3, 30)), 3: [9, 10]}
    for seq, ids in prompts.items():
        alone.step(seq, ids[:-1], 0)
        together.step(seq, ids[:-1], 0)
    want = torch.stack([alone.step(seq, ids[-1:], len(ids) - 1) for seq, ids in prompts.items()])
    got = together.step_many([(seq, ids[-1:], len(ids) - 1) for seq, ids in prompts.items()])
    assert got.shape == want.shape
    assert (got - want).abs().max() < 1e-5


def test_restarting_a_sequence_at_position_zero_forgets_its_past(tmp_path):
    model = _load(make_checkpoint(tmp_path, "llama", True))
    run = LocalRunner(model, torch.device("cpu"))
    first = run.step(1, [5, 6, 7], 0)
    run.step(1, [9], 3)
    again = run.step(1, [5, 6, 7], 0)  # the same blocks, overwritten: the old token 9 is not seen
    assert torch.equal(first, again)
    from workers.kv_cache import StepBatch

    with pytest.raises(ValueError, match="block table"):  # positions past the blocks given: refused
        StepBatch.build([([1], 40, [0, 1])], 16, torch.device("cpu"))


def test_rope_parameters_and_legacy_rope_theta_both_parse(tmp_path):
    import json

    path = make_checkpoint(tmp_path, "qwen3", True)
    cfg = json.loads((path / "config.json").read_text())
    assert ModelConfig.from_hf(cfg).rope_theta == 1e6
    legacy = {k: v for k, v in cfg.items() if k != "rope_parameters"} | {"rope_theta": 5e5}
    assert ModelConfig.from_hf(legacy).rope_theta == 5e5


def test_a_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = make_checkpoint(tmp_path, "llama", tied=True)
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="model.layers.1.mlp.up_proj.weight"):
        _load(path)


def test_unsupported_architecture_is_refused_by_name():
    from workers.arch.config import UnsupportedModel

    with pytest.raises(UnsupportedModel, match="'gpt2'"):
        ModelConfig.from_hf({"model_type": "gpt2"})


def test_sampling_rules():
    from rpc.messages import SamplingParams
    from workers.sampling import new_generator, sample

    logits = torch.tensor([0.0, 1.0, 5.0, 2.0, 9.0])
    greedy = SamplingParams(temperature=0.0)
    assert sample(logits, greedy, new_generator(greedy, torch.device("cpu")), 0) == 4
    assert sample(logits, greedy, None, vocab_limit=4) == 2  # ids past the tokenizer are never chosen
    hot = SamplingParams(temperature=1.5, seed=11)

    def draws(params, n=50):
        g = new_generator(params, torch.device("cpu"))
        return [sample(logits, params, g, 0) for _ in range(n)]

    assert draws(hot) == draws(hot)  # a seed reproduces the sequence of draws
    assert len(set(draws(hot))) > 1
    assert set(draws(SamplingParams(temperature=1.5, top_k=1, seed=3))) == {4}
    assert set(draws(SamplingParams(temperature=5.0, top_k=2, seed=3))) <= {2, 4}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.5, seed=3))) == {4}
    # a very high temperature flattens the distribution: every id turns up
    assert set(draws(SamplingParams(temperature=50.0, seed=3), 200)) == {0, 1, 2, 3, 4}
    # sampled (not only greedy) draws also respect the vocabulary limit
    p = SamplingParams(temperature=50.0, seed=1)
    g = new_generator(p, torch.device("cpu"))
    assert {sample(logits, p, g, vocab_limit=3) for _ in range(100)} == {0, 1, 2}
