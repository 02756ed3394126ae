"""The grammar of one forced tool call, in the markup of the model's family.

With `tool_choice` required / named (Anthropic: "any" / "tool") the call is generated under a
Lark grammar (`engine.constrain`) that admits exactly one call of an allowed function: the name
is one of the allowed names (an alternative per function, never free text), and the arguments
follow the function's parameter schema. Nothing in it leaves room to wander:

- JSON is compact (`"x-guidance": {"whitespace_flexible": false}` on every embedded schema: a
  sampled call cannot spend its tokens on whitespace inside the object);
- families whose arguments are not one JSON object (Qwen3-Coder XML, GLM, Gemma, pythonic) get
  one rule per parameter, in the schema's order, the required ones always and the others maybe;
  a value is JSON of the parameter's schema, or for string parameters text in the family's
  quoting (bounded by `maxLength`; one of the values when there is a string `enum`);
- an object schema that lists `properties` and says nothing of `additionalProperties` admits
  only those keys;
- markup that the tokenizer holds as one special token is matched as that token (`<[id]>`),
  other markup as text.

`loose=True` keeps the markup and the names but lets the arguments be any JSON object (any keys,
any values): the fallback when a parameter schema uses a keyword the engine cannot enforce.
Every family `tools.detect` knows has a grammar here (`FAMILIES`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from ..messages import ConstraintSpec, ToolSpec
from ..tools.detect import OutputFormat
from ..tools.parsers import deepseek

Style = Literal["xml", "gemma4", "function_gemma", "python"]
Pair = Callable[[str, str], str]

COMPACT = {"whitespace_flexible": False}
GEMMA4_QUOTE = '<|"|>'

# Text values: XML families may hold any text but a tag start (`</` ends the value, `<p` could
# open another parameter); Gemma's quoted strings hold no `<` at all (their quote is markup).
_TEXT_UNIT: dict[Style, str] = {
    "xml": r"([^<]|<[^\/p<])",
    "gemma4": "[^<]",
    "function_gemma": "[^<]",
    "python": "",
}
_KEY = r"/[A-Za-z_][A-Za-z0-9_]{0,63}/"


def call_grammar(
    fmt: OutputFormat,
    tools: Sequence[ToolSpec],
    name: str | None,
    *,
    loose: bool = False,
    special: Mapping[str, int] | None = None,
) -> ConstraintSpec | None:
    """One call of `name` (None: any of `tools`' functions) in `fmt`'s markup; None when no
    function is allowed or the family has no grammar."""
    chosen = [t for t in tools if t.raw is None and (name is None or t.name == name)]
    build = _BUILDERS.get(fmt.tool_family)
    if not chosen or build is None:
        return None
    g = _Grammar(special or {}, loose)
    body = build(g, fmt, chosen)
    # A template that opened <think> in the prompt: the call may close it first.
    think = '"</think>\\n\\n"? ' if fmt.reasoning and not fmt.harmony else ""
    return ConstraintSpec.lark("\n".join([f"start: {think}{body}", *g.rules]))


class _Grammar:
    """Rule writing: literals (special tokens by id), embedded schemas, parameter lists."""

    def __init__(self, special: Mapping[str, int], loose: bool) -> None:
        self.special = special
        self.loose = loose
        self.rules: list[str] = []
        self._memo: dict[str, str] = {}

    def rule(self, body: str) -> str:
        name = self._memo.get(body)
        if name is None:
            name = self._memo[body] = f"r{len(self.rules)}"
            self.rules.append(f"{name}: {body}")
        return name

    def lit(self, text: str) -> str:
        """`text` as grammar: its special tokens by id, the rest as quoted strings."""
        parts: list[str] = []
        rest = text
        while rest:
            hits = [(rest.find(m), m) for m in self.special if m and m in rest]
            if not hits:
                parts.append(_quote(rest))
                break
            at, marker = min(hits)
            if at:
                parts.append(_quote(rest[:at]))
            parts.append(f"<[{self.special[marker]}]>")
            rest = rest[at + len(marker) :]
        return " ".join(parts) if parts else '""'

    def json(self, schema: Mapping[str, Any] | None) -> str:
        """An embedded JSON Schema, compact (the schema's own x-guidance options win)."""
        value = dict(schema or {})
        value["x-guidance"] = {**COMPACT, **value.get("x-guidance", {})}
        return "%json " + json.dumps(value, ensure_ascii=False)

    def args(self, tool: ToolSpec) -> str:
        """A call's arguments as one JSON object."""
        return self.json({"type": "object"} if self.loose else _parameters(tool))

    def params(
        self, tool: ToolSpec, pair: Pair, style: Style, sep: str = "", close: str = ""
    ) -> str:
        """The parameters as `pair(key, value)` items joined by `sep` (each value followed
        by the markup `close`, see `value`): in the schema's order,
        required ones always, the others maybe. Loose: any number of any keys."""
        if self.loose:
            item = self.rule(pair(_KEY, self.value(None, style, close)))
            if not sep:
                return f"{item}*"
            return f"({item} ({self.lit(sep)} {item})*)?"
        required = set(_required(tool))
        items = [
            (self.rule(pair(_quote(key), self.value(schema, style, close))), key in required)
            for key, schema in _properties(tool).items()
        ]
        return self._sequence(items, sep, 0, started=False)

    def _sequence(self, items: list[tuple[str, bool]], sep: str, k: int, *, started: bool) -> str:
        if k == len(items):
            return '""'
        item, required = items[k]
        lead = f"{self.lit(sep)} " if sep and started else ""
        present = f"{lead}{item} {self._sequence(items, sep, k + 1, started=True)}"
        if required:
            return self.rule(present)
        absent = self._sequence(items, sep, k + 1, started=started)
        return self.rule(f"{present} | {absent}")

    def value(self, schema: Any, style: Style, close: str = "") -> str:
        """One parameter's value in the family's syntax, then the markup `close`. A text value
        and its `close` are one regex: the lexer is greedy, and a text that may hold a newline
        would otherwise swallow the newline that starts the closing tag."""
        tail = f" {self.lit(close)}" if close else ""
        schema = schema if isinstance(schema, dict) and not self.loose else {}
        strings = _string_choices(schema)
        if strings is not None:
            choices = " | ".join(self._string_literal(s, style) for s in strings)
            return self.rule(f"({choices}){tail}")
        types = schema.get("type")
        is_text = types == "string" or (isinstance(types, list) and "string" in types)
        if style == "python":
            return self.rule(f"({self._python_value(schema, types)}){tail}")
        if not schema and style != "xml":
            is_text = True  # any value: text, in the family's quotes
        if not (is_text or not schema):
            return self.rule(self.json(_closed(schema)) + tail)
        low = schema.get("minLength", 0) if is_text else 0
        high = schema.get("maxLength") if is_text else None
        if isinstance(high, int):
            bound = f"{{{int(low)},{high}}}"
        else:
            bound = f"{{{int(low)},}}" if low else "*"
        unit = _TEXT_UNIT[style]
        if isinstance(high, int) and style == "xml":
            # The XML unit `<X` is two characters: counted as one, a value could run past its
            # maxLength. A bounded XML value holds no `<`.
            unit = "[^<]"
        if any(m in close for m in self.special):  # a special token cannot be in a regex
            return self.rule(self._quoted(f"/{unit}{bound}/", style) + tail)
        text = f"/{unit}{bound}{_escape(close)}/"
        return self.rule(self._quoted(text, style))

    def _python_value(self, schema: dict[str, Any], types: Any) -> str:
        """A Python literal: booleans and null as `True` / `False` / `None`, the rest as JSON
        (JSON strings and numbers are Python literals too; nested `true` / `null` are not, so
        an object or array parameter holding them does not parse)."""
        if not schema:
            return self.json({"type": ["string", "number"]})
        kinds = types if isinstance(types, list) else [types] if isinstance(types, str) else []
        out = []
        if "boolean" in kinds:
            out.append('"True" | "False"')
        if "null" in kinds:
            out.append('"None"')
        rest = [k for k in kinds if k not in ("boolean", "null")]
        if rest or not kinds:
            typed = {**schema, "type": rest[0] if len(rest) == 1 else rest} if rest else schema
            out.append(self.json(_closed(typed)))
        return " | ".join(out)

    def _quoted(self, grammar: str, style: Style) -> str:
        if style == "gemma4":
            return f"{self.lit(GEMMA4_QUOTE)} {grammar} {self.lit(GEMMA4_QUOTE)}"
        if style == "function_gemma":
            return f"{self.lit('<escape>')} {grammar} {self.lit('<escape>')}"
        return grammar

    def _string_literal(self, value: str, style: Style) -> str:
        if style == "python":
            return _quote(json.dumps(value, ensure_ascii=False))
        return self._quoted(_quote(value), style)


def _escape(text: str) -> str:
    """`text` as a literal inside a regex."""
    return "".join("\\n" if c == "\n" else ("\\" + c if c in _META else c) for c in text)


_META = set("\\.+*?()|[]{}^$#&-~/")


def _quote(text: str) -> str:
    """A Lark string literal of `text`."""
    return json.dumps(text, ensure_ascii=False)


def _parameters(tool: ToolSpec) -> dict[str, Any]:
    return _closed(dict(tool.parameters or {"type": "object"}))


def _closed(schema: Any) -> Any:
    """The schema with objects that list their `properties` closed to other keys, unless the
    schema says otherwise: a call's arguments are the declared ones (the non-JSON families can
    only write declared ones anyway), and a sampled call cannot wander off into extra keys."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) if k in _NESTED else v for k, v in schema.items()}
    for key in ("properties", "$defs", "definitions", "patternProperties"):
        if isinstance(schema.get(key), dict):
            out[key] = {k: _closed(v) for k, v in schema[key].items()}
    open_keys = ("additionalProperties", "patternProperties", "allOf")
    if isinstance(schema.get("properties"), dict) and not any(k in schema for k in open_keys):
        out["additionalProperties"] = False
    return out


# Not `allOf`: closing each part of an intersection would leave nothing that satisfies all.
_NESTED = ("items", "prefixItems", "anyOf", "oneOf", "additionalProperties")


def _properties(tool: ToolSpec) -> dict[str, Any]:
    props = (tool.parameters or {}).get("properties")
    return dict(props) if isinstance(props, dict) else {}


def _required(tool: ToolSpec) -> list[str]:
    required = (tool.parameters or {}).get("required")
    return [r for r in required if isinstance(r, str)] if isinstance(required, list) else []


def _string_choices(schema: Mapping[str, Any]) -> list[str] | None:
    choices = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices):
        return choices
    return None


def _alternatives(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else "(" + " | ".join(parts) + ")"


# -- one builder per family --------------------------------------------------------------------


def _json_call(g: _Grammar, tools: list[ToolSpec], key: str) -> str:
    """`{"name": ..., key: {...}}`: the name fixed per alternative."""
    schemas = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t.name},
                key: {"type": "object"} if g.loose else _parameters(t),
            },
            "required": ["name", key],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return g.json(schemas[0] if len(schemas) == 1 else {"anyOf": schemas})


def _hermes(g: _Grammar, fmt: OutputFormat, tools: list[ToolSpec]) -> str:
    call = _json_call(g, tools, "arguments")
    return f'{g.lit("<tool_call>")} "\\n" {call} "\\n" {g.lit("</tool_call>")}'


def _llama3(g: _Grammar, fmt: OutputFormat, tools: list[ToolSpec]) -> str:
    return _json_call(g, tools, "parameters")


def _mistral(g: _Grammar, fmt: OutputFormat, tools: list[ToolSpec]) -> str:
    if not fmt.mistral_args:
        return f'{g.lit("[TOOL_CALLS]")} "[" {_json_call(g, tools, "arguments")} "]"'
    calls = [f"{_quote(t.name)} {g.lit('[ARGS]')} {g.args(t)}" for t in tools]
    return f"{g.lit('[TOOL_CALLS]')} {_alternatives(calls)}"


def _qwen3_coder(g: _Grammar, fmt: OutputFormat, tools: list[ToolSpec]) -> str:
    def pair(key: str, value: str) -> str:
        return f'"<parameter=" {key} ">\\n" {value}'

    close = "\n</parameter>\n"
    calls = [
        f'"<function=" {_quote(t.name)} ">\\n" {g.params(t, pair, "xml", close=close)} '
        '"</function>\\n"'
        for t in tools
    ]
    return f'{g.lit("<tool_call>")} "\\n" {_alternatives(calls)} {g.lit("</tool_call>")}'


def _glm(g: _Grammar, fmt: OutputFormat, tools: list[ToolSpec]) -> str:
    def pair(key: str, value: str) -> str:
        k0, k1 = g.lit("<arg_key>"), g.lit("</arg_key>")
        return f'{k0} {key} {k1} "\\n" {g.lit("<arg_value>")} {value} "\\n"'

    close = "</arg_value>"
    calls = [f'{_quote(t.name)} "\\n" {g.params(t, pair, "xml", close=close)}' for t in tools]
    return f"{g.lit('<tool_call>')} {_alternatives(calls)} {g.lit('</tool_call>')}"


def _kimi(g: _Grammar, fmt: OutputFormat, tools: list[ToolSpec]) -> str:
    begin = g.lit("<|tool_call_argument_begin|>")
    calls = [f"{_quote(f'functions.{t.name}:0')} {begin} {g.args(t)}" for t in tools]
    head = g.lit("<|tool_calls_section_begin|><|tool_call_begin|>")
    tail = g.lit("<|tool_call_end|><|tool_calls_section_end|>")
    return f"{head} {_alternatives(calls)} {tail}"


def _deepseek(g: _Grammar, fmt: OutputFormat, tools: list[ToolSpec]) -> str:
    calls = [f"{_quote(t.name)} {g.lit(deepseek.SEP)} {g.args(t)}" for t in tools]
    head = g.lit(deepseek.CALLS_BEGIN + deepseek.CALL_BEGIN)
    tail = g.lit(deepseek.CALL_END + deepseek.CALLS_END)
    return f"{head} {_alternatives(calls)} {tail}"


def _gemma_calls(g: _Grammar, tools: list[ToolSpec], style: Style) -> str:
    def pair(key: str, value: str) -> str:
        return f'{key} ":" {value}'

    calls = [f'"call:" {_quote(t.name)} "{{" {g.params(t, pair, style, ",")} "}}"' for t in tools]
    return _alternatives(calls)


def _gemma4(g: _Grammar, fmt: OutputFormat, tools: list[ToolSpec]) -> str:
    calls = _gemma_calls(g, tools, "gemma4")
    return f"{g.lit('<|tool_call>')} {calls} {g.lit('<tool_call|>')}"


def _function_gemma(g: _Grammar, fmt: OutputFormat, tools: list[ToolSpec]) -> str:
    calls = _gemma_calls(g, tools, "function_gemma")
    return f"{g.lit('<start_function_call>')} {calls} {g.lit('<end_function_call>')}"


def _pythonic(g: _Grammar, fmt: OutputFormat, tools: list[ToolSpec]) -> str:
    def pair(key: str, value: str) -> str:
        return f'{key} "=" {value}'

    calls = [f'{_quote(t.name)} "(" {g.params(t, pair, "python", ", ")} ")"' for t in tools]
    return f'"[" {_alternatives(calls)} "]"'


def _harmony(g: _Grammar, fmt: OutputFormat, tools: list[ToolSpec]) -> str:
    head = g.lit("<|channel|>") + ' "commentary to=functions." '
    body = g.lit(" <|constrain|>json<|message|>")
    calls = [f"{_quote(t.name)} {body} {g.args(t)}" for t in tools]
    return f"{head}{_alternatives(calls)} {g.lit('<|call|>')}"


_BUILDERS: dict[str, Callable[[_Grammar, OutputFormat, list[ToolSpec]], str]] = {
    "hermes": _hermes,
    "llama3": _llama3,
    "mistral": _mistral,
    "qwen3_coder": _qwen3_coder,
    "glm": _glm,
    "kimi_k2": _kimi,
    "deepseek": _deepseek,
    "gemma4": _gemma4,
    "function_gemma": _function_gemma,
    "pythonic": _pythonic,
    "harmony": _harmony,
}
FAMILIES = tuple(_BUILDERS)
