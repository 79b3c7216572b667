"""The GPU device check (issue 23): one command, random weights made here, no downloads.

    .venv/bin/python bench/gpu.py [--device cuda] [--out gpu.json]      # Qwen3-0.6B shape, bf16, minutes
    .venv/bin/python bench/gpu.py --device cpu --quick --out q.json     # tiny shapes: the script's own test

Writes a random Qwen3-0.6B-shaped checkpoint with transformers (save_pretrained to a temp dir),
loads it into cortex as the benches do, and measures:
- parity: the device path's logits (prompt, then a few greedy decode steps) against cortex's fp32
  CPU path on the same weights; max |difference| relative to the logits' scale, top-1 agreement;
- greedy tokens equal with the Triton decode attention on and off (CORTEX_GPU_ATTENTION) and with
  CUDA graphs on and off (workers/gpu/graphs.py);
- decode tokens/s at 1, 16 and 64 streams (aggregate), CUDA graphs and eager, greedy sampling on the
  device (workers/gpu/sampling.py), one host sync per step (the token ids);
- TTFT of a 2,000-token prompt (one prefill step to the first token on the host);
- HF transformers ``generate`` (greedy, KV cache) on the same weights and device, one stream;
- the memory bound: weight bytes read per decode step over the bandwidth of a measured device copy.
Then the same table for a random Qwen3.5-0.8B-shaped hybrid (Gated DeltaNet layers: their state
slots are among the graphs' static inputs, workers/gpu/deltanet.py's kernels update them in place),
JSON key ``hybrid`` (``--no-hybrid`` skips it). Prints the tables, writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rpc.messages import SamplingParams  # noqa: E402
from workers import attention  # noqa: E402
from workers.arch import model_class  # noqa: E402
from workers.arch.config import ModelConfig  # noqa: E402
from workers.arch.qwen3_5 import HybridRunner  # noqa: E402
from workers.gpu.graphs import DecodeGraphs  # noqa: E402
from workers.gpu.sampling import SamplingTensors, sample  # noqa: E402
from workers.kv_cache import BLOCK_SIZE, LocalRunner  # noqa: E402
from workers.weights import load_weights  # noqa: E402

QWEN3_06B = dict(  # Qwen/Qwen3-0.6B's config.json
    vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1e6, tie_word_embeddings=True,
)  # fmt: skip
TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, rope_theta=1e6, tie_word_embeddings=True,
)  # fmt: skip
# Qwen3.5-0.8B's text model, as bench/hybrid.py writes it; the quick run takes tests' tiny hybrid
QWEN3_5_08B = dict(
    hidden_size=1024, intermediate_size=3584, num_hidden_layers=24,
    layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 6, num_attention_heads=8, num_key_value_heads=2,
    head_dim=256, linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
    linear_num_key_heads=16, linear_num_value_heads=16, vocab_size=248320, max_position_embeddings=262144,
    rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
    tie_word_embeddings=True,
)  # fmt: skip
# (streams, decode tokens per stream, TTFT prompt, parity prompt, greedy-check tokens)
FULL = dict(streams=(1, 16, 64), tokens=128, ttft_prompt=2000, parity_prompt=32, greedy=32)
QUICK = dict(streams=(1, 4), tokens=16, ttft_prompt=64, parity_prompt=12, greedy=8)
STREAM_PROMPT = 16  # prompt tokens of each decode stream
PARITY_RTOL = 0.05  # bf16: max |logit difference| under 5% of the largest |logit| (fp32 CPU reference)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_checkpoint(path: Path, shape: dict) -> Path:
    """A random Qwen3 checkpoint: weights scaled by fan-in (tests/checkpoints.py's randomize), so
    logits are peaked and a layout mistake changes the argmax; saved in bfloat16."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tests.checkpoints import randomize

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**shape, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2))
    randomize(model)
    model.tie_weights()
    model.to(torch.bfloat16).save_pretrained(path)
    return path


def make_hybrid_checkpoint(path: Path, quick: bool) -> tuple[Path, int]:
    """A random Qwen3.5 checkpoint (decays near 1, so the state carries far) and its vocabulary."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    from tests.checkpoints import hybrid_randomize, tiny_hybrid_text_config

    shape = tiny_hybrid_text_config(tied=True) if quick else QWEN3_5_08B
    torch.manual_seed(0)
    model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**{"bos_token_id": 1, "eos_token_id": 2, **shape}))
    hybrid_randomize(model.float())
    model.tie_weights()
    model.to(torch.bfloat16).save_pretrained(path)
    return path, shape["vocab_size"]


def runner(model, device: torch.device, num_blocks: int, streams: int = 1):
    """A runner for ``streams`` sequences: a hybrid model's holds a state slot each, and one more
    (the graphs' padding rows' scratch slot, the last)."""
    if getattr(model, "recurrent", False):
        return HybridRunner(model, device, num_blocks=num_blocks, num_slots=streams + 1)
    return LocalRunner(model, device, num_blocks=num_blocks)


def load_cortex(path: Path, device: torch.device, dtype: torch.dtype):
    cfg = ModelConfig.from_hf_dir(path)
    with torch.device(device):
        model = model_class(cfg)(cfg, dtype=dtype)
    load_weights(model, "safetensors", sorted(str(f) for f in path.glob("*.safetensors")), device=device.type)
    return model


@contextmanager
def gpu_attention(mode: str):
    """CORTEX_GPU_ATTENTION for the duration (read at every decode step; frozen into a graph at capture)."""
    old = os.environ.get(attention.GPU_ATTENTION_ENV)
    os.environ[attention.GPU_ATTENTION_ENV] = mode
    try:
        yield
    finally:
        if old is None:
            del os.environ[attention.GPU_ATTENTION_ENV]
        else:
            os.environ[attention.GPU_ATTENTION_ENV] = old


def prompt(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy_logits(model, device: torch.device, ids: list[int], steps: int) -> torch.Tensor:
    """The prompt's last logits, then those of ``steps`` greedy decode steps: [steps + 1, vocab] fp32 on the CPU."""
    run = runner(model, device, (len(ids) + steps) // BLOCK_SIZE + 2)
    out = [run.step(0, ids, 0)]
    for i in range(steps):
        out.append(run.step(0, [int(out[-1].argmax())], len(ids) + i))
    return torch.stack(out).float().cpu()


def parity(model, path: Path, device: torch.device, vocab: int, n_prompt: int) -> dict:
    """The device path's logits against cortex's fp32 CPU path on the same checkpoint."""
    ids = prompt(n_prompt, vocab, 1)
    got = greedy_logits(model, device, ids, 4)
    want = greedy_logits(load_cortex(path, torch.device("cpu"), torch.float32), torch.device("cpu"), ids, 4)
    rel = float((got - want).abs().max() / want.abs().max())
    top1 = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    return {"max_rel_diff": rel, "top1_agree": top1, "tolerance": PARITY_RTOL, "pass": rel < PARITY_RTOL}


class Streams:
    """``n`` sequences prefilled with random prompts in one runner, their blocks allocated up front
    for ``tokens`` more positions; the pool's last block is the graphs' scratch block. A hybrid
    model's sequence ``s`` holds state slot ``s``; the last slot is the graphs' scratch slot."""

    def __init__(self, model, device: torch.device, n: int, tokens: int, vocab: int):
        per_seq = -(-(STREAM_PROMPT + tokens) // BLOCK_SIZE)
        self.runner = runner(model, device, n * per_seq + 1, n)
        self.scratch, self.per_seq = n * per_seq, per_seq
        for s in range(n):
            self.runner.tables[s] = list(range(s * per_seq, (s + 1) * per_seq))
        self.states = getattr(self.runner, "states", None)
        if self.states is None:
            self.runner.next_block = n * per_seq
        else:
            self.runner.slots.update((s, s) for s in range(n))
        first = self.runner.step_many([(s, prompt(STREAM_PROMPT, vocab, 10 + s), 0) for s in range(n)])
        self.last = first.argmax(-1).tolist()
        self.pos = STREAM_PROMPT
        self.n = n

    def graphs(self, model, vocab: int) -> DecodeGraphs:
        return DecodeGraphs(
            model, self.runner.cache, self.n, self.per_seq, vocab, pad_block=self.scratch, states=self.states
        )

    def decode(self, steps: int, graphs: DecodeGraphs | None) -> tuple[float, list[list[int]]]:
        """``steps`` greedy steps of every stream: (seconds, tokens per stream). One host sync per step."""
        greedy = SamplingTensors.build([SamplingParams(temperature=0.0)] * self.n, [0] * self.n, self.runner.device)
        out = [[] for _ in range(self.n)]
        sync(self.runner.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            if graphs is None:
                logits = self.runner.step_many([(s, [self.last[s]], self.pos) for s in range(self.n)])
            else:
                rows = [(self.last[s], self.pos, self.runner.tables[s]) for s in range(self.n)]
                logits = graphs.run(rows, range(self.n) if self.states is not None else ())
            self.last = sample(logits, greedy).tokens.tolist()  # the step's one host sync
            self.pos += 1
            for s, tok in enumerate(self.last):
                out[s].append(tok)
        return time.perf_counter() - t0, out


def decode_rate(model, device: torch.device, n: int, tokens: int, vocab: int, use_graphs: bool) -> dict:
    streams = Streams(model, device, n, tokens + 4, vocab)
    graphs = None
    if use_graphs:
        graphs = streams.graphs(model, vocab)
        graphs.capture()
    streams.decode(4, graphs)  # warm-up: Triton compiles, caches fill
    seconds, _ = streams.decode(tokens, graphs)
    out = {"tok_s": n * tokens / seconds, "step_ms": 1000 * seconds / tokens}
    if graphs is not None:
        out["graphs_captured"] = bool(graphs.graphs)
        out["graphs_reserved_mib"] = graphs.reserved_bytes() / 2**20
    return out


def greedy_tokens(model, device: torch.device, vocab: int, tokens: int, use_graphs: bool) -> list[int]:
    streams = Streams(model, device, 1, tokens, vocab)
    graphs = streams.graphs(model, vocab) if use_graphs else None
    if graphs is not None:
        graphs.capture()
    return [streams.last[0]] + streams.decode(tokens - 1, graphs)[1][0]


def greedy_checks(model, device: torch.device, vocab: int, tokens: int) -> dict:
    with gpu_attention("torch"):
        torch_attn = greedy_tokens(model, device, vocab, tokens, use_graphs=False)
    with gpu_attention("triton"):
        triton_eager = greedy_tokens(model, device, vocab, tokens, use_graphs=False)
        triton_graphs = greedy_tokens(model, device, vocab, tokens, use_graphs=True)
    same = lambda a, b: sum(x == y for x, y in zip(a, b, strict=True))  # noqa: E731
    return {
        "tokens": tokens,
        "triton_vs_torch_attention": same(triton_eager, torch_attn),
        "graphs_vs_eager": same(triton_graphs, triton_eager),
        "triton_used": device.type == "cuda" and attention._paged_attention() is not None,
    }


def deltanet_kernel_calls(model, device: torch.device, vocab: int) -> int:
    """Calls one hybrid decode step makes into workers/gpu/deltanet.py's kernels: two per linear
    layer when the model's decode rows take them, 0 on the PyTorch (or native CPU) path."""
    from workers.gpu import deltanet

    calls, saved = [], {n: getattr(deltanet, n) for n in ("delta_rule_decode", "conv_decode")}
    for name, fn in saved.items():
        setattr(deltanet, name, lambda *a, _fn=fn: calls.append(1) or _fn(*a))
    try:
        Streams(model, device, 1, 2, vocab).decode(1, None)
    finally:
        for name, fn in saved.items():
            setattr(deltanet, name, fn)
    return len(calls)


def ttft(model, device: torch.device, n: int, vocab: int) -> float:
    """Milliseconds from a ``n``-token prompt to its first token on the host (best of 2, after a warm-up)."""
    best = float("inf")
    for i in range(3):
        run = runner(model, device, n // BLOCK_SIZE + 2)
        ids = prompt(n, vocab, 100 + i)
        sync(device)
        t0 = time.perf_counter()
        int(run.step(0, ids, 0).argmax())
        if i:
            best = min(best, time.perf_counter() - t0)
    return 1000 * best


def hf_rate(path: Path, device: torch.device, dtype: torch.dtype, tokens: int, vocab: int) -> float:
    """HF transformers generate, greedy with its KV cache, one stream: (n - 1) / (t(n) - t(1)),
    the prompt's cost cancelled as bench/decode.py does."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    ids = torch.tensor([prompt(STREAM_PROMPT, vocab, 10)], device=device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def run(k: int) -> float:
        sync(device)
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=k, min_new_tokens=k, **kw)
        sync(device)
        return time.perf_counter() - t

    run(2)  # warm-up
    # best of 3 each: one slow call would otherwise make the difference meaningless
    decode = min(run(tokens) for _ in range(3)) - min(run(1) for _ in range(3))
    if decode <= 0:
        raise RuntimeError(f"timing noise exceeds {tokens} tokens' decode time: no HF rate")
    return (tokens - 1) / decode


def bandwidth(device: torch.device, mib: int) -> float:
    """Bytes/s of a device-to-device copy (read + write), best of 5."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() / best


def weight_bytes(model) -> int:
    """What one decode step reads: every parameter once (a tied embedding once, as the head)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def machine(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "host": platform.processor() or platform.machine()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        try:
            smi = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            info["driver"] = subprocess.run(smi, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info


def sampling_syncs(device: torch.device, vocab: int) -> str:
    """Whether device sampling (mixed greedy and sampled rows, penalties, a mask) syncs the host:
    CUDA's sync debug mode raises on any sync. 'none' or the error; 'n/a' off CUDA."""
    if device.type != "cuda":
        return "n/a"
    params = [SamplingParams(temperature=t, top_p=0.9, top_k=50, min_p=0.05, presence_penalty=0.5) for t in (0, 1)] * 8
    t = SamplingTensors.build(params, list(range(16)), device)
    t.output_counts = torch.zeros(16, vocab, device=device)
    t.allowed = torch.ones(16, vocab, dtype=torch.bool, device=device)
    logits = torch.randn(16, vocab, device=device)
    sample(logits, t, logprobs=5)  # warm-up outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sample(logits, t, logprobs=5)
        return "none"
    except RuntimeError as e:
        return f"sync: {e}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def report(r: dict) -> None:
    m = r["machine"]
    print(f"# bench/gpu.py on {m.get('gpu', m['host'])} ({m['device']}, driver {m.get('driver')}), torch {m['torch']}")
    for section in (r, r.get("hybrid")):
        if section is not None:
            table(section)


def table(r: dict) -> None:
    s = r["model"]
    print(f"# model: random {s['shape']} ({s.get('params', 0):,} parameters, {s['dtype']})")
    par, gr = r.get("parity") or {}, r.get("greedy") or {}
    rows = [
        ("parity vs fp32 CPU: max rel diff", lambda: f"{par['max_rel_diff']:.4f} (< {PARITY_RTOL}: {par['pass']})"),
        ("parity: top-1 agreement", lambda: f"{par['top1_agree']:.2f}"),
        ("greedy equal, Triton vs torch attn", lambda: f"{gr['triton_vs_torch_attention']}/{gr['tokens']}"),
        ("greedy equal, graphs vs eager", lambda: f"{gr['graphs_vs_eager']}/{gr['tokens']}"),
    ]
    if "deltanet_kernel_calls" in r:
        rows.append(("Triton DeltaNet kernel calls per step", lambda: str(r["deltanet_kernel_calls"])))
    for n, d in (r.get("decode") or {}).items():
        for mode, rate in d.items():
            label = mode if (rate or {}).get("graphs_captured", True) else "graphs not captured (padded, eager)"
            rows.append(
                (f"decode {n} streams, {label}", lambda x=rate: f"{x['tok_s']:9.1f} tok/s ({x['step_ms']:.2f} ms/step)")
            )
    rows += [
        (f"TTFT, {r['ttft_prompt']}-token prompt", lambda: f"{r['ttft_ms']:9.1f} ms"),
        ("HF transformers generate, 1 stream", lambda: f"{r['hf_tok_s']:9.1f} tok/s"),
        ("cortex / HF, 1 stream (graphs)", lambda: f"{r['speedup_vs_hf']:9.2f}x"),
        ("copy bandwidth", lambda: f"{r['bandwidth_gb_s']:9.1f} GB/s"),
        (
            "memory bound, 1 stream",
            lambda: f"{r['memory_bound_tok_s']:9.1f} tok/s ({r['weights_bytes'] / 1e9:.2f} GB/token)",
        ),
        ("fraction of the bound, 1 stream", lambda: f"{r['fraction_of_bound']:9.3f}"),
        ("host syncs inside device sampling", lambda: str(r["sampling_syncs"])),
    ]
    width = max(len(k) for k, _ in rows)
    for k, cell in rows:
        try:
            v = cell()
        except (KeyError, TypeError):  # a measurement that failed: its error is listed below
            v = "failed"
        print(f"{k:<{width}}  {v}")
    for name, error in r["errors"].items():
        print(f"error in {name}: {error}")


def attempt(r: dict, name: str, fn: Callable[[], object]) -> object:
    """``fn()``, or None with the error recorded: one failed measurement must not cost the others
    (a lent GPU's minutes are few)."""
    try:
        return fn()
    except Exception as e:  # reported in the table, the JSON and the exit status
        traceback.print_exc()
        r["errors"][name] = f"{type(e).__name__}: {e}"
        return None


def measure(r: dict, path: Path, device: torch.device, dtype: torch.dtype, plan: dict, vocab: int, hf: bool) -> None:
    model = load_cortex(path, device, dtype)
    r["model"]["params"] = sum(p.numel() for p in {p.data_ptr(): p for p in model.parameters()}.values())
    r["parity"] = attempt(r, "parity", lambda: parity(model, path, device, vocab, plan["parity_prompt"]))
    r["greedy"] = attempt(r, "greedy", lambda: greedy_checks(model, device, vocab, plan["greedy"]))
    r["decode"] = {}
    for n in plan["streams"]:
        r["decode"][str(n)] = {
            mode: attempt(r, f"decode {n} {mode}", lambda n=n, m=mode: decode_rate(model, device, n, plan["tokens"], vocab, m == "graphs"))
            for mode in ("graphs", "eager")
        }  # fmt: skip
    r["ttft_ms"] = attempt(r, "ttft", lambda: ttft(model, device, plan["ttft_prompt"], vocab))
    if getattr(model, "recurrent", False):
        r["deltanet_kernel_calls"] = attempt(r, "deltanet", lambda: deltanet_kernel_calls(model, device, vocab))
    if hf:
        r["hf_tok_s"] = attempt(r, "hf", lambda: hf_rate(path, device, dtype, 64, vocab))
    r["bandwidth_gb_s"] = attempt(r, "bandwidth", lambda: bandwidth(device, 16 if plan is QUICK else 1024) / 1e9)
    r["weights_bytes"] = weight_bytes(model)
    r["sampling_syncs"] = attempt(r, "sampling", lambda: sampling_syncs(device, vocab))


def ratios(r: dict, first: str) -> None:
    """The figures derived from the measured ones, where those exist."""
    one = (r["decode"][first].get("graphs") or {}).get("tok_s")
    if one and r.get("hf_tok_s"):
        r["speedup_vs_hf"] = one / r["hf_tok_s"]
    if r.get("bandwidth_gb_s"):
        r["memory_bound_tok_s"] = r["bandwidth_gb_s"] * 1e9 / r["weights_bytes"]
        if one:
            r["fraction_of_bound"] = one / r["memory_bound_tok_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--quick", action="store_true", help="tiny shapes and counts (the script's own test)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--no-hybrid", action="store_true", help="skip the Qwen3.5-shaped hybrid's table")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    shape, plan = (TINY, QUICK) if args.quick else (QWEN3_06B, FULL)
    r = {"machine": machine(device), "plan": {k: list(v) if isinstance(v, tuple) else v for k, v in plan.items()}}
    r.update(section("qwen3-tiny" if args.quick else "qwen3-0.6b", dtype, plan))
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp) / "qwen3", shape)
        measure(r, path, device, dtype, plan, shape["vocab_size"], not args.no_hf)
    ratios(r, str(plan["streams"][0]))
    if not args.no_hybrid:
        r["hybrid"] = h = section("qwen3_5-tiny" if args.quick else "qwen3_5-0.8b", dtype, plan)
        with tempfile.TemporaryDirectory() as tmp:
            path, vocab = make_hybrid_checkpoint(Path(tmp) / "qwen3_5", args.quick)
            measure(h, path, device, dtype, plan, vocab, not args.no_hf)
        ratios(h, str(plan["streams"][0]))
    report(r)
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=2))
    sys.exit(1 if r["errors"] or r.get("hybrid", {}).get("errors") else 0)


def section(shape: str, dtype: torch.dtype, plan: dict) -> dict:
    """One model's results, before measuring."""
    return {
        "model": {"shape": shape, "dtype": str(dtype).removeprefix("torch.")},
        "ttft_prompt": plan["ttft_prompt"],
        "errors": {},
    }


if __name__ == "__main__":
    main()
