"""Anthropic's Messages request shapes as typed models (`/v1/messages`, `count_tokens`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Discriminator, Field, Tag

from ..protocol import INTEGRAL, Model, Number, Part, Response

_GROUPS = {
    "text": "text",
    "image": "media",
    "document": "media",
    "container_upload": "media",
    "thinking": "thinking",
    "redacted_thinking": "thinking",
    "tool_use": "tool_use",
    "server_tool_use": "tool_use",
    "tool_result": "tool_result",
}


def _block_tag(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else None
    return _GROUPS.get(kind) if isinstance(kind, str) else None


class TextBlock(Part):
    type: Literal["text"]
    text: str


class MediaBlock(Part):
    """Images and documents: accepted by the shape, refused by a text-only model."""

    type: Literal["image", "document", "container_upload"]
    source: dict[str, Any] | None = None


class ThinkingBlock(Part):
    """Earlier thinking: the assistant turn's reasoning for the template (which decides
    whether to show it: Qwen3's shows it only after the last user turn); redacted thinking has
    no text and is dropped."""

    type: Literal["thinking", "redacted_thinking"]
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None


class ToolUseBlock(Part):
    type: Literal["tool_use", "server_tool_use"]
    id: str | None = None
    name: Annotated[str, Field(min_length=1)]
    input: dict[str, Any] = Field(default_factory=dict)


class ToolResultBlock(Part):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[Block] | None = None
    is_error: bool | None = None


Block = Annotated[
    Annotated[TextBlock, Tag("text")]
    | Annotated[MediaBlock, Tag("media")]
    | Annotated[ThinkingBlock, Tag("thinking")]
    | Annotated[ToolUseBlock, Tag("tool_use")]
    | Annotated[ToolResultBlock, Tag("tool_result")],
    Discriminator(_block_tag),
]
ToolResultBlock.model_rebuild()


class MessageIn(Part):
    """A turn; `system` / `developer` entries are mid-conversation system text (Anthropic's
    beta `mid-conversation-system`), kept where they stand (`generation.system_turns`)."""

    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Block]


class SystemText(Part):
    type: Literal["text"]
    text: str


class ToolIn(Part):
    """A custom tool (`input_schema`), or a server tool (web search, bash, ...) that the
    template sees as given."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)
    name: str
    type: str | None = None
    description: str | None = None
    input_schema: dict[str, Any] | None = None


class ToolChoiceIn(Part):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(Part):
    """Extended thinking: "enabled" (with `budget_tokens`, accepted, not enforced: the model
    stops thinking on its own), "adaptive" (the model decides; `display` "omitted" leaves the
    thinking out of the response), "disabled", or "between_tools" (thinking off; whatever
    reasoning the model still writes comes back as thinking blocks)."""

    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = None
    display: Literal["summarized", "omitted"] | None = None


class JsonOutputFormat(Part):
    """Structured output: the answer is JSON valid against `schema`, enforced by constrained
    decoding (a schema the engine cannot enforce is a 400 before anything is generated)."""

    type: Literal["json_schema"]
    json_schema: Annotated[dict[str, Any], Field(alias="schema")]


class OutputConfig(Part):
    """`effort` goes to the chat template as `reasoning_effort` (low / medium / high; xhigh and
    max as high); `format` is structured output."""

    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: JsonOutputFormat | None = None


class Metadata(Part):
    user_id: str | None = None


class CountTokensRequest(Model):
    model: Annotated[str, Field(min_length=1)]
    messages: Annotated[list[MessageIn], Field(min_length=1)]
    system: str | list[SystemText] | None = None
    tools: list[ToolIn] | None = None
    tool_choice: ToolChoiceIn | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    output_format: JsonOutputFormat | None = None  # the older name of output_config.format


class MessagesRequest(CountTokensRequest):
    max_tokens: Annotated[int, Field(ge=1), INTEGRAL]
    temperature: Annotated[Number, Field(ge=0, le=1)] | None = None  # Anthropic's range
    top_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0), INTEGRAL] | None = None
    stop_sequences: list[str] | None = None
    stream: bool | None = None
    metadata: Metadata | None = None


# -- responses --------------------------------------------------------------------------------

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class AnthropicUsage(Response):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class TextOut(Response):
    type: Literal["text"]
    text: str


class ThinkingOut(Response):
    type: Literal["thinking"]
    thinking: str
    signature: str


class ToolUseOut(Response):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


BlockOut = Annotated[TextOut | ThinkingOut | ToolUseOut, Field(discriminator="type")]


class AnthropicMessage(Response):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[BlockOut]
    stop_reason: StopReason | None
    stop_sequence: str | None
    usage: AnthropicUsage


class TokenCount(Response):
    input_tokens: int


class AnthropicErrorDetail(Response):
    type: Literal[
        "invalid_request_error",
        "authentication_error",
        "permission_error",
        "not_found_error",
        "request_too_large",
        "rate_limit_error",
        "api_error",
        "overloaded_error",
        "timeout_error",
    ]
    message: str


class AnthropicError(Response):
    """Anthropic's error shape (also a stream's `error` event)."""

    type: Literal["error"]
    error: AnthropicErrorDetail


class MessageStart(Response):
    type: Literal["message_start"]
    message: AnthropicMessage


class Ping(Response):
    type: Literal["ping"]


class ContentBlockStart(Response):
    type: Literal["content_block_start"]
    index: int
    content_block: BlockOut


class TextDeltaOut(Response):
    type: Literal["text_delta"]
    text: str


class ThinkingDeltaOut(Response):
    type: Literal["thinking_delta"]
    thinking: str


class SignatureDeltaOut(Response):
    type: Literal["signature_delta"]
    signature: str


class InputJsonDeltaOut(Response):
    type: Literal["input_json_delta"]
    partial_json: str


class ContentBlockDelta(Response):
    type: Literal["content_block_delta"]
    index: int
    delta: Annotated[
        TextDeltaOut | ThinkingDeltaOut | SignatureDeltaOut | InputJsonDeltaOut,
        Field(discriminator="type"),
    ]


class ContentBlockStop(Response):
    type: Literal["content_block_stop"]
    index: int


class StopDelta(Response):
    stop_reason: StopReason | None
    stop_sequence: str | None


class MessageDelta(Response):
    type: Literal["message_delta"]
    delta: StopDelta
    usage: AnthropicUsage


class MessageStop(Response):
    type: Literal["message_stop"]


# The events of a stream, by SSE event name.
STREAM_EVENTS: dict[str, type[Response]] = {
    "message_start": MessageStart,
    "ping": Ping,
    "content_block_start": ContentBlockStart,
    "content_block_delta": ContentBlockDelta,
    "content_block_stop": ContentBlockStop,
    "message_delta": MessageDelta,
    "message_stop": MessageStop,
    "error": AnthropicError,
}
