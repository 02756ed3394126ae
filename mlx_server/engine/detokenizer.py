"""Streaming detokenization: turn token ids into text pieces as they arrive.

A character may span several tokens (byte-level BPE splits emoji and CJK into byte tokens), so a
piece is only released once it decodes without a trailing replacement character. Decoding looks at
a short window of recent tokens, not the whole output, so each step costs O(1).
"""

from __future__ import annotations

from .tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


class StreamingDetokenizer:
    """Incremental decoder in the style of text-generation-inference's prefix/read offsets."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        skip_special_tokens: bool = True,
        keep_special: frozenset[int] = frozenset(),
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        # Special tokens shown anyway (tool-call markers such as Mistral's [TOOL_CALLS]).
        self._keep = keep_special
        self._special = tokenizer.special_ids() - keep_special if keep_special else frozenset()
        self._ids: list[int] = []
        self._prefix = 0  # start of the window used as decoding context
        self._read = 0  # tokens before this index have been released as text

    def add(self, token_id: int) -> str:
        """Feed one token; return the newly completed text (possibly empty)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if len(full_text) > len(prefix_text) and not full_text.endswith(REPLACEMENT):
            new = full_text[len(prefix_text) :]
            self._prefix = self._read
            self._read = len(self._ids)
            return new
        return ""

    def flush(self) -> str:
        """Release whatever is still held back at the end of a generation."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        if len(full_text) > len(prefix_text):
            return full_text[len(prefix_text) :]
        return ""

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self._skip and self._keep:
            ids = [i for i in ids if i not in self._special]
            return self._tok.decode(ids, skip_special_tokens=False)
        return self._tok.decode(ids, skip_special_tokens=self._skip)
