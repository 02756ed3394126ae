"""OpenAI's request shapes (chat completions, completions, embeddings) as typed models: the one
place each field and its limits are declared. Validation, the `param` of a field error and the
OpenAPI document all follow from these. Rules between fields are `convert.py`'s."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Discriminator, Field, Tag

from ..protocol import INTEGRAL, Model, Number, Part, Response, Stop, TokenId

MAX_N = 16
MAX_CHOICES = 128  # completions: prompts x n
MAX_LOGPROBS = 5  # completions
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit
SEED = Annotated[int, Field(ge=-(2**63), le=2**63 - 1), INTEGRAL]


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


class StructuredOutputs(Part):
    """vLLM's `structured_outputs`: exactly one of a JSON Schema (`json`), a regular expression,
    a list of choices, a Lark grammar, or any JSON object."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1)] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class Sampling(Model):
    """The sampling fields chat completions and completions share."""

    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0), INTEGRAL] | None = None
    min_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[Number, Field(ge=0.01, le=10)] | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    seed: SEED | None = None
    logit_bias: (
        dict[Annotated[str, Field(pattern=r"^[0-9]+$")], Annotated[Number, Field(ge=-100, le=100)]]
        | None
    ) = None
    stop: Stop = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None
    response_format: ResponseFormat | None = None
    # The constrained decoder as vLLM and llama.cpp expose it (one constraint per request).
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None
    guided_grammar: str | None = None
    json_schema: dict[str, Any] | None = None  # llama.cpp's top-level schema
    grammar: str | None = None  # llama.cpp's top-level grammar (Lark syntax here)
    user: str | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N), INTEGRAL] | None = None
    # This server's extension: a `timings` object (prompt and generation tokens per second,
    # cached tokens, time to first token) on the response and on a stream's last chunk.
    timings: bool | None = None


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
    type: Literal["function"] | None = None
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
    max_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20), INTEGRAL] | None = None
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
    best_of: Annotated[int, Field(ge=1, le=MAX_N), INTEGRAL] | None = None
    max_tokens: Annotated[int, Field(ge=0), INTEGRAL] | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), INTEGRAL] | None = None
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
    encoding_format: Literal["float", "base64"] | None = None  # null: "float"
    dimensions: Annotated[int, Field(ge=1), INTEGRAL] | None = None
    user: str | None = None


# -- responses --------------------------------------------------------------------------------


class PromptTokensDetails(Response):
    cached_tokens: int


class Usage(Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(Response):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Response):
    content: list[TokenLogprob] | None
    refusal: list[Any] | None = None


class FunctionOut(Response):
    name: str
    arguments: str


class ToolCallOut(Response):
    id: str
    type: Literal["function"]
    function: FunctionOut


class AssistantMessage(Response):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCallOut] | None = None
    reasoning_content: str | None = None


class ChatChoice(Response):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: Literal["stop", "length", "tool_calls"]


class Timings(Response):
    """How fast the request ran (with `"timings": true`), in llama.cpp's names: the prompt
    phase runs from arrival to the first generated piece, the generation phase from there to
    the end. `prompt_n` counts the prompt tokens processed (not served from the prompt cache,
    `cache_n`); the generation rate counts the tokens after the first."""

    prompt_n: int
    prompt_ms: float
    prompt_per_token_ms: float | None
    prompt_per_second: float | None
    predicted_n: int
    predicted_ms: float
    predicted_per_token_ms: float | None
    predicted_per_second: float | None
    cache_n: int
    prompt_tokens: int
    ttft_ms: float | None


class Envelope(Response):
    id: str
    created: int
    model: str
    system_fingerprint: str | None = None
    timings: Timings | None = None  # the whole response, or a stream's last chunk


class ChatCompletion(Envelope):
    object: Literal["chat.completion"]
    choices: Annotated[list[ChatChoice], Field(min_length=1)]
    usage: Usage


class ChunkFunction(Response):
    name: str | None = None
    arguments: str | None = None


class ChunkToolCall(Response):
    """index, id, type and name first; then fragments of `function.arguments`."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ChunkFunction | None = None


class ChunkDelta(Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ChunkToolCall] | None = None


class ChunkChoice(Response):
    index: int
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None


class ChatCompletionChunk(Envelope):
    object: Literal["chat.completion.chunk"]
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(Response):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(Response):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class Completion(Envelope):
    """A whole completion (with usage) or one stream chunk."""

    object: Literal["text_completion"]
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Embedding(Response):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | Annotated[str, Field(json_schema_extra={"contentEncoding": "base64"})]


class EmbeddingUsage(Response):
    prompt_tokens: int
    total_tokens: int


class Embeddings(Response):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelMetadata(Response):
    """This server's extension of the model object (`GET /v1/models`)."""

    state: Literal["loaded", "loading", "available"]
    default: bool
    aliases: list[str]
    size_bytes: int
    context_length: int | None
    unload_in: float | None = Field(description="seconds until an idle unload (--idle-unload)")
    load_error: str | None = None


class ModelCard(Response):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    metadata: ModelMetadata | None = None


class ModelList(Response):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorDetail(Response):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(Response):
    """OpenAI's error shape."""

    error: ErrorDetail
