"""DeepSeek V3.1 / V3.2: `<|tool_calls_begin|><|tool_call_begin|>NAME<|tool_sep|>{...}
<|tool_call_end|>...<|tool_calls_end|>`, and V3 / R1's older `<|tool_call_begin|>function
<|tool_sep|>NAME\n```json\n{...}\n```<|tool_call_end|>`. (The real markers are written with
fullwidth bars and a U+2581 block in place of each underscore: `_marker` builds them.)"""

from __future__ import annotations

import re

from .base import Take, ToolCall, ToolParser, _arguments_text, take_until


def _marker(name: str) -> str:
    """`tool_calls_begin` -> DeepSeek's spelling (fullwidth bars, U+2581 for underscores)."""
    return "<\uff5c" + name.replace("_", "\u2581") + "\uff5c>"


CALLS_BEGIN = _marker("tool_calls_begin")
CALLS_END = _marker("tool_calls_end")
CALL_BEGIN = _marker("tool_call_begin")
CALL_END = _marker("tool_call_end")
SEP = _marker("tool_sep")
_CALL = re.compile(re.escape(CALL_BEGIN) + r"(.*?)" + re.escape(CALL_END), re.DOTALL)
_FENCED = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


class DeepSeekParser(ToolParser):
    name = "deepseek"
    starts = (CALLS_BEGIN, CALL_BEGIN)

    def _take(self, buf: str, final: bool) -> Take:
        end_marker = CALLS_END if buf.startswith(CALLS_BEGIN) else CALL_END
        return take_until(buf, end_marker, final, _parse)


def _parse(markup: str) -> list[ToolCall] | None:
    calls: list[ToolCall] = []
    for match in _CALL.finditer(markup):
        head, sep, rest = match.group(1).partition(SEP)
        if not sep:
            return None
        if head.strip() == "function" and "\n" in rest:  # V3 / R1: type, then name and fence
            name, _, rest = rest.partition("\n")
        else:
            name = head
        fenced = _FENCED.match(rest)
        args = _arguments_text((fenced.group(1) if fenced else rest).strip())
        if not name.strip() or args is None:
            return None
        calls.append(ToolCall(name=name.strip(), arguments=args))
    return calls or None
