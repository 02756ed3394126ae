"""Render a conversation with the model's own Jinja chat template.

Templates come from the model (tokenizer_config.json, chat_template.jinja or GGUF metadata) and
run in a sandbox with the helpers Hugging Face templates expect (`raise_exception`,
`strftime_now`, `tojson`). A model without a template falls back to ChatML, with a warning.
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

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **kwargs,
            )
        except TemplateError:
            raise
        except Exception as exc:  # a template may fail in arbitrary ways on odd input
            raise TemplateError(f"chat template failed on this request: {exc}") from exc
