"""Incremental tool-call parsers, one module per model family's markup (see `base` for the
machinery they share). `detect.detect_format` picks the family from the chat template.

Families (`PARSERS`):

- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Qwen2.5, Qwen3, Hermes;
  the default and the generic fallback's format).
- `qwen3_coder`: `<tool_call><function=NAME><parameter=P>value</parameter></function></tool_call>`.
- `llama3`: a JSON object `{"name": ..., "parameters": {...}}` as the answer, or after
  `<|python_tag|>`.
- `mistral`: `[TOOL_CALLS][{...}]` and `[TOOL_CALLS]NAME[ARGS]{...}`.
- `glm`: `<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value></tool_call>` (GLM-4.5/4.7).
- `kimi_k2`: `<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:0
  <|tool_call_argument_begin|>{...}<|tool_call_end|><|tool_calls_section_end|>`.
- `deepseek`: `<|tool_calls_begin|><|tool_call_begin|>NAME<|tool_sep|>{...}...` (V3.1, written
  with fullwidth bars), and V3's fenced JSON form.
- `gemma4`, `function_gemma`: `<|tool_call>call:NAME{...}<tool_call|>`,
  `<start_function_call>call:NAME{...}<end_function_call>`.
- `pythonic`: `[f(a=1), g(b="x")]` (Llama 3.2/4, LFM2, Gemma 3's ```tool_code blocks).
- `harmony` (gpt-oss): calls in the commentary channel, `to=functions.NAME`; its channels also
  carry the reasoning, so `harmony.HarmonyParser` is used in place of a `ToolParser`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import Piece, Take, ToolCall, ToolParser, _held_suffix, convert_value, scan_json
from .deepseek import DeepSeekParser
from .gemma import FunctionGemmaParser, Gemma4Parser
from .glm import GlmParser
from .hermes import HermesParser
from .kimi import KimiK2Parser
from .llama3 import Llama3Parser
from .mistral import MistralParser
from .pythonic import PythonicParser
from .qwen3_coder import Qwen3CoderParser

__all__ = [
    "PARSERS",
    "Piece",
    "Take",
    "ToolCall",
    "ToolParser",
    "_held_suffix",
    "convert_value",
    "make_parser",
    "scan_json",
]

PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser,
    "qwen3_coder": Qwen3CoderParser,
    "llama3": Llama3Parser,
    "mistral": MistralParser,
    "glm": GlmParser,
    "kimi_k2": KimiK2Parser,
    "deepseek": DeepSeekParser,
    "gemma4": Gemma4Parser,
    "function_gemma": FunctionGemmaParser,
    "pythonic": PythonicParser,
}


def make_parser(family: str, tools: Sequence[dict[str, Any]] | None = None) -> ToolParser:
    return PARSERS.get(family, HermesParser)(tools)
