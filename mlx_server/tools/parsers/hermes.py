"""Hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Qwen2.5, Qwen3,
Hermes; the default, and the format of the generic fallback for templates without tools)."""

from __future__ import annotations

from .base import Take, ToolParser, _calls_from_json


class HermesParser(ToolParser):
    name = "hermes"
    starts = ("<tool_call>",)
    end = "</tool_call>"

    def _take(self, buf: str, final: bool) -> Take:
        body_at = len(self.starts[0])
        end = buf.find(self.end, body_at)
        if end < 0:
            if not final:
                return None
            return _calls_from_json(buf[body_at:].strip(), "arguments", "parameters"), len(buf)
        body = buf[body_at:end].strip()
        return _calls_from_json(body, "arguments", "parameters"), end + len(self.end)
