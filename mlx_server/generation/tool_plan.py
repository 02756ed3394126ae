"""Tool calling and reasoning, planned for one model and request: the tools the template sees,
the `OutputSpec` the stream layer parses with, a forced call's prefill or grammar, and template
kwargs such as `enable_thinking`.

A required call ("required" / a named function; Anthropic's "any" / "tool") is enforced:

- for the JSON families (Hermes, Llama 3) by constrained decoding: a grammar that admits exactly
  one call of an allowed function, its arguments valid against the function's parameter schema
  (a schema the engine cannot enforce falls back to "any JSON object" for the arguments);
- for the others (Qwen3-Coder XML, Mistral) by prefilling the assistant turn with the start of
  the family's markup (for a named function, up to its arguments); the parser reads the prefill
  first.

"none" leaves the tools out of the template and parses no calls.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs

from ..errors import InvalidRequest
from ..messages import ConstraintSpec, OutputSpec, ToolSpec
from ..tools.detect import OutputFormat
from .port import ModelPort
from .request import Request

_RESERVED_KWARGS = frozenset(
    {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "documents"}
)


@attrs.frozen(kw_only=True)
class Plan:
    tools: tuple[ToolSpec, ...]
    output: OutputSpec
    prefill: str = ""
    template_kwargs: tuple[tuple[str, Any], ...] = ()
    constraint: ConstraintSpec | None = None
    loose_constraint: ConstraintSpec | None = None  # arguments: any JSON object


def plan(fmt: OutputFormat, request: Request) -> Plan:
    """What to render and how to read the output, for this model and request."""
    # The renderer's own arguments cannot be overridden from a request.
    kwargs = {k: v for k, v in request.template_kwargs.items() if k not in _RESERVED_KWARGS}
    if request.enable_thinking is not None:
        kwargs.setdefault("enable_thinking", request.enable_thinking)
    choice = request.tool_choice
    if not request.tools or choice.mode == "none":
        output = OutputSpec(reasoning=request.reasoning)
        return Plan(tools=(), output=output, template_kwargs=tuple(kwargs.items()))
    tools_json = json.dumps([t.template_json() for t in request.tools], ensure_ascii=False)
    prefill = ""
    constraint = loose = None
    if choice.mode == "required":
        if fmt.reasoning:
            kwargs["enable_thinking"] = False  # the call comes at once
        constraint = call_grammar(fmt, request.tools, choice.name)
        loose = call_grammar(fmt, request.tools, choice.name, loose=True)
        if constraint is None:
            prefill = fmt.forced_prefill(choice.name)
    output = OutputSpec(
        tools_json=tools_json,
        reasoning=request.reasoning,
        prefill=prefill,
        max_calls=None if choice.parallel else 1,
    )
    return Plan(
        tools=request.tools,
        output=output,
        prefill=prefill,
        template_kwargs=tuple(kwargs.items()),
        constraint=constraint,
        loose_constraint=loose,
    )


def call_grammar(
    fmt: OutputFormat, tools: tuple[ToolSpec, ...], name: str | None, *, loose: bool = False
) -> ConstraintSpec | None:
    """A grammar for exactly one call in the family's markup (JSON families only)."""
    if fmt.tool_family not in ("hermes", "llama3"):
        return None
    key = "arguments" if fmt.tool_family == "hermes" else "parameters"
    schemas = []
    for tool in tools:
        if tool.raw is not None or (name is not None and tool.name != name):
            continue
        params: Mapping[str, Any] = {"type": "object"} if loose else tool.parameters
        schemas.append(
            {
                "type": "object",
                "properties": {
                    "name": {"const": tool.name},
                    key: dict(params or {"type": "object"}),
                },
                "required": ["name", key],
                "additionalProperties": False,
            }
        )
    if not schemas:
        return None
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    call = "%json " + json.dumps(schema)
    # A template that opened <think> in the prompt: the call may close it first.
    think = '"</think>\\n\\n"? ' if fmt.reasoning else ""
    if fmt.tool_family == "hermes":
        return ConstraintSpec.lark(f'start: {think}"<tool_call>\\n" {call} "\\n</tool_call>"')
    return ConstraintSpec.lark(f"start: {think}{call}")


async def enforce(model: ModelPort, tool_plan: Plan) -> ConstraintSpec | None:
    """The plan's grammar, compiled (off the event loop); the loose one when the parameter
    schemas use keywords the engine cannot enforce."""
    if tool_plan.constraint is None:
        return None
    try:
        await model.check_constraint(tool_plan.constraint, param="tools")
    except InvalidRequest:
        await model.check_constraint(tool_plan.loose_constraint, param="tools")
        return tool_plan.loose_constraint
    return tool_plan.constraint
