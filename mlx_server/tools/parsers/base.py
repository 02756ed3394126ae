"""Incremental tool-call parsers, one per model family's markup.

Each parser is fed generated text in pieces of any size (down to one character) and returns
`Piece`s: plain text for the client, or a complete `ToolCall`. Text that may be the start of a
tool call is held back and released as soon as it cannot be one; a call is returned once its
markup is complete and parses. Markup that turns out malformed is returned as text, never
raised. Pure code: no MLX, trio or quart.

Families (`PARSERS`):

- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Qwen2.5, Qwen3, Hermes;
  the default).
- `qwen3_coder`: `<tool_call><function=NAME><parameter=P>value</parameter></function></tool_call>`
  (Qwen3-Coder, qwen3_next); values are converted with the tool's JSON schema types.
- `llama3`: a JSON object `{"name": ..., "parameters": {...}}` as the whole answer, optionally
  after `<|python_tag|>`; several calls may be separated by `;`.
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, and the newer
  `[TOOL_CALLS]NAME[ARGS]{...}`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import attrs


@attrs.frozen
class ToolCall:
    """One parsed call: the function's name and its arguments as a JSON object text."""

    name: str
    arguments: str


Piece = str | ToolCall
Take = tuple[list[ToolCall] | None, int] | None
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


_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.DOTALL)


class Qwen3CoderParser(ToolParser):
    name = "qwen3_coder"
    starts = ("<tool_call>", "<function=")

    def _take(self, buf: str, final: bool) -> Take:
        end_marker = "</tool_call>" if buf.startswith("<tool_call>") else "</function>"
        end = buf.find(end_marker)
        if end < 0:
            if not final:
                return None
            return self._parse(buf), len(buf)
        used = end + len(end_marker)
        return self._parse(buf[:used]), used

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


PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser,
    "qwen3_coder": Qwen3CoderParser,
    "llama3": Llama3Parser,
    "mistral": MistralParser,
}


def make_parser(family: str, tools: Sequence[dict[str, Any]] | None = None) -> ToolParser:
    return PARSERS.get(family, HermesParser)(tools)
