"""From a `Request` to what the engine runs: tool plan, grammar, template render + tokenize,
context check. `count_tokens` shares the prompt function with `prepare`, so a count always
equals the `input_tokens` of the same request."""

from __future__ import annotations

from typing import Any

import attrs

from ..errors import InvalidRequest
from ..messages import (
    ChatMessage,
    ConstraintSpec,
    OutputSpec,
    PromptSpec,
    SamplingParams,
    VisionInput,
)
from . import system_turns
from .port import ModelPort
from .request import Request, resolve_sampling
from .tool_plan import Plan, enforce, plan


@attrs.frozen(kw_only=True)
class Prompt:
    """One tokenized prompt, how many tokens it may generate, and what `echo` shows of it."""

    ids: tuple[int, ...]
    max_tokens: int
    text: str | None = None  # the prompt as sent, when it was text
    vision: VisionInput | None = None  # a chat with images (`ModelPort.chat_prompt`)


@attrs.frozen(kw_only=True)
class Prepared:
    request: Request
    model_name: str
    prompts: tuple[Prompt, ...]
    sampling: SamplingParams
    output: OutputSpec | None
    constraint: ConstraintSpec | None

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.ids) for p in self.prompts)

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.request.n


async def prepare(model: ModelPort, request: Request) -> Prepared:
    """Plan, compile and tokenize; every problem is a 400 naming the field, before anything is
    queued."""
    for token, _ in request.sampling.logit_bias:
        if not 0 <= token < model.vocab_size:
            raise InvalidRequest(
                f"'logit_bias' token id {token} is out of range", param="logit_bias"
            )
    tool_plan = plan(model.output_format, request, model.special_markers)
    await model.check_constraint(request.constraint, param=request.constraint_param)
    # A required / named tool call is a grammar too; it takes the place of response_format.
    constraint = await enforce(model, tool_plan) or request.constraint
    limit = request.max_tokens
    prompts: list[Prompt] = []
    if request.chat is not None:
        ids, vision = await _chat_prompt(model, request, tool_plan)
        wanted = model.default_max_tokens if limit is None else limit
        room = _check_length(model, ids, 1 if wanted > 0 else 0, param=request.prompt_param)
        prompts.append(Prompt(ids=ids, max_tokens=min(wanted, room), vision=vision))
    else:
        for spec in request.prompts:
            ids = await model.prompt_ids(spec, param=request.prompt_param)
            room = _check_length(model, ids, 1, param=request.prompt_param)
            wanted = model.default_max_tokens if limit is None else limit
            prompts.append(Prompt(ids=ids, max_tokens=max(1, min(wanted, room)), text=spec.text))
    return Prepared(
        request=request,
        model_name=model.model_name,
        prompts=tuple(prompts),
        sampling=resolve_sampling(request.sampling, model.sampling_defaults),
        output=tool_plan.output if request.chat is not None else None,
        constraint=constraint,
    )


async def count_tokens(model: ModelPort, request: Request) -> int:
    """The prompt's length, exactly as `prepare` tokenizes it."""
    ids, _ = await _chat_prompt(model, request, plan(model.output_format, request))
    return len(ids)


async def _chat_prompt(
    model: ModelPort, request: Request, tool_plan: Plan
) -> tuple[tuple[int, ...], VisionInput | None]:
    """The chat's token ids, and its images for a vision model (image tokens counted)."""
    if not any(m.images for m in request.chat or ()):
        return await _chat_ids(model, request, tool_plan), None
    if request.prefill is not None:
        raise InvalidRequest(
            "an assistant prefill cannot be combined with images", param=request.prompt_param
        )
    chat = await system_turns.arrange(model, request.chat or ())
    spec = PromptSpec(
        chat=chat,
        prefill=tool_plan.prefill,
        tools=tool_plan.tools,
        template_kwargs=tool_plan.template_kwargs,
    )
    return await model.chat_prompt(spec, param=request.prompt_param)


async def _chat_ids(model: ModelPort, request: Request, tool_plan: Plan) -> tuple[int, ...]:
    """The chat's token ids. A `prefill` (a trailing assistant turn) is continued: the chat is
    rendered with that turn closed, and whatever the template wrote after its content (ChatML:
    `<|im_end|>\\n`) is cut off, token by token. That tail is found by also rendering the chat
    with an empty final turn: the two token sequences share it as a common suffix."""
    chat = await system_turns.arrange(model, request.chat or ())
    common = {"tools": tool_plan.tools, "template_kwargs": tool_plan.template_kwargs}
    if request.prefill is None:
        spec = PromptSpec(chat=chat, prefill=tool_plan.prefill, **common)
        return await model.prompt_ids(spec)

    def closed_turn(content: str) -> PromptSpec:
        turn = ChatMessage(role="assistant", content=content)
        return PromptSpec(chat=(*chat, turn), add_generation_prompt=False, **common)

    full = await model.prompt_ids(closed_turn(request.prefill + tool_plan.prefill))
    empty = await model.prompt_ids(closed_turn(""))
    return full[: len(full) - closing_length(full, empty)]


def closing_length(full: tuple[int, ...], empty: tuple[int, ...]) -> int:
    """How many tokens at the end of `full` the template wrote after the final turn's content:
    the common suffix of `full` and `empty`, never reaching into their common prefix."""
    prefix = 0
    for a, b in zip(full, empty, strict=False):
        if a != b:
            break
        prefix += 1
    room = min(len(full), len(empty)) - prefix
    suffix = 0
    while suffix < room and full[-1 - suffix] == empty[-1 - suffix]:
        suffix += 1
    return suffix


def _check_length(
    model: ModelPort, ids: tuple[int, ...], need: int, *, param: str, what: str = "the prompt"
) -> int:
    """The room left in the context window after the prompt; a 400 when it leaves less than
    `need` tokens (a generation needs one; an embedding input may fill the window)."""
    return check_length(model.context_length, ids, need, param=param, what=what)


def check_length(
    context_length: int, ids: tuple[int, ...], need: int, *, param: str, what: str = "the prompt"
) -> int:
    if not ids:
        raise InvalidRequest(f"{what} has no tokens", param=param)
    room = context_length - len(ids)
    if room < need:
        raise ContextTooLong(
            f"this model's maximum context length is {context_length} tokens; "
            f"{what} has {len(ids)}",
            code="context_length_exceeded",
            param=param,
            tokens=len(ids),
            limit=context_length,
        )
    return room


class ContextTooLong(InvalidRequest):
    """A prompt the context cannot hold; `tokens` and `limit` let a dialect word it its own
    way (Anthropic: "prompt is too long: N tokens > M maximum")."""

    def __init__(self, message: str, *, tokens: int, limit: int, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.tokens = tokens
        self.limit = limit
