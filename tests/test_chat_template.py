"""The chat template module: the generic tool prompt for templates that ignore `tools`, checked
with the bundled default model's real template (SmolLM2's, which has no tool support)."""

from __future__ import annotations

import json
import logging

import pytest

from mlx_server.engine.chat_template import ChatTemplate
from mlx_server.testing.tiny import default_tokenizer
from mlx_server.tools.detect import detect_format
from mlx_server.tools.parsers import ToolCall, make_parser

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
# A Hermes-style template that renders tools itself (the shape of Qwen2.5's).
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}"
    "</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def smollm2() -> ChatTemplate:
    tok = default_tokenizer()
    return ChatTemplate(tok.chat_template, bos_token=tok.bos_token, eos_token=tok.eos_token)


@pytest.mark.slow
def test_default_model_template_gets_the_tool_prompt(
    smollm2: ChatTemplate, caplog: pytest.LogCaptureFixture
) -> None:
    tok = default_tokenizer()
    assert smollm2.tool_fallback
    chat = [{"role": "user", "content": "Weather in Paris?"}]
    with caplog.at_level(logging.WARNING, logger="mlx_server.engine.chat_template"):
        plain = smollm2.render(chat)
        with_tools = smollm2.render(chat, tools=TOOLS)
        smollm2.render(chat, tools=TOOLS)
    # The tools are in the prompt now (count_tokens differs), in the system turn.
    assert len(tok.encode(with_tools)) > len(tok.encode(plain)) + 40
    system = with_tools.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\n# Tools")
    assert json.dumps(TOOLS[0]) in system and "<tool_call>" in system
    assert with_tools.endswith(
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
    )
    # Logged once per template.
    assert sum("ignores tools" in r.getMessage() for r in caplog.records) == 1
    # The tool family of such a template is the one the tool prompt asks for.
    assert detect_format("llama", smollm2.source).tool_family == "hermes"


@pytest.mark.slow
def test_history_calls_and_results_are_rendered_as_text(smollm2: ChatTemplate) -> None:
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": c}}}
                for c in ("Paris", "Rome")
            ],
        },
        {"role": "tool", "tool_call_id": "1", "name": "get_weather", "content": "sunny"},
        {"role": "tool", "tool_call_id": "2", "name": "get_weather", "content": "rain"},
    ]
    text = smollm2.render(chat, tools=TOOLS)
    turns = text.split("<|im_end|>\n")
    assert turns[0].startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert turns[2] == (
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    )
    assert turns[3] == (
        "<|im_start|>user\n"
        '<tool_response>\n{"name": "get_weather", "content": "sunny"}\n</tool_response>\n'
        '<tool_response>\n{"name": "get_weather", "content": "rain"}\n</tool_response>'
    )
    # Without tools in the request, earlier calls still show (the history is not lost).
    assert "<tool_call>" in smollm2.render(chat[1:])
    # An answer in the format the prompt asks for is read back as a call.
    parser = make_parser("hermes", TOOLS)
    answer = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert parser.feed(answer) + parser.finish() == [
        ToolCall(name="get_weather", arguments='{"city": "Oslo"}')
    ]


def test_templates_that_render_tools_are_left_alone() -> None:
    template = ChatTemplate(TOOL_TEMPLATE)
    assert not template.tool_fallback
    chat = [{"role": "user", "content": "Hi"}]
    assert template.render(chat, tools=TOOLS).startswith(
        "<|im_start|>system\n<tools>" + json.dumps(TOOLS[0])
    )
    assert "# Tools" not in template.render(chat, tools=TOOLS)
