"""The prefix cache of a hybrid model (Qwen3.5): cached KV blocks plus saved recurrent states.

A linear-attention layer's state cannot be cut back to an earlier token, so a cached prefix is only
usable where a copy of the state was saved (cortex/engine/checkpoints.py). The scheduler ends a
prompt chunk at the last block boundary before the prompt's last token and the workers save the
state there; a later prompt that starts with the same blocks resumes from it (the state copied into
its own slot), which is what an agent's next turn, a resend, and the other choices of ``n > 1`` do.
Saved states are bounded, reused least recently used first, and go with their blocks.
"""

from __future__ import annotations

import pytest
import torch

from cortex.engine.blocks import BlockManager
from cortex.engine.scheduler import Scheduler
from rpc.messages import GenerateStep, LoadDenseShard, SamplingParams, SeqInput
from tests.checkpoints import hf_hybrid_model, make_hybrid_checkpoint
from tests.test_engine import _seq
from workers.arch import ModelConfig

BS = 4  # block size of the scheduler tests
TOL = 1e-4  # fp32 logits against transformers


def _sched(blocks: int = 32, slots: int = 2, checkpoints: int = 2, chunk: int = 64) -> Scheduler:
    return Scheduler(BlockManager(blocks, BS), 64, chunk, max_seqs=8, state_slots=slots, checkpoints=checkpoints)


def _run_prompt(sched: Scheduler, seq) -> list:
    """Plan and finish steps until ``seq`` has computed its prompt; the work of each step."""
    steps = []
    while seq.computed < seq.prompt_len:
        work = sched.plan()
        sched.done(work)
        steps.append(work)
    return steps


def _like(seq, tokens: list[int], request_id: str = "next", index: int = 0):
    """A new sequence (nothing admitted or computed) with these prompt tokens."""
    new = _seq(len(tokens))
    new.tokens, new.request_id, new.index = list(tokens), request_id, index
    return new


# -- the scheduler: where states are saved and what resumes from them -------------------------------------


def test_a_prompt_chunk_ends_at_its_last_block_boundary_and_the_state_there_is_saved():
    sched = _sched()
    a = _seq(10)  # blocks [0,4) [4,8) [8,10): the boundary before its last token is 8
    sched.add(a)
    first, second = _run_prompt(sched, a)
    (w1,), (w2,) = first, second
    assert (w1.start, len(w1.tokens), w1.restore_from) == (0, 8, -1)
    assert w1.save_to >= 2  # a slot after the two running ones
    assert (w2.start, len(w2.tokens), w2.save_to) == (8, 2, -1)
    assert sched.checkpoints.has(a.block_digests[1])


def test_the_next_turn_resumes_from_the_saved_state_and_reports_its_cached_tokens():
    sched = _sched()
    a = _seq(10)
    sched.add(a)
    _run_prompt(sched, a)
    saved = sched.checkpoints.saved[a.block_digests[1]]
    sched.remove(a)
    turn2 = _like(a, list(range(10)) + [50, 51, 52, 53, 54, 55, 56])  # the conversation, grown at the end
    sched.add(turn2)
    (w,) = sched.plan()
    assert (w.start, w.restore_from, turn2.cached_tokens) == (8, saved, 8)
    assert turn2.checkpoint_at == 16 and len(w.tokens) == 8 and w.save_to >= 0  # and it saves its own
    assert sched.checkpoints.pinned == {saved: 1}  # nothing reuses the slot before the step reads it
    sched.done([w])
    assert sched.checkpoints.pinned == {}


def test_a_cached_prefix_without_a_saved_state_at_its_end_is_cut_to_one_that_has_it():
    sched = _sched(checkpoints=1)
    a = _seq(10)
    sched.add(a)
    _run_prompt(sched, a)  # blocks 0 and 1 named; a state saved at 8 only
    sched.remove(a)
    longer = _like(a, list(range(14)))  # blocks 0..2 could hit, but the state is only known at 8
    sched.add(longer)
    (w,) = sched.plan()
    assert w.start == 8 and w.restore_from >= 0


def test_without_saved_states_a_hybrid_model_caches_no_prefix():
    sched = _sched(checkpoints=0)
    a = _seq(10)
    sched.add(a)
    (w,) = sched.plan()
    assert (w.start, len(w.tokens), w.save_to) == (0, 10, -1)  # one chunk, no boundary to stop at
    sched.done([w])
    sched.remove(a)
    again = _like(a, list(range(10)))
    sched.add(again)
    (w,) = sched.plan()
    assert w.start == 0 and sched.blocks.num_cached == 0


def test_the_other_choices_wait_for_the_first_to_save_its_prompt_state_then_resume_from_it():
    sched = _sched(slots=3)
    first = _seq(10)
    others = [_like(first, first.tokens, request_id=first.request_id, index=i) for i in (1, 2)]
    for s in (first, *others):
        sched.add(s)
    (w,) = sched.plan()  # the others wait: they would compute the same prompt again
    assert w.seq is first and len(sched.waiting) == 2
    sched.done([w])
    work = sched.plan()
    assert [x.seq for x in work] == [first, *others]
    for x in work[1:]:
        assert (x.start, len(x.tokens)) == (8, 2) and x.restore_from == w.save_to
        assert x.seq.cached_tokens == 8


def test_saved_states_are_bounded_and_the_least_recently_used_is_reused():
    sched = _sched(slots=1, checkpoints=2)
    prompts = [[p * 100 + i for i in range(9)] for p in range(3)]  # three unrelated conversations
    seqs = []
    for i, tokens in enumerate(prompts):
        s = _like(_seq(1), tokens, request_id=f"c{i}")
        sched.add(s)
        _run_prompt(sched, s)
        sched.remove(s)
        seqs.append(s)
    cp = sched.checkpoints
    assert len(cp.saved) == 2 and not cp.has(seqs[0].block_digests[1])  # the oldest went
    assert cp.has(seqs[1].block_digests[1]) and cp.has(seqs[2].block_digests[1])


def test_a_saved_state_goes_with_its_block_and_when_the_cache_is_cleared():
    sched = _sched(blocks=4, slots=1, checkpoints=2)
    a = _seq(9)
    sched.add(a)
    _run_prompt(sched, a)
    sched.remove(a)
    assert sched.checkpoints.has(a.block_digests[1])
    b = _like(a, [900 + i for i in range(13)], request_id="other")  # needs all 4 blocks: a's are overwritten
    sched.add(b)
    _run_prompt(sched, b)
    assert not sched.checkpoints.has(a.block_digests[1]) and sched.checkpoints.has(b.block_digests[2])
    sched.remove(b)
    assert sched.clear_prefix_cache() and not sched.checkpoints.saved
    assert len(sched.checkpoints.free) == 2


def test_a_failed_step_lets_go_of_what_it_was_to_restore_and_save():
    sched = _sched()
    a = _seq(10)
    sched.add(a)
    _run_prompt(sched, a)
    sched.remove(a)
    again = _like(a, list(range(10)) + [7, 7, 7, 7, 7, 7, 7])
    sched.add(again)
    work = sched.plan()
    sched.abandon(work)
    sched.remove(again)
    assert sched.checkpoints.pinned == {} and len(sched.checkpoints.free) + len(sched.checkpoints.saved) == 2


# -- the worker: a resumed sequence computes what transformers computes -----------------------------------


@pytest.fixture(scope="module")
def hybrid_ckpt(tmp_path_factory):
    return make_hybrid_checkpoint(tmp_path_factory.mktemp("hybrid-prefix"))


@pytest.fixture(scope="module", params=["qwen3_5-vlm", "qwen3_next"])
def resumable_ckpt(request, tmp_path_factory):
    """The two checkpoint shapes the issue names: VLM-shaped Qwen3.5 and dense Qwen3-Next."""
    arch, vlm = ("qwen3_next", False) if request.param == "qwen3_next" else ("qwen3_5", True)
    return make_hybrid_checkpoint(tmp_path_factory.mktemp(request.param), arch=arch, vlm=vlm)


def test_a_sequence_resumed_from_a_saved_state_and_shared_blocks_equals_transformers(resumable_ckpt):
    """Worker level, fp32: sequence A computes a prompt in two chunks (7 tokens, then to the block
    boundary at 16 where its state is saved, then the rest); sequence B shares A's first block,
    resumes from the saved state in a slot of its own, in a step with A's decode, and its logits equal
    transformers' on B's whole sequence."""
    from workers.worker import Worker

    hybrid_ckpt = resumable_ckpt
    cfg = ModelConfig.from_hf_dir(hybrid_ckpt)
    worker = Worker("cpu")
    loaded = worker.handle(
        LoadDenseShard(
            model_id="m",
            format="safetensors",
            files=[str(p) for p in sorted(hybrid_ckpt.glob("*.safetensors"))],
            config=cfg.to_dict(),
            dtype="float32",
            rank=0,
            world_size=1,
            kv_blocks=16,
            state_slots=3,  # two running sequences, one saved state
        )
    )
    assert loaded.state_bytes > 0
    captured = []
    worker.models["m"].model.register_forward_hook(lambda _m, _a, logits: captured.append(logits))
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, 500, (21,), generator=g).tolist()
    b = a[:16] + torch.randint(0, 500, (9,), generator=g).tolist()
    greedy = SamplingParams(temperature=0)

    def step(*seqs: SeqInput) -> None:
        worker.handle(GenerateStep("m", list(seqs)))

    step(SeqInput(1, a[:7], 0, greedy, [0, 1], False, state_slot=0))
    step(SeqInput(1, a[7:16], 7, greedy, [0, 1], False, state_slot=0, state_save=2))
    step(SeqInput(1, a[16:], 16, greedy, [0, 1], True, state_slot=0))
    step(
        SeqInput(1, [a[-1]], 21, greedy, [0, 1], True, state_slot=0),  # A decodes on beside it
        SeqInput(2, b[16:], 16, greedy, [0, 2], True, state_slot=1, state_from=2),
    )
    ref = hf_hybrid_model(hybrid_ckpt)
    with torch.no_grad():
        want_a = ref(torch.tensor([a])).logits[0, -1]
        want_b = ref(torch.tensor([b])).logits[0, -1]
    assert (captured[2][0] - want_a).abs().max() < TOL
    assert (captured[3][1] - want_b).abs().max() < TOL


def test_a_slot_past_the_pool_is_refused_by_name(hybrid_ckpt):
    from workers.worker import Worker

    worker = Worker("cpu")
    worker.handle(
        LoadDenseShard(
            model_id="m",
            format="safetensors",
            files=[str(p) for p in sorted(hybrid_ckpt.glob("*.safetensors"))],
            config=ModelConfig.from_hf_dir(hybrid_ckpt).to_dict(),
            dtype="float32",
            rank=0,
            world_size=1,
            kv_blocks=4,
            state_slots=2,
        )
    )
    bad = SeqInput(1, [1, 2], 16, SamplingParams(), [0, 1], True, state_slot=0, state_from=5)
    with pytest.raises(ValueError, match="saved state 5 is not one of 2"):
        worker.step(GenerateStep("m", [bad]))
