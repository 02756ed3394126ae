"""Stream events -> per-choice results: what every renderer, streamed or whole, reads."""

from __future__ import annotations

from collections.abc import AsyncIterator

import attrs

from ..errors import GenerationFailed
from ..messages import (
    Failed,
    Finished,
    ReasoningDelta,
    StreamEvent,
    TextDelta,
    TokenLogprob,
    ToolCallArgsDelta,
    ToolCallStart,
    Usage,
)

NO_RESULT = "the generation ended without a result"


@attrs.define
class ToolCallOut:
    """A tool call the model made: `arguments` is the JSON text it wrote."""

    id: str
    name: str
    arguments: str = ""


@attrs.define
class ChoiceResult:
    texts: list[str] = attrs.field(factory=list)
    reasoning_parts: list[str] = attrs.field(factory=list)
    tool_calls: list[ToolCallOut] = attrs.field(factory=list)
    logprobs: list[TokenLogprob] = attrs.field(factory=list)
    finished: Finished | None = None

    @property
    def text(self) -> str:
        return "".join(self.texts)

    @property
    def reasoning(self) -> str:
        return "".join(self.reasoning_parts)


@attrs.define
class Tally:
    """The choices of one response (`prompts` x `n`), fed event by event."""

    n: int  # choices per prompt
    prompt_tokens: int
    choices: list[ChoiceResult]
    remaining: int = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.remaining = len(self.choices)

    @classmethod
    def of(cls, count: int, *, n: int, prompt_tokens: int) -> Tally:
        return cls(n=n, prompt_tokens=prompt_tokens, choices=[ChoiceResult() for _ in range(count)])

    def add(self, index: int, ev: StreamEvent) -> bool:
        """Record an event; True when it finished its choice (the first time)."""
        choice = self.choices[index]
        if isinstance(ev, TextDelta):
            choice.texts.append(ev.text)
            choice.logprobs.extend(ev.logprobs)
        elif isinstance(ev, ReasoningDelta):
            choice.reasoning_parts.append(ev.text)
        elif isinstance(ev, ToolCallStart):
            choice.tool_calls.append(ToolCallOut(id=ev.call_id, name=ev.name))
        elif isinstance(ev, ToolCallArgsDelta):
            choice.tool_calls[ev.index].arguments += ev.arguments
        elif isinstance(ev, Finished) and choice.finished is None:
            choice.finished = ev
            self.remaining -= 1
            return True
        return False

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def usage(self) -> Usage:
        """Each prompt counts once however many choices share it; completions add up."""
        completion = cached = 0
        for i, choice in enumerate(self.choices):
            if choice.finished is None:
                continue
            completion += choice.finished.usage.completion_tokens
            if i % self.n == 0:
                cached += choice.finished.usage.cached_tokens
        return Usage(
            prompt_tokens=self.prompt_tokens, completion_tokens=completion, cached_tokens=cached
        )


def failure(ev: Failed) -> GenerationFailed:
    return GenerationFailed(ev.message, status=ev.status, kind=ev.kind)


async def collect(events: AsyncIterator[tuple[int, StreamEvent]], tally: Tally) -> Tally:
    """Read a whole response's events; a failure raises `GenerationFailed`."""
    async for index, ev in events:
        if isinstance(ev, Failed):
            raise failure(ev)
        if tally.add(index, ev) and tally.done:
            return tally
    raise GenerationFailed(NO_RESULT)
