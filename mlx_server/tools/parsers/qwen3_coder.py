"""Qwen3-Coder: `<tool_call><function=NAME><parameter=P>value</parameter></function></tool_call>`
(Qwen3-Coder, qwen3_next, Qwen3.5); values are converted with the tool's JSON schema types."""

from __future__ import annotations

import json
import re
from typing import Any

from .base import Take, ToolCall, ToolParser, convert_value, take_until

_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.DOTALL)


class Qwen3CoderParser(ToolParser):
    name = "qwen3_coder"
    starts = ("<tool_call>", "<function=")

    def _take(self, buf: str, final: bool) -> Take:
        end_marker = "</tool_call>" if buf.startswith("<tool_call>") else "</function>"
        return take_until(buf, end_marker, final, self._parse)

    def _parse(self, markup: str) -> list[ToolCall] | None:
        calls: list[ToolCall] = []
        for match in _FUNCTION.finditer(markup):
            name = match.group(1).strip()
            schema = self._schemas.get(name, {})
            props = schema.get("properties") if isinstance(schema, dict) else None
            args: dict[str, Any] = {}
            for p in _PARAMETER.finditer(match.group(2)):
                key = p.group(1).strip()
                value = p.group(2)
                value = value.removeprefix("\n").removesuffix("\n")
                prop = props.get(key) if isinstance(props, dict) else None
                args[key] = convert_value(value, prop if isinstance(prop, dict) else None)
            calls.append(ToolCall(name=name, arguments=json.dumps(args, ensure_ascii=False)))
        return calls or None
