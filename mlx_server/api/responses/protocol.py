"""OpenAI's Responses API request (`POST /v1/responses`, `/v1/responses/input_tokens`) as a
typed model: the one place its top-level fields and their limits are declared. Input items and
tools come in many shapes (see `convert.py`, which checks each and names the failing field);
here they are typed as the JSON they are."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from ..protocol import Int, Model, Number, Part, Response

MAX_METADATA = 16


class Reasoning(Part):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class TextConfig(Part):
    format: dict[str, Any] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class StreamOptions(Part):
    include_obfuscation: bool | None = None


class ResponsesRequest(Model):
    """`POST /v1/responses`."""

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: Reasoning | None = None
    max_output_tokens: Annotated[Int, Field(ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    top_logprobs: Annotated[Int, Field(ge=0, le=20)] | None = None
    metadata: dict[str, str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None
    user: str | None = None
    service_tier: str | None = None
    background: bool | None = None
    max_tool_calls: Annotated[Int, Field(ge=1)] | None = None

    param_roots = frozenset({"input", "tool_choice", "tools"})

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        if len(value) > MAX_METADATA:
            raise ValueError(f"at most {MAX_METADATA} keys")
        for key, item in value.items():
            if len(key) > 64:
                raise ValueError(f"key {key[:20]!r}... is longer than 64 characters")
            if len(item) > 512:
                raise ValueError(f"the value of {key!r} is longer than 512 characters")
        return value


class InputTokensRequest(ResponsesRequest):
    """`POST /v1/responses/input_tokens`: the same fields; `input` may be left out when
    `previous_response_id` carries the conversation."""

    input: str | list[dict[str, Any]] = Field(default_factory=list)


# -- response shapes (for the OpenAPI document) ------------------------------------------------


class ResponseObject(Response):
    """A response: output items (`message`, `reasoning`, `function_call`, `custom_tool_call`)
    and usage, with the request-derived fields echoed."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete", "failed", "in_progress"]
    model: str | None = None
    output: list[dict[str, Any]]
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, Any] | None = None
    instructions: str | None = None
    tools: list[dict[str, Any]] = []
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    metadata: dict[str, str] = {}
    previous_response_id: str | None = None
    store: bool = True
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None


class ResponseEvent(Response):
    """One event of a Responses stream; `type` names it and `sequence_number` orders it."""

    type: str
    sequence_number: int


class InputTokens(Response):
    object: Literal["response.input_tokens"]
    input_tokens: int


class DeletedResponse(Response):
    id: str
    object: Literal["response"]
    deleted: bool


class InputItemList(Response):
    object: Literal["list"]
    data: list[dict[str, Any]]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool
