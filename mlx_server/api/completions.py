"""OpenAI's legacy text completions: `POST /v1/completions`.

The prompt is raw text, tokenized without a chat template (a BOS token is added only for models
that want one), or token ids used as they are. Each prompt makes `n` choices; choice `i` belongs
to prompt `i // n`. All the choices of a request are queued together (all or none: a full queue
is a 429 before anything is sent) and batch together in the executor.

Differences from OpenAI, on purpose:
- `suffix` (insertion) is not supported: a non-empty suffix is a 400.
- `best_of` must equal `n` (no server-side ranking of extra samples).
- `response_format` (an extension, as in vLLM): as in chat completions, enforced by constrained
  decoding.
- `echo` with `logprobs`: the prompt's tokens are listed with a `null` log-probability (and a
  `null` top_logprobs entry); OpenAI leaves only the first one null. Prompt logprobs would need
  a second pass over the prompt.
- `text_offset` counts the characters of the tokens' own texts; a character split across two
  tokens can make it differ slightly from offsets into `text`.
- `max_tokens` may be 0: nothing is generated (useful with `echo`).
- A seeded request with `n` > 1 gives choice `j` of each prompt the seed `seed + j`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio
from quart import Blueprint, Response

from ..errors import InvalidRequest
from ..messages import (
    Failed,
    Finished,
    GenerationRequest,
    Heartbeat,
    PromptSpec,
    StreamEvent,
    TextDelta,
    TokenLogprob,
    Usage,
)
from . import outcome, sse
from .errors import openai_error, openai_error_body
from .openai import SYSTEM_FINGERPRINT, parse_sampling, usage_json
from .params import Fields, json_body, prompt_inputs
from .state import models, use_model
from .structured import parse_response_format

if TYPE_CHECKING:
    from ..actors.frontend import Frontend

bp = Blueprint("completions", __name__)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint
MAX_N = 16
MAX_CHOICES = 128  # prompts x n
MAX_LOGPROBS = 5


# -- request parsing ---------------------------------------------------------------------------


def parse_prompts(raw: Any, *, param: str = "prompt") -> list[PromptSpec]:
    """A string, a list of strings, a list of token ids, or a list of lists of token ids."""
    return prompt_inputs(raw, param=param)


@attrs.frozen
class Prompt:
    """One tokenized prompt and what `echo` shows of it."""

    ids: tuple[int, ...]
    echo_text: str = ""
    echo_tokens: tuple[str, ...] = ()


# -- rendering ---------------------------------------------------------------------------------


@attrs.define
class _Choice:
    prompt: Prompt
    echo: bool
    want_logprobs: bool
    texts: list[str] = attrs.field(factory=list)
    tokens: list[str] = attrs.field(factory=list)
    token_logprobs: list[float | None] = attrs.field(factory=list)
    top_logprobs: list[dict[str, float] | None] = attrs.field(factory=list)
    text_offset: list[int] = attrs.field(factory=list)
    offset: int = 0
    finished: Finished | None = None

    def start(self) -> tuple[str, dict[str, Any] | None]:
        """The echoed prompt (text and logprobs part), if any."""
        if not self.echo:
            return "", self.logprobs_part(0)
        mark = len(self.tokens)
        if self.want_logprobs:
            for piece in self.prompt.echo_tokens:
                self.tokens.append(piece)
                self.token_logprobs.append(None)
                self.top_logprobs.append(None)
                self.text_offset.append(self.offset)
                self.offset += len(piece)
        self.offset = len(self.prompt.echo_text)
        self.texts.append(self.prompt.echo_text)
        return self.prompt.echo_text, self.logprobs_part(mark)

    def add(self, delta: TextDelta) -> dict[str, Any] | None:
        """Record a delta; return its logprobs part."""
        mark = len(self.tokens)
        self.texts.append(delta.text)
        if self.want_logprobs:
            for lp in delta.logprobs:
                self._add_token(lp)
        return self.logprobs_part(mark)

    def _add_token(self, lp: TokenLogprob) -> None:
        top = {token: value for token, _, value in lp.top}
        top.setdefault(lp.token, lp.logprob)  # the sampled token is always listed
        self.tokens.append(lp.token)
        self.token_logprobs.append(lp.logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(self.offset)
        self.offset += len(lp.token)

    def logprobs_part(self, mark: int) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        return {
            "tokens": self.tokens[mark:],
            "token_logprobs": self.token_logprobs[mark:],
            "top_logprobs": self.top_logprobs[mark:],
            "text_offset": self.text_offset[mark:],
        }


def _finish_reason(ev: Finished) -> str:
    return ev.finish_reason if ev.finish_reason in ("stop", "length") else "stop"


@attrs.define
class CompletionRender:
    """Renders one completion request (prompts x n choices) in OpenAI's shapes."""

    id: str
    created: int
    model: str
    n: int
    prompts: list[Prompt]
    echo: bool
    want_logprobs: bool
    include_usage: bool
    choices: list[_Choice] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.choices = [
            _Choice(prompt=p, echo=self.echo, want_logprobs=self.want_logprobs)
            for p in self.prompts
            for _ in range(self.n)
        ]

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        }

    def usage(self) -> Usage:
        """Each prompt counts once however many choices share it; completions add up."""
        prompt_tokens = sum(len(p.ids) for p in self.prompts)
        completion = 0
        cached = 0
        for i, choice in enumerate(self.choices):
            if choice.finished is None:
                continue
            completion += choice.finished.usage.completion_tokens
            if i % self.n == 0:
                cached += choice.finished.usage.cached_tokens
        return Usage(
            prompt_tokens=prompt_tokens, completion_tokens=completion, cached_tokens=cached
        )

    async def complete(
        self, events: AsyncIterator[tuple[int, StreamEvent]]
    ) -> Response | dict[str, Any]:
        for choice in self.choices:
            choice.start()
        remaining = len(self.choices)
        async for index, ev in events:
            choice = self.choices[index]
            if isinstance(ev, TextDelta):
                choice.add(ev)
            elif isinstance(ev, Failed):
                return openai_error(ev.message, status=ev.status, kind=ev.kind)
            elif isinstance(ev, Finished) and choice.finished is None:
                choice.finished = ev
                remaining -= 1
                if not remaining:
                    break
        if remaining:
            return openai_error("the generation ended without a result", status=500)
        body = self._envelope(
            [
                {
                    "text": "".join(c.texts),
                    "index": i,
                    "logprobs": c.logprobs_part(0),
                    "finish_reason": _finish_reason(c.finished) if c.finished else "stop",
                }
                for i, c in enumerate(self.choices)
            ]
        )
        body["usage"] = usage_json(self.usage())
        return body

    def _chunk(
        self, index: int, text: str, logprobs: dict[str, Any] | None, finish: str | None = None
    ) -> bytes:
        choice = {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}
        return sse.data(self._envelope([choice]))

    async def stream(self, events: AsyncIterator[tuple[int, StreamEvent]]) -> AsyncIterator[bytes]:
        if self.echo:
            for i, choice in enumerate(self.choices):
                text, lps = choice.start()
                yield self._chunk(i, text, lps)
        remaining = len(self.choices)
        async for index, ev in events:
            choice = self.choices[index]
            if isinstance(ev, TextDelta):
                lps = choice.add(ev)
                if ev.text or (lps and lps["tokens"]):
                    yield self._chunk(index, ev.text, lps)
            elif isinstance(ev, Heartbeat):
                yield sse.KEEPALIVE
            elif isinstance(ev, Failed):
                yield sse.data(openai_error_body(ev.message, status=ev.status, kind=ev.kind))
                break
            elif isinstance(ev, Finished) and choice.finished is None:
                choice.finished = ev
                remaining -= 1
                yield self._chunk(index, "", None, _finish_reason(ev))
                if not remaining:
                    if self.include_usage:
                        usage = self._envelope([])
                        usage["usage"] = usage_json(self.usage())
                        yield sse.data(usage)
                    break
        else:
            message = "the generation ended without a result"
            yield sse.data(openai_error_body(message, status=500))
        yield sse.DONE


async def _nothing_to_generate(
    requests: Sequence[GenerationRequest],
) -> AsyncIterator[tuple[int, StreamEvent]]:
    """The events of `max_tokens: 0`: every choice ends at once, having generated nothing."""
    for i, request in enumerate(requests):
        usage = Usage(prompt_tokens=len(request.prompt_ids), completion_tokens=0)
        yield i, Finished(finish_reason="length", usage=usage)
    await trio.lowlevel.checkpoint()


# -- the route ---------------------------------------------------------------------------------


@bp.post("/v1/completions")
async def completions() -> Response | dict[str, Any]:
    models()  # 503 until the server is ready
    body = await json_body()
    f = Fields(body)
    fe = await use_model(body.get("model"))
    specs = parse_prompts(body.get("prompt"))
    suffix = f.string("suffix")
    if suffix:
        raise InvalidRequest("'suffix' is not supported by this server", param="suffix")
    n = f.integer("n", 1, lo=1, hi=MAX_N) or 1
    best_of = f.integer("best_of", n, lo=1, hi=MAX_N)
    if best_of != n:
        raise InvalidRequest(
            f"'best_of' must equal 'n' ({n}): ranking extra samples is not supported",
            param="best_of",
        )
    if len(specs) * n > MAX_CHOICES:
        raise InvalidRequest(
            f"{len(specs)} prompts x n={n} is more than {MAX_CHOICES} choices", param="prompt"
        )
    max_tokens = f.integer("max_tokens", DEFAULT_MAX_TOKENS, lo=0)
    assert max_tokens is not None
    sampling = parse_sampling(f, vocab_size=fe.vocab_size)
    logprobs = f.integer("logprobs", None, lo=0, hi=MAX_LOGPROBS)
    if logprobs is not None:
        sampling = attrs.evolve(sampling, logprobs=True, top_logprobs=logprobs)
    echo = f.boolean("echo", False)
    stop = f.stop_list("stop")
    stream = f.boolean("stream", False)
    stream_options = f.obj("stream_options")
    if stream_options is not None and not stream:
        raise InvalidRequest(
            "'stream_options' is only allowed when 'stream' is true", param="stream_options"
        )
    include_usage = bool((stream_options or {}).get("include_usage"))
    ignore_eos = f.boolean("ignore_eos", False)
    constraint = parse_response_format(body.get("response_format"))  # an extension, as in vLLM
    await fe.check_constraint(constraint)

    prompts: list[Prompt] = []
    for spec in specs:
        prompts.append(await _prepare(fe, spec, echo=echo, want_logprobs=logprobs is not None))

    request_id = f"cmpl-{uuid.uuid4().hex}"
    requests: list[GenerationRequest] = []
    for p, prompt in enumerate(prompts):
        room = fe.context_length - len(prompt.ids)
        for j in range(n):
            choice_sampling = sampling
            if sampling.seed is not None and j:
                choice_sampling = attrs.evolve(sampling, seed=sampling.seed + j)
            requests.append(
                GenerationRequest(
                    request_id=f"{request_id}-{p * n + j}",
                    prompt_ids=prompt.ids,
                    sampling=choice_sampling,
                    max_tokens=max(1, min(max_tokens, room)),
                    stop=stop,
                    ignore_eos=ignore_eos,
                    constraint=constraint,
                )
            )
    render = CompletionRender(
        id=request_id,
        created=int(time.time()),
        model=fe.model_name,
        n=n,
        prompts=prompts,
        echo=echo,
        want_logprobs=logprobs is not None,
        include_usage=stream and include_usage,
    )
    watch = outcome.current()
    prompt_tokens = sum(len(p.ids) for p in prompts)
    echoed = [c.prompt.echo_text for c in render.choices] if echo else []

    def observed(
        events: AsyncIterator[tuple[int, StreamEvent]],
    ) -> AsyncIterator[tuple[int, StreamEvent]]:
        return watch.observe(
            events, prompt_tokens=prompt_tokens, choices_per_prompt=n, prefixes=echoed
        )

    if max_tokens == 0:
        events = observed(_nothing_to_generate(requests))
        if stream:
            return Response(render.stream(events), status=200, headers=sse.SSE_HEADERS)
        return await render.complete(events)
    handle = fe.start_streams(requests)  # a full queue is a 429 before any byte is sent
    if stream:
        chunks = sse.ClosingBody(render.stream(observed(handle.events)), handle.close)
        return Response(chunks, status=200, headers=sse.SSE_HEADERS)
    with handle as tagged:
        return await render.complete(observed(tagged))


async def _prepare(fe: Frontend, spec: PromptSpec, *, echo: bool, want_logprobs: bool) -> Prompt:
    ids = await fe.prompt_ids(spec)
    fe.check_length(ids, 1, param="prompt")
    if not echo:
        return Prompt(ids=ids)
    text, pieces = await fe.detokenize(ids)
    if spec.text is not None:
        text = spec.text  # echo exactly what was sent
    return Prompt(ids=ids, echo_text=text, echo_tokens=pieces if want_logprobs else ())
