"""Every sampling parameter changes the output the way the OpenAI (and vLLM) docs say."""

from __future__ import annotations

import openai
import pytest
import torch

from rpc.messages import SamplingParams
from workers.sampling import greedy, greedy_rows, new_generator, plain_greedy, sample

LOGITS = torch.tensor([0.0, 1.0, 5.0, 2.0, 9.0])
CPU = torch.device("cpu")


def draws(params: SamplingParams, n: int = 200, **kw) -> list[int]:
    g = new_generator(params, CPU)
    return [sample(LOGITS, params, g, 0, **kw) for _ in range(n)]


def test_min_p_keeps_tokens_at_least_that_fraction_of_the_top_one():
    hot = SamplingParams(temperature=3.0, seed=1)
    assert set(draws(hot)) == {0, 1, 2, 3, 4}
    # at T=3 the probabilities are about .03 .04 .13 .05 .76: min_p 0.1 keeps only 4 (0.1 * .76 > .05)
    assert set(draws(SamplingParams(temperature=3.0, seed=1, min_p=0.1))) <= {2, 4}
    assert 2 in draws(SamplingParams(temperature=3.0, seed=1, min_p=0.1), 400)


def test_logit_bias_forces_or_bans_tokens():
    greedy = SamplingParams(temperature=0.0)
    assert sample(LOGITS, SamplingParams(temperature=0.0, logit_bias={0: 100.0}), None, 0) == 0
    assert sample(LOGITS, SamplingParams(temperature=0.0, logit_bias={4: -100.0}), None, 0) == 2
    assert sample(LOGITS, greedy, None, 0) == 4


def test_frequency_and_presence_penalties_count_generated_tokens():
    greedy = dict(temperature=0.0)
    assert sample(LOGITS, SamplingParams(**greedy, frequency_penalty=2.0), None, 0, output=[4]) == 4  # 9-2 > 5
    assert sample(LOGITS, SamplingParams(**greedy, frequency_penalty=2.0), None, 0, output=[4, 4, 4]) == 2  # 9-6 < 5
    assert sample(LOGITS, SamplingParams(**greedy, presence_penalty=2.0), None, 0, output=[4]) == 4  # 7 > 5
    assert sample(LOGITS, SamplingParams(**greedy, presence_penalty=2.0), None, 0, prompt=[4, 4]) == 4  # prompt not


def test_repetition_penalty_covers_prompt_and_output():
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert sample(LOGITS, p, None, 0, prompt=[4]) == 2  # 9/2 = 4.5 < 5
    assert sample(LOGITS, p, None, 0, output=[4]) == 2
    assert sample(LOGITS, p, None, 0, prompt=[1]) == 4


# -- through the API ---------------------------------------------------------------------------------


@pytest.fixture
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0)


HI = [{"role": "user", "content": "Hello, world!"}]


def _token(tiny_qwen3, text: str) -> tuple[int, str]:
    """A token id of ``text`` and the text it decodes to."""
    from cortex.chat.tokenizer import from_hf_dir

    tok = from_hf_dir(tiny_qwen3)
    tid = tok.encode(text)[0]
    return tid, tok.decode([tid])


def test_logit_bias_through_the_api(client, tiny_qwen3):
    paris, text = _token(tiny_qwen3, "Paris")
    r = client.chat.completions.create(
        model="tiny", messages=HI, max_tokens=5, temperature=0, logit_bias={str(paris): 100}
    )
    assert r.choices[0].message.content == text * 5


def test_stop_token_ids_end_the_completion(client, tiny_qwen3):
    paris, _ = _token(tiny_qwen3, "Paris")
    r = client.chat.completions.create(
        model="tiny",
        messages=HI,
        max_tokens=5,
        temperature=0,
        logit_bias={str(paris): 100},
        extra_body={"stop_token_ids": [paris]},
    )
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == ""
    assert r.usage.completion_tokens == 1


def test_frequency_penalty_reduces_repetition(client):
    plain = client.chat.completions.create(
        model="tiny", messages=HI, max_tokens=40, temperature=0, extra_body={"ignore_eos": True}
    )
    penalised = client.chat.completions.create(
        model="tiny", messages=HI, max_tokens=40, temperature=0, frequency_penalty=2.0, extra_body={"ignore_eos": True}
    )

    def most_repeated(text: str) -> int:
        words = text.split()
        return max((words.count(w) for w in set(words)), default=0)

    assert penalised.choices[0].message.content != plain.choices[0].message.content
    assert most_repeated(penalised.choices[0].message.content) <= most_repeated(plain.choices[0].message.content)


def test_repetition_penalty_and_min_p_are_accepted_and_change_sampling(client):
    base = dict(model="tiny", messages=HI, max_tokens=16, temperature=0.0, extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**base).choices[0].message.content
    rep = client.chat.completions.create(**{**base, "extra_body": {"ignore_eos": True, "repetition_penalty": 5.0}})
    assert rep.choices[0].message.content != plain
    r = client.chat.completions.create(
        model="tiny", messages=HI, max_tokens=8, temperature=1.0, seed=3, extra_body={"min_p": 0.99}
    )
    greedy = client.chat.completions.create(model="tiny", messages=HI, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == greedy.choices[0].message.content  # min_p ~1 keeps only the top


@pytest.mark.parametrize(
    "body, param",
    [
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 500}}, "logit_bias"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"min_p": 2}, "min_p"),
        ({"stop_token_ids": ["a"]}, "stop_token_ids"),
    ],
)
def test_bad_sampling_values_are_400(tiny_server, body, param):
    import httpx

    r = httpx.post(tiny_server.url + "/v1/chat/completions", json={"model": "tiny", "messages": HI, **body}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_logprobs_and_top_logprobs(client, tiny_qwen3):
    r = client.chat.completions.create(
        model="tiny",
        messages=HI,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
        assert t.token == t.top_logprobs[0].token and t.logprob == pytest.approx(t.top_logprobs[0].logprob)  # greedy
    plain = client.chat.completions.create(model="tiny", messages=HI, max_tokens=3)
    assert plain.choices[0].logprobs is None
    # each token's bytes (a token can be part of a character) add up to the text
    paris, text = _token(tiny_qwen3, "Paris")
    forced = client.chat.completions.create(
        model="tiny", messages=HI, max_tokens=4, temperature=0, logprobs=True, logit_bias={str(paris): 100}
    )
    tokens = forced.choices[0].logprobs.content
    assert [t.token for t in tokens] == [text] * 4
    assert b"".join(bytes(t.bytes) for t in tokens).decode() == forced.choices[0].message.content


def test_streamed_logprobs_cover_every_token(client):
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=HI,
            max_tokens=8,
            temperature=0.7,
            seed=2,
            logprobs=True,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    entries = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert len(entries) == 8 and all(t.top_logprobs == [] for t in entries)


def test_top_logprobs_without_logprobs_is_400(tiny_server):
    import httpx

    r = httpx.post(
        tiny_server.url + "/v1/chat/completions", json={"model": "tiny", "messages": HI, "top_logprobs": 2}, timeout=60
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_n_choices_differ_and_are_each_reproducible(client):
    kw = dict(model="tiny", messages=HI, max_tokens=10, temperature=1.0, seed=5, n=3, extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) == 3
    assert r.usage.completion_tokens == 30 and r.usage.prompt_tokens < 30
    again = client.chat.completions.create(**kw)
    assert [c.message.content for c in again.choices] == texts
    single = client.chat.completions.create(**{**kw, "n": 1})
    assert single.choices[0].message.content == texts[0]  # choice 0 is what n=1 gives


def test_n_choices_stream_with_their_indexes(client):
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=HI,
            max_tokens=6,
            temperature=1.0,
            seed=5,
            n=3,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    by_index: dict[int, str] = {}
    finishes = {}
    for c in chunks:
        for ch in c.choices:
            by_index[ch.index] = by_index.get(ch.index, "") + (ch.delta.content or "")
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert finishes == {0: "length", 1: "length", 2: "length"}
    whole = client.chat.completions.create(
        model="tiny", messages=HI, max_tokens=6, temperature=1.0, seed=5, n=3, extra_body={"ignore_eos": True}
    )
    assert [by_index[i] for i in range(3)] == [c.message.content for c in whole.choices]
    assert chunks[-1].usage.completion_tokens == 18


def test_greedy_takes_the_first_of_equal_maxima_as_torch_argmax_does():
    logits = torch.zeros(49152)
    logits[[7, 100, 40000]] = 3.0
    assert greedy(logits) == int(torch.argmax(logits)) == 7
    assert greedy(logits[50:]) == int(torch.argmax(logits[50:])) == 50  # a view: ids count from its start
    assert greedy(torch.full((10,), float("-inf"))) == 0


def test_greedy_counts_a_nan_as_the_maximum_as_torch_argmax_does():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    logits[[300, 600]] = float("nan")
    assert greedy(logits) == int(torch.argmax(logits)) == 300
    half = logits.half()  # not float32: PyTorch's own argmax
    assert greedy(half) == int(torch.argmax(half)) == 300


def test_a_steps_greedy_rows_pick_as_greedy_does_row_by_row():
    """A step whose rows are all plain greedy is picked in one scan (workers.worker._greedy_rows):
    each row's token is what ``sample`` picks for it, ties, NaNs and the vocabulary limit included."""
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(3))
    logits[0, [5, 9]] = 50.0  # a tie: the first
    logits[1, 700] = float("nan")  # a NaN counts as the maximum
    logits[2, 990] = 99.0  # past the vocabulary limit: never picked
    params = SamplingParams(temperature=0.0)
    for limit in (0, 980):
        want = [sample(row, params, None, limit) for row in logits]
        assert greedy_rows(logits, limit) == want
    assert greedy_rows(logits, 0)[:3] == [5, 700, 990]


@pytest.mark.parametrize(
    ("params", "allowed", "plain"),
    [
        (SamplingParams(temperature=0.0), None, True),
        (SamplingParams(temperature=0.7), None, False),
        (SamplingParams(temperature=0.0, logprobs=0), None, False),
        (SamplingParams(temperature=0.0, logit_bias={3: 1.0}), None, False),
        (SamplingParams(temperature=0.0, repetition_penalty=1.1), None, False),
        (SamplingParams(temperature=0.0), b"\xff", False),
    ],
)
def test_only_rows_with_nothing_but_greedy_take_the_one_scan(params, allowed, plain):
    assert plain_greedy(params, allowed) is plain
