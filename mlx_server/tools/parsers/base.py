"""The incremental machinery every tool-call parser shares, and its helpers.

A parser is fed generated text in pieces of any size (down to one character) and returns
`Piece`s: plain text for the client, or a complete `ToolCall`. Text that may be the start of a
tool call is held back and released as soon as it cannot be one; a call is returned once its
markup is complete and parses. Markup that turns out malformed is returned as text, never
raised. Pure code: no MLX, trio or quart.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import attrs


@attrs.frozen
class ToolCall:
    """One parsed call: the function's name and its arguments as a JSON object text."""

    name: str
    arguments: str


Piece = str | ToolCall
Take = tuple[list[ToolCall] | None, int] | None


def take_until(
    buf: str,
    end_marker: str,
    final: bool,
    parse: Callable[[str], list[ToolCall] | None],
    *,
    body_from: int | None = None,
) -> Take:
    """Read one piece of markup that ends at `end_marker`. `parse` gets the body between
    `body_from` and the marker, or (`body_from` None) the whole markup, both ends included.
    Unterminated markup waits for more text; at the end of the generation it is parsed as it
    is (usually failing, so it comes back as text)."""
    end = buf.find(end_marker, body_from or 0)
    if end < 0:
        if not final:
            return None
        return parse(buf if body_from is None else buf[body_from:]), len(buf)
    used = end + len(end_marker)
    return parse(buf[:used] if body_from is None else buf[body_from:end]), used


"""A family's verdict on markup at the start of the buffer: None to wait for more text, else
(the calls, or None when malformed, and how many characters the markup used)."""


def scan_json(text: str, start: int) -> int | None:
    """The index just past the JSON object or array starting at `text[start]`, None when it is
    not complete yet, -1 when `text[start]` does not open one."""
    if start >= len(text):
        return None
    if text[start] not in "{[":
        return -1
    depth = 0
    in_string = False
    escape = False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escape:
                escape = False
            elif c == "\\":
                escape = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _held_suffix(text: str, markers: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a marker."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


def _arguments_text(value: Any) -> str | None:
    """A call's arguments as JSON object text (models give a dict or a JSON string)."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            return None
    if value is None:
        value = {}
    if not isinstance(value, dict):
        return None
    return json.dumps(value, ensure_ascii=False)


def _call_from_object(obj: Any, *keys: str) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    if obj.get("type") == "function" and isinstance(obj.get("function"), dict):
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    args: Any = {}
    for key in keys:
        if key in obj:
            args = obj[key]
            break
    text = _arguments_text(args)
    return None if text is None else ToolCall(name=name, arguments=text)


def _json_values(text: str) -> list[Any] | None:
    """One JSON value, or several in a row (separated by whitespace, commas or semicolons, as
    models sometimes put two calls in one block); None when the text is not that."""
    try:
        return [json.loads(text)]
    except ValueError:
        pass
    decoder = json.JSONDecoder()
    values: list[Any] = []
    at = 0
    while True:
        while at < len(text) and text[at] in " \t\r\n,;":
            at += 1
        if at >= len(text):
            return values or None
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            return None
        values.append(value)


def _calls_from_json(text: str, *keys: str) -> list[ToolCall] | None:
    values = _json_values(text)
    if values is None:
        return None
    items = values[0] if len(values) == 1 and isinstance(values[0], list) else values
    calls = [_call_from_object(item, *keys) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None]


class ToolParser:
    """The incremental machinery shared by every family; subclasses say where markup starts
    (`starts`, `_find_start`) and how to read one (`_take`)."""

    name = "base"
    starts: tuple[str, ...] = ()
    separators = " \t\r\n"

    def __init__(self, tools: Sequence[dict[str, Any]] | None = None) -> None:
        self._schemas: dict[str, dict[str, Any]] = {}
        for tool in tools or ():
            fn = tool.get("function", tool) if isinstance(tool, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                params = fn.get("parameters") or fn.get("input_schema") or {}
                self._schemas[fn["name"]] = params if isinstance(params, dict) else {}
        self._buf = ""
        self._inside = False
        self._calls = 0
        self._said_text = False  # non-separator text has been released

    @property
    def calls(self) -> int:
        return self._calls

    # -- what subclasses provide ---------------------------------------------------------------

    def _at_beginning(self) -> bool:
        return not self._said_text

    def _find_start(self, buf: str) -> int | None:
        found = [i for i in (buf.find(m) for m in self.starts) if i >= 0]
        return min(found) if found else None

    def _hold(self, buf: str) -> int:
        return _held_suffix(buf, self.starts)

    def _take(self, buf: str, final: bool) -> Take:
        raise NotImplementedError

    # -- the machinery ---------------------------------------------------------------------------

    def feed(self, text: str) -> list[Piece]:
        self._buf += text
        return self._run(final=False)

    def finish(self) -> list[Piece]:
        out = self._run(final=True)
        if self._buf:
            out.extend(self._text(self._buf))
            self._buf = ""
        return out

    def _text(self, text: str) -> list[Piece]:
        if not text:
            return []
        if not text.strip(self.separators):
            # Whitespace between and after calls is not content; before any call it is kept.
            if self._calls:
                return []
        else:
            self._said_text = True
        return [text]

    def _run(self, *, final: bool) -> list[Piece]:
        out: list[Piece] = []
        while self._buf:
            if not self._inside:
                start = self._find_start(self._buf)
                if start is None:
                    keep = 0 if final else self._hold(self._buf)
                    out.extend(self._text(self._buf[: len(self._buf) - keep]))
                    self._buf = self._buf[len(self._buf) - keep :]
                    break
                out.extend(self._text(self._buf[:start]))
                self._buf = self._buf[start:]
                self._inside = True
            taken = self._take(self._buf, final)
            if taken is None:
                if final:  # a family that cannot decide at the end: the markup is text
                    out.extend(self._text(self._buf))
                    self._buf = ""
                    self._inside = False
                break
            calls, used = taken
            used = max(1, used)
            if calls is None:
                out.extend(self._text(self._buf[:used]))
                self._said_text = True
            else:
                out.extend(calls)
                self._calls += len(calls)
            self._buf = self._buf[used:]
            self._inside = False
        return out


def _schema_types(schema: dict[str, Any] | None) -> list[str]:
    if not schema:
        return []
    kind = schema.get("type")
    if isinstance(kind, str):
        return [kind]
    if isinstance(kind, list):
        return [k for k in kind if isinstance(k, str)]
    out: list[str] = []
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or ():
            if isinstance(sub, dict):
                out.extend(_schema_types(sub))
    if not out and "enum" in schema:
        out = ["string"]
    return out


def convert_value(value: str, schema: dict[str, Any] | None) -> Any:
    """A parameter's text as the JSON value its schema asks for; text when it does not parse
    (or the schema says string, or there is no schema)."""
    types = _schema_types(schema)
    if not types or types == ["string"]:
        return value
    text = value.strip()
    for kind in [t for t in types if t != "string"] + (["string"] if "string" in types else []):
        if kind == "null" and text.lower() in ("null", "none"):
            return None
        if kind == "boolean" and text.lower() in ("true", "false"):
            return text.lower() == "true"
        if kind == "integer":
            try:
                return int(text)
            except ValueError:
                try:
                    number = float(text)
                except ValueError:
                    continue
                if number.is_integer():
                    return int(number)
        if kind == "number":
            try:
                number = float(text)
            except ValueError:
                continue
            return int(number) if number.is_integer() and "." not in text else number
        if kind in ("object", "array"):
            try:
                parsed = json.loads(text)
            except ValueError:
                continue
            if isinstance(parsed, dict if kind == "object" else list):
                return parsed
        if kind == "string":
            return value
    return value
