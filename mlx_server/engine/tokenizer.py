"""The tokenizer the engine uses: a `tokenizers.Tokenizer` plus the facts about special tokens.

Built either from a Hugging Face model directory (tokenizer.json + tokenizer_config.json) or from
GGUF metadata (see `engine.gguf`). No MLX here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import tokenizers

from ..errors import ModelLoadError


@attrs.define(eq=False)
class Tokenizer:
    """Encodes prompts and decodes ids; knows which ids end a generation."""

    backend: tokenizers.Tokenizer
    eos_token_ids: frozenset[int]
    bos_token: str | None = None
    eos_token: str | None = None
    chat_template: str | None = None
    add_bos: bool = False

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Encode text. Chat prompts already carry their special tokens as text, so by default
        no BOS is prepended; `add_special_tokens` adds it for models that want one."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token is not None:
            bos = self.backend.token_to_id(self.bos_token)
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos, *ids]
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def special_ids(self) -> frozenset[int]:
        """Ids of added special tokens (never shown in generated text)."""
        return frozenset(
            i for i, tok in self.backend.get_added_tokens_decoder().items() if tok.special
        )


def _token_content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def load_hf_tokenizer(model_dir: Path, config: dict[str, Any]) -> Tokenizer:
    """Load tokenizer.json, tokenizer_config.json, generation_config.json and any
    chat_template.jinja from a Hugging Face style model directory."""
    tok_file = model_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise ModelLoadError(
            f"{model_dir}: no tokenizer.json (the fast tokenizer file is required)"
        )
    try:
        backend = tokenizers.Tokenizer.from_file(str(tok_file))
    except Exception as exc:  # tokenizers raises plain Exception on corrupt files
        raise ModelLoadError(f"{tok_file}: cannot read tokenizer: {exc}") from exc

    tok_config: dict[str, Any] = {}
    cfg_file = model_dir / "tokenizer_config.json"
    if cfg_file.is_file():
        try:
            tok_config = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{cfg_file}: not valid JSON: {exc}") from exc

    chat_template: str | None = None
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        chat_template = jinja_file.read_text(encoding="utf-8")
    else:
        tmpl = tok_config.get("chat_template")
        if isinstance(tmpl, str):
            chat_template = tmpl
        elif isinstance(tmpl, list):  # named templates: take "default"
            for entry in tmpl:
                if isinstance(entry, dict) and entry.get("name") == "default":
                    chat_template = entry.get("template")

    bos_token = _token_content(tok_config.get("bos_token"))
    eos_token = _token_content(tok_config.get("eos_token"))

    eos_ids: set[int] = set()
    for source in (config.get("eos_token_id"), _generation_eos(model_dir)):
        if isinstance(source, int):
            eos_ids.add(source)
        elif isinstance(source, list):
            eos_ids.update(i for i in source if isinstance(i, int))
    if eos_token is not None:
        eid = backend.token_to_id(eos_token)
        if eid is not None:
            eos_ids.add(eid)
    # End-of-turn markers of common chat formats also end a generation.
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"):
        mid = backend.token_to_id(marker)
        if mid is not None and marker in (chat_template or ""):
            eos_ids.add(mid)

    add_bos = bool(tok_config.get("add_bos_token", False))
    return Tokenizer(
        backend=backend,
        eos_token_ids=frozenset(eos_ids),
        bos_token=bos_token,
        eos_token=eos_token,
        chat_template=chat_template,
        add_bos=add_bos,
    )


def _generation_eos(model_dir: Path) -> Any:
    gen = model_dir / "generation_config.json"
    if not gen.is_file():
        return None
    try:
        return json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError):
        return None
