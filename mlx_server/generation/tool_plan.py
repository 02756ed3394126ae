"""Tool calling and reasoning, planned for one model and request: the tools the template sees,
the `OutputSpec` the stream layer parses with, a forced call's prefill or grammar, and template
kwargs such as `enable_thinking`.

A required call ("required" / a named function; Anthropic's "any" / "tool") is enforced by
constrained decoding, in every family: a grammar (`call_grammar`) that admits exactly one call
of an allowed function in the family's markup, the name chosen by the grammar, the arguments
compact and valid against the function's parameter schema (a schema the engine cannot enforce
falls back to "any JSON object" for the arguments). A family without a grammar would get the
start of its markup as a prefill instead (the parser reads the prefill first).

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
from .call_grammar import call_grammar
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


def plan(fmt: OutputFormat, request: Request, special: Mapping[str, int] | None = None) -> Plan:
    """What to render and how to read the output, for this model and request (`special`: the
    family's markers that are single special tokens, `ModelPort.special_markers`)."""
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
        constraint = call_grammar(fmt, request.tools, choice.name, special=special)
        loose = call_grammar(fmt, request.tools, choice.name, loose=True, special=special)
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
