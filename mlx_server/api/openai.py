"""OpenAI-compatible routes: chat completions (streaming and not) and the model list."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import attrs
from quart import Blueprint, Response

from ..errors import InvalidRequest
from ..messages import (
    ChatMessage,
    Failed,
    Finished,
    GenerationRequest,
    Heartbeat,
    PromptSpec,
    ReasoningDelta,
    SamplingParams,
    StreamEvent,
    TextDelta,
    TokenLogprob,
    ToolCallArgsDelta,
    ToolCallStart,
    Usage,
)
from . import outcome, sse
from .errors import openai_error, openai_error_body
from .params import Fields, json_body
from .state import models, use_model
from .structured import parse_response_format
from .tools import enforce, parse_openai_tools, plan, template_tool_calls

if TYPE_CHECKING:
    from ..actors.models import ModelSlot

bp = Blueprint("openai", __name__)

SYSTEM_FINGERPRINT = "mlx-server"
_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


# -- request parsing ---------------------------------------------------------------------------


def _content_text(content: Any, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                parts.append(part)
                continue
            if not isinstance(part, dict):
                raise InvalidRequest(f"'{where}[{j}]' must be an object", param=f"{where}[{j}]")
            kind = part.get("type")
            if kind in ("text", "input_text") and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif kind in ("image_url", "input_image", "input_audio", "file"):
                raise InvalidRequest(
                    f"'{where}[{j}]': content type {kind!r} is not supported (text-only model)",
                    param=f"{where}[{j}]",
                )
            else:
                raise InvalidRequest(
                    f"'{where}[{j}]': unknown content part type {kind!r}", param=f"{where}[{j}]"
                )
        return "".join(parts)
    raise InvalidRequest(f"'{where}' must be a string or a list of content parts", param=where)


def parse_chat_messages(raw: Any) -> tuple[ChatMessage, ...]:
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("'messages' must be a non-empty array", param="messages")
    out: list[ChatMessage] = []
    import json

    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequest(f"'{where}' must be an object", param=where)
        role = m.get("role")
        if not isinstance(role, str) or role not in _ROLES:  # a dict/list is unhashable
            raise InvalidRequest(
                f"'{where}.role' must be one of {sorted(_ROLES)}, got {role!r}",
                param=f"{where}.role",
            )
        content = _content_text(m.get("content"), f"{where}.content")
        if content is None and role in ("system", "developer", "user"):
            raise InvalidRequest(f"'{where}.content' is required", param=f"{where}.content")
        extra: list[tuple[str, str]] = []
        for key in ("tool_calls", "tool_call_id", "reasoning_content"):
            if m.get(key) is not None:
                value = m[key]
                if key == "tool_calls":
                    value = template_tool_calls(value, f"{where}.tool_calls")
                extra.append((key, json.dumps(value)))
        name = m.get("name") if isinstance(m.get("name"), str) else None
        out.append(
            ChatMessage(
                role="system" if role == "developer" else role,
                content=content,
                name=name,
                extra=tuple(extra),
            )
        )
    return tuple(out)


def parse_sampling(f: Fields, *, vocab_size: int) -> SamplingParams:
    temperature = f.number("temperature", 1.0, lo=0.0, hi=2.0)
    top_p = f.number("top_p", 1.0, lo=0.0, hi=1.0)
    top_k = f.integer("top_k", 0, lo=0)
    min_p = f.number("min_p", 0.0, lo=0.0, hi=1.0)
    rep = f.number("repetition_penalty", 1.0, lo=0.01, hi=10.0)
    presence = f.number("presence_penalty", 0.0, lo=-2.0, hi=2.0)
    frequency = f.number("frequency_penalty", 0.0, lo=-2.0, hi=2.0)
    # OpenAI's int64 range. MLX keys take 0..2**64-1 (a larger seed killed the executor thread),
    # so the seed is taken mod 2**63, which leaves room for the `seed + j` of n > 1 choices.
    seed = f.integer("seed", None, lo=-(2**63), hi=2**63 - 1)
    bias_raw = f.obj("logit_bias") or {}
    bias: list[tuple[int, float]] = []
    for k, v in bias_raw.items():
        try:
            tid = int(k)
        except ValueError:
            raise InvalidRequest(
                f"'logit_bias' key {k!r} is not a token id", param="logit_bias"
            ) from None
        if not 0 <= tid < vocab_size:
            raise InvalidRequest(f"'logit_bias' token id {tid} is out of range", param="logit_bias")
        if isinstance(v, bool) or not isinstance(v, int | float) or not -100 <= v <= 100:
            raise InvalidRequest(
                "'logit_bias' values must be numbers in [-100, 100]", param="logit_bias"
            )
        bias.append((tid, float(v)))
    assert temperature is not None and top_p is not None and top_k is not None
    assert min_p is not None and rep is not None and presence is not None and frequency is not None
    return SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=rep,
        presence_penalty=presence,
        frequency_penalty=frequency,
        seed=None if seed is None else seed % 2**63,
        logit_bias=tuple(bias),
    )


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


# -- routes ------------------------------------------------------------------------------------


@bp.get("/v1/models")
async def list_models() -> Response | dict[str, Any]:
    pool = models()
    return {"object": "list", "data": [_model_json(slot) for slot in pool.slots]}


@bp.get("/v1/models/<path:model_id>")
async def get_model(model_id: str) -> Response | dict[str, Any]:
    return _model_json(models().resolve(model_id))


def _model_json(slot: ModelSlot) -> dict[str, Any]:
    return {"id": slot.name, "object": "model", "created": slot.created, "owned_by": "mlx-server"}


@bp.post("/v1/chat/completions")
async def chat_completions() -> Response | dict[str, Any]:
    models()  # 503 until the server is ready
    body = await json_body()
    f = Fields(body)
    fe = await use_model(body.get("model"))
    chat = parse_chat_messages(body.get("messages"))
    stream = f.boolean("stream", False)
    n = f.integer("n", 1, lo=1, hi=MAX_N) or 1
    legacy_max = f.integer("max_tokens", None, lo=1)  # validated even when superseded
    max_tokens = f.integer("max_completion_tokens", None, lo=1)
    if max_tokens is None:
        max_tokens = legacy_max
    sampling = parse_sampling(f, vocab_size=fe.vocab_size)
    want_logprobs = f.boolean("logprobs", False)
    top_logprobs = f.integer("top_logprobs", 0, lo=0, hi=20) or 0
    if top_logprobs and not want_logprobs:
        raise InvalidRequest("'top_logprobs' requires 'logprobs': true", param="top_logprobs")
    if want_logprobs:
        sampling = attrs.evolve(sampling, logprobs=True, top_logprobs=top_logprobs)
    stop = f.stop_list("stop")
    stream_options = f.obj("stream_options") or {}
    include_usage = bool(stream_options.get("include_usage")) if stream else False
    if body.get("stream_options") is not None and not stream:
        raise InvalidRequest(
            "'stream_options' is only allowed when 'stream' is true", param="stream_options"
        )
    constraint = parse_response_format(body.get("response_format"))
    tool_request = parse_openai_tools(body)
    template_kwargs = f.obj("chat_template_kwargs")
    effort = f.string("reasoning_effort")
    tool_plan = plan(
        fe,
        tool_request,
        reasoning="split",
        enable_thinking=False if effort == "none" else None,
        template_kwargs=template_kwargs,
    )

    await fe.check_constraint(constraint)  # an unenforceable schema is a 400 up front
    # A required / named tool call is a grammar too; it takes the place of response_format.
    constraint = await enforce(fe, tool_plan) or constraint
    prompt_ids = await fe.prompt_ids(
        PromptSpec(
            chat=chat,
            tools_json=tool_plan.tools_json,
            template_kwargs_json=tool_plan.template_kwargs_json,
            prefill=tool_plan.prefill,
        )
    )
    limit = fe.check_length(prompt_ids, max_tokens or fe.default_max_tokens)
    base = GenerationRequest(
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
        prompt_ids=prompt_ids,
        sampling=sampling,
        max_tokens=limit,
        stop=stop,
        ignore_eos=f.boolean("ignore_eos", False),
        constraint=constraint,
    )
    render = ChatRender(
        id=base.request_id,
        created=int(time.time()),
        model=fe.model_name,
        n=n,
        include_usage=include_usage,
        want_logprobs=want_logprobs,
    )
    requests = choice_requests(base, n)
    watch = outcome.current()
    if stream:
        # A full queue is a 429 before any byte is sent.
        handle = fe.start_streams(requests, tool_plan.output)
        events = watch.observe(handle.events, prompt_tokens=len(prompt_ids), choices_per_prompt=n)
        body = render.stream(events)
        return Response(sse.ClosingBody(body, handle.close), status=200, headers=sse.SSE_HEADERS)
    with fe.start_streams(requests, tool_plan.output) as events:
        watched = watch.observe(events, prompt_tokens=len(prompt_ids), choices_per_prompt=n)
        return await render.complete(watched)


MAX_N = 16


def choice_requests(base: GenerationRequest, n: int) -> list[GenerationRequest]:
    """One generation per choice. A seeded request gives each choice its own derived seed, so
    choices differ yet the whole response is reproducible."""
    if n == 1:
        return [base]
    out = []
    for j in range(n):
        sampling = base.sampling
        if sampling.seed is not None:
            sampling = attrs.evolve(sampling, seed=sampling.seed + j)
        out.append(attrs.evolve(base, request_id=f"{base.request_id}-{j}", sampling=sampling))
    return out


def finish_reason(ev: Finished, tool_calls: bool = False) -> str:
    if tool_calls and ev.finish_reason == "stop":
        return "tool_calls"
    return ev.finish_reason if ev.finish_reason in ("stop", "length") else "stop"


@attrs.define
class ChatRender:
    """Renders one chat completion (n choices) in OpenAI's shapes, streamed or whole."""

    id: str
    created: int
    model: str
    n: int
    include_usage: bool
    want_logprobs: bool

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }

    async def complete(
        self, events: AsyncIterator[tuple[int, StreamEvent]]
    ) -> Response | dict[str, Any]:
        texts: list[list[str]] = [[] for _ in range(self.n)]
        reasoning: list[list[str]] = [[] for _ in range(self.n)]
        calls: list[list[dict[str, Any]]] = [[] for _ in range(self.n)]
        logprobs: list[list[dict[str, Any]]] = [[] for _ in range(self.n)]
        finished: dict[int, Finished] = {}
        async for index, ev in events:
            if isinstance(ev, TextDelta):
                texts[index].append(ev.text)
                logprobs[index].extend(logprob_json(lp) for lp in ev.logprobs)
            elif isinstance(ev, ReasoningDelta):
                reasoning[index].append(ev.text)
            elif isinstance(ev, ToolCallStart):
                calls[index].append(
                    {
                        "id": f"call_{ev.call_id}",
                        "type": "function",
                        "function": {"name": ev.name, "arguments": ""},
                    }
                )
            elif isinstance(ev, ToolCallArgsDelta):
                calls[index][ev.index]["function"]["arguments"] += ev.arguments
            elif isinstance(ev, Failed):
                return openai_error(ev.message, status=ev.status, kind=ev.kind)
            elif isinstance(ev, Finished):
                finished[index] = ev
                if len(finished) == self.n:
                    break
        if len(finished) < self.n:
            return openai_error("the generation ended without a result", status=500)
        choices = [
            {
                "index": i,
                "message": message_json("".join(texts[i]), "".join(reasoning[i]), calls[i]),
                "logprobs": {"content": logprobs[i], "refusal": None}
                if self.want_logprobs
                else None,
                "finish_reason": finish_reason(finished[i], bool(calls[i])),
            }
            for i in range(self.n)
        ]
        return {
            **self._envelope("chat.completion"),
            "choices": choices,
            "usage": usage_json(total_usage(list(finished.values()))),
        }

    def _chunk(
        self,
        index: int,
        delta: dict[str, Any],
        finish: str | None = None,
        lps: list[Any] | None = None,
    ) -> bytes:
        obj = self._envelope("chat.completion.chunk")
        obj["choices"] = [
            {
                "index": index,
                "delta": delta,
                "logprobs": {"content": lps, "refusal": None} if lps is not None else None,
                "finish_reason": finish,
            }
        ]
        if self.include_usage:
            obj["usage"] = None
        return sse.data(obj)

    async def stream(self, events: AsyncIterator[tuple[int, StreamEvent]]) -> AsyncIterator[bytes]:
        for i in range(self.n):
            yield self._chunk(i, {"role": "assistant", "content": ""})
        finished: dict[int, Finished] = {}
        with_calls: set[int] = set()
        async for index, ev in events:
            if isinstance(ev, TextDelta):
                lps = [logprob_json(lp) for lp in ev.logprobs] if self.want_logprobs else None
                if ev.text or lps:
                    yield self._chunk(index, {"content": ev.text}, lps=lps)
            elif isinstance(ev, ReasoningDelta):
                yield self._chunk(index, {"reasoning_content": ev.text})
            elif isinstance(ev, ToolCallStart):
                with_calls.add(index)
                call = {
                    "index": ev.index,
                    "id": f"call_{ev.call_id}",
                    "type": "function",
                    "function": {"name": ev.name, "arguments": ""},
                }
                yield self._chunk(index, {"tool_calls": [call]})
            elif isinstance(ev, ToolCallArgsDelta):
                part = {"index": ev.index, "function": {"arguments": ev.arguments}}
                yield self._chunk(index, {"tool_calls": [part]})
            elif isinstance(ev, Heartbeat):
                yield sse.KEEPALIVE
            elif isinstance(ev, Failed):
                yield sse.data(openai_error_body(ev.message, status=ev.status, kind=ev.kind))
                break
            elif isinstance(ev, Finished):
                finished[index] = ev
                yield self._chunk(index, {}, finish_reason(ev, index in with_calls))
                if len(finished) == self.n:
                    if self.include_usage:
                        obj = self._envelope("chat.completion.chunk")
                        obj["choices"] = []
                        obj["usage"] = usage_json(total_usage(list(finished.values())))
                        yield sse.data(obj)
                    break
        else:
            message = "the generation ended without a result"
            yield sse.data(openai_error_body(message, status=500))
        yield sse.DONE


def message_json(text: str, reasoning: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
    """A choice's message: `content` is null when the answer is only tool calls; reasoning
    goes in `reasoning_content`, never in `content`."""
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if calls:
        message["content"] = text.strip() or None
        message["tool_calls"] = calls
    if reasoning:
        message["reasoning_content"] = reasoning
    return message


def total_usage(finished: list[Finished]) -> Usage:
    """The prompt is counted once however many choices share it; completions add up."""
    first = finished[0].usage
    return Usage(
        prompt_tokens=first.prompt_tokens,
        completion_tokens=sum(f.usage.completion_tokens for f in finished),
        cached_tokens=first.cached_tokens,
    )
