"""Render a conversation with the model's own Jinja chat template.

Templates come from the model (tokenizer_config.json, chat_template.jinja or GGUF metadata) and
run in a sandbox with the helpers Hugging Face templates expect (`raise_exception`,
`strftime_now`, `tojson`). A model without a template falls back to ChatML, with a warning.

Templates that ignore `tools` (found by rendering a probe conversation with and without a
probe tool: SmolLM2's, Gemma 3's) get a generic tool prompt instead of losing the tools without
a word (`ChatTemplate.tool_fallback`, logged once per template):

- the tool definitions go at the end of the system prompt (a system message is added when the
  conversation has none), one OpenAI-shaped JSON object per line between `<tools>` and
  `</tools>`, with the instruction to call a function by answering
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the Hermes format, which the
  `hermes` tool parser reads back, and the grammar of forced calls produces);
- an earlier assistant turn's tool calls are appended to its text in that same markup;
- tool results become a user turn (consecutive results one turn) of
  `<tool_response>{"name": ..., "content": ...}</tool_response>` blocks, so templates that only
  allow alternating user/assistant turns accept them.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import InvalidRequest

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TOOL_PROMPT_HEAD = (
    "# Tools\n\n"
    "You may call one or more of the functions below to help answer the user.\n"
    "The functions, one JSON object per line:\n<tools>\n"
)
TOOL_PROMPT_TAIL = (
    "\n</tools>\n\n"
    "To call a function, answer with a JSON object holding its name and its arguments between "
    "<tool_call> and </tool_call> tags, one block per call:\n"
    '<tool_call>\n{"name": "<function name>", "arguments": {<arguments as JSON>}}\n</tool_call>\n'
    "The results come back in <tool_response></tool_response> tags."
)
_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "probe_tool_7f3a",
        "description": "probe",
        "parameters": {"type": "object", "properties": {}},
    },
}


class TemplateError(InvalidRequest):
    """The chat template refused or failed on this conversation."""


def _raise_exception(message: str) -> None:
    raise TemplateError(f"chat template error: {message}")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, **_: Any) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class ChatTemplate:
    """A compiled chat template plus the special tokens it may refer to."""

    def __init__(
        self, source: str | None, *, bos_token: str | None = None, eos_token: str | None = None
    ) -> None:
        if source is None:
            log.warning("the model has no chat template; falling back to ChatML")
            source = CHATML_TEMPLATE
        self.source = source
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        try:
            self._template = _compile(source)
        except jinja2.TemplateSyntaxError as exc:
            log.warning("the model's chat template does not compile (%s); using ChatML", exc)
            self.source = CHATML_TEMPLATE
            self._template = _compile(CHATML_TEMPLATE)
        self.tool_fallback = not self._renders_tools()
        self._warned = False

    def _renders_tools(self) -> bool:
        """Whether the template shows the `tools` it is given (a probe tool changes the
        rendered probe conversation). A template that fails on the probe is left alone."""
        probe = [{"role": "user", "content": "Hi"}]
        try:
            without = self._render(probe, add_generation_prompt=True, tools=None)
        except Exception:
            return True
        try:
            with_tool = self._render(probe, add_generation_prompt=True, tools=[_PROBE_TOOL])
        except Exception:
            return False
        return with_tool != without

    def _render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None,
        **kwargs: Any,
    ) -> str:
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **kwargs,
        )

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        if self.tool_fallback and (tools or _has_tool_turns(messages)):
            if not self._warned:
                self._warned = True
                log.warning(
                    "the chat template ignores tools: tool definitions, calls and results "
                    "are written into the prompt in a generic format (Hermes <tool_call> JSON)"
                )
            messages, tools = with_tool_prompt(messages, tools), None
        try:
            return self._render(
                messages, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs
            )
        except TemplateError:
            raise
        except Exception as exc:  # a template may fail in arbitrary ways on odd input
            raise TemplateError(f"chat template failed on this request: {exc}") from exc


def _has_tool_turns(messages: list[dict[str, Any]]) -> bool:
    return any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def tool_prompt(tools: list[dict[str, Any]]) -> str:
    """The generic tool section of the system prompt (see the module docstring)."""
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return TOOL_PROMPT_HEAD + lines + TOOL_PROMPT_TAIL


def _call_text(call: dict[str, Any]) -> str:
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    if isinstance(args, str):  # JSON text from a client: shown as the object it encodes
        try:
            args = json.loads(args)
        except ValueError:
            pass
    body = json.dumps({"name": fn.get("name"), "arguments": args}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def _joined(first: Any, second: Any) -> Any:
    """Two tool results' contents on separate lines (text, or parts when images are among
    them)."""
    if isinstance(first, str) and isinstance(second, str):
        return first + "\n" + second

    def parts(c: Any) -> list[Any]:
        return c if isinstance(c, list) else [{"type": "text", "text": c}]

    return [*parts(first), {"type": "text", "text": "\n"}, *parts(second)]


def with_tool_prompt(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """The conversation rewritten for a template that ignores tools: the tool prompt in the
    system turn, earlier calls as text, tool results as user turns."""
    out: list[dict[str, Any]] = []
    for message in messages:
        m = dict(message)
        if m.get("role") == "tool":
            content: Any = m.get("content")
            images: list[dict[str, Any]] = []
            if isinstance(content, list):  # a vision model's tool result with images
                images = [p for p in content if p.get("type") != "text"]
                content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
            result = {"name": m.get("name") or m.get("tool_call_id"), "content": content}
            block: Any = (
                "<tool_response>\n" + json.dumps(result, ensure_ascii=False) + "\n</tool_response>"
            )
            if images:  # the images follow their result, as image parts of the user turn
                block = [{"type": "text", "text": block}, *images]
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] = _joined(out[-1]["content"], block)
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
            continue
        calls = m.pop("tool_calls", None)
        if calls:
            text = "\n".join(_call_text(c) for c in calls)
            m["content"] = f"{m.get('content') or ''}\n{text}".lstrip("\n")
        out.append(m)
    for m in out:
        m.pop("_tool_results", None)
    if tools:
        section = tool_prompt(tools)
        if out and out[0].get("role") == "system":
            first = out[0]
            first["content"] = f"{first.get('content') or ''}\n\n{section}".lstrip("\n")
        else:
            out.insert(0, {"role": "system", "content": section})
    return out
