"""Gemma's function-call markup: Gemma 4's `<|tool_call>call:NAME{key:<|"|>text<|"|>,n:3}
<tool_call|>` and FunctionGemma's `<start_function_call>call:NAME{key:<escape>text<escape>}
<end_function_call>`. The body is read by mlx-lm's own parsers for these formats."""

from __future__ import annotations

import importlib
from typing import Any

from .base import Take, ToolCall, ToolParser, _arguments_text, take_until


class _Delimited(ToolParser):
    end = ""
    module = ""  # the mlx_lm.tool_parsers module that reads the body

    def _take(self, buf: str, final: bool) -> Take:
        return take_until(buf, self.end, final, self._parse, body_from=len(self.starts[0]))

    def _parse(self, body: str) -> list[ToolCall] | None:
        parse: Any = importlib.import_module(f"mlx_lm.tool_parsers.{self.module}").parse_tool_call
        try:
            parsed = parse(body)
        except (ValueError, KeyError, IndexError, TypeError):  # JSONDecodeError is a ValueError
            return None
        calls: list[ToolCall] = []
        for item in parsed if isinstance(parsed, list) else [parsed]:
            name = item.get("name") if isinstance(item, dict) else None
            args = _arguments_text(item.get("arguments")) if isinstance(item, dict) else None
            if not isinstance(name, str) or not name or args is None:
                return None
            calls.append(ToolCall(name=name, arguments=args))
        return calls or None


class Gemma4Parser(_Delimited):
    name = "gemma4"
    starts = ("<|tool_call>",)
    end = "<tool_call|>"
    module = "gemma4"


class FunctionGemmaParser(_Delimited):
    name = "function_gemma"
    starts = ("<start_function_call>",)
    end = "<end_function_call>"
    module = "function_gemma"
