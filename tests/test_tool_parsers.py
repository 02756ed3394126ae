"""Unit tests of `mlx_server.tools`: each family's incremental parser (whole, in small chunks,
one character at a time), malformed output as text, the `<think>` splitter, format detection
and the chain the stream actor feeds."""

from __future__ import annotations

import json

import pytest

from mlx_server.messages import (
    OutputSpec,
    ReasoningDelta,
    StreamEvent,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallStart,
)
from mlx_server.tools.detect import OutputFormat, detect_format
from mlx_server.tools.output import OutputParser
from mlx_server.tools.parsers import ToolCall, convert_value, deepseek, make_parser, scan_json
from mlx_server.tools.parsers.harmony import HarmonyParser
from mlx_server.tools.reasoning import ThinkSplitter

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "metric": {"type": "boolean"},
                    "where": {"type": "object"},
                },
            },
        },
    }
]
CHUNKS = [1, 2, 3, 7, 1000]


def run(family: str, text: str, chunk: int) -> list[str | ToolCall]:
    parser = make_parser(family, TOOLS)
    out: list[str | ToolCall] = []
    for i in range(0, len(text), chunk):
        out.extend(parser.feed(text[i : i + chunk]))
    out.extend(parser.finish())
    merged: list[str | ToolCall] = []
    for piece in out:
        if isinstance(piece, str) and merged and isinstance(merged[-1], str):
            merged[-1] += piece
        else:
            merged.append(piece)
    return merged


def call(name: str, **args: object) -> ToolCall:
    return ToolCall(name=name, arguments=json.dumps(args))


CASES = {
    "hermes": [
        (
            'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            "</tool_call>",
            ["Let me check.\n", call("get_weather", city="Paris")],
        ),
        (  # two calls; the whitespace between and after them is not content
            '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n'
            '{"name": "b", "arguments": "{\\"x\\": 1}"}\n</tool_call>\n',
            [call("a"), call("b", x=1)],
        ),
        (  # no closing tag before the end of the generation
            '<tool_call>{"name": "a", "arguments": {"s": "</tool"}}',
            [call("a", s="</tool")],
        ),
        (  # two objects in one block
            '<tool_call>\n{"name": "a", "arguments": {}}\n{"name": "b", "arguments": {}}\n'
            "</tool_call>",
            [call("a"), call("b")],
        ),
        ("a < b and <tool not a call", ["a < b and <tool not a call"]),
        (
            '<tool_call>{"name": oops}</tool_call> then',
            ['<tool_call>{"name": oops}</tool_call> then'],
        ),
        (
            '<tool_call>{"name": "a", "arguments": {"x"',
            ['<tool_call>{"name": "a", "arguments": {"x"'],
        ),
    ],
    "qwen3_coder": [
        (
            "Sure.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n"
            "<parameter=days>\n3\n</parameter>\n<parameter=metric>\ntrue\n</parameter>\n"
            '<parameter=where>\n{"lat": 1.5}\n</parameter>\n</function>\n</tool_call>',
            [
                "Sure.\n",
                call("get_weather", city="New York", days=3, metric=True, where={"lat": 1.5}),
            ],
        ),
        (  # without <tool_call>, and an unknown parameter stays a string
            "<function=get_weather>\n<parameter=city>\n42\n</parameter>\n<parameter=x>\n5\n"
            "</parameter>\n</function>",
            [call("get_weather", city="42", x="5")],
        ),
        (
            "<tool_call>\nno function here\n</tool_call>",
            ["<tool_call>\nno function here\n</tool_call>"],
        ),
    ],
    "llama3": [
        (
            '{"name": "get_weather", "parameters": {"city": "Paris"}}',
            [call("get_weather", city="Paris")],
        ),
        (
            '<|python_tag|>{"name": "a", "parameters": {"s": "}{"}}; '
            '{"name": "b", "parameters": {}}',
            [call("a", s="}{"), call("b")],
        ),
        ('{"answer": 42}', ['{"answer": 42}']),  # JSON that is not a call is the answer
        ("The set {1, 2} is small.", ["The set {1, 2} is small."]),
        (
            'Use {"name": "x", "parameters": {}} later',
            ['Use {"name": "x", "parameters": {}} later'],
        ),
        ('{"name": "a", "parameters": {', ['{"name": "a", "parameters": {']),
    ],
    "mistral": [
        (
            '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
            '{"name": "b", "arguments": {}}]',
            [call("get_weather", city="Paris"), call("b")],
        ),
        (
            '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]b[ARGS]{}',
            [call("get_weather", city="Paris"), call("b")],
        ),
        ("[TOOL_CALLS] not json at all", ["[TOOL_CALLS] not json at all"]),
        ("Text [TOOL", ["Text [TOOL"]),
    ],
    "glm": [
        (  # GLM-4.5: newlines between the parts; a typed integer and an object
            "Checking.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>"
            "\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n<arg_key>where</arg_key>\n"
            '<arg_value>{"lat": 1.5}</arg_value>\n</tool_call>',
            ["Checking.\n", call("get_weather", city="Paris", days=3, where={"lat": 1.5})],
        ),
        (  # GLM-4.7: no newlines; two calls; a call without arguments
            "<tool_call>get_weather<arg_key>city</arg_key><arg_value>42</arg_value></tool_call>"
            "<tool_call>now</tool_call>",
            [call("get_weather", city="42"), call("now")],
        ),
        ("<tool_call>{not a name}</tool_call>", ["<tool_call>{not a name}</tool_call>"]),
        ("a <tool", ["a <tool"]),
    ],
    "kimi_k2": [
        (
            "Sure.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
            '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
            "<|tool_call_begin|>functions.now:1<|tool_call_argument_begin|>{}<|tool_call_end|>"
            "<|tool_calls_section_end|>",
            ["Sure.", call("get_weather", city="Paris"), call("now")],
        ),
        (
            "<|tool_calls_section_begin|><|tool_call_begin|>broken<|tool_calls_section_end|>",
            ["<|tool_calls_section_begin|><|tool_call_begin|>broken<|tool_calls_section_end|>"],
        ),
    ],
    "deepseek": [
        (  # V3.1
            f"Let me see.{deepseek.CALLS_BEGIN}{deepseek.CALL_BEGIN}get_weather{deepseek.SEP}"
            f'{{"city": "Paris"}}{deepseek.CALL_END}{deepseek.CALL_BEGIN}now{deepseek.SEP}{{}}'
            f"{deepseek.CALL_END}{deepseek.CALLS_END}",
            ["Let me see.", call("get_weather", city="Paris"), call("now")],
        ),
        (  # V3 / R1: type, name, fenced JSON
            f"{deepseek.CALLS_BEGIN}{deepseek.CALL_BEGIN}function{deepseek.SEP}get_weather\n```json\n"
            f'{{"city": "Rome"}}\n```{deepseek.CALL_END}{deepseek.CALLS_END}',
            [call("get_weather", city="Rome")],
        ),
        (
            f"{deepseek.CALLS_BEGIN}{deepseek.CALL_BEGIN}x{deepseek.CALL_END}{deepseek.CALLS_END}",
            [
                f"{deepseek.CALLS_BEGIN}{deepseek.CALL_BEGIN}x{deepseek.CALL_END}{deepseek.CALLS_END}"
            ],
        ),
    ],
    "gemma4": [
        (
            'Ok.<|tool_call>call:get_weather{city:<|"|>Paris, FR<|"|>,days:3}<tool_call|>',
            ["Ok.", call("get_weather", city="Paris, FR", days=3)],
        ),
        ("<|tool_call>nonsense<tool_call|>", ["<|tool_call>nonsense<tool_call|>"]),
    ],
    "function_gemma": [
        (
            "<start_function_call>call:get_weather{city:<escape>Paris<escape>,days:3}"
            "<end_function_call>",
            [call("get_weather", city="Paris", days=3)],
        ),
    ],
    "pythonic": [
        (  # Llama 3.2 / 4: the answer is a list of calls
            '[get_weather(city="Paris", days=3), now()]',
            [call("get_weather", city="Paris", days=3), call("now")],
        ),
        (
            ' [get_weather(city="a]b(", where={"lat": 1.5})]',
            [call("get_weather", city="a]b(", where={"lat": 1.5})],
        ),
        (  # LFM2's markers, Gemma 3's fenced tool_code block
            "<|tool_call_start|>[get_weather(city='Rome')]<|tool_call_end|>Done.",
            [call("get_weather", city="Rome"), "Done."],
        ),
        (
            'Let me look.\n```tool_code\nget_weather(city="Oslo")\n```',
            ["Let me look.\n", call("get_weather", city="Oslo")],
        ),
        ("[1, 2, 3] are numbers", ["[1, 2, 3] are numbers"]),
        ("[Note] read this", ["[Note] read this"]),
        ("See [f(x=1)] later", ["See [f(x=1)] later"]),  # not at the start: text
        ("[f(x=open('a'))]", ["[f(x=open('a'))]"]),  # not a literal: never evaluated
    ],
}


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize(
    ("family", "text", "expected"),
    [(family, text, expected) for family, cases in CASES.items() for text, expected in cases],
)
def test_parsers(family: str, text: str, expected: list[object], chunk: int) -> None:
    assert run(family, text, chunk) == expected


def test_text_is_released_as_soon_as_it_cannot_be_a_call() -> None:
    parser = make_parser("hermes")
    assert parser.feed("Hello <tool") == ["Hello "]
    assert parser.feed("box") == ["<toolbox"]
    assert parser.feed("<tool_call>{") == []
    parser = make_parser("llama3")
    assert parser.feed("  ") == []
    assert parser.feed("Hi") == ["  Hi"]


def test_scan_json() -> None:
    assert scan_json('{"a": "}"} tail', 0) == 10
    assert scan_json('{"a": [1, {', 0) is None
    assert scan_json("x{}", 0) == -1


def test_convert_value() -> None:
    assert convert_value("5", {"type": "integer"}) == 5
    assert convert_value("5.5", {"type": "number"}) == 5.5
    assert convert_value("null", {"type": ["integer", "null"]}) is None
    assert convert_value("abc", {"type": "integer"}) == "abc"
    assert convert_value("[1, 2]", {"type": "array"}) == [1, 2]
    assert convert_value("007", {"type": "string"}) == "007"
    assert convert_value("007", None) == "007"


def think(text: str, chunk: int, inside: bool = False) -> tuple[str, str]:
    splitter = ThinkSplitter(inside=inside)
    parts = []
    for i in range(0, len(text), chunk):
        parts.extend(splitter.feed(text[i : i + chunk]))
    parts.extend(splitter.finish())
    reasoning = "".join(t for c, t in parts if c == "reasoning")
    content = "".join(t for c, t in parts if c == "content")
    return reasoning, content


@pytest.mark.parametrize("chunk", CHUNKS)
def test_think_splitter(chunk: int) -> None:
    assert think("<think>\nStep 1.\nStep 2.\n</think>\n\nAnswer.", chunk) == (
        "Step 1.\nStep 2.",
        "Answer.",
    )
    assert think("Still thinking.\n</think>\n\nAnswer.", chunk, inside=True) == (
        "Still thinking.",
        "Answer.",
    )
    assert think("No thinking <think> here", chunk) == ("", "No thinking <think> here")
    assert think("<think>cut off", chunk) == ("cut off", "")
    assert think("<thi", chunk) == ("", "<thi")


def test_detect_format() -> None:
    from mlx_server.testing.scripted import TEMPLATES

    assert detect_format("qwen2", TEMPLATES["hermes"]) == OutputFormat("hermes", False)
    assert detect_format("qwen3", TEMPLATES["qwen3"]) == OutputFormat("hermes", True)
    assert detect_format("qwen3_next", TEMPLATES["qwen3_coder"]).tool_family == "qwen3_coder"
    assert detect_format("llama", TEMPLATES["llama3"]).tool_family == "llama3"
    assert detect_format("mistral", TEMPLATES["mistral"]).tool_family == "mistral"
    assert detect_format("qwen3_next", None).tool_family == "qwen3_coder"
    assert detect_format("mistral", None).tool_family == "mistral"
    assert detect_format("llama", "{{ messages }}").tool_family == "hermes"
    assert detect_format("mistral", "[TOOL_CALLS]x[ARGS]").mistral_args


def events(parser: OutputParser, text: str, chunk: int = 1) -> list[StreamEvent]:
    out: list[StreamEvent] = []
    for i in range(0, len(text), chunk):
        out.extend(parser.feed(text[i : i + chunk]))
    out.extend(parser.finish())
    return out


def test_output_parser_chain() -> None:
    fmt = OutputFormat("hermes", True)
    spec = OutputSpec(tools_json=json.dumps(TOOLS))
    text = (
        '<think>\nMaybe <tool_call> here?\n</think>\n\nOK.\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Oslo"}}\n</tool_call>'
    )
    got = events(OutputParser(fmt, spec), text)
    reasoning = "".join(e.text for e in got if isinstance(e, ReasoningDelta))
    content = "".join(e.text for e in got if isinstance(e, TextDelta))
    starts = [e for e in got if isinstance(e, ToolCallStart)]
    args = "".join(e.arguments for e in got if isinstance(e, ToolCallArgsDelta))
    assert reasoning == "Maybe <tool_call> here?"  # calls inside reasoning are not parsed
    assert content == "OK.\n"
    assert [s.name for s in starts] == ["get_weather"] and len(starts[0].call_id) == 24
    assert json.loads(args) == {"city": "Oslo"}
    # Dropped reasoning; a template that opened <think> in the prompt.
    got = events(
        OutputParser(
            fmt, OutputSpec(reasoning="drop"), prompt_tail="<|im_start|>assistant\n<think>\n"
        ),
        "hidden\n</think>\n\nshown",
    )
    assert all(isinstance(e, TextDelta) for e in got)
    assert "".join(e.text for e in got if isinstance(e, TextDelta)) == "shown"


def test_output_parser_prefill_and_max_calls() -> None:
    fmt = OutputFormat("hermes", False)
    prefill = fmt.forced_prefill("get_weather")
    spec = OutputSpec(tools_json=json.dumps(TOOLS), prefill=prefill, max_calls=1)
    parser = OutputParser(fmt, spec)
    got = events(
        parser, '{"city": "Rome"}}\n</tool_call>\n<tool_call>\n{"name": "x"}\n</tool_call>'
    )
    assert [type(e) for e in got] == [ToolCallStart, ToolCallArgsDelta]
    assert isinstance(got[1], ToolCallArgsDelta) and json.loads(got[1].arguments) == {
        "city": "Rome"
    }


@pytest.mark.parametrize("family", ["hermes", "qwen3_coder", "llama3", "mistral"])
def test_forced_prefill_parses(family: str) -> None:
    fmt = OutputFormat(family, False)
    prefill = fmt.forced_prefill("get_weather")
    rest = {
        "hermes": '{"city": "Rome"}}\n</tool_call>',
        "qwen3_coder": "<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>",
        "llama3": '{"city": "Rome"}}',
        "mistral": '{"city": "Rome"}}]',
    }[family]
    got = run(family, prefill + rest, 1)
    assert got == [call("get_weather", city="Rome")]


@pytest.mark.slow  # starts a process
def test_tools_package_is_pure() -> None:
    """`mlx_server.tools` imports neither MLX nor trio nor quart."""
    import subprocess
    import sys

    code = (
        "import sys, mlx_server.tools.output, mlx_server.tools.detect;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'trio', 'quart'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- Harmony (gpt-oss)

HARMONY = (
    "<|channel|>analysis<|message|>The user wants weather. <|end|>"
    "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
    '<|message|>{"city": "Paris"}'
)


HARMONY_ANSWER = (
    "<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final"
    "<|message|>Paris.<|return|>"
)


def harmony(text: str, chunk: int) -> list[object]:
    parser = HarmonyParser()
    out: list[object] = []
    for i in range(0, len(text), chunk):
        out.extend(parser.feed(text[i : i + chunk]))
    out.extend(parser.finish())
    merged: list[object] = []
    for part in out:
        if (
            isinstance(part, tuple)
            and merged
            and isinstance(merged[-1], tuple)
            and merged[-1][0] == part[0]
        ):
            merged[-1] = (part[0], merged[-1][1] + part[1])
        else:
            merged.append(part)
    return merged


@pytest.mark.parametrize("chunk", CHUNKS)
def test_harmony_channels_and_calls(chunk: int) -> None:
    # Reasoning, then a call in the commentary channel (generation stops at <|call|>).
    assert harmony(HARMONY, chunk) == [
        ("reasoning", "The user wants weather. "),
        call("get_weather", city="Paris"),
    ]
    # Reasoning then the final answer (<|return|> ends the generation, never shown).
    text = (
        "<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final"
        "<|message|>Paris is the capital.<|return|>"
    )
    assert harmony(text, chunk) == [("reasoning", "Easy."), ("content", "Paris is the capital.")]
    # The recipient before the channel; a preamble in commentary is text.
    text = (
        "<|channel|>commentary<|message|>Looking it up.<|end|>"
        "<|start|>assistant to=functions.now<|channel|>commentary json<|message|>{}<|call|>"
    )
    assert harmony(text, chunk) == [("content", "Looking it up."), call("now")]
    # No markup at all: plain content; a malformed call body is shown as text.
    assert harmony("Just text <not markup>", chunk) == [("content", "Just text <not markup>")]
    text = "<|channel|>commentary to=functions.f<|message|>{oops"
    assert harmony(text, chunk) == [("content", "{oops")]


def test_harmony_holds_back_only_what_may_be_markup() -> None:
    parser = HarmonyParser()
    assert parser.feed("<|channel|>final<|message|>Hello <|") == [("content", "Hello ")]
    assert parser.feed("en") == []
    assert parser.feed("d|>") == []
    assert parser.feed("<|start|>assistant<|channel|>final<|message|>more") == [("content", "more")]


def collect(parser: OutputParser, text: str, chunk: int) -> list[StreamEvent]:
    events: list[StreamEvent] = []
    for i in range(0, len(text), chunk):
        events.extend(parser.feed(text[i : i + chunk]))
    return events + parser.finish()


def test_harmony_through_the_output_parser() -> None:
    fmt = detect_format("gpt_oss", "{{ '<|channel|>' }}")
    assert fmt.harmony and fmt.reasoning and "<|channel|>" in fmt.markers
    spec = OutputSpec(reasoning="split", tools_json=json.dumps(TOOLS))
    events = collect(OutputParser(fmt, spec), HARMONY, 3)
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    assert reasoning == "The user wants weather. "
    assert not [e for e in events if isinstance(e, TextDelta)]
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    args = [e for e in events if isinstance(e, ToolCallArgsDelta)]
    assert [s.name for s in starts] == ["get_weather"]
    assert json.loads(args[0].arguments) == {"city": "Paris"}
    # Reasoning dropped, or left in the text (without the channel markup).
    events = collect(OutputParser(fmt, OutputSpec(reasoning="drop")), HARMONY_ANSWER, 2)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Paris."
    assert not [e for e in events if isinstance(e, ReasoningDelta)]
    events = collect(OutputParser(fmt, OutputSpec(reasoning="off")), HARMONY_ANSWER, 2)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Easy.Paris."
    # Forced calls prefill the commentary header; the rest is the arguments.
    prefill = fmt.forced_prefill("get_weather")
    parser = OutputParser(fmt, OutputSpec(reasoning="split", tools_json="[]", prefill=prefill))
    events = parser.feed('{"city": "Oslo"}') + parser.finish()
    assert [type(e) for e in events] == [ToolCallStart, ToolCallArgsDelta]


@pytest.mark.parametrize(
    ("family", "name"),
    [
        ("glm", "get_weather"),
        ("kimi_k2", "get_weather"),
        ("deepseek", "get_weather"),
        ("gemma4", "get_weather"),
        ("function_gemma", "get_weather"),
        ("pythonic", "get_weather"),
    ],
)
def test_forced_prefill_starts_a_call_the_parser_completes(family: str, name: str) -> None:
    fmt = OutputFormat(family, False)
    rest = {
        "glm": "<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>",
        "kimi_k2": '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>',
        "deepseek": f'{{"city": "Paris"}}{deepseek.CALL_END}{deepseek.CALLS_END}',
        "gemma4": '{city:<|"|>Paris<|"|>}<tool_call|>',
        "function_gemma": "{city:<escape>Paris<escape>}<end_function_call>",
        "pythonic": 'city="Paris")]',
    }[family]
    assert run(family, fmt.forced_prefill(name) + rest, 1) == [call(name, city="Paris")]


def test_detect_new_families() -> None:
    def family(model_type: str | None, template: str | None) -> str:
        return detect_format(model_type, template).tool_family

    tools = "{% for tool in tools %}{{ tool | tojson }}{% endfor %}"
    assert family("glm4_moe", tools + "<tool_call>{{ name }}<arg_key>k</arg_key>") == "glm"
    assert family("kimi_k2", tools + "<|tool_calls_section_begin|>") == "kimi_k2"
    assert family("deepseek_v3", tools + deepseek.CALLS_BEGIN) == "deepseek"
    assert family("gemma4", tools + "<|tool_call>") == "gemma4"
    assert family(None, tools + "<start_function_call>") == "function_gemma"
    assert family("llama4", tools + "<|python_start|>") == "pythonic"
    assert family("lfm2", tools + "<|tool_call_start|>") == "pythonic"
    assert family("llama", tools + "<|start_header_id|>[func_name1(params_name1=") == "pythonic"
    assert family("gpt_oss", None) == "harmony"
    # Markup unknown but the template renders tools: the model type decides.
    assert family("glm4_moe", tools) == "glm"
    # The template ignores tools (Gemma 3, SmolLM2): the generic tool prompt, Hermes format.
    assert family("gemma3_text", "{{ messages }}") == "hermes"
    assert detect_format("lfm2", tools, tool_fallback=True).tool_family == "hermes"
    assert detect_format("lfm2", tools, tool_fallback=False).tool_family == "pythonic"
    assert detect_format("deepseek_v3", tools + "<think>").reasoning
