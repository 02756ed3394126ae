"""Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, and the newer
`[TOOL_CALLS]NAME[ARGS]{...}`."""

from __future__ import annotations

from .base import Take, ToolCall, ToolParser, _arguments_text, _calls_from_json, scan_json


class MistralParser(ToolParser):
    name = "mistral"
    starts = ("[TOOL_CALLS]",)
    _ARGS = "[ARGS]"
    _CALL_ID = "[CALL_ID]"

    def _take(self, buf: str, final: bool) -> Take:
        at = len(self.starts[0])
        while at < len(buf) and buf[at] in " \t\r\n":
            at += 1
        if at >= len(buf):
            return (None, len(buf)) if final else None
        if buf[at] == "[":  # the JSON array form
            end = scan_json(buf, at)
            if end is None or end < 0:
                return (None, len(buf)) if final else None
            return _calls_from_json(buf[at:end], "arguments", "parameters"), end
        args_at = buf.find(self._ARGS, at)
        if args_at < 0:
            name_so_far = buf[at:]
            if final or len(name_so_far) > 256 or any(c in name_so_far for c in " \n{"):
                return None, len(buf)  # not a name: the markup is text
            return None
        name = buf[at:args_at]
        if self._CALL_ID in name:
            name = name[: name.index(self._CALL_ID)]
        name = name.strip()
        json_at = args_at + len(self._ARGS)
        end = scan_json(buf, json_at)
        if end is None:
            return (None, len(buf)) if final else None
        if end < 0 or not name:
            return None, json_at
        text = _arguments_text(buf[json_at:end])
        if text is None:
            return None, end
        return [ToolCall(name=name, arguments=text)], end
