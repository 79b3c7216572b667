"""Tokenizers: a Hugging Face ``tokenizer.json``, or the vocabulary stored in a GGUF file.

Both end up as a ``tokenizers.Tokenizer``, so encoding, decoding and streaming decode have one
implementation whatever the model's format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# llama.cpp's pre-tokenizer names -> the split regex the model was trained with.
_GPT2_PAT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PAT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters: byte-level BPE vocabularies (GPT-2,
    Llama 3, Qwen, SmolLM) spell every token's bytes with these characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in byte_to_unicode().items()}


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The exact bytes a token stands for (a token can be part of a multi-byte character)."""
    piece = tokenizer.id_to_token(token_id)
    if piece is None:
        return b""
    if all(ch in _UNICODE_TO_BYTE for ch in piece):
        return bytes(_UNICODE_TO_BYTE[ch] for ch in piece)
    return piece.encode()  # an added token spelled as plain text


# GGUF token types (llama.cpp): 3 = control, 4 = user-defined.
_CONTROL, _USER_DEFINED, _UNUSED = 3, 4, 5  # GGUF token types


@dataclass
class TokenizerInfo:
    tokenizer: Tokenizer
    bos_token: str | None
    eos_token: str | None
    add_bos: bool

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, whole: bool = False) -> list[int]:
        """``text``'s token ids. ``whole``: the text is a whole input, encoded as the tokenizer's
        post-processor frames one (an embedding model's: Qwen3-Embedding appends the
        ``<|endoftext|>`` whose state it pools); a chat prompt is not (its template has the tokens)."""
        ids = self.tokenizer.encode(text, add_special_tokens=whole).ids
        if self.add_bos and self.bos_token is not None:
            bos = self.tokenizer.token_to_id(self.bos_token)
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _byte_level_pre(pattern: str | None, individual_digits: bool = False):
    steps = []
    if individual_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if pattern is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


def _pre_tokenizer_for(pre: str):
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return _byte_level_pre(_QWEN2_PAT)
    if pre in ("llama3", "llama-bpe", "smaug-bpe"):
        return _byte_level_pre(_LLAMA3_PAT)
    if pre == "smollm":
        return _byte_level_pre(None, individual_digits=True)
    return _byte_level_pre(_GPT2_PAT)


def from_gguf_fields(fields: dict[str, Any]) -> TokenizerInfo:
    """Build the tokenizer stored in GGUF metadata (``tokenizer.ggml.*``, BPE models only)."""
    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (supported: gpt2 byte-level BPE)")
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    types: list[int] = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    # UNUSED entries are the converter's [PAD{i}] rows up to the embedding size: not vocabulary
    # (llama.cpp never emits them), so vocab_size, the sampler's limit, stops before them
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types, strict=True)) if ty != _UNUSED}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer_for(fields.get("tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    added = [
        AddedToken(t, special=ty == _CONTROL, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty in (_CONTROL, _USER_DEFINED)
    ]
    tok.add_tokens(added)

    def name(key: str) -> str | None:
        i = fields.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    bos, eos = name("tokenizer.ggml.bos_token_id"), name("tokenizer.ggml.eos_token_id")
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", False))
    if fields.get("tokenizer.ggml.add_eos_token") and eos is not None:  # a whole input ends with EOS (embedding models)
        framed = [bos] if add_bos and bos is not None else []
        single = " ".join([*(f"{t}:0" for t in framed), "$A:0", f"{eos}:0"])
        specials = [(t, vocab[t]) for t in dict.fromkeys([*framed, eos])]
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    return TokenizerInfo(tokenizer=tok, bos_token=bos, eos_token=eos, add_bos=add_bos)


def from_hf_dir(path: Path) -> TokenizerInfo:
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    bos = _token_text(cfg.get("bos_token"))
    # add_bos_token is explicit in Llama configs; Qwen adds no BOS. A post-processor may also add it.
    return TokenizerInfo(tok, bos, _token_text(cfg.get("eos_token")), bool(cfg.get("add_bos_token", False)))


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value
