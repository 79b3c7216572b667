"""The CUDA path: runs only where a GPU is present (skipped on CPU-only CI, which has none).

Proves that a worker loads a model on cuda:0 inside an NCCL group and produces the same greedy
tokens as the CPU, and that `cortex serve` with devices = ["cuda:0"] answers like a CPU server.
"""

from __future__ import annotations

import httpx
import pytest
import torch

from tests.checkpoints import make_checkpoint
from tests.conftest import Server, tiny_models_toml, train_tiny_tokenizer, write_chatml_tokenizer_config
from tests.tp_harness import free_port

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _greedy(path, device: str, group: bool, n: int = 24) -> list[int]:
    from workers.arch import ModelConfig, model_class
    from workers.kv_cache import LocalRunner
    from workers.parallel import TPGroup
    from workers.weights import load_weights

    dev = torch.device(device)
    tp = TPGroup.connect(0, 1, f"127.0.0.1:{free_port()}", dev, 60) if group else TPGroup()
    cfg = ModelConfig.from_hf_dir(path)
    with torch.device(dev):
        model = model_class(cfg)(cfg, tp)
    load_weights(model, "safetensors", [str(p) for p in path.glob("*.safetensors")])
    run = LocalRunner(model, dev)
    prompt = [3, 17, 42, 99, 7, 250, 11]
    out = [int(run.step(0, prompt, 0).argmax())]
    for i in range(n - 1):
        out.append(int(run.step(0, out[-1:], len(prompt) + i).argmax()))
    assert tp._pg is not None or not group  # a real NCCL communicator, even for one rank
    return out


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_nccl_group_on_cuda0_gives_the_cpu_greedy_tokens(tmp_path, arch):
    path = make_checkpoint(tmp_path, arch, tied=arch == "qwen3")
    assert _greedy(path, "cuda:0", group=True) == _greedy(path, "cpu", group=False)


def test_cortex_serve_on_cuda_answers_like_the_cpu(tmp_path):
    path = make_checkpoint(tmp_path / "m", "qwen3", tied=True)
    train_tiny_tokenizer(path)
    write_chatml_tokenizer_config(path)
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hello, world!"}],
        "max_tokens": 24,
        "temperature": 0,
    }
    texts = {}
    for device in ("cpu", "cuda:0"):
        srv = Server(
            tmp_path / device.replace(":", ""),
            tiny_models_toml(path, 'dtype = "float32"'),
            '[engine]\nkv_cache_dtype = "float32"\n',  # the CPU's default pool is float16; CUDA's float32
            devices=f'["{device}"]',
        )
        try:
            health = srv.wait_healthy()
            assert health["models"][0]["devices"] == [device]
            r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            texts[device] = r.json()["choices"][0]["message"]["content"]
        finally:
            srv.stop()
    assert texts["cuda:0"] == texts["cpu"] and texts["cpu"]
