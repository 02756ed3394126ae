"""Forced tool calls always complete: with `tool_choice` required / named (Anthropic "any" /
"tool") the call is generated under the family's call grammar (`generation.call_grammar`).

A random-weight tiny model sampled at temperature 1 under each family's grammar must write a
call that the family's own parser reads, of an allowed function, with arguments that validate
against the function's schema (jsonschema), for several seeds. The grammar's JSON is compact
(no whitespace after `{`), names are alternatives of the grammar, and special-token markup is
matched as the token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from mlx_server.engine import constrain
from mlx_server.engine.batch import BatchEngine
from mlx_server.engine.model import LoadedModel, load
from mlx_server.generation import Request, ToolChoice
from mlx_server.generation.call_grammar import FAMILIES, call_grammar
from mlx_server.generation.tool_plan import plan
from mlx_server.messages import (
    Admit,
    ChatMessage,
    GenerationRequest,
    OutputSpec,
    SamplingParams,
    SequenceFinished,
    TokenOut,
    ToolCallArgsDelta,
    ToolCallStart,
    ToolSpec,
)
from mlx_server.testing.tiny import build_tiny_model, default_tokenizer
from mlx_server.tools.detect import OutputFormat
from mlx_server.tools.output import OutputParser

# Strings bounded, as a tiny random model never chooses to close one on its own; the second
# tool leaves `additionalProperties` unsaid (the call grammar closes it).
WEATHER: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "alerts": {"type": "boolean"},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME: dict[str, Any] = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 8}},
    "required": ["zone"],
}
TOOLS = (
    ToolSpec(name="get_weather", description="Weather forecast", parameters=WEATHER),
    ToolSpec(name="get_time", parameters=TIME),
)
SCHEMAS = {t.name: dict(t.parameters) for t in TOOLS}
SEEDS = 4
# Nested values, unions with null, an optional parameter that may be left out, and objects that
# leave `additionalProperties` unsaid at every level.
SEARCH: dict[str, Any] = {
    "type": "object",
    "properties": {
        "filters": {
            "type": "object",
            "properties": {"year": {"type": "integer", "minimum": 1900, "maximum": 2100}},
            "required": ["year"],
        },
        "tags": {"type": "array", "items": {"enum": ["news", "blog"]}, "maxItems": 3},
        "ratio": {"type": "number", "minimum": 0, "maximum": 1},
        "note": {"type": ["string", "null"], "maxLength": 6},
        "exact": {"type": ["boolean", "null"]},
        "limit": {"type": "integer", "minimum": 1, "maximum": 50},
    },
    "required": ["filters", "tags", "note", "exact"],
}
NESTED = (ToolSpec(name="search", parameters=SEARCH), ToolSpec(name="noop", parameters={}))


def family_format(family: str) -> OutputFormat:
    """`mistral` in its `[TOOL_CALLS]NAME[ARGS]{...}` form, `mistral-array` in the older one."""
    if family == "mistral-array":
        return OutputFormat(tool_family="mistral", reasoning=False)
    return OutputFormat(tool_family=family, reasoning=False, mistral_args=family == "mistral")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path: Path = tmp_path_factory.mktemp("forced") / "tiny-llama"
    build_tiny_model(path, "llama")
    return load(str(path))


def sample(loaded: LoadedModel, spec: Any, seeds: int) -> list[tuple[str, str]]:
    """`seeds` generations at temperature 1 under `spec`: (text, finish reason) each."""
    tok = loaded.tokenizer
    engine = BatchEngine(
        loaded.model, eos_token_ids=tok.eos_token_ids, vocab_size=tok.vocab_size, tokenizer=tok
    )
    prompt = tuple(tok.encode("Call one of the tools."))
    ids: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    for seed in range(seeds):
        sampling = SamplingParams(temperature=1.0, seed=seed)
        request = GenerationRequest(
            request_id=str(seed), prompt_ids=prompt, sampling=sampling, max_tokens=400,
            constraint=spec,
        )  # fmt: skip
        ids[str(seed)] = []
        engine.admit(Admit(request=request))
    while engine.has_work:
        for ev in engine.step():
            if isinstance(ev, TokenOut):
                ids[ev.request_id].append(ev.token_id)
            elif isinstance(ev, SequenceFinished):
                reasons[ev.request_id] = ev.finish_reason
    return [(tok.decode(ids[k], skip_special_tokens=False), reasons[k]) for k in sorted(ids)]


def parse_calls(
    fmt: OutputFormat, text: str, tools: tuple[ToolSpec, ...] = TOOLS
) -> list[tuple[str, str]]:
    tools_json = json.dumps([t.template_json() for t in tools])
    parser = OutputParser(fmt, OutputSpec(tools_json=tools_json))
    events = parser.feed(text) + parser.finish()
    names = [e.name for e in events if isinstance(e, ToolCallStart)]
    args = [e.arguments for e in events if isinstance(e, ToolCallArgsDelta)]
    return list(zip(names, args, strict=True))


@pytest.mark.parametrize("name", [None, "get_weather"], ids=["any", "named"])
@pytest.mark.parametrize("family", [*FAMILIES, "mistral-array"])
def test_sampled_forced_calls_parse_and_validate(
    tiny: LoadedModel, family: str, name: str | None
) -> None:
    fmt = family_format(family)
    spec = call_grammar(fmt, TOOLS, name)
    assert spec is not None
    for text, reason in sample(tiny, spec, SEEDS):
        assert reason == "stop", (family, text[:200])  # the grammar closed the call
        calls = parse_calls(fmt, text)
        assert len(calls) == 1, (family, text)
        called, arguments = calls[0]
        assert called in (name,) if name else called in SCHEMAS
        jsonschema.validate(json.loads(arguments), SCHEMAS[called])


# FunctionGemma's call syntax has no nesting: mlx-lm's parser reads `{k:v,...}` up to the first
# `}` and splits on commas, so object and array values cannot be read back.
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "function_gemma"])
def test_nested_and_nullable_parameters(tiny: LoadedModel, family: str) -> None:
    fmt = family_format(family)
    spec = call_grammar(fmt, NESTED, "search")
    assert spec is not None
    for text, reason in sample(tiny, spec, 3):
        assert reason == "stop", (family, text[:200])
        [(called, arguments)] = parse_calls(fmt, text, NESTED)
        assert called == "search"
        jsonschema.validate(json.loads(arguments), {**SEARCH, "additionalProperties": False})


def test_every_detected_family_has_a_grammar() -> None:
    """No family falls back to a prefill with an unconstrained name."""
    request = Request(
        id="r",
        chat=(ChatMessage(role="user", content="hi"),),
        tools=TOOLS,
        tool_choice=ToolChoice(mode="required"),
    )
    from mlx_server.tools.parsers import PARSERS

    for family in {*PARSERS, "harmony"}:
        p = plan(family_format(family), request)
        assert p.constraint is not None and p.prefill == "", family
        assert p.loose_constraint is not None


def allowed(c: constrain.Constraint, width: int) -> set[int]:
    return set(np.flatnonzero(c.allowed(width)).tolist())


def test_json_inside_the_call_is_compact() -> None:
    """After `{` only a key may come: none of the whitespace tokens the flexible default
    allowed (160 of 166 of them, so a sampled call could pad until `max_tokens`)."""
    tok = default_tokenizer()
    for family in ("hermes", "llama3", "kimi_k2", "harmony", "mistral"):
        spec = call_grammar(family_format(family), TOOLS, "get_time")
        assert spec is not None
        c = constrain.start(spec, tok)
        text = {
            "hermes": '<tool_call>\n{"name":"get_time","arguments":{',
            "llama3": '{"name":"get_time","parameters":{',
            "kimi_k2": "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_time:0"
            "<|tool_call_argument_begin|>{",
            "harmony": "<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>{",
            "mistral": "[TOOL_CALLS]get_time[ARGS]{",
        }[family]
        for t in tok.encode(text):
            assert c.advance(t), (family, text)
        after = allowed(c, tok.vocab_size)
        assert {tok.decode([t]) for t in after} == {'"'}, family


def test_a_bounded_xml_value_counts_characters() -> None:
    """`maxLength` bounds characters: the XML families' `<X` unit (two characters) once let a
    sampled 8-character-bounded value run to 9 (seen at temperature 1 in a CI run)."""
    tok = default_tokenizer()
    spec = call_grammar(family_format("qwen3_coder"), TOOLS, "get_time")
    assert spec is not None

    def accepts(value: str) -> bool:
        c = constrain.start(spec, tok)
        text = f"<tool_call>\n<function=get_time>\n<parameter=zone>\n{value}\n</parameter>\n"
        return all(c.advance(t) for t in tok.encode(text))

    assert accepts("Europe/P")  # 8 characters
    assert not accepts("Europe/Pa")  # 9
    assert not accepts("\t\t\t ES?<a")  # 9 characters, 8 units of the old grammar


def test_loose_grammar_keeps_names_and_markup() -> None:
    tok = default_tokenizer()
    for family in FAMILIES:
        spec = call_grammar(family_format(family), TOOLS, "get_time", loose=True)
        assert spec is not None
        constrain.check(spec, tok)
        assert "get_time" in spec.source and "get_weather" not in spec.source


def test_special_token_markup_is_matched_as_the_token() -> None:
    """A marker the tokenizer holds as one special token is that token in the grammar (here
    SmolLM2's `<|im_start|>` plays Mistral's `[TOOL_CALLS]`)."""
    tok = default_tokenizer()
    special = tok.token_to_id("<|im_start|>")
    assert special is not None
    spec = call_grammar(family_format("mistral"), TOOLS, None, special={"[TOOL_CALLS]": special})
    assert spec is not None and f"<[{special}]>" in spec.source
    c = constrain.start(spec, tok)
    assert allowed(c, tok.vocab_size) == {special}


def test_no_allowed_function_means_no_grammar() -> None:
    server_tool = ToolSpec(name="web_search", raw={"type": "web_search_20250305"})
    assert call_grammar(family_format("hermes"), (server_tool,), None) is None
    assert call_grammar(family_format("hermes"), TOOLS, "missing") is None


def test_declared_keys_only_unless_the_schema_says_otherwise() -> None:
    from mlx_server.generation.call_grammar import _closed

    inner = {"type": "object", "properties": {"d": {"type": "integer"}}}
    closed = _closed({"type": "object", "properties": {"c": inner}, "required": ["c"]})
    assert closed["additionalProperties"] is False
    assert closed["properties"]["c"]["additionalProperties"] is False
    for open_schema in (
        {"type": "object", "properties": {"a": {}}, "additionalProperties": {"type": "string"}},
        {"type": "object", "properties": {"a": {}}, "patternProperties": {"^x": {}}},
        # An intersection: closing each part would leave nothing that satisfies both.
        {"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}], "properties": {}},
    ):
        assert _closed(open_schema) == open_schema


# --------------------------------------------------------------------------- through the server


@pytest.mark.slow
@pytest.mark.parametrize("template", ["hermes", "qwen3", "qwen3_coder", "llama3", "mistral"])
def test_forced_calls_through_the_server(
    tmp_path_factory: pytest.TempPathFactory, template: str
) -> None:
    """A random-weight model with the family's chat template, served by the real CLI: the
    OpenAI SDK with `tool_choice` required and named, the Anthropic SDK with `any`, all at
    temperature 1; every choice is one call that parses and validates."""
    import anthropic
    import openai

    from mlx_server.testing.scripted import build_scripted_model
    from mlx_server.testing.server import run_server

    root = tmp_path_factory.mktemp(f"forced-{template}")
    model_dir = build_scripted_model(root / "tiny", template)
    tools: Any = [
        {"type": "function", "function": {"name": t.name, "parameters": SCHEMAS[t.name]}}
        for t in TOOLS
    ]
    with run_server(["--model", str(model_dir)], log_path=root / "server.log") as server:
        oa = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
        named: Any = {"type": "function", "function": {"name": "get_weather"}}
        for choice_param in ("required", named):
            completion = oa.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "What is the weather?"}],
                tools=tools,
                tool_choice=choice_param,
                temperature=1.0,
                n=4,
                max_tokens=300,
            )
            for choice in completion.choices:
                assert choice.finish_reason == "tool_calls", choice
                [call] = choice.message.tool_calls or []
                assert call.type == "function"
                if choice_param != "required":
                    assert call.function.name == "get_weather"
                schema = SCHEMAS[call.function.name]
                jsonschema.validate(json.loads(call.function.arguments), schema)
        claude = anthropic.Anthropic(base_url=server.base_url, api_key="x", max_retries=0)
        message = claude.messages.create(
            model="tiny",
            max_tokens=300,
            messages=[{"role": "user", "content": "What is the weather?"}],
            tools=[{"name": t.name, "input_schema": SCHEMAS[t.name]} for t in TOOLS],
            tool_choice={"type": "any"},
            extra_body={"temperature": 1.0},
        )
        assert message.stop_reason == "tool_use"
        [use] = [b for b in message.content if b.type == "tool_use"]
        jsonschema.validate(use.input, SCHEMAS[use.name])
