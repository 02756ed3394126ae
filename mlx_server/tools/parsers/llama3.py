"""Llama 3.x: a JSON object `{"name": ..., "parameters": {...}}` as the whole answer,
optionally after `<|python_tag|>`; several calls may be separated by `;`."""

from __future__ import annotations

from .base import Take, ToolParser, _calls_from_json, _held_suffix, scan_json


class Llama3Parser(ToolParser):
    """Llama 3.x: the answer is a JSON call (or several, `;`-separated), or `<|python_tag|>`
    then JSON. Only a JSON object at the very beginning (or after a call) can be a call, so
    JSON in the middle of an answer stays text."""

    name = "llama3"
    starts = ("<|python_tag|>",)
    separators = " \t\r\n;"

    def _find_start(self, buf: str) -> int | None:
        tag = buf.find(self.starts[0])
        if self._at_beginning():
            stripped = len(buf) - len(buf.lstrip(self.separators))
            if stripped < len(buf) and buf[stripped] == "{" and (tag < 0 or stripped < tag):
                return 0  # leading whitespace belongs to the call
        return tag if tag >= 0 else None

    def _hold(self, buf: str) -> int:
        if self._at_beginning() and not buf.strip(self.separators):
            return len(buf)  # leading whitespace: a call may follow
        return _held_suffix(buf, self.starts)

    def _take(self, buf: str, final: bool) -> Take:
        at = len(self.starts[0]) if buf.startswith(self.starts[0]) else 0
        while at < len(buf) and buf[at] in self.separators:
            at += 1
        if at >= len(buf):
            return (None, len(buf)) if final else None
        end = scan_json(buf, at)
        if end is None:
            return (None, len(buf)) if final else None
        if end < 0:
            return None, len(buf) if final else at  # a tag followed by something else
        return _calls_from_json(buf[at:end], "parameters", "arguments"), end
