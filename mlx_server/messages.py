"""The whole message vocabulary of the server, in one place.

API handlers, the scheduler, the executor, the cache manager and the per-request stream actors talk
only through these frozen classes. Nothing here imports MLX, trio or quart: messages are plain
data, and the tuples inside them are immutable so a message can cross threads safely.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import attrs

if TYPE_CHECKING:
    from .engine.images import DecodedImage

FinishReason = Literal["stop", "length", "abort", "error", "timeout"]


# --------------------------------------------------------------------------------------------
# What a request asks for
# --------------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class SamplingParams:
    """How to choose each next token. temperature 0 means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


@attrs.frozen(kw_only=True)
class ToolCall:
    """A tool call of an earlier assistant turn: `arguments` is the parsed JSON object (chat
    templates apply `tojson` to it), never JSON text to be parsed again."""

    name: str
    arguments: Mapping[str, Any] = attrs.field(factory=dict, eq=False)
    id: str | None = None


@attrs.frozen(kw_only=True)
class ToolSpec:
    """A function the model may call. `raw` is a tool the template sees exactly as given (an
    Anthropic server tool); otherwise it is rendered in OpenAI's function shape."""

    name: str
    description: str | None = None
    parameters: Mapping[str, Any] = attrs.field(factory=dict, eq=False)
    raw: Mapping[str, Any] | None = attrs.field(default=None, eq=False)

    def template_json(self) -> dict[str, Any]:
        """The tool as Hugging Face chat templates expect it."""
        if self.raw is not None:
            return dict(self.raw)
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = dict(self.parameters) or {"type": "object", "properties": {}}
        return {"type": "function", "function": function}


@attrs.frozen(kw_only=True)
class ImageRef:
    """An image of a chat turn, at character `offset` of the turn's text. The API layer fills
    in `source` as the client sent it (a data URL, bare base64, or an http(s) URL); the model's
    frontend decodes it (off the event loop, within the server's limits) into `image`."""

    source: str = attrs.field(default="", repr=False)
    offset: int = 0
    param: str = "messages"
    """The field the image came in, for the error of an image the server will not read."""
    image: DecodedImage | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def digest(self) -> str | None:
        return None if self.image is None else self.image.digest


@attrs.frozen(kw_only=True)
class ChatMessage:
    """One turn of a conversation, flattened to text for the chat template; tool calls, a tool
    result's call id, earlier reasoning and images travel as typed fields."""

    role: str
    content: str | None
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    reasoning: str | None = None
    images: tuple[ImageRef, ...] = ()

    def template_json(self) -> dict[str, Any]:
        # Templates concatenate content; a tool-call turn's null content is "" to them.
        entry: dict[str, Any] = {"role": self.role, "content": self.content or ""}
        if self.images:
            # Vision templates place one image placeholder per {"type": "image"} part.
            text, parts, at = self.content or "", [], 0
            for ref in sorted(self.images, key=lambda r: r.offset):
                if ref.offset > at:
                    parts.append({"type": "text", "text": text[at : ref.offset]})
                parts.append({"type": "image"})
                at = max(at, ref.offset)
            if at < len(text):
                parts.append({"type": "text", "text": text[at:]})
            entry["content"] = parts
        if self.name is not None:
            entry["name"] = self.name
        if self.tool_calls:
            entry["tool_calls"] = [
                {
                    "type": "function",
                    "function": {"name": c.name, "arguments": dict(c.arguments)},
                    **({"id": c.id} if c.id is not None else {}),
                }
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            entry["tool_call_id"] = self.tool_call_id
        if self.reasoning is not None:
            entry["reasoning_content"] = self.reasoning
        return entry


@attrs.frozen(kw_only=True)
class PromptSpec:
    """What to turn into prompt token ids: a chat, a raw text, or ids already tokenized."""

    chat: tuple[ChatMessage, ...] | None = None
    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    add_generation_prompt: bool = True
    tools: tuple[ToolSpec, ...] = ()
    template_kwargs: tuple[tuple[str, Any], ...] = ()
    prefill: str = ""  # text the assistant turn starts with (a forced tool call's markup)


ConstraintKind = Literal["json_object", "json_schema", "regex", "lark"]


@attrs.frozen(kw_only=True)
class ConstraintSpec:
    """A grammar the generated text must follow, enforced by masking tokens at every step
    (`engine.constrain` compiles it; its docstring documents each kind).

    `source` is the JSON text of a JSON Schema (`json_schema`), a regular expression (`regex`),
    a Lark grammar in llguidance's dialect (`lark`, which may embed `%json {schema}`), or ""
    (`json_object`: any JSON object). Build one with the class methods below; check it with
    `Frontend.check_constraint` (off the event loop) before starting a stream."""

    kind: ConstraintKind
    source: str = ""

    @classmethod
    def json_object(cls) -> ConstraintSpec:
        return cls(kind="json_object")

    @classmethod
    def json_schema(cls, schema: object) -> ConstraintSpec:
        """`schema`: a JSON Schema as parsed JSON (a dict) or as JSON text. Key order is kept:
        properties are generated in the schema's order."""
        text = schema if isinstance(schema, str) else json.dumps(schema)
        return cls(kind="json_schema", source=text)

    @classmethod
    def regex(cls, pattern: str) -> ConstraintSpec:
        return cls(kind="regex", source=pattern)

    @classmethod
    def lark(cls, grammar: str) -> ConstraintSpec:
        return cls(kind="lark", source=grammar)


@attrs.frozen(kw_only=True)
class OutputSpec:
    """How the stream layer reads a generation besides detokenizing it (`mlx_server.tools`):
    parse tool calls (when `tools_json` is set: the request's tools, for their schemas) and
    split `<think>` reasoning ("split": as ReasoningDelta; "drop": discarded; "off": left in
    the text). `prefill` is markup the prompt already ends with (a forced tool call's start),
    read before the generated text; `max_calls` 1 keeps only the first call."""

    tools_json: str | None = None
    reasoning: Literal["split", "drop", "off"] = "split"
    prefill: str = ""
    max_calls: int | None = None


@attrs.frozen(kw_only=True)
class Deadline:
    """When a request must be done, on the trio clock (`at`; inf: never), and the timeout it
    came from. One object from the request's arrival to its last event: waiting for a model to
    load, queueing, prefill and decode all spend the same budget."""

    at: float
    timeout: float

    @classmethod
    def starting(cls, now: float, timeout: float) -> Deadline:
        return cls(at=now + timeout if math.isfinite(timeout) else math.inf, timeout=timeout)

    def message(self, what: str = "request") -> str:
        return f"{what} timed out after {self.timeout:g} s"


@attrs.frozen(kw_only=True)
class GenerationRequest:
    """A request as the scheduler sees it, after the prompt has been tokenized."""

    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    max_tokens: int
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    constraint: ConstraintSpec | None = None
    vision: VisionInput | None = None
    """A prompt with images: `prompt_ids` are then its prefix-cache key (image tokens as
    negative ids derived from each image's content hash); the executor runs the vision
    encoder over `vision`."""


@attrs.frozen(kw_only=True)
class VisionInput:
    """What a vision model's processor reads: the rendered prompt (one image placeholder per
    image) and the decoded images, in order."""

    text: str = attrs.field(repr=False)
    images: tuple[DecodedImage, ...] = attrs.field(eq=False, repr=False)


# --------------------------------------------------------------------------------------------
# Scheduler <-> executor
# --------------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class CachedPrefix:
    """A stored KV state the executor holds under `handle`, covering `length` prompt tokens."""

    handle: int
    length: int


@attrs.frozen(kw_only=True)
class Admit:
    """Start prefilling a request (optionally from a cached prefix)."""

    request: GenerationRequest
    prefix: CachedPrefix | None = None


@attrs.frozen(kw_only=True)
class Abort:
    """Drop a request from the executor's batch at the next step boundary."""

    request_id: str


@attrs.frozen(kw_only=True)
class ReleaseCache:
    """The cache manager evicted these stored KV states; the executor frees them."""

    handles: tuple[int, ...]


@attrs.frozen(kw_only=True)
class Shutdown:
    """Stop the executor thread."""


ExecutorCommand = Admit | Abort | ReleaseCache | Shutdown


@attrs.frozen(kw_only=True)
class TopLogprob:
    token_id: int
    logprob: float


@attrs.frozen(kw_only=True)
class TokenOut:
    """One generated token of one request."""

    request_id: str
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[TopLogprob, ...] = ()


@attrs.frozen(kw_only=True)
class StoredCache:
    """A finished request's KV state, kept by the executor under `handle`."""

    handle: int
    token_ids: tuple[int, ...]
    nbytes: int
    # False: the state cannot be cut to a shorter prefix (recurrent state, a sliding window
    # that has moved on); it serves only prompts that continue all of `token_ids`.
    cuttable: bool = True


@attrs.frozen(kw_only=True)
class PrefillProgress:
    """A chunk of a request's prompt was processed (drives keepalives)."""

    request_id: str
    done: int
    total: int
    cached: int = 0


@attrs.frozen(kw_only=True)
class SequenceFinished:
    """The executor is done with a request: it hit EOS, its token limit, or was aborted."""

    request_id: str
    finish_reason: FinishReason
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    stored: StoredCache | None = None


@attrs.frozen(kw_only=True)
class SequenceFailed:
    """The request could not be completed: the executor raised, or the server is stopping."""

    request_id: str
    message: str
    kind: str = "api_error"
    status: int = 500


@attrs.frozen(kw_only=True)
class StepOutput:
    """Everything one executor step produced, in order."""

    events: tuple[TokenOut | PrefillProgress | SequenceFinished | SequenceFailed, ...]
    batch_size: int
    # Speculative decoding: draft tokens proposed and accepted in this step.
    drafted: int = 0
    accepted: int = 0
    # Bytes of KV cache held by the requests in the engine (-1: not reported this step), and
    # prompt-cache states loaded from disk this step.
    kv_bytes: int = -1
    disk_hits: int = 0


# --------------------------------------------------------------------------------------------
# Stream actor -> API handler
# --------------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@attrs.frozen(kw_only=True)
class TokenLogprob:
    """A generated token with its log-probability, as text and bytes for the API."""

    token: str
    token_id: int
    logprob: float
    top: tuple[tuple[str, int, float], ...] = ()


@attrs.frozen(kw_only=True)
class TextDelta:
    """New text for the client (never a broken UTF-8 sequence, never part of a stop string)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@attrs.frozen(kw_only=True)
class ReasoningDelta:
    """New reasoning text (what the model wrote inside `<think>…</think>`)."""

    text: str


@attrs.frozen(kw_only=True)
class ToolCallStart:
    """A tool call was parsed: its position among this generation's calls, a fresh id (hex;
    each API adds its own prefix) and the function's name. Its arguments follow."""

    index: int
    call_id: str
    name: str


@attrs.frozen(kw_only=True)
class ToolCallArgsDelta:
    """A fragment of a tool call's arguments (JSON object text); the fragments of one call
    concatenate to its complete arguments."""

    index: int
    arguments: str


@attrs.frozen(kw_only=True)
class Heartbeat:
    """The prompt is still being processed; lets SSE send a keepalive."""


@attrs.frozen(kw_only=True)
class Finished:
    """The generation ended normally (or by timeout); carries the usage."""

    finish_reason: FinishReason
    usage: Usage
    stop_sequence: str | None = None


@attrs.frozen(kw_only=True)
class Failed:
    """The generation ended with an error after it had started."""

    message: str
    kind: str = "api_error"
    status: int = 500


StreamEvent = (
    TextDelta | ReasoningDelta | ToolCallStart | ToolCallArgsDelta | Heartbeat | Finished | Failed
)
