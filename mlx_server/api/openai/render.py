"""Results and stream events in OpenAI's shapes: chat completions, completions, embeddings."""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs

from ...actors.frontend import Frontend
from ...generation import Prepared, Tally
from ...generation.accumulate import NO_RESULT, ChoiceResult, ToolCallOut
from ...messages import (
    Failed,
    Finished,
    Heartbeat,
    ReasoningDelta,
    StreamEvent,
    TextDelta,
    TokenLogprob,
    ToolCallArgsDelta,
    ToolCallStart,
    Usage,
)
from .. import outcome, sse
from ..errors import openai_error_body

SYSTEM_FINGERPRINT = "mlx-server"


def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def logprob_json(lp: TokenLogprob) -> dict[str, Any]:
    return {
        "token": lp.token,
        "logprob": lp.logprob,
        "bytes": list(lp.token.encode("utf-8")),
        "top_logprobs": [
            {"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))} for t, _, v in lp.top
        ],
    }


def finish_reason(ev: Finished, tool_calls: bool = False) -> str:
    if tool_calls and ev.finish_reason == "stop":
        return "tool_calls"
    return ev.finish_reason if ev.finish_reason in ("stop", "length") else "stop"


def tool_call_json(call: ToolCallOut) -> dict[str, Any]:
    return {
        "id": f"call_{call.id}",
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def message_json(choice: ChoiceResult) -> dict[str, Any]:
    """A choice's message: `content` is null when the answer is only tool calls; reasoning
    goes in `reasoning_content`, never in `content`."""
    text = choice.text
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if choice.tool_calls:
        message["content"] = text.strip() or None
        message["tool_calls"] = [tool_call_json(c) for c in choice.tool_calls]
    if choice.reasoning:
        message["reasoning_content"] = choice.reasoning
    return message


def _failed(ev: Failed) -> bytes:
    return sse.data(openai_error_body(ev.message, status=ev.status, kind=ev.kind))


_NO_RESULT = sse.data(openai_error_body(NO_RESULT, status=500))


def timings_part(watch: outcome.Outcome | None, tally: Tally) -> dict[str, Any]:
    """`{"timings": ...}` for a request that asked for them (`"timings": true`), else `{}`: on
    the whole body, and on the last chunk of a stream (the usage chunk when there is one)."""
    if watch is None:
        return {}
    return {"timings": watch.timings(tally.usage())}


# -- chat completions -------------------------------------------------------------------------


@attrs.define
class ChatRender:
    include_usage: bool = False
    timings: bool = False
    created: int = attrs.field(factory=lambda: int(time.time()))
    _watch: outcome.Outcome | None = attrs.field(init=False, default=None)

    async def begin(self, model: Frontend, prepared: Prepared) -> None:
        if self.timings:
            self._watch = outcome.current()

    def prefixes(self) -> list[str]:
        return []

    def _envelope(self, prepared: Prepared, obj: str) -> dict[str, Any]:
        return {
            "id": prepared.request.id,
            "object": obj,
            "created": self.created,
            "model": prepared.model_name,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }

    def complete(self, prepared: Prepared, tally: Tally) -> dict[str, Any]:
        want_logprobs = prepared.sampling.logprobs
        choices = []
        for i, c in enumerate(tally.choices):
            assert c.finished is not None
            lps = [logprob_json(lp) for lp in c.logprobs]
            choices.append(
                {
                    "index": i,
                    "message": message_json(c),
                    "logprobs": {"content": lps, "refusal": None} if want_logprobs else None,
                    "finish_reason": finish_reason(c.finished, bool(c.tool_calls)),
                }
            )
        return {
            **self._envelope(prepared, "chat.completion"),
            "choices": choices,
            "usage": usage_json(tally.usage()),
            **timings_part(self._watch, tally),
        }

    async def stream(
        self,
        prepared: Prepared,
        tally: Tally,
        events: AsyncIterator[tuple[int, StreamEvent]],
    ) -> AsyncIterator[bytes]:
        want_logprobs = prepared.sampling.logprobs
        envelope = self._envelope(prepared, "chat.completion.chunk")

        def chunk(
            index: int,
            delta: dict[str, Any],
            finish: str | None = None,
            lps: Any = None,
            extra: dict[str, Any] | None = None,
        ):
            choice = {
                "index": index,
                "delta": delta,
                "logprobs": {"content": lps, "refusal": None} if lps is not None else None,
                "finish_reason": finish,
            }
            obj = {**envelope, "choices": [choice]}
            if self.include_usage:
                obj["usage"] = None
            return sse.data({**obj, **(extra or {})})

        for i in range(prepared.choices):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for index, ev in events:
            if isinstance(ev, TextDelta):
                lps = [logprob_json(lp) for lp in ev.logprobs] if want_logprobs else None
                if ev.text or lps:
                    yield chunk(index, {"content": ev.text}, lps=lps)
            elif isinstance(ev, ReasoningDelta):
                yield chunk(index, {"reasoning_content": ev.text})
            elif isinstance(ev, ToolCallStart):
                call = {"index": ev.index, **tool_call_json(ToolCallOut(ev.call_id, ev.name))}
                yield chunk(index, {"tool_calls": [call]})
            elif isinstance(ev, ToolCallArgsDelta):
                part = {"index": ev.index, "function": {"arguments": ev.arguments}}
                yield chunk(index, {"tool_calls": [part]})
            elif isinstance(ev, Heartbeat):
                yield sse.KEEPALIVE
            elif isinstance(ev, Failed):
                yield _failed(ev)
                break
            if isinstance(ev, Finished | ToolCallStart | ToolCallArgsDelta) and tally.add(
                index, ev
            ):
                assert isinstance(ev, Finished)
                calls = bool(tally.choices[index].tool_calls)
                last = tally.done and not self.include_usage
                extra = timings_part(self._watch, tally) if last else None
                yield chunk(index, {}, finish_reason(ev, calls), extra=extra)
                if tally.done:
                    if self.include_usage:
                        usage = {"usage": usage_json(tally.usage())}
                        timed = timings_part(self._watch, tally)
                        yield sse.data({**envelope, "choices": [], **usage, **timed})
                    break
        else:
            yield _NO_RESULT
        yield sse.DONE


# -- completions ------------------------------------------------------------------------------


@attrs.define
class _Logprobs:
    """A completion choice's legacy logprobs lists, grown as tokens come."""

    tokens: list[str] = attrs.field(factory=list)
    token_logprobs: list[float | None] = attrs.field(factory=list)
    top_logprobs: list[dict[str, float] | None] = attrs.field(factory=list)
    text_offset: list[int] = attrs.field(factory=list)
    offset: int = 0

    def add(self, token: str, logprob: float | None, top: dict[str, float] | None) -> None:
        self.tokens.append(token)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(self.offset)
        self.offset += len(token)

    def add_generated(self, lp: TokenLogprob) -> None:
        top = {token: value for token, _, value in lp.top}
        top.setdefault(lp.token, lp.logprob)  # the sampled token is always listed
        self.add(lp.token, lp.logprob, top)

    def since(self, mark: int) -> dict[str, Any]:
        return {
            "tokens": self.tokens[mark:],
            "token_logprobs": self.token_logprobs[mark:],
            "top_logprobs": self.top_logprobs[mark:],
            "text_offset": self.text_offset[mark:],
        }


@attrs.define
class CompletionRender:
    """Prompts x n choices; choice `i` belongs to prompt `i // n`. `echo` starts each choice
    with its prompt (with logprobs: the prompt's tokens, with a null log-probability)."""

    echo: bool = False
    include_usage: bool = False
    timings: bool = False
    created: int = attrs.field(factory=lambda: int(time.time()))
    _echoes: list[tuple[str, tuple[str, ...]]] = attrs.field(init=False, factory=list)
    _lps: list[_Logprobs] = attrs.field(init=False, factory=list)
    _watch: outcome.Outcome | None = attrs.field(init=False, default=None)

    async def begin(self, model: Frontend, prepared: Prepared) -> None:
        if self.timings:
            self._watch = outcome.current()
        n = prepared.request.n
        want = prepared.sampling.logprobs
        for prompt in prepared.prompts:
            echoed: tuple[str, tuple[str, ...]] = ("", ())
            if self.echo:
                text, pieces = await model.detokenize(prompt.ids)
                # Echo exactly what was sent.
                echoed = (prompt.text if prompt.text is not None else text, pieces if want else ())
            self._echoes.extend([echoed] * n)
        self._lps = [_Logprobs() for _ in range(prepared.choices)]

    def prefixes(self) -> list[str]:
        return [text for text, _ in self._echoes] if self.echo else []

    def _start(self, i: int, want: bool) -> tuple[str, dict[str, Any] | None]:
        """Choice `i`'s echoed prompt: its text and logprobs part."""
        if not self.echo:
            return "", self._lps[i].since(0) if want else None
        text, pieces = self._echoes[i]
        lps = self._lps[i]
        for piece in pieces:
            lps.add(piece, None, None)
        lps.offset = len(text)
        return text, lps.since(0) if want else None

    def _add(self, i: int, ev: TextDelta, want: bool) -> dict[str, Any] | None:
        if not want:
            return None
        lps = self._lps[i]
        mark = len(lps.tokens)
        for lp in ev.logprobs:
            lps.add_generated(lp)
        return lps.since(mark)

    def _envelope(self, prepared: Prepared, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": prepared.request.id,
            "object": "text_completion",
            "created": self.created,
            "model": prepared.model_name,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        }

    def complete(self, prepared: Prepared, tally: Tally) -> dict[str, Any]:
        want = prepared.sampling.logprobs
        choices = []
        for i, c in enumerate(tally.choices):
            text, lps = self._start(i, want)
            for delta in c.logprobs:
                self._lps[i].add_generated(delta)
            reason = finish_reason(c.finished) if c.finished else "stop"
            choices.append(
                {
                    "text": text + c.text,
                    "index": i,
                    "logprobs": self._lps[i].since(0) if want else lps,
                    "finish_reason": reason,
                }
            )
        return {
            **self._envelope(prepared, choices),
            "usage": usage_json(tally.usage()),
            **timings_part(self._watch, tally),
        }

    async def stream(
        self,
        prepared: Prepared,
        tally: Tally,
        events: AsyncIterator[tuple[int, StreamEvent]],
    ) -> AsyncIterator[bytes]:
        want = prepared.sampling.logprobs

        def chunk(
            index: int,
            text: str,
            lps: Any,
            finish: str | None = None,
            extra: dict[str, Any] | None = None,
        ) -> bytes:
            choice = {"text": text, "index": index, "logprobs": lps, "finish_reason": finish}
            return sse.data({**self._envelope(prepared, [choice]), **(extra or {})})

        if self.echo:
            for i in range(prepared.choices):
                text, lps = self._start(i, want)
                yield chunk(i, text, lps)
        async for index, ev in events:
            if isinstance(ev, TextDelta):
                lps = self._add(index, ev, want)
                if ev.text or (lps and lps["tokens"]):
                    yield chunk(index, ev.text, lps)
            elif isinstance(ev, Heartbeat):
                yield sse.KEEPALIVE
            elif isinstance(ev, Failed):
                yield _failed(ev)
                break
            elif isinstance(ev, Finished) and tally.add(index, ev):
                last = tally.done and not self.include_usage
                extra = timings_part(self._watch, tally) if last else None
                yield chunk(index, "", None, finish_reason(ev), extra=extra)
                if tally.done:
                    if self.include_usage:
                        usage = self._envelope(prepared, [])
                        usage["usage"] = usage_json(tally.usage())
                        yield sse.data({**usage, **timings_part(self._watch, tally)})
                    break
        else:
            yield _NO_RESULT
        yield sse.DONE


# -- embeddings -------------------------------------------------------------------------------


def encode_base64(vector: list[float]) -> str:
    """Little-endian float32 bytes, base64: what OpenAI sends and its SDKs decode."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def embeddings_json(
    vectors: list[list[float]], *, model: str, tokens: int, encoding: str
) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {
                "object": "embedding",
                "index": i,
                "embedding": encode_base64(v) if encoding == "base64" else v,
            }
            for i, v in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
