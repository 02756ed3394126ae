"""Anthropic's Messages request shapes as typed models (`/v1/messages`, `count_tokens`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Discriminator, Field, Tag

from ..protocol import Int, Model, Number, Part

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
    return _GROUPS.get(value.get("type")) if isinstance(value, dict) else None  # type: ignore[arg-type]


class TextBlock(Part):
    type: Literal["text"]
    text: str


class MediaBlock(Part):
    """Images and documents: accepted by the shape, refused by a text-only model."""

    type: Literal["image", "document", "container_upload"]
    source: dict[str, Any] | None = None


class ThinkingBlock(Part):
    """Earlier thinking: dropped from the prompt, as Anthropic drops it."""

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
    role: Literal["user", "assistant"]
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
    """Extended thinking: `budget_tokens` is accepted, not enforced (the model stops thinking
    on its own)."""

    type: Literal["enabled", "disabled"]
    budget_tokens: Annotated[Int, Field(ge=1)] | None = None


class Metadata(Part):
    user_id: str | None = None


class CountTokensRequest(Model):
    model: Annotated[str, Field(min_length=1)]
    messages: Annotated[list[MessageIn], Field(min_length=1)]
    system: str | list[SystemText] | None = None
    tools: list[ToolIn] | None = None
    tool_choice: ToolChoiceIn | None = None
    thinking: Thinking | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: Annotated[Int, Field(ge=1)]
    temperature: Annotated[Number, Field(ge=0, le=1)] | None = None  # Anthropic's range
    top_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    top_k: Annotated[Int, Field(ge=0)] | None = None
    stop_sequences: list[str] | None = None
    stream: bool | None = None
    metadata: Metadata | None = None
