"""GLM-4.5 / 4.6 / 4.7: `<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>`
(with or without newlines between the parts). A value is text, converted with the tool's JSON
schema types (a JSON object or array for object/array parameters)."""

from __future__ import annotations

import json
import re
from typing import Any

from .base import Take, ToolCall, ToolParser, convert_value, take_until

_PAIR = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)


class GlmParser(ToolParser):
    name = "glm"
    starts = ("<tool_call>",)
    end = "</tool_call>"

    def _take(self, buf: str, final: bool) -> Take:
        return take_until(buf, self.end, final, self._parse, body_from=len(self.starts[0]))

    def _parse(self, body: str) -> list[ToolCall] | None:
        at = body.find("<arg_key>")
        name = (body if at < 0 else body[:at]).strip()
        if not name or any(c in name for c in "<>{}\n "):
            return None
        props = self._schemas.get(name, {}).get("properties")
        args: dict[str, Any] = {}
        rest = "" if at < 0 else body[at:]
        for match in _PAIR.finditer(rest):
            key = match.group(1).strip()
            prop = props.get(key) if isinstance(props, dict) else None
            args[key] = convert_value(match.group(2), prop if isinstance(prop, dict) else None)
        if rest.count("<arg_key>") != len(args):
            return None  # an unfinished or malformed pair
        return [ToolCall(name=name, arguments=json.dumps(args, ensure_ascii=False))]
