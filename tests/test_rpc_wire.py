"""The RPC layer: every message survives msgpack, every malformed frame gets an Error reply and never
kills the receiver, every call has a timeout, and stale replies never answer the wrong call."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import zmq

from rpc import engine, messages
from rpc.codec import DecodeError, decode, encode
from rpc.messages import (
    Ack,
    ClearKvCache,
    Embeddings,
    EmbedStep,
    Error,
    GenerateStep,
    LoadDenseShard,
    Loaded,
    Ping,
    Pong,
    ReleaseSequences,
    SamplingParams,
    SeqInput,
    StepResult,
    Unload,
)
from rpc.transport import RpcClient, RpcServer, RpcTimeout
from tests.checkpoints import make_checkpoint
from workers.arch.config import ModelConfig

SAMPLES = [
    Ping(),
    Pong(pid=12, device="cuda:0", models=["a", "b"]),
    LoadDenseShard(
        model_id="m",
        format="safetensors",
        files=["/a", "/b"],
        config={"arch": "qwen3", "x": [1, 2]},
        dtype="bfloat16",
        rank=1,
        world_size=2,
        dist_address="127.0.0.1:29500",
        vocab_limit=151669,
    ),
    Loaded(model_id="m", param_bytes=10**10, load_seconds=1.5),
    Loaded(model_id="m", param_bytes=10, load_seconds=1.5, kv_blocks=4, kv_bytes=100, state_bytes=7),
    GenerateStep(
        model_id="m",
        seqs=[
            SeqInput(seq_id=1, tokens=[1, 2, 3], start_pos=0, sampling=SamplingParams(0.7, 0.9, 20, 42)),
            SeqInput(seq_id=2, tokens=[9], start_pos=17, sampling=SamplingParams(), sample=False),
            SeqInput(seq_id=3, tokens=[4], start_pos=2, sampling=SamplingParams(), allowed=b"\x0f\x00"),
            SeqInput(seq_id=4, tokens=[5, 6], start_pos=0, sampling=SamplingParams(), state_slot=3),
        ],
    ),
    StepResult(model_id="m", tokens=[5, -1]),
    EmbedStep(model_id="m", seqs=[[1, 2, 3], [4]], chunk_tokens=512),
    Embeddings(model_id="m", dim=2, vectors=b"\x00\x00\x80\x3f\x00\x00\x00\x00"),
    ClearKvCache(model_id="m", blocks=[1, 2]),
    ClearKvCache(model_id="m"),
    ReleaseSequences(model_id="m", seq_ids=[1, 2]),
    ReleaseSequences(model_id="m"),
    Unload(model_id="m"),
    Ack(),
    Error(kind=messages.ErrorKind.STEP_FAILED, message="boom"),
    engine.Submit(
        request_id="r",
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        sampling=SamplingParams(0.0),
        max_tokens=5,
        stop=["\n"],
        template_kwargs={"enable_thinking": False},
    ),
    engine.Cancel(request_id="r"),
    engine.Embed(request_id="e", model="m", inputs=["def f(): pass", "héllo"], dimensions=8, client="c"),
    engine.Embed(request_id="e", model="m", input_ids=[[1, 2], [3]], hop=True),
    engine.Answer(data={"dim": 2, "vectors": b"\x00\x00\x80\x3f\x00\x00\x00\x00", "prompt_tokens": 3}),
    engine.Query(what="health"),
    engine.ModelOp(op="load", model="m"),
    engine.Answer(data={"models": [{"id": "m"}]}),
    engine.Submit(
        request_id="t",
        model="m",
        messages=[],
        sampling=SamplingParams(),
        prompt_ids=[1, 2],
        tools=[{"name": "f", "description": "", "parameters": {"type": "object"}}],
        tool_choice="required",
        tool_name="f",
        json_schema={"type": "object"},
        thinking=False,
    ),
    engine.Started(request_id="r", prompt_tokens=3, reasoning=True),
    engine.Waiting(request_id="r", reason="model 'm' is loading"),
    engine.Delta(request_id="r", text="héllo 🤖", completion_tokens=2),
    engine.Finished(request_id="r", finish_reason="length", prompt_tokens=3, completion_tokens=5),
    engine.Finished(request_id="r", finish_reason="stop", prompt_tokens=3, completion_tokens=5, stop_sequence="\n"),
    engine.Failure(request_id="r", kind=engine.FailureKind.MODEL_LOADING, message="wait", retry_after=5),
    engine.Failure(
        request_id="r",
        kind=engine.FailureKind.CONTEXT_LENGTH_EXCEEDED,
        message="too long",
        overflow=engine.ContextOverflow(limit=8, prompt_tokens=6, max_tokens=4),
    ),
    engine.Forward(
        request_id="r",
        targets=[engine.Target("b", "http://b:31313", "k"), engine.Target("c", "http://c:31313", model="m")],
        reason="resident on b",
    ),
    engine.PeerFailed(endpoint="http://b:31313", reason="ConnectError"),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg):
    msg_id, back = decode(encode(msg, 77))
    assert msg_id == 77 and back == msg and type(back) is type(msg)


def test_the_samples_cover_every_message_type():
    defined = {
        c for m in (messages, engine) for c in vars(m).values() if isinstance(c, type) and c.__module__ == m.__name__
    }
    assert defined - {type(s) for s in SAMPLES} <= {
        SamplingParams,
        SeqInput,
        engine.Target,
        engine.ContextOverflow,
        engine.FailureKind,
        engine.NodeStatus,
        messages.ErrorKind,
    }  # nested


def test_every_failure_kind_has_one_http_meaning():
    """Failure kinds are an enum on the wire; the front maps each one, and nothing else, to a status."""
    from cortex.api.errors import FAILURES

    assert set(FAILURES) == set(engine.FailureKind)
    _, back = decode(encode(engine.Failure("r", engine.FailureKind.OVERLOADED, "busy", 3), 1))
    assert back.kind is engine.FailureKind.OVERLOADED


def _frame(msg_id, body) -> bytes:
    """A frame as the wire carries one: [id, message map]."""
    return msgpack.packb([msg_id, body])


@pytest.mark.parametrize(
    "frame, words",
    [
        (b"\xc1\xff garbage", "not msgpack"),
        (msgpack.packb({"type": "Ping", "id": 1}), "Expected `array`"),  # not [id, message]
        (msgpack.packb([1, 2, 3]), "length 2"),
        (_frame(1, {"model_id": "m"}), "missing required field `type`"),
        (_frame(1, {"type": "Launch"}), "Invalid value 'Launch'"),
        (_frame(1, {"type": "Unload", "model_id": "m", "force": True}), "unknown field `force`"),
        (_frame(1, {"type": "Unload"}), "model_id"),
        (_frame("one", {"type": "Unload", "model_id": "m"}), "Expected `int`, got `str` - at `$[0]`"),
        (_frame(1, {"type": "StepResult", "model_id": "m", "tokens": "123"}), "Expected `array`, got `str`"),
        (
            _frame(
                1,
                {
                    "type": "GenerateStep",
                    "model_id": "m",
                    "seqs": [{"seq_id": True, "tokens": [], "start_pos": 0, "sampling": {}}],
                },
            ),
            "Expected `int`, got `bool` - at `$[1].seqs[0].seq_id`",
        ),  # fmt: skip
        (_frame(1, {"type": "GenerateStep", "model_id": "m", "seqs": [{"seq_id": 1}]}), "seqs[0]"),
        (
            _frame(1, {"type": "Failure", "request_id": "r", "kind": "oops", "message": "m"}),
            "Invalid enum value 'oops'",
        ),
    ],
)
def test_malformed_frames_are_decode_errors(frame, words):
    with pytest.raises(DecodeError, match=re.escape(words)):
        decode(frame)


@pytest.fixture
def endpoint(tmp_path):
    return f"ipc://{tmp_path}/rpc.sock"


def _serve(endpoint, handler, stop):
    server = RpcServer(endpoint)

    def loop():
        while not stop.is_set():
            got = server.recv(50)
            if got and got[2] is not None:
                reply = handler(got[2])
                if reply is not None:
                    server.reply(got[0], got[1], reply)
        server.close()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


def test_call_returns_the_reply(endpoint):
    stop = threading.Event()
    _serve(endpoint, lambda m: Pong(pid=1, device="cpu", models=[]), stop)
    client = RpcClient(endpoint)
    try:
        assert client.call(Ping(), 5) == Pong(pid=1, device="cpu", models=[])
    finally:
        stop.set()
        client.close()


def test_a_silent_server_times_out(endpoint):
    stop = threading.Event()
    _serve(endpoint, lambda m: None, stop)
    client = RpcClient(endpoint)
    try:
        t0 = time.monotonic()
        with pytest.raises(RpcTimeout, match="Ping"):
            client.call(Ping(), 0.3)
        assert time.monotonic() - t0 >= 0.25  # it waited for its timeout (how much longer is the machine's business)
    finally:
        stop.set()
        client.close()


def test_a_late_reply_never_answers_the_next_call(endpoint):
    stop, first = threading.Event(), threading.Event()

    def slow_then_fast(msg):
        if isinstance(msg, Unload) and not first.is_set():
            first.set()
            time.sleep(0.5)  # answers after the caller gave up
            return Error(kind=messages.ErrorKind.INTERNAL, message="stale")
        return Ack()

    _serve(endpoint, slow_then_fast, stop)
    client = RpcClient(endpoint)
    try:
        with pytest.raises(RpcTimeout):
            client.call(Unload("m"), 0.1)
        assert client.socket.poll(30_000)  # the stale Error is now waiting in the socket
        assert client.call(Unload("m"), 5) == Ack()
    finally:
        stop.set()
        client.close()


def test_garbage_gets_an_error_reply_and_the_server_keeps_serving(endpoint):
    stop = threading.Event()
    _serve(endpoint, lambda m: Ack(), stop)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(endpoint)
    try:
        sock.send(b"\x00\x01 not msgpack")
        assert sock.poll(5000)
        msg_id, reply = decode(sock.recv())
        assert isinstance(reply, Error) and reply.kind == "bad_frame"
        client = RpcClient(endpoint)
        assert client.call(Ping(), 5) == Ack()
        client.close()
    finally:
        stop.set()
        sock.close(0)


# -- the real worker process --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    sock = f"ipc://{tmp_path_factory.mktemp('w')}/w.sock"
    proc = subprocess.Popen([sys.executable, "-m", "workers.worker", "--endpoint", sock, "--device", "cpu"])
    client = RpcClient(sock)
    assert isinstance(client.call(Ping(), 90), Pong)
    yield proc, client
    client.close()
    proc.kill()
    proc.wait()


def test_worker_answers_ping_with_its_pid(worker):
    proc, client = worker
    pong = client.call(Ping(), 10)
    assert pong.pid == proc.pid and pong.device == "cpu"


def test_worker_survives_garbage_and_wrong_requests(worker, tmp_path):
    proc, client = worker
    client.socket.send(b"garbage")
    assert client.recv(5000)[1].kind == "bad_frame"
    assert client.call(engine.Query(what="health"), 10).kind == "bad_frame"  # not a worker request
    step = GenerateStep("absent", [SeqInput(1, [1], 0, SamplingParams(), [0])])
    assert client.call(step, 10).kind == "unknown_model"
    load = LoadDenseShard(
        model_id="x", format="safetensors", files=[str(tmp_path / "none.safetensors")], config={}, dtype="float32"
    )
    reply = client.call(load, 30)
    assert isinstance(reply, Error) and reply.kind == "load_failed"
    assert proc.poll() is None and isinstance(client.call(Ping(), 10), Pong)


def _load_tiny(path, model_id: str, **kw) -> LoadDenseShard:
    """Load a local checkpoint's safetensors, float32, whole (one rank)."""
    files = [str(p) for p in path.glob("*.safetensors")]
    config = ModelConfig.from_hf_dir(path).to_dict()
    return LoadDenseShard(model_id=model_id, format="safetensors", files=files, config=config, dtype="float32", **kw)


def test_worker_load_generate_clear_unload(worker, tmp_path):
    _, client = worker
    load = _load_tiny(make_checkpoint(tmp_path, "qwen3", tied=True), "tiny", vocab_limit=400, kv_blocks=8)
    loaded = client.call(load, 60)
    assert isinstance(loaded, Loaded) and loaded.param_bytes > 0 and loaded.kv_blocks == 8
    assert client.call(load, 10).kind == "load_failed"  # already loaded: refused, not duplicated
    greedy = SamplingParams(temperature=0.0)
    first = client.call(GenerateStep("tiny", [SeqInput(1, [3, 4, 5], 0, greedy, [0])]), 30)
    assert isinstance(first, StepResult) and 0 <= first.tokens[0] < 400
    # two sequences in one step: a decode of seq 1 and a new prompt, identical to seq 1's, in block 1
    both = client.call(
        GenerateStep("tiny", [SeqInput(1, first.tokens, 3, greedy, [0]), SeqInput(2, [3, 4, 5], 0, greedy, [1])]), 30
    )
    assert isinstance(both, StepResult) and both.tokens[1] == first.tokens[0]
    no_room = client.call(GenerateStep("tiny", [SeqInput(3, list(range(20)), 0, greedy, [2])]), 10)
    assert no_room.kind == "step_failed" and "block table" in no_room.message  # 20 tokens, one 16-slot block
    assert client.call(ReleaseSequences("tiny", [1, 2]), 10) == Ack()
    assert client.call(ClearKvCache("tiny"), 10) == Ack()
    assert client.call(Unload("tiny"), 10) == Ack()
    assert client.call(Unload("tiny"), 10) == Ack()  # idempotent
    assert client.call(Ping(), 10).models == []


def test_a_sequence_whose_sampling_fails_fails_alone(worker, tmp_path):
    """A distribution no draw can come from (a NaN bias; the API refuses NaN, a worker must not
    depend on that) fails its own sequence; the step's other sequences get their tokens."""
    _, client = worker
    load = _load_tiny(make_checkpoint(tmp_path, "llama", tied=True), "tiny-nan", kv_blocks=4)
    assert isinstance(client.call(load, 60), Loaded)
    poisoned = SamplingParams(temperature=1.0, logit_bias={5: float("nan")})
    step = GenerateStep(
        "tiny-nan",
        [SeqInput(1, [3, 4, 5], 0, poisoned, [0]), SeqInput(2, [3, 4, 5], 0, SamplingParams(temperature=0.0), [1])],
    )
    result = client.call(step, 30)
    assert isinstance(result, StepResult)
    assert result.tokens[0] == -1 and "RuntimeError" in result.errors[0]
    assert result.tokens[1] >= 0 and result.errors[1] == ""
    assert client.call(Unload("tiny-nan"), 10) == Ack()


@pytest.mark.parametrize(
    "frame",
    [
        msgpack.packb({"type": "Ping", "id": 1, 1: 2, "x": 3}),  # mixed key types: sorting them used to raise
        msgpack.packb({"type": "Ping", "id": True}),
        msgpack.packb({"type": "Unload", "id": 1, "model_id": {"nested": [1, b"\x00"]}}),
    ],
)
def test_odd_but_valid_msgpack_is_a_decode_error_not_a_crash(frame):
    with pytest.raises(DecodeError):
        decode(frame)


def test_the_worker_survives_a_mixed_key_frame(worker):
    proc, client = worker
    client.socket.send(msgpack.packb({"type": "Ping", "id": 1, 1: 2, "x": 3}))
    assert client.recv(5000)[1].kind == "bad_frame"
    assert proc.poll() is None and isinstance(client.call(Ping(), 10), Pong)


def test_clearing_a_model_the_worker_does_not_hold_is_an_ack(worker):
    _, client = worker
    assert client.call(ReleaseSequences("never-loaded", [1]), 10) == Ack()
    assert client.call(ClearKvCache("never-loaded", [1]), 10) == Ack()


def test_clear_kv_cache_zeroes_the_blocks_it_names_or_the_whole_pool(tmp_path):
    """In-process, to look at the pool itself."""
    from workers.worker import Worker

    worker = Worker("cpu")
    load = _load_tiny(make_checkpoint(tmp_path, "qwen3", tied=True), "tiny", vocab_limit=400, kv_blocks=4)
    assert isinstance(worker.load(load), Loaded)
    greedy = SamplingParams(temperature=0.0)
    step = GenerateStep("tiny", [SeqInput(1, [3, 4, 5], 0, greedy, [0]), SeqInput(2, [6, 7], 0, greedy, [2])])
    assert isinstance(worker.step(step), StepResult)
    pool = worker.models["tiny"].cache
    by_block = (pool.k.shape[0], pool.num_blocks, pool.block_size, *pool.k.shape[2:])

    def filled(block: int) -> bool:
        return bool(pool.k.view(by_block)[:, block].any() or pool.v.view(by_block)[:, block].any())

    assert filled(0) and filled(2) and not filled(1)
    assert worker.clear(ClearKvCache("tiny", [0])) == Ack()
    assert not filled(0) and filled(2)
    assert worker.clear(ClearKvCache("tiny")) == Ack()
    assert not any(filled(b) for b in range(pool.num_blocks))
    assert worker.unload(Unload("tiny")) == Ack()
