"""The leader <-> worker codec on the message that crosses between every two steps: a GenerateStep
of N decoding sequences (one token each, a 45-block table, sampling parameters), encoded by the
leader and decoded (and checked) by the worker.

Peer in the same run: msgpack-python packing and unpacking the same content as plain dicts, with no
checking at all (what any msgpack codec costs at least). Prints milliseconds and the ratio.

    .venv/bin/python bench/codec.py [--seqs 64]
"""

from __future__ import annotations

import argparse
import platform
import time

import msgpack
import msgspec

from rpc.codec import decode, encode
from rpc.messages import GenerateStep, SamplingParams, SeqInput


def step(n: int) -> GenerateStep:
    return GenerateStep(
        "qwen3-0.6b",
        [
            SeqInput(i, [1000 + i], 700 + i, SamplingParams(0.7, 0.9, 20, i), list(range(i * 50, i * 50 + 45)))
            for i in range(n)
        ],
    )


def best_ms(fn, reps: int = 2000, rounds: int = 5) -> float:
    for _ in range(reps // 10):
        fn()
    runs = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        runs.append((time.perf_counter() - t0) / reps * 1e3)
    return min(runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, default=64)
    args = p.parse_args()
    msg = step(args.seqs)
    frame = encode(msg, 1)
    assert decode(frame) == (1, msg)
    plain = msgspec.to_builtins(msg)  # the same content as dicts and lists
    packed = msgpack.packb(plain)
    ours = best_ms(lambda: encode(msg, 1)), best_ms(lambda: decode(frame))
    peer = best_ms(lambda: msgpack.packb(plain)), best_ms(lambda: msgpack.unpackb(packed))
    print(
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, msgspec {msgspec.__version__}"
    )
    print(f"GenerateStep of {args.seqs} sequences: {len(frame)} bytes")
    print(f"  cortex (msgspec, typed, checked): encode {ours[0]:.4f} ms + decode {ours[1]:.4f} ms = {sum(ours):.4f} ms")
    print(f"  msgpack-python, plain dicts:      encode {peer[0]:.4f} ms + decode {peer[1]:.4f} ms = {sum(peer):.4f} ms")
    print(f"  ratio cortex / plain msgpack: {sum(ours) / sum(peer):.2f}x")


if __name__ == "__main__":
    main()
