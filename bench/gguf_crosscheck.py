"""Our GGUF files, run by llama.cpp itself: the same greedy tokens as transformers.

tests/gguf_writer.py writes hybrid (Qwen3.5) checkpoints the way llama.cpp's converter does, and
cortex loads them with transformers' logits (tests/test_qwen35_gguf.py). That proves the writer and
the loader agree with each other; this proves the writer agrees with llama.cpp: each tiny random
checkpoint, written as GGUF, is served by llama.cpp's own `llama-server`, and its greedy tokens
must equal transformers' on the same prompt.

    .venv/bin/python bench/gguf_crosscheck.py [--server PATH]

The server is the one `bench/llama_server.py` builds (~/.cache/cortex-bench/build-*/bin); it is a
benchmark dependency, so this check stays out of `make test`. llama.cpp reads one head dimension
for the linear layers' keys and values, so these checkpoints use equal ones (the real models do).
Their embeddings have more rows (512) than the tokenizer has tokens (about 400), as Qwen3.5's has
(248,320 rows, 248,077 tokens): the writer pads the token list as llama.cpp's converter does, which
llama.cpp requires. Dense Qwen3-Next has no llama.cpp form (only the
mixture-of-experts model is converted) and is not checked; Qwen3-MoE, Qwen3-Next with experts and
Qwen3.5-MoE are.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tests.checkpoints as checkpoints  # noqa: E402
from tests.checkpoints import QWEN3_5_VOCAB  # noqa: E402
from tests.conftest import train_tiny_tokenizer  # noqa: E402
from tests.gguf_writer import write_gguf  # noqa: E402
from tests.qwen_tok import built  # noqa: E402

LAYERS = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
# (maker, its arguments): llama.cpp expresses neither a dense layer among MoE ones nor a layer
# pattern other than every n-th full attention, so these checkpoints keep to what it can say
CASES = {
    "qwen3_5": ("hybrid", {"arch": "qwen3_5", "layer_types": LAYERS}),
    "qwen3_5-vlm": ("hybrid", {"arch": "qwen3_5", "vlm": True, "layer_types": LAYERS}),
    # the real vocabulary (tests/qwen_tok.py): 33 added tokens past the ranks, 243 pads to 248,320 rows
    "qwen3_5-248k": ("hybrid", {"arch": "qwen3_5", "layer_types": LAYERS, "vocab": QWEN3_5_VOCAB, "tied": True}),
    "qwen3_moe": ("moe", {"arch": "qwen3_moe", "mlp_only_layers": []}),
    "qwen3_next-moe": ("moe", {"arch": "qwen3_next", "layer_types": LAYERS, "mlp_only_layers": []}),
    "qwen3_5_moe": ("moe", {"arch": "qwen3_5_moe", "layer_types": LAYERS}),
}
STEPS = 8


def default_server() -> Path | None:
    found = sorted((Path.home() / ".cache" / "cortex-bench").glob("build-*/bin/llama-server"))
    return found[-1] if found else None


def make(case: tuple[str, dict], root: Path) -> Path:
    """A tiny random checkpoint (512 embedding rows unless the case says) with a smaller trained
    tokenizer, or with the real Qwen3.5 one."""
    text_config = checkpoints.tiny_hybrid_text_config

    def equal_head_dims(*args, **kwargs) -> dict:
        cfg = text_config(*args, **kwargs)
        cfg["linear_value_head_dim"] = cfg["linear_key_head_dim"]
        return cfg

    checkpoints.tiny_hybrid_text_config = equal_head_dims
    try:
        maker, kw = case
        if maker == "hybrid":
            path = checkpoints.make_hybrid_checkpoint(root / "hf", **kw)
        else:
            path = checkpoints.make_moe_checkpoint(root / "hf", **kw)
    finally:
        checkpoints.tiny_hybrid_text_config = text_config
    if kw.get("vocab") == QWEN3_5_VOCAB:
        shutil.copyfile(built("qwen3_5"), path / "tokenizer.json")
    else:
        train_tiny_tokenizer(path)
    return path


def transformers_greedy(path: Path, prompt: list[int]) -> list[int]:
    model, seq, out = checkpoints.hf_hybrid_model(path), list(prompt), []
    with torch.no_grad():
        for _ in range(STEPS):
            out.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            seq.append(out[-1])
    return out


def llama_greedy(server: Path, gguf_file: Path, prompt: list[int], port: int = 39017) -> list[int]:
    log = gguf_file.with_suffix(".log")
    cmd = [str(server), "-m", str(gguf_file), "--port", str(port), "-t", "2", "-c", "256", "--no-warmup"]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited: {log.read_text()[-2000:]}")
        body = {"prompt": prompt, "n_predict": STEPS, "temperature": 0, "samplers": ["top_k"], "top_k": 1}
        r = httpx.post(f"http://127.0.0.1:{port}/completion", json={**body, "return_tokens": True}, timeout=120)
        return r.json()["tokens"]
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--server", type=Path, default=default_server())
    args = p.parse_args()
    if args.server is None or not args.server.exists():
        print("no llama-server: build it with `.venv/bin/python bench/llama_server.py --build-only`")
        return 2
    failed = 0
    for name, case in CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            path = make(case, Path(tmp))
            prompt = torch.randint(3, 250, (20,), generator=torch.Generator().manual_seed(1)).tolist()
            want = transformers_greedy(path, prompt)
            for label, kw in (("f32", {}), ("f16", {"f16": True})):
                got = llama_greedy(args.server, write_gguf(path, Path(tmp) / f"{label}.gguf", **kw), prompt)
                same = got == want
                failed += not same
                print(f"{name:12s} {label}: llama.cpp {got} transformers {want} {'same' if same else 'DIFFERENT'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
