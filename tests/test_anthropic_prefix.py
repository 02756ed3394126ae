"""A five-turn agent session as Claude Code sends it (a billing header that changes every
request, mid-conversation `system` entries, thinking, tool use and tool results), rendered by
real chat templates through the Anthropic dialect and the generation path: the prompt of turn
N+1 starts with every token of turn N's prompt (all but its generation prompt), so the prefix
cache serves the whole earlier conversation.

Templates: SmolLM2's own (it ignores tools: the generic tool prompt), the test families'
(`testing.scripted.TEMPLATES`), and a strict one that refuses system turns after the first
(Gemma-style), where the system text is folded into the next user turn instead.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import pytest

from mlx_server.api.anthropic import convert
from mlx_server.api.anthropic.protocol import MessagesRequest
from mlx_server.engine.chat_template import ChatTemplate
from mlx_server.engine.tokenizer import Tokenizer
from mlx_server.generation.prepare import prepare
from mlx_server.generation.system_turns import fold, renders_in_place
from mlx_server.messages import (
    ChatMessage,
    ConstraintSpec,
    GenerationRequest,
    ImageRef,
    OutputSpec,
    PromptSpec,
)
from mlx_server.testing.scripted import TEMPLATES
from mlx_server.testing.tiny import default_tokenizer
from mlx_server.tools.detect import OutputFormat, detect_format

STRICT_TEMPLATE = """\
{{- bos_token }}
{%- if messages[0].role == 'system' %}{% set system = messages[0].content %}\
{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}
{%- for m in turns %}
{%- if m.role == 'system' %}{{ raise_exception('System role only at the start') }}{% endif %}
<start_of_turn>{{ 'model' if m.role == 'assistant' else 'user' }}
{% if loop.first and system %}{{ system }}

{% endif %}{{ m.content }}<end_of_turn>
{%- endfor %}
{%- if add_generation_prompt %}
<start_of_turn>model
{% endif %}"""

BASH = {
    "name": "Bash",
    "description": "Run a shell command",
    "input_schema": {
        "type": "object",
        "properties": {"command": {"type": "string"}},
        "required": ["command"],
    },
}


@attrs.define(eq=False)
class TemplatePort:
    """The model as the generation path sees it (`generation.ModelPort`), for one chat
    template over SmolLM2's tokenizer: it renders and tokenizes as the server does."""

    tokenizer: Tokenizer
    template: ChatTemplate
    vocab_size: int = 0
    model_name: str = "template-under-test"
    context_length: int = 1 << 16
    default_max_tokens: int = 16

    @property
    def output_format(self) -> OutputFormat:
        return detect_format("llama", self.template.source)

    @property
    def sampling_defaults(self) -> Mapping[str, Any] | None:
        return None

    @property
    def special_markers(self) -> Mapping[str, int]:
        return {}

    async def prompt_ids(self, spec: PromptSpec, *, param: str = "prompt") -> tuple[int, ...]:
        assert spec.chat is not None
        text = self.template.render(
            [m.template_json() for m in spec.chat],
            add_generation_prompt=spec.add_generation_prompt,
            tools=[t.template_json() for t in spec.tools] or None,
            **dict(spec.template_kwargs),
        )
        return tuple(self.tokenizer.encode(text + spec.prefill))

    async def chat_prompt(
        self, spec: PromptSpec, *, param: str = "messages"
    ) -> tuple[tuple[int, ...], None]:
        return await self.prompt_ids(spec, param=param), None  # text only

    async def check_constraint(self, spec: ConstraintSpec | None, *, param: str = "") -> None:
        return None

    async def detokenize(self, ids: Sequence[int]) -> tuple[str, tuple[str, ...]]:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False), ()

    def start_streams(
        self, requests: Sequence[GenerationRequest], output: OutputSpec | None = None
    ) -> Any:
        raise AssertionError("nothing is generated here")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return default_tokenizer()


def port_for(tok: Tokenizer, name: str) -> TemplatePort:
    source = {"smollm2": tok.chat_template, "strict": STRICT_TEMPLATE}.get(name) or TEMPLATES[name]
    template = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    return TemplatePort(tok, template, vocab_size=tok.vocab_size)


def session(turns: int) -> list[dict[str, Any]]:
    """The request bodies of an agent session, one per turn: each adds the model's answer (a
    thought, a line of text and a Bash call), the tool's result and, on turns 3 and 5, a
    mid-conversation system entry; the billing header's `cch` changes every request."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Tidy up the repository."}]
    bodies = []
    for n in range(1, turns + 1):
        bodies.append(
            {
                "model": "m",
                "max_tokens": 64,
                "system": [
                    {
                        "type": "text",
                        "text": f"x-anthropic-billing-header: cc_version=2.1; cch={n * 7919};",
                    },
                    {"type": "text", "text": "You are an agent that works in a shell."},
                ],
                "messages": copy.deepcopy(messages),
                "tools": [BASH],
                "thinking": {"type": "adaptive"},
                "output_config": {"effort": "high"},
                "context_management": {"edits": [{"type": "clear_thinking_20251015"}]},
            }
        )
        call_id = f"toolu_{n:02d}"
        messages.append(
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": f"Step {n}: look around.", "signature": "s"},
                    {"type": "text", "text": f"Running step {n}."},
                    {"type": "tool_use", "id": call_id, "name": "Bash", "input": {"command": "ls"}},
                ],
            }
        )
        messages.append(
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": call_id, "content": f"file{n}.txt"}
                ],
            }
        )
        if n in (2, 4):
            messages.append({"role": "system", "content": f"Reminder {n}: keep going."})
    return bodies


async def prompt_of(port: TemplatePort, body: dict[str, Any]) -> tuple[int, ...]:
    request = convert.messages_request(MessagesRequest.model_validate(body))
    prepared = await prepare(port, request)
    return prepared.prompts[0].ids


async def generation_prompt_length(port: TemplatePort) -> int:
    """How many tokens the template's generation prompt adds (the part of turn N's prompt
    that turn N+1 replaces with the answer)."""
    chat = (ChatMessage(role="user", content="hi"),)
    with_gp = await port.prompt_ids(PromptSpec(chat=chat))
    without = await port.prompt_ids(PromptSpec(chat=chat, add_generation_prompt=False))
    return len(with_gp) - len(without)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# Not "mistral": its template writes the tool list before the *last* user message, so the list
# moves as the conversation grows (the real Mistral templates do the same); nothing the server
# places can keep that prefix.
@pytest.mark.parametrize(
    "template", ["smollm2", "hermes", "qwen3", "qwen3_coder", "llama3", "strict"]
)
async def test_each_turn_starts_with_the_previous_prompt(tok: Tokenizer, template: str) -> None:
    port = port_for(tok, template)
    tail = await generation_prompt_length(port)
    prompts = [await prompt_of(port, body) for body in session(5)]
    text = tok.decode(list(prompts[-1]), skip_special_tokens=False)
    assert "x-anthropic-billing-header" not in text
    assert "Reminder 2: keep going." in text and "Reminder 4: keep going." in text
    for n in range(4):
        earlier, later = prompts[n], prompts[n + 1]
        shared = len(earlier) - tail
        assert common_prefix(earlier, later) >= shared, (template, n + 1)
        assert len(later) > len(earlier)


async def test_system_turns_stay_in_place_or_fold(tok: Tokenizer) -> None:
    assert await renders_in_place(port_for(tok, "smollm2"))
    assert await renders_in_place(port_for(tok, "hermes"))
    assert not await renders_in_place(port_for(tok, "strict"))
    prompt = await prompt_of(port_for(tok, "strict"), session(3)[-1])
    text = tok.decode(list(prompt), skip_special_tokens=False)
    # Folded: the reminder opens a user turn of its own after the tool results.
    assert "<start_of_turn>user\nReminder 2: keep going.<end_of_turn>" in text
    # In place, as a system turn, for a template that renders one.
    prompt = await prompt_of(port_for(tok, "hermes"), session(3)[-1])
    text = tok.decode(list(prompt), skip_special_tokens=False)
    assert "<|im_start|>system\nReminder 2: keep going.<|im_end|>" in text


def test_fold_places_system_text_in_user_turns() -> None:
    def turn(role: str, content: str) -> ChatMessage:
        return ChatMessage(role=role, content=content)

    chat = (
        turn("system", "top"),
        turn("user", "u1"),
        turn("assistant", "a1"),
        turn("system", "s1"),
        turn("user", "u2"),
        turn("assistant", "a2"),
        turn("user", "u3"),
        turn("system", "s2"),
        turn("assistant", "a3"),
        turn("system", "s3"),
    )
    assert [(m.role, m.content) for m in fold(chat)] == [
        ("system", "top"),
        ("user", "u1"),
        ("assistant", "a1"),
        ("user", "s1\n\nu2"),
        ("assistant", "a2"),
        ("user", "u3\n\ns2"),
        ("assistant", "a3"),
        ("user", "s3"),
    ]
    # A conversation that goes on folds its earlier part the same way.
    assert fold(chat[:8])[:6] == fold(chat)[:6]


def test_fold_keeps_images_where_they_were_in_the_text() -> None:
    image = ImageRef(source="data:image/png;base64,AAAA", offset=4)
    chat = (
        ChatMessage(role="user", content="u1"),
        ChatMessage(role="assistant", content="a1"),
        ChatMessage(role="system", content="note"),
        ChatMessage(role="user", content="see this", images=(image,)),
    )
    folded = fold(chat)[-1]
    assert folded.content == "note\n\nsee this"
    [moved] = folded.images
    assert folded.content[moved.offset :] == "this"
