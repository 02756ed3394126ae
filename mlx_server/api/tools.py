"""Tool calling and reasoning, request side, for both APIs: validate `tools` and `tool_choice`,
turn tool calls of earlier turns into what chat templates expect, and plan the generation
(the tools the template sees, the `OutputSpec` the stream layer parses with, a forced call's
prefill, template kwargs such as `enable_thinking`).

`tool_choice` "required" / a named function (Anthropic: "any" / "tool") is enforced:

- for the JSON families (Hermes, Llama 3) by constrained decoding (`engine.constrain`): a
  grammar that admits exactly one call of an allowed function, its arguments valid against the
  function's parameter schema (a schema the engine cannot enforce falls back to "any JSON
  object" for the arguments);
- for the others (Qwen3-Coder XML, Mistral) by prefilling the assistant turn with the start of
  the family's markup (for a named function, up to its arguments), so the model goes on with a
  call; the parser reads the prefill first.

"none" leaves the tools out of the template and parses no calls.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

import attrs

from ..errors import InvalidRequest
from ..messages import ConstraintSpec, OutputSpec
from ..tools.detect import OutputFormat

if TYPE_CHECKING:
    from ..actors.frontend import Frontend

Choice = Literal["auto", "none", "required"]
_RESERVED_KWARGS = frozenset(
    {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "documents"}
)


@attrs.frozen(kw_only=True)
class ToolRequest:
    """A request's tools (OpenAI function format, as templates expect) and how to use them."""

    tools: tuple[dict[str, Any], ...]
    choice: Choice = "auto"
    name: str | None = None  # the function a call must use
    parallel: bool = True

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools if "function" in t]


@attrs.frozen(kw_only=True)
class Plan:
    tools_json: str | None
    output: OutputSpec
    prefill: str = ""
    template_kwargs: dict[str, Any] = attrs.field(factory=dict)
    constraint: ConstraintSpec | None = None
    loose_constraint: ConstraintSpec | None = None  # arguments: any JSON object

    @property
    def template_kwargs_json(self) -> str | None:
        return json.dumps(self.template_kwargs) if self.template_kwargs else None


def parse_openai_tools(body: dict[str, Any]) -> ToolRequest | None:
    raw = body.get("tools")
    choice_raw = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidRequest("'parallel_tool_calls' must be a boolean", param="parallel_tool_calls")
    if raw is None or raw == []:
        if choice_raw not in (None, "none", "auto"):
            raise InvalidRequest(
                "'tool_choice' requires 'tools' (no tools were given)", param="tool_choice"
            )
        return None
    if not isinstance(raw, list):
        raise InvalidRequest("'tools' must be an array", param="tools")
    tools: list[dict[str, Any]] = []
    for j, tool in enumerate(raw):
        where = f"tools[{j}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise InvalidRequest(f"'{where}' must be an object of type 'function'", param=where)
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRequest(
                f"'{where}.function' must be an object with a non-empty string 'name'",
                param=f"{where}.function",
            )
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise InvalidRequest(
                f"'{where}.function.parameters' must be an object",
                param=f"{where}.function.parameters",
            )
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise InvalidRequest(
                f"'{where}.function.description' must be a string",
                param=f"{where}.function.description",
            )
        entry = {"name": fn["name"]}
        if fn.get("description") is not None:
            entry["description"] = fn["description"]
        entry["parameters"] = fn.get("parameters") or {"type": "object", "properties": {}}
        tools.append({"type": "function", "function": entry})
    names = [t["function"]["name"] for t in tools]
    choice: Choice = "auto"
    name: str | None = None
    if choice_raw is None or choice_raw in ("auto", "none", "required"):
        choice = choice_raw or "auto"
    elif (
        isinstance(choice_raw, dict)
        and choice_raw.get("type") == "function"
        and isinstance(choice_raw.get("function"), dict)
        and isinstance(choice_raw["function"].get("name"), str)
    ):
        choice, name = "required", choice_raw["function"]["name"]
    else:
        raise InvalidRequest(
            "'tool_choice' must be 'none', 'auto', 'required' or "
            '{"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    if name is not None and name not in names:
        raise InvalidRequest(
            f"'tool_choice' names the function {name!r}, which is not in 'tools'",
            param="tool_choice",
        )
    return ToolRequest(tools=tuple(tools), choice=choice, name=name, parallel=parallel is not False)


def parse_anthropic_tool_choice(raw: Any, tools_json: str | None) -> ToolRequest | None:
    """Anthropic's `tool_choice` over the tools `anthropic._tools_json` already converted."""
    tools: list[dict[str, Any]] = json.loads(tools_json) if tools_json else []
    if raw is None:
        raw = {"type": "auto"}
    if not isinstance(raw, dict) or raw.get("type") not in ("auto", "any", "tool", "none"):
        raise InvalidRequest(
            "'tool_choice.type' must be one of 'auto', 'any', 'tool', 'none'", param="tool_choice"
        )
    disable = raw.get("disable_parallel_tool_use")
    if disable is not None and not isinstance(disable, bool):
        raise InvalidRequest(
            "'tool_choice.disable_parallel_tool_use' must be a boolean",
            param="tool_choice.disable_parallel_tool_use",
        )
    kind = raw["type"]
    if not tools:
        if kind in ("any", "tool"):
            raise InvalidRequest(
                "'tool_choice' requires 'tools' (no tools were given)", param="tool_choice"
            )
        return None
    names = [t["function"]["name"] for t in tools if isinstance(t.get("function"), dict)]
    name: str | None = None
    if kind == "tool":
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(
                "'tool_choice.name' is required for type 'tool'", param="tool_choice.name"
            )
        if name not in names:
            raise InvalidRequest(
                f"'tool_choice.name' is {name!r}, which is not in 'tools'",
                param="tool_choice.name",
            )
    choice: Choice = {"auto": "auto", "none": "none"}.get(kind, "required")  # type: ignore[assignment]
    return ToolRequest(tools=tuple(tools), choice=choice, name=name, parallel=disable is not True)


def template_tool_calls(raw: Any, where: str) -> list[dict[str, Any]]:
    """An assistant turn's `tool_calls` for the chat template: OpenAI's shape, with the
    arguments as an object (most Hugging Face templates apply `tojson` to them)."""
    if not isinstance(raw, list):
        raise InvalidRequest(f"'{where}' must be an array", param=where)
    out: list[dict[str, Any]] = []
    for j, call in enumerate(raw):
        at = f"{where}[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidRequest(
                f"'{at}' must be an object with a 'function' that has a string 'name'", param=at
            )
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise InvalidRequest(
                    f"'{at}.function.arguments' is not valid JSON", param=f"{at}.function.arguments"
                ) from None
        if not isinstance(args, dict):
            raise InvalidRequest(
                f"'{at}.function.arguments' must be a JSON object",
                param=f"{at}.function.arguments",
            )
        entry: dict[str, Any] = {
            "type": "function",
            "function": {"name": fn["name"], "arguments": args},
        }
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def plan(
    fe: Frontend,
    tools: ToolRequest | None,
    *,
    reasoning: Literal["split", "drop"],
    enable_thinking: bool | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> Plan:
    """What to render and how to read the output, for this model and request."""
    fmt = fe.output_format
    # The renderer's own arguments cannot be overridden from a request.
    kwargs = {k: v for k, v in (template_kwargs or {}).items() if k not in _RESERVED_KWARGS}
    if enable_thinking is not None:
        kwargs.setdefault("enable_thinking", enable_thinking)
    if tools is None or tools.choice == "none":
        return Plan(tools_json=None, output=OutputSpec(reasoning=reasoning), template_kwargs=kwargs)
    tools_json = json.dumps(list(tools.tools), ensure_ascii=False)
    prefill = ""
    constraint = loose = None
    if tools.choice == "required":
        if fmt.reasoning:
            kwargs["enable_thinking"] = False  # the call comes at once
        constraint = call_grammar(fmt, tools)
        loose = call_grammar(fmt, tools, loose=True)
        if constraint is None:
            prefill = fmt.forced_prefill(tools.name)
    output = OutputSpec(
        tools_json=tools_json,
        reasoning=reasoning,
        prefill=prefill,
        max_calls=None if tools.parallel else 1,
    )
    return Plan(
        tools_json=tools_json,
        output=output,
        prefill=prefill,
        template_kwargs=kwargs,
        constraint=constraint,
        loose_constraint=loose,
    )


def call_grammar(
    fmt: OutputFormat, tools: ToolRequest, *, loose: bool = False
) -> ConstraintSpec | None:
    """A grammar for exactly one call in the family's markup (JSON families only)."""
    if fmt.tool_family not in ("hermes", "llama3"):
        return None
    key = "arguments" if fmt.tool_family == "hermes" else "parameters"
    schemas = []
    for tool in tools.tools:
        fn = tool["function"]
        if tools.name is not None and fn["name"] != tools.name:
            continue
        params = {"type": "object"} if loose else fn.get("parameters") or {"type": "object"}
        schemas.append(
            {
                "type": "object",
                "properties": {"name": {"const": fn["name"]}, key: params},
                "required": ["name", key],
                "additionalProperties": False,
            }
        )
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    call = "%json " + json.dumps(schema)
    # A template that opened <think> in the prompt: the call may close it first.
    think = '"</think>\\n\\n"? ' if fmt.reasoning else ""
    if fmt.tool_family == "hermes":
        return ConstraintSpec.lark(f'start: {think}"<tool_call>\\n" {call} "\\n</tool_call>"')
    return ConstraintSpec.lark(f"start: {think}{call}")


async def enforce(fe: Frontend, tool_plan: Plan) -> ConstraintSpec | None:
    """The plan's grammar, compiled (off the event loop); the loose one when the parameter
    schemas use keywords the engine cannot enforce."""
    if tool_plan.constraint is None:
        return None
    try:
        await fe.check_constraint(tool_plan.constraint, param="tools")
    except InvalidRequest:
        await fe.check_constraint(tool_plan.loose_constraint, param="tools")
        return tool_plan.loose_constraint
    return tool_plan.constraint
