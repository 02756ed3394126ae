"""Pythonic call lists: `[get_weather(city="Paris"), get_time(zone="CET")]` as the answer
(Llama 3.2 / 4, the template asks for this form), also inside `<|python_start|>...<|python_end|>`
(Llama 4), `<|tool_call_start|>...<|tool_call_end|>` (LFM2) or a fenced ```` ```tool_code ````
block (Gemma 3's documented tool use). Arguments must be Python literals; the list is read with
`ast`, never evaluated."""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from .base import Take, ToolCall, ToolParser, _held_suffix, take_until

# Marker pairs around a call list.
WRAPPERS = {
    "<|python_start|>": "<|python_end|>",
    "<|tool_call_start|>": "<|tool_call_end|>",
    "```tool_code": "```",
}
# What a bare call list looks like from its start: `[` then a (dotted) name then `(`.
_LIST_HEAD = re.compile(r"\[\s*[A-Za-z_][\w.]*\s*\(")


class PythonicParser(ToolParser):
    name = "pythonic"
    starts = tuple(WRAPPERS)

    def _find_start(self, buf: str) -> int | None:
        found = [i for i in (buf.find(m) for m in self.starts) if i >= 0]
        tag = min(found) if found else -1
        if self._at_beginning() or self.calls:
            lead = len(buf) - len(buf.lstrip())
            if lead < len(buf) and buf[lead] == "[" and (tag < 0 or lead < tag):
                return 0
        return tag if tag >= 0 else None

    def _hold(self, buf: str) -> int:
        if (self._at_beginning() or self.calls) and not buf.strip():
            return len(buf)  # leading whitespace: a call list may follow
        return _held_suffix(buf, self.starts)

    def _take(self, buf: str, final: bool) -> Take:
        for start, end_marker in WRAPPERS.items():
            if buf.startswith(start):
                return take_until(buf, end_marker, final, self._parse, body_from=len(start))
        lead = len(buf) - len(buf.lstrip())
        head = buf[lead:]
        if not _LIST_HEAD.match(head):
            if final or not _could_be_head(head):
                return None, len(buf) if final else lead + 1  # plain text after all
            return None
        end = _scan_list(buf, lead)
        if end is None:
            return (None, len(buf)) if final else None
        calls = self._parse(buf[lead:end])
        return calls, end

    def _parse(self, text: str) -> list[ToolCall] | None:
        text = text.strip()
        try:
            tree = ast.parse(text, mode="eval").body
        except SyntaxError:
            return None
        items = tree.elts if isinstance(tree, ast.List | ast.Tuple) else [tree]
        calls: list[ToolCall] = []
        for node in items:
            call = _call(node)
            if call is None:
                return None
            calls.append(call)
        return calls or None


def _could_be_head(head: str) -> bool:
    """Whether more text could still make `head` the start of a call list."""
    m = re.match(r"\[\s*([A-Za-z_][\w.]*)?\s*", head)
    return m is not None and m.end() == len(head)


def _call(node: ast.expr) -> ToolCall | None:
    if not isinstance(node, ast.Call) or node.args:
        return None
    name = _dotted(node.func)
    if name is None:
        return None
    args: dict[str, Any] = {}
    for kw in node.keywords:
        if kw.arg is None:
            return None
        try:
            args[kw.arg] = ast.literal_eval(kw.value)
        except (ValueError, SyntaxError):
            return None
    try:
        text = json.dumps(args, ensure_ascii=False)
    except (TypeError, ValueError):
        return None  # a set or bytes: not JSON
    return ToolCall(name=name, arguments=text)


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _scan_list(text: str, start: int) -> int | None:
    """The index just past the bracketed list starting at `text[start]` (Python strings of
    either quote skipped), None when it is not complete yet."""
    depth = 0
    quote = ""
    escape = False
    for i in range(start, len(text)):
        c = text[i]
        if quote:
            if escape:
                escape = False
            elif c == "\\":
                escape = True
            elif c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None
