"""A Responses API request, converted into the chat-completions shape the generation path reads.

The Responses API describes a turn as a list of items (messages with typed parts, function and
custom tool calls with their outputs, reasoning) plus `instructions`, tools of several kinds, and
`text.format`. The chat-completions body is the one request shape the rest of the server already
serves in full (tool plans, grammars, templates, reasoning), so a Responses request becomes one:

- messages: `instructions` and leading `system`/`developer` items become the system message;
  `function_call` / `custom_tool_call` items become assistant `tool_calls` (consecutive calls
  join one assistant turn), their outputs `tool` messages, `reasoning` items the next assistant
  turn's `reasoning_content`.
- tools: `function` tools as they are; the functions of a `namespace` tool under the name
  `<namespace>__<function>`; a `custom` tool as a function taking one string, `input`. Built-in
  tools the server cannot run (web search, file search, computer use, ...) are not offered to the
  model; they are listed in `skipped_tools` for the log, and forcing one is a 400.
- `text.format` -> `response_format`; `reasoning.effort` -> `reasoning_effort`;
  `max_output_tokens` -> `max_completion_tokens`.

`tool_map` tells the response writer which model-visible names stand for which tools. Pure.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import attrs

from ...errors import InvalidRequest
from .events import ToolRef

NAMESPACE_SEPARATOR = "__"
BUILTIN_TOOLS = frozenset(
    {
        "web_search",
        "web_search_preview",
        "web_search_2025_08_26",
        "web_search_preview_2025_03_11",
        "file_search",
        "computer",
        "computer_use",
        "computer_use_preview",
        "code_interpreter",
        "image_generation",
        "mcp",
        "local_shell",
        "shell",
        "apply_patch",
        "tool_search",
    }
)
_MESSAGE_ROLES = {"user", "assistant", "system", "developer"}
_ENCRYPTED_PREFIX = "mlxs1:"


@attrs.frozen(kw_only=True)
class ChatShape:
    """The chat-completions fields a Responses request turns into."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    tool_choice: Any
    tool_map: dict[str, ToolRef]
    skipped_tools: tuple[str, ...]
    response_format: dict[str, Any] | None
    custom_grammars: dict[str, dict[str, Any]]


def _bad(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param)


# -- reasoning round trip ----------------------------------------------------------------------


def encrypt_reasoning(text: str) -> str:
    """The opaque `encrypted_content` handed back when `include` asks for it: the reasoning text,
    wrapped so that the next turn can restore it (it is encoded, not secret; nothing leaves the
    machine)."""
    raw = json.dumps({"text": text}).encode()
    return _ENCRYPTED_PREFIX + base64.urlsafe_b64encode(raw).decode()


def decrypt_reasoning(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value.startswith(_ENCRYPTED_PREFIX):
        raise _bad("'encrypted_content' was not produced by this server", param)
    try:
        decoded = json.loads(base64.urlsafe_b64decode(value[len(_ENCRYPTED_PREFIX) :]))
    except (binascii.Error, ValueError) as exc:
        raise _bad("'encrypted_content' is corrupt", param) from exc
    text = decoded.get("text") if isinstance(decoded, dict) else None
    if not isinstance(text, str):
        raise _bad("'encrypted_content' is corrupt", param)
    return text


# -- input items -------------------------------------------------------------------------------


def _part_text(part: Any, param: str) -> str | dict[str, Any]:
    if isinstance(part, str):
        return part
    if not isinstance(part, dict):
        raise _bad(f"'{param}' must be an object", param)
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text", "summary_text", "reasoning_text"):
        text = part.get("text")
        if not isinstance(text, str):
            raise _bad(f"'{param}.text' must be a string", f"{param}.text")
        return text
    if kind == "refusal":
        refusal = part.get("refusal")
        if not isinstance(refusal, str):
            raise _bad(f"'{param}.refusal' must be a string", f"{param}.refusal")
        return refusal
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str):
            raise _bad(
                f"'{param}': only images given as 'image_url' (a data URL or an http(s) URL) "
                "are supported",
                param,
            )
        return {"type": "image_url", "image_url": {"url": url, "detail": part.get("detail")}}
    if kind in ("input_file", "input_audio"):
        raise _bad(f"'{param}': content type {kind!r} is not supported", param)
    raise _bad(f"'{param}': unknown content part type {kind!r}", param)


def _content(raw: Any, param: str) -> str | list[Any]:
    """A message's content: a string, or a list of parts (text joined; images kept as chat
    image parts)."""
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, list):
        raise _bad(f"'{param}' must be a string or an array of content parts", param)
    parts = [_part_text(p, f"{param}[{j}]") for j, p in enumerate(raw)]
    if all(isinstance(p, str) for p in parts):
        return "".join(p for p in parts if isinstance(p, str))
    return [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]


def _output_text(raw: Any, param: str) -> str:
    """A tool call's output: a string, or content parts whose text is joined."""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list):
        texts: list[str] = []
        for j, part in enumerate(raw):
            value = _part_text(part, f"{param}[{j}]")
            if not isinstance(value, str):
                raise _bad(f"'{param}[{j}]': a tool output can only hold text", f"{param}[{j}]")
            texts.append(value)
        return "".join(texts)
    raise _bad(f"'{param}' must be a string or an array of content parts", param)


def _string(item: dict[str, Any], key: str, param: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise _bad(f"'{param}.{key}' must be a non-empty string", f"{param}.{key}")
    return value


def _model_name(name: str, namespace: Any) -> str:
    return f"{namespace}{NAMESPACE_SEPARATOR}{name}" if isinstance(namespace, str) else name


class _Builder:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.pending_reasoning: list[str] = []

    def _assistant(self) -> dict[str, Any]:
        """The assistant turn new calls or text join: the last message when it is an assistant
        turn without tool results after it, else a new one."""
        last = self.messages[-1] if self.messages else None
        if last is not None and last["role"] == "assistant":
            return last
        turn: dict[str, Any] = {"role": "assistant", "content": None}
        if self.pending_reasoning:
            turn["reasoning_content"] = "".join(self.pending_reasoning)
            self.pending_reasoning = []
        self.messages.append(turn)
        return turn

    def message(self, role: str, content: str | list[Any]) -> None:
        if role == "assistant":
            turn = self._assistant()
            if turn.get("tool_calls"):
                turn = {"role": "assistant", "content": None}
                self.messages.append(turn)
            previous = turn.get("content")
            if isinstance(previous, str) and isinstance(content, str):
                turn["content"] = previous + content
            else:
                turn["content"] = content
            return
        if role == "developer":
            role = "system"
        self.messages.append({"role": role, "content": content})

    def call(self, call_id: str, name: str, arguments: str) -> None:
        turn = self._assistant()
        turn.setdefault("tool_calls", []).append(
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        )

    def output(self, call_id: str, text: str) -> None:
        self.messages.append({"role": "tool", "tool_call_id": call_id, "content": text})


def convert_items(items: list[Any], *, param: str = "input") -> list[dict[str, Any]]:
    """Responses input items -> chat messages (no system merging; see `to_chat`)."""
    builder = _Builder()
    for i, item in enumerate(items):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"'{where}' must be an object", where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in _MESSAGE_ROLES:
                raise _bad(
                    f"'{where}.role' must be one of {sorted(_MESSAGE_ROLES)}, got {role!r}",
                    f"{where}.role",
                )
            if "content" not in item:
                raise _bad(f"'{where}.content' is required", f"{where}.content")
            builder.message(role, _content(item["content"], f"{where}.content"))
        elif kind == "function_call":
            name = _model_name(_string(item, "name", where), item.get("namespace"))
            arguments = item.get("arguments", "")
            if not isinstance(arguments, str):
                raise _bad(f"'{where}.arguments' must be a string", f"{where}.arguments")
            builder.call(_string(item, "call_id", where), name, arguments or "{}")
        elif kind == "custom_tool_call":
            name = _model_name(_string(item, "name", where), item.get("namespace"))
            text = item.get("input")
            if not isinstance(text, str):
                raise _bad(f"'{where}.input' must be a string", f"{where}.input")
            builder.call(_string(item, "call_id", where), name, json.dumps({"input": text}))
        elif kind in ("function_call_output", "custom_tool_call_output"):
            if "output" not in item:
                raise _bad(f"'{where}.output' is required", f"{where}.output")
            builder.output(
                _string(item, "call_id", where), _output_text(item["output"], f"{where}.output")
            )
        elif kind == "reasoning":
            texts: list[str] = []
            if item.get("encrypted_content") is not None:
                texts.append(
                    decrypt_reasoning(item["encrypted_content"], f"{where}.encrypted_content")
                )
            else:
                for key in ("content", "summary"):
                    raw = item.get(key) or []
                    if not isinstance(raw, list):
                        raise _bad(f"'{where}.{key}' must be an array", f"{where}.{key}")
                    found = [_output_text([p], f"{where}.{key}") for p in raw]
                    if found:
                        texts.extend(found)
                        break
            builder.pending_reasoning.append("".join(texts))
        elif kind == "item_reference":
            raise _bad(
                f"'{where}': item references are not supported; send the item itself or use "
                "previous_response_id",
                where,
            )
        else:
            raise _bad(f"'{where}.type': unknown or unsupported input item type {kind!r}", where)
    return builder.messages


# -- tools -------------------------------------------------------------------------------------


def _function_tool(tool: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    parameters = tool.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise _bad(f"'{where}.parameters' must be a JSON Schema object", f"{where}.parameters")
    function: dict[str, Any] = {"name": name, "parameters": parameters}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    if isinstance(tool.get("strict"), bool):
        function["strict"] = tool["strict"]
    return {"type": "function", "function": function}


def _custom_tool(tool: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    description = tool.get("description") if isinstance(tool.get("description"), str) else ""
    fmt = tool.get("format") or {"type": "text"}
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "grammar"):
        raise _bad(f"'{where}.format.type' must be 'text' or 'grammar'", f"{where}.format")
    hint = "Free-form text."
    if fmt["type"] == "grammar":
        if fmt.get("syntax") not in ("lark", "regex"):
            raise _bad(
                f"'{where}.format.syntax' must be 'lark' or 'regex'", f"{where}.format.syntax"
            )
        if not isinstance(fmt.get("definition"), str) or not fmt["definition"].strip():
            raise _bad(
                f"'{where}.format.definition' must be a non-empty string",
                f"{where}.format.definition",
            )
        hint = f"Text following this {fmt['syntax']} grammar:\n{fmt['definition']}"
    parameters = {
        "type": "object",
        "properties": {"input": {"type": "string", "description": hint}},
        "required": ["input"],
        "additionalProperties": False,
    }
    function = {"name": name, "description": description, "parameters": parameters}
    return {"type": "function", "function": function}


def convert_tools(
    raw: Any,
) -> tuple[list[dict[str, Any]], dict[str, ToolRef], list[str], dict[str, dict[str, Any]]]:
    """Responses tools -> (chat tools, name map, skipped built-in tool types, custom grammars)."""
    if raw is None:
        return [], {}, [], {}
    if not isinstance(raw, list):
        raise _bad("'tools' must be an array", "tools")
    tools: list[dict[str, Any]] = []
    names: dict[str, ToolRef] = {}
    skipped: list[str] = []
    grammars: dict[str, dict[str, Any]] = {}

    def add(chat_tool: dict[str, Any], ref: ToolRef, where: str) -> None:
        name = chat_tool["function"]["name"]
        if name in names:
            raise _bad(f"'{where}': tool name {name!r} is used twice", where)
        names[name] = ref
        tools.append(chat_tool)

    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _bad(f"'{where}' must be an object", where)
        kind = tool.get("type")
        if kind == "function":
            name = _string(tool, "name", where)
            add(_function_tool(tool, name, where), ToolRef(kind="function", name=name), where)
        elif kind == "custom":
            name = _string(tool, "name", where)
            add(_custom_tool(tool, name, where), ToolRef(kind="custom", name=name), where)
            fmt = tool.get("format")
            if isinstance(fmt, dict) and fmt.get("type") == "grammar":
                grammars[name] = fmt
        elif kind == "namespace":
            namespace = _string(tool, "name", where)
            inner = tool.get("tools")
            if not isinstance(inner, list):
                raise _bad(f"'{where}.tools' must be an array", f"{where}.tools")
            for j, sub in enumerate(inner):
                sub_where = f"{where}.tools[{j}]"
                if not isinstance(sub, dict) or sub.get("type", "function") not in (
                    "function",
                    "custom",
                ):
                    raise _bad(
                        f"'{sub_where}' must be a function or custom tool", f"{sub_where}.type"
                    )
                name = _string(sub, "name", sub_where)
                full = _model_name(name, namespace)
                if sub.get("type") == "custom":
                    ref = ToolRef(kind="custom", name=name, namespace=namespace)
                    add(_custom_tool(sub, full, sub_where), ref, sub_where)
                else:
                    ref = ToolRef(kind="function", name=name, namespace=namespace)
                    add(_function_tool(sub, full, sub_where), ref, sub_where)
        elif isinstance(kind, str) and (kind in BUILTIN_TOOLS or kind.startswith("web_search")):
            skipped.append(kind)
        else:
            raise _bad(f"'{where}.type': unknown tool type {kind!r}", f"{where}.type")
    return tools, names, skipped, grammars


def convert_tool_choice(raw: Any, names: dict[str, ToolRef]) -> Any:
    """Responses `tool_choice` -> the chat form (`auto`/`none`/`required`/named function)."""
    if raw is None or raw in ("auto", "none", "required"):
        return raw
    if not isinstance(raw, dict):
        raise _bad("'tool_choice' must be 'auto', 'none', 'required' or an object", "tool_choice")
    kind = raw.get("type")
    if kind in ("function", "custom"):
        name = raw.get("name")
        if not isinstance(name, str):
            raise _bad("'tool_choice.name' must be a string", "tool_choice.name")
        full = _model_name(name, raw.get("namespace"))
        if full not in names:
            raise _bad(f"'tool_choice' names {name!r}, which is not among the tools", "tool_choice")
        return {"type": "function", "function": {"name": full}}
    if kind == "allowed_tools":
        mode = raw.get("mode", "auto")
        if mode not in ("auto", "required"):
            raise _bad("'tool_choice.mode' must be 'auto' or 'required'", "tool_choice.mode")
        return mode
    if isinstance(kind, str) and (kind in BUILTIN_TOOLS or kind.startswith("web_search")):
        raise _bad(
            f"'tool_choice' forces the built-in tool {kind!r}, which this server cannot run",
            "tool_choice",
        )
    raise _bad(f"'tool_choice.type': unknown tool choice {kind!r}", "tool_choice.type")


def convert_text_format(raw: Any) -> dict[str, Any] | None:
    """`text.format` -> chat `response_format`."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _bad("'text' must be an object", "text")
    fmt = raw.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise _bad("'text.format' must be an object", "text.format")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise _bad("'text.format.schema' must be a JSON Schema object", "text.format.schema")
        spec: dict[str, Any] = {"name": fmt.get("name") or "response", "schema": fmt["schema"]}
        if isinstance(fmt.get("strict"), bool):
            spec["strict"] = fmt["strict"]
        return {"type": "json_schema", "json_schema": spec}
    raise _bad(f"'text.format.type': unknown format {kind!r}", "text.format.type")


# -- the whole request -------------------------------------------------------------------------


def _merge_leading_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Join the system messages before the first other turn into one (chat templates read one
    system prompt, first)."""
    head: list[str] = []
    rest_from = 0
    for rest_from, message in enumerate(messages):  # noqa: B007
        if message["role"] != "system" or not isinstance(message["content"], str):
            break
        head.append(message["content"])
    else:
        rest_from = len(messages)
    if len(head) <= 1:
        return messages
    return [{"role": "system", "content": "\n\n".join(head)}, *messages[rest_from:]]


def to_chat(body: dict[str, Any], history: list[dict[str, Any]] | None = None) -> ChatShape:
    """The chat-completions fields for a Responses request; `history` is the stored
    conversation of `previous_response_id` (input and output items), read before `input`."""
    raw_input = body.get("input")
    if raw_input is None:
        raise _bad("'input' is required", "input")
    if isinstance(raw_input, str):
        items: list[Any] = [{"type": "message", "role": "user", "content": raw_input}]
    elif isinstance(raw_input, list):
        items = raw_input
    else:
        raise _bad("'input' must be a string or an array of input items", "input")
    messages = convert_items(list(history or []), param="previous_response") if history else []
    # Earlier turns' instructions are not carried over (as OpenAI documents).
    messages = [m for m in messages if m["role"] != "system"]
    messages.extend(convert_items(items))
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _bad("'instructions' must be a string", "instructions")
        messages.insert(0, {"role": "system", "content": instructions})
    messages = _merge_leading_system(messages)
    if not any(m["role"] != "system" for m in messages):
        raise _bad("'input' must contain at least one message or tool output", "input")
    tools, names, skipped, grammars = convert_tools(body.get("tools"))
    tool_choice = convert_tool_choice(body.get("tool_choice"), names)
    if tool_choice in ("required",) and not tools:
        raise _bad("'tool_choice' is 'required' but no tool can be offered", "tool_choice")
    return ChatShape(
        messages=messages,
        tools=tools,
        tool_choice=tool_choice,
        tool_map=names,
        skipped_tools=tuple(skipped),
        response_format=convert_text_format(body.get("text")),
        custom_grammars=grammars,
    )
