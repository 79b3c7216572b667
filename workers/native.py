"""The worker's native CPU kernels (workers/kernels/*.c): built once with the system C compiler,
cached by source hash, loaded with ctypes.

Why our own: PyTorch's packed int4 kernel needs bfloat16 activations (rounded to 8 bits of
mantissa: greedy text drifts from the float32 model) and reaches about 6 GB/s for one row. These
kernels keep the file's Q4/Q8 blocks exact, quantize activations per block of 32 to int16 (1.5e-5
relative error: logits within 0.01 of float32) and use exact integer dot products, faster for one
row and small batches (``qmatmul.c``). ``attention.c`` runs decode attention straight from the
paged KV pool, float32 or float16 (no gather into padded tensors), and RoPE with the KV write;
``pointwise.c`` the norms and SwiGLU; ``moe.c`` a mixture-of-experts layer's routed experts in one
call; ``decode.c`` a whole all-decode step's layers (and, where the head is packed, its logits) in
one call; ``deltanet.c`` a Gated DeltaNet layer's single-token step (conv, delta rule on the state
in place, gated norm) in one call.
When they cannot be built (no C compiler, no AVX2, ``CORTEX_NATIVE_KERNELS=0``), every caller
takes its PyTorch path instead.

Kernel paths (``PATHS``): the same sources built once per instruction set, each its own shared
object, so a CPU without AVX-512 never loads (let alone runs) AVX-512 code. ``avx2`` is the
baseline; ``avx512`` compiles them for AVX-512 F/BW/VL (EVEX encodings, 32 vector registers: the
compiler's choice; the intrinsics stay 256-bit, see qmatmul.c for why); ``avx512vnni`` adds
``vpdpwssd`` to the block products (an int16 multiply-add and the add after it in one
instruction). All three compute the same bits. The best path the CPU reports is picked once, at
first use; ``CORTEX_CPU_KERNELS`` (``auto``, a path's name, or ``torch`` for PyTorch's kernels)
overrides it, so every path can be tested on one machine. A path this CPU cannot run is refused
with a warning and the best one it can run is used instead. AMX is not used (nothing here asks
the kernel for it), so a CPU or kernel without it changes nothing.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from workers import cpu

log = logging.getLogger("cortex.worker")

KERNELS = Path(__file__).with_name("kernels")
SOURCES = tuple(
    KERNELS / name for name in ("qmatmul.c", "attention.c", "pointwise.c", "moe.c", "decode.c", "deltanet.c")
)
HEADERS = (KERNELS / "simd.h", KERNELS / "kernels.h")
# -Bsymbolic: decode.c's calls into the other kernels bind within the same object, so two paths
# loaded side by side (tests compare them in one process) never call into each other's code
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-Wl,-Bsymbolic", "-lm")
AVX512 = ("-mavx512f", "-mavx512bw", "-mavx512vl")
# path -> (the CPU features it needs, in cpu.SIMD's spelling; the compiler flags added to FLAGS),
# best last: `auto` takes the last one the CPU can run
PATHS = {
    "avx2": (cpu.NATIVE_NEEDS, ()),
    "avx512": (cpu.NATIVE_NEEDS | {"avx512f", "avx512bw", "avx512vl"}, AVX512),
    "avx512vnni": (cpu.NATIVE_NEEDS | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}, (*AVX512, "-mavx512vnni")),
}
ENV = "CORTEX_CPU_KERNELS"  # auto (default), one of PATHS, or torch
_c_int = ctypes.c_int


class Linear(ctypes.Structure):
    """decode.c's ``linear_t``: one block-format weight (``m`` NULL for Q8)."""

    _fields_ = [("q", ctypes.c_void_p), ("d", ctypes.c_void_p), ("m", ctypes.c_void_p),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64)]  # fmt: skip


def linear_of(layer) -> Linear | None:
    """A ``Linear`` for a packed layer the native kernels run (``workers.quant.QuantLinear`` with
    impl "native", no bias; the caller sees to its all-reduce), or None for any other layer."""
    # QuantLinear is recognised by its fields: workers.quant imports this module, not the reverse
    if getattr(layer, "impl", None) != "native" or getattr(layer, "bias", None) is not None:
        return None
    d = layer.scales.data
    offsets = d[1].data_ptr() if layer.kind == "int4" else None  # int4 scales [2, N, K/32]: d, then m
    return Linear(layer.packed.data_ptr(), d.data_ptr(), offsets, layer.out_features, layer.in_features)


class Moe(ctypes.Structure):
    """kernels.h's ``moe_t``: a mixture-of-experts layer, its experts as two ``Linear`` arrays.
    Build it with ``moe_table``, which keeps the arrays it points into alive."""

    _fields_ = [("router", ctypes.c_void_p), ("gate_up", ctypes.c_void_p), ("down", ctypes.c_void_p),
                ("experts", ctypes.c_int64), ("inter", ctypes.c_int64), ("top_k", ctypes.c_int64),
                ("norm_topk", ctypes.c_int64)]  # fmt: skip


def moe_table(gate_up, down, router: torch.Tensor | None = None, top_k: int = 0, norm_topk: bool = True) -> Moe | None:
    """A ``Moe`` for experts packed one layer per expert (``gate_up``, ``down``: sequences of packed
    layers), or None when one of them is not a ``linear_of`` layer. ``router`` (float32 [experts,
    hidden] on the CPU), ``top_k`` and ``norm_topk``: for decode.c, which routes too."""
    parts = [[linear_of(m) for m in bank] for bank in (gate_up, down)]
    if any(p is None for bank in parts for p in bank) or len(parts[0]) != len(parts[1]) or not parts[0]:
        return None
    arrays = [(Linear * len(bank))(*bank) for bank in parts]
    table = Moe(None, *map(ctypes.addressof, arrays), len(parts[0]), parts[1][0].k, top_k, int(norm_topk))
    if router is not None:
        table.router = router.data_ptr()
    table._keep = (arrays, router)  # the Linear arrays (and router) the table points into
    return table


class Layer(ctypes.Structure):
    """decode.c's ``layer_t``: one decoder layer's weights (``moe``: a ``Moe``'s address, or None
    for a dense MLP)."""

    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("q_norm", ctypes.c_void_p),
                ("k_norm", ctypes.c_void_p), ("qkv", Linear), ("o", Linear), ("gate_up", Linear),
                ("down", Linear), ("moe", ctypes.c_void_p)]  # fmt: skip


class NativeKernels:
    """The loaded library and typed calls into it."""

    def __init__(self, path: Path, name: str = "avx2"):
        lib = ctypes.CDLL(str(path))
        vp = ctypes.c_void_p
        lib.cortex_q4_matmul.argtypes = [vp, _c_int, _c_int, vp, vp, vp, _c_int, vp]
        lib.cortex_q8_matmul.argtypes = [vp, _c_int, _c_int, vp, vp, _c_int, vp]
        lib.cortex_paged_attention.argtypes = [vp, vp, vp, vp, _c_int, vp, *[_c_int] * 5, ctypes.c_float, vp, _c_int]
        lib.cortex_q4_matmul.restype = lib.cortex_q8_matmul.restype = lib.cortex_paged_attention.restype = _c_int
        lib.cortex_rms_norm.argtypes = [vp, _c_int, _c_int, vp, ctypes.c_float, vp]
        lib.cortex_add_rms_norm.argtypes = [vp, vp, _c_int, _c_int, vp, ctypes.c_float, vp, vp]
        lib.cortex_swiglu.argtypes = [vp, _c_int, _c_int, vp]
        i64, f32 = ctypes.c_int64, ctypes.c_float
        lib.cortex_decode_layers.argtypes = [vp, _c_int, _c_int, vp, *[_c_int] * 5, f32, vp, vp, vp, vp, vp, vp, i64,
                                             vp, _c_int, vp, _c_int, f32, _c_int, vp, vp, vp, _c_int, vp]  # fmt: skip
        lib.cortex_decode_layers.restype = _c_int
        lib.cortex_moe_experts.argtypes = [vp, _c_int, _c_int, vp, vp, _c_int, vp, vp]
        lib.cortex_moe_route.argtypes = [vp, _c_int, _c_int, vp, vp, vp]
        lib.cortex_moe_experts.restype = lib.cortex_moe_route.restype = _c_int
        lib.cortex_rope_store.argtypes = [vp, *[_c_int] * 4, vp, vp, vp, vp, vp, vp, vp, _c_int]
        lib.cortex_deltanet_decode.argtypes = [vp, i64, _c_int, vp, vp, vp, vp, vp, vp, vp, vp, f32,
                                               *[_c_int] * 5, vp, i64]  # fmt: skip
        lib.cortex_deltanet_decode.restype = _c_int
        for fn in (lib.cortex_rms_norm, lib.cortex_add_rms_norm, lib.cortex_swiglu, lib.cortex_rope_store):
            fn.restype = None
        self.lib, self.path, self.name = lib, path, name

    def q4_matmul(self, x: torch.Tensor, qs: torch.Tensor, dm: torch.Tensor) -> torch.Tensor:
        """``x``: float32 [M, K]; ``qs``: uint8 [N, K/32, 16]; ``dm``: float16 [2, N, K/32], the
        blocks' scales d, then their offsets m by blocks of 16 rows, each block transposed
        ([N/16, K/32, 16] in the second half); passed as two pointers into it: no indexing op per call."""
        m_ptr = dm.data_ptr() + dm.stride(0) * dm.element_size()
        return self._matmul(self.lib.cortex_q4_matmul, x, qs, dm.data_ptr(), m_ptr)

    def q8_matmul(self, x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """``x``: float32 [M, K]; ``qs``: int8 [N, K]; ``d``: float16 [N, K/32]."""
        return self._matmul(self.lib.cortex_q8_matmul, x, qs, d.data_ptr())

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm over the last dimension of float32 ``x``, times ``weight``."""
        x = x.contiguous()
        out = torch.empty_like(x)
        d = x.shape[-1]
        self.lib.cortex_rms_norm(x.data_ptr(), x.numel() // d, d, weight.data_ptr(), eps, out.data_ptr())
        return out

    def add_rms_norm(
        self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, RMSNorm(x + delta) * weight) in one pass: a residual add and the next norm."""
        x, delta = x.contiguous(), delta.contiguous()
        total, out = torch.empty_like(x), torch.empty_like(x)
        d = x.shape[-1]
        self.lib.cortex_add_rms_norm(
            x.data_ptr(), delta.data_ptr(), x.numel() // d, d, weight.data_ptr(), eps, total.data_ptr(), out.data_ptr()
        )
        return total, out

    def swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for float32 rows laid out [gate | up] (the fused projection's output)."""
        gate_up = gate_up.contiguous()
        inter = gate_up.shape[-1] // 2
        out = gate_up.new_empty(*gate_up.shape[:-1], inter)
        self.lib.cortex_swiglu(gate_up.data_ptr(), gate_up.numel() // (2 * inter), inter, out.data_ptr())
        return out

    def rope_store(
        self,
        heads: torch.Tensor,
        cos: torch.Tensor,
        signed_sin: torch.Tensor,
        slots: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        q_heads: int,
    ) -> torch.Tensor:
        """RoPE on the step's q and k heads and the KV write, in one call. ``heads``: float32
        [T, Hq + 2 Hkv, D]; ``cos``, ``signed_sin``: [T, 1, D]; ``slots``: int64 [T]; the pools:
        one layer's [slots, Hkv, D]. Returns the rotated q [T, Hq, D]."""
        heads, cos, signed_sin = heads.contiguous(), cos.contiguous(), signed_sin.contiguous()
        T, _, d = heads.shape
        q = heads.new_empty(T, q_heads, d)
        self.lib.cortex_rope_store(
            heads.data_ptr(), T, q_heads, k_pool.shape[1], d, cos.data_ptr(), signed_sin.data_ptr(), None,
            slots.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), q.data_ptr(), _half(k_pool),
        )  # fmt: skip
        return q

    def decode_layers(
        self, x: torch.Tensor, layers, dims: tuple[int, ...], eps: float, cos, sin, kv, batch, head=None
    ) -> torch.Tensor | None:
        """Every decoder layer of an all-decode step, in place on the residual stream ``x`` [T, H]
        (decode.c). ``layers``: a ``Layer`` array; ``dims``: (Hq, Hkv, D, intermediate); ``cos``,
        ``sin``: the RoPE tables (``Rotary.table``: row p for position p, read at each row's
        ``batch.positions``). With
        ``head`` = (final norm weight [H], the head's ``Linear``), the step goes on in the same call
        to the logits of ``batch.last_rows``, returned (float32 [S, vocab]); else None."""
        hq, hkv, d, inter = dims
        if cos.shape[0] <= batch.top_position:  # the kernel reads row p of the tables for position p
            raise ValueError(f"RoPE tables of {cos.shape[0]} rows for position {batch.top_position}")
        logits, tail = None, (None, None, None, 0, None)
        if head is not None:
            norm, linear = head
            last = batch.last_rows
            logits = torch.empty(last.shape[0], linear.n, dtype=torch.float32)
            tail = (norm.data_ptr(), ctypes.addressof(linear), last.data_ptr(), last.shape[0], logits.data_ptr())
        rc = self.lib.cortex_decode_layers(
            x.data_ptr(), x.shape[0], x.shape[1], ctypes.addressof(layers), len(layers), hq, hkv, d, inter, eps,
            cos.data_ptr(), sin.data_ptr(), batch.positions.data_ptr(), batch.slots.data_ptr(), kv.k.data_ptr(),
            kv.v.data_ptr(),
            kv.k.stride(0), batch.decode_blocks.data_ptr(), batch.decode_blocks.shape[1],
            batch.decode_lengths.data_ptr(), kv.block_size, d**-0.5, _half(kv.k), *tail,
        )  # fmt: skip
        _check(rc, "native decode step")
        return logits

    def deltanet_decode(
        self,
        proj: torch.Tensor,
        rows: torch.Tensor,
        slots: torch.Tensor,
        layer: tuple,
        pool: tuple,
        dims: tuple,
        out: torch.Tensor,
    ) -> None:
        """One Gated DeltaNet decode step of the single-token ``rows`` (int64 [B]) of ``proj`` (float32
        [T, width], the fused input projection), in one call (deltanet.c): conv and delta states of
        ``slots`` (int64 [B]) updated in place in ``pool`` = (conv [slots, C, kernel - 1], delta [slots,
        hv, dk, dv]), the gated norm's output written to those rows of ``out`` [T, hv dv]. ``layer``:
        (conv weight [C, kernel], A_log, dt_bias, norm weight, eps); ``dims``: (hk, hv, dk, dv)."""
        conv, delta = pool
        conv_w, a_log, dt_bias, norm_w, eps = layer
        rc = self.lib.cortex_deltanet_decode(
            proj.data_ptr(), proj.stride(0), rows.shape[0], rows.data_ptr(), slots.data_ptr(), conv.data_ptr(),
            conv_w.data_ptr(), delta.data_ptr(), a_log.data_ptr(), dt_bias.data_ptr(), norm_w.data_ptr(), eps, *dims,
            conv.shape[-1] + 1, out.data_ptr(), out.stride(0),
        )  # fmt: skip
        _check(rc, "native DeltaNet step")

    def moe_experts(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, table: Moe) -> torch.Tensor:
        """``sum_j weights[t, j] * expert_{experts[t, j]}(x[t])`` for every row t of float32 ``x``
        [T, hidden], in one call (moe.c). ``experts``: int64 [T, k]; ``weights``: float32 [T, k];
        ``table``: from ``moe_table``."""
        x, experts, weights = x.contiguous(), experts.contiguous(), weights.contiguous()
        y = torch.empty_like(x)
        rc = self.lib.cortex_moe_experts(
            x.data_ptr(), x.shape[0], x.shape[1], experts.data_ptr(), weights.data_ptr(), experts.shape[1],
            ctypes.addressof(table), y.data_ptr(),
        )  # fmt: skip
        _check(rc, "native experts")
        return y

    def moe_route(self, h: torch.Tensor, table: Moe) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights float32 [T, k], expert ids int64 [T, k]) of float32 rows ``h`` [T, hidden] as
        decode.c routes them (``table`` from ``moe_table`` with its router): what
        ``SparseMoeBlock.route`` computes."""
        h = h.contiguous()
        ids = torch.empty(h.shape[0], table.top_k, dtype=torch.int64)
        weights = torch.empty(h.shape[0], table.top_k, dtype=torch.float32)
        rc = self.lib.cortex_moe_route(
            h.data_ptr(), h.shape[0], h.shape[1], ctypes.addressof(table), ids.data_ptr(), weights.data_ptr()
        )
        _check(rc, "native router")
        return weights, ids

    def paged_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        tables: torch.Tensor,
        lengths: torch.Tensor,
        block_size: int,
        scale: float,
    ) -> torch.Tensor | None:
        """One query token per sequence against its cached context, read through its block table.
        ``q``: float32 [B, Hq, D]; ``k``, ``v``: one layer's pool [slots, Hkv, D]; ``tables``: int64
        [B, width]; ``lengths``: int64 [B]. None for shapes the kernel does not take."""
        q = q.contiguous()
        out = torch.empty_like(q)
        B, hq, d = q.shape
        rc = self.lib.cortex_paged_attention(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), tables.data_ptr(), tables.shape[1], lengths.data_ptr(),
            B, hq, k.shape[1], d, block_size, scale, out.data_ptr(), _half(k),
        )  # fmt: skip
        return None if rc else out

    @staticmethod
    def _matmul(fn, x: torch.Tensor, qs: torch.Tensor, *scale_ptrs: int) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty(x.shape[0], qs.shape[0], dtype=torch.float32)
        if not x.shape[0]:
            return y
        if fn(x.data_ptr(), x.shape[0], x.shape[1], qs.data_ptr(), *scale_ptrs, qs.shape[0], y.data_ptr()):
            raise MemoryError("native matmul: out of memory for the activation buffers")
        return y


POOL_DTYPES = (torch.float32, torch.float16)  # KV pool dtypes the kernels read and write


def _check(rc: int, what: str) -> None:
    """Raise for a kernel's error code: -1 out of memory, -2 an expert id out of range."""
    if rc == -2:
        raise IndexError(f"{what}: an expert id out of range")
    if rc:
        raise MemoryError(f"{what}: out of memory for its buffers")


def _half(pool: torch.Tensor) -> int:
    return int(pool.dtype == torch.float16)


def _cache_dir() -> Path:
    explicit = os.environ.get("CORTEX_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base) / "cortex" / "kernels"


def _build(target: Path, flags: tuple[str, ...]) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise OSError("no C compiler (cc or gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target, then rename: ranks of one model may build at the same moment
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *flags, "-o", tmp, *map(str, SOURCES)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if r.returncode:
            raise OSError(f"{compiler} failed: {r.stderr.strip()[:500]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def runnable_paths() -> list[str]:
    """The kernel paths this CPU can run, best last (none without AVX2, FMA and F16C)."""
    if not cpu.runs_native_kernels():
        return []
    features = cpu.simd_features()
    if features is None:  # no /proc/cpuinfo: only the baseline, which torch's detection vouches for
        return ["avx2"]
    return [name for name, (needs, _) in PATHS.items() if needs <= features]


def chosen_path() -> str:
    """The path ``load()`` takes: ``CORTEX_CPU_KERNELS`` when this CPU can run it, else the best
    one it can run; ``torch`` when there is none or it is asked for (or ``CORTEX_NATIVE_KERNELS=0``)."""
    if os.environ.get("CORTEX_NATIVE_KERNELS", "1") == "0":
        return "torch"
    asked = os.environ.get(ENV, "auto").strip().lower() or "auto"
    runnable = runnable_paths()
    if asked == "torch" or not runnable:
        return "torch"
    if asked in runnable:
        return asked
    if asked != "auto":
        known = "one of " + ", ".join(("auto", *PATHS, "torch"))
        why = "this CPU cannot run it" if asked in PATHS else f"expected {known}"
        log.warning("%s=%s: %s; using %s", ENV, asked, why, runnable[-1])
    return runnable[-1]


def load(path: str | None = None) -> NativeKernels | None:
    """The kernels of ``path`` (default: ``chosen_path()``, or a lesser path when that one does not
    build, e.g. a compiler without AVX-512), built on first use; None (with the reason logged once)
    when unavailable or when the path is ``torch``."""
    if path is None:
        chosen = chosen_path()
        runnable = runnable_paths()
        fallbacks = runnable[: runnable.index(chosen)][::-1] if chosen in runnable else []
        for candidate in (chosen, *fallbacks):
            kernels_ = load(candidate)
            if kernels_ is not None:
                return kernels_
        return None
    if path == "torch":
        if not cpu.runs_native_kernels():
            log.info("native kernels: this CPU has no AVX2 with FMA and F16C; using PyTorch's kernels")
        return None
    if path not in runnable_paths():  # never load code this CPU cannot run
        log.warning("native kernels: this CPU cannot run the %s path", path)
        return None
    flags = (*FLAGS, *PATHS[path][1])
    code = b"".join(f.read_bytes() for f in (*SOURCES, *HEADERS))
    digest = hashlib.sha256(code + " ".join(flags).encode()).hexdigest()[:16]
    for cache in (_cache_dir(), Path(tempfile.gettempdir()) / f"cortex-kernels-{os.getuid()}"):
        target = cache / f"cortex-{path}-{digest}.so"
        try:
            if not target.exists():
                _build(target, flags)
                log.info("native kernels built: %s", target)
            return NativeKernels(target, path)
        except OSError as e:
            reason = e
    log.warning("native kernels (%s) unavailable (%s)", path, reason)
    return None


def path_name() -> str:
    """What the worker's CPU linears and attention run on: a path's name, or ``torch``."""
    k = kernels()
    return k.name if k is not None else "torch"


_kernels: NativeKernels | None | bool = False  # False: not tried yet; this module is its only owner


def for_tensor(x: torch.Tensor) -> NativeKernels | None:
    """The kernels, for a float32 tensor on the CPU (what they compute on); else None."""
    return kernels() if x.device.type == "cpu" and x.dtype == torch.float32 else None


def kernels() -> NativeKernels | None:
    global _kernels
    if _kernels is False:
        _kernels = load()
    return _kernels
