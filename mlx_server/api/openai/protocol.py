"""OpenAI's request shapes (chat completions, completions, embeddings) as typed models: the one
place each field and its limits are declared. Validation, the `param` of a field error and the
OpenAPI document all follow from these. Rules between fields are `convert.py`'s."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Discriminator, Field, Tag

from ..protocol import Int, Model, Number, Part, Stop, TokenId

MAX_N = 16
MAX_CHOICES = 128  # completions: prompts x n
MAX_LOGPROBS = 5  # completions
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit
SEED = Annotated[Int, Field(ge=-(2**63), le=2**63 - 1)]


# -- shared -----------------------------------------------------------------------------------


class StreamOptions(Part):
    include_usage: bool | None = None


class TextFormat(Part):
    type: Literal["text"] = "text"


class JsonObjectFormat(Part):
    type: Literal["json_object"]


class JsonSchemaSpec(Part):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="a JSON Schema")
    strict: bool | None = None


class JsonSchemaFormat(Part):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


def _format_tag(value: Any) -> str | None:
    if isinstance(value, dict):
        kind = value.get("type", "text")  # a missing type was always read as text
        return kind if isinstance(kind, str) else None
    return None


ResponseFormat = Annotated[
    Annotated[TextFormat, Tag("text")]
    | Annotated[JsonObjectFormat, Tag("json_object")]
    | Annotated[JsonSchemaFormat, Tag("json_schema")],
    Discriminator(_format_tag),
]


class Sampling(Model):
    """The sampling fields chat completions and completions share."""

    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    top_k: Annotated[Int, Field(ge=0)] | None = None
    min_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[Number, Field(ge=0.01, le=10)] | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    seed: SEED | None = None
    logit_bias: dict[str, Annotated[Number, Field(ge=-100, le=100)]] | None = None
    stop: Stop = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    n: Annotated[Int, Field(ge=1, le=MAX_N)] | None = None


# -- chat completions -------------------------------------------------------------------------


class TextPart(Part):
    type: Literal["text", "input_text"]
    text: str


class MediaPart(Part):
    """Images, audio and files: accepted by the shape, refused by a text-only model."""

    type: Literal["image_url", "input_image", "input_audio", "file"]
    image_url: dict[str, Any] | str | None = None
    input_audio: dict[str, Any] | None = None
    file: dict[str, Any] | None = None


ContentPart = Annotated[
    Annotated[TextPart, Tag("text")] | Annotated[MediaPart, Tag("media")],
    Discriminator(
        lambda v: (
            None
            if not isinstance(v, dict)
            else "text"
            if v.get("type") in ("text", "input_text")
            else "media"
            if v.get("type") in ("image_url", "input_image", "input_audio", "file")
            else None
        )
    ),
]


class FunctionCall(Part):
    name: str
    arguments: str | dict[str, Any] = "{}"  # JSON text, as OpenAI sends it (or an object)


class ToolCallIn(Part):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessageIn(Part):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[str | ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDef(Part):
    name: Annotated[str, Field(min_length=1)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Part):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(Part):
    name: str


class NamedToolChoice(Part):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(Sampling):
    param_roots: ClassVar[frozenset[str]] = frozenset({"response_format", "logit_bias", "stop"})

    model: str | None = None
    messages: Annotated[list[ChatMessageIn], Field(min_length=1)]
    max_tokens: Annotated[Int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[Int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[Int, Field(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None


# -- completions ------------------------------------------------------------------------------

PROMPT_FORMS = "a string, a list of strings, a list of token ids or a list of lists of token ids"

Prompt = (
    str
    | Annotated[list[TokenId], Field(min_length=1)]
    | Annotated[list[str], Field(min_length=1)]
    | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
)


class CompletionRequest(Sampling):
    param_roots: ClassVar[frozenset[str]] = frozenset(
        {"prompt", "response_format", "logit_bias", "stop"}
    )
    root_messages: ClassVar[Mapping[str, str]] = {
        "prompt": f"'prompt' must be {PROMPT_FORMS} (token ids: non-negative integers)"
    }

    model: str | None = None
    prompt: Prompt
    suffix: str | None = None
    best_of: Annotated[Int, Field(ge=1, le=MAX_N)] | None = None
    max_tokens: Annotated[Int, Field(ge=0)] | None = None
    logprobs: Annotated[Int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool | None = None


# -- embeddings -------------------------------------------------------------------------------

EmbeddingInput = (
    Annotated[str, Field(min_length=1)]
    | Annotated[list[TokenId], Field(min_length=1)]
    | Annotated[
        list[Annotated[str, Field(min_length=1)]],
        Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS),
    ]
    | Annotated[
        list[Annotated[list[TokenId], Field(min_length=1)]],
        Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS),
    ]
)


class EmbeddingRequest(Model):
    param_roots: ClassVar[frozenset[str]] = frozenset({"input"})
    root_messages: ClassVar[Mapping[str, str]] = {
        "input": f"'input' must be {PROMPT_FORMS.replace('a string', 'a non-empty string')}, "
        f"at most {MAX_EMBEDDING_INPUTS} inputs"
    }

    model: str | None = None
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[Int, Field(ge=1)] | None = None
    user: str | None = None
