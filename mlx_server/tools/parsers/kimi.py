"""Kimi-K2: `<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:0
<|tool_call_argument_begin|>{...}<|tool_call_end|>...<|tool_calls_section_end|>` (the call id
names the function, `functions.` prefix and `:index` suffix removed)."""

from __future__ import annotations

import re

from .base import Take, ToolCall, ToolParser, _arguments_text, take_until

SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
_CALL = re.compile(
    r"<\|tool_call_begin\|>\s*(.*?)\s*<\|tool_call_argument_begin\|>(.*?)<\|tool_call_end\|>",
    re.DOTALL,
)
_ID = re.compile(r"^(?:functions\.)?([^\s:]+)(?::\d+)?$")


class KimiK2Parser(ToolParser):
    name = "kimi_k2"
    starts = (SECTION_BEGIN, "<|tool_call_begin|>")

    def _take(self, buf: str, final: bool) -> Take:
        sectioned = buf.startswith(SECTION_BEGIN)
        end_marker = SECTION_END if sectioned else "<|tool_call_end|>"
        return take_until(buf, end_marker, final, _parse)


def _parse(markup: str) -> list[ToolCall] | None:
    calls: list[ToolCall] = []
    for match in _CALL.finditer(markup):
        ident = _ID.match(match.group(1))
        args = _arguments_text(match.group(2).strip())
        if ident is None or args is None:
            return None
        calls.append(ToolCall(name=ident.group(1), arguments=args))
    return calls or None
