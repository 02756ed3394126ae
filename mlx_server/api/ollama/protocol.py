"""Ollama's request shapes as typed models: the one place each field and its limits are declared.
A field error is a 400 naming the field's path (`options.num_predict`, `messages[0].role`) in
Ollama's `{"error": ...}` shape. Rules between fields are `convert.py`'s.

Options this server has no use for (`num_ctx`, `num_gpu`, `mirostat`, ...) and fields it does not
know are accepted and ignored, as Ollama ignores options a runner does not support.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from ..protocol import Int, Model, Number, Part, Response

FORMAT_MESSAGE = "'format' must be \"json\" or a JSON Schema object"
THINK_MESSAGE = "'think' must be a boolean or one of 'low', 'medium', 'high'"
MAX_STOPS = 16
KEEP_ALIVE_MESSAGE = "'keep_alive' must be a number of seconds or a duration such as \"5m\""


class Options(Part):
    """Sampling under Ollama's names (`repeat_penalty`, `num_predict`: -1 and -2 mean "until the
    context is full")."""

    num_predict: Int | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    top_k: Annotated[Int, Field(ge=0)] | None = None
    min_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    seed: Annotated[Int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    stop: Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    repeat_penalty: Annotated[Number, Field(ge=0.01, le=10)] | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None


class CalledFunction(Part):
    name: Annotated[str, Field(min_length=1)]
    arguments: dict[str, Any] | str = Field(default_factory=dict)  # an object (or JSON text)


class ToolCall(Part):
    id: str | None = None
    function: CalledFunction


class Message(Part):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    thinking: str | None = None
    images: list[Annotated[str, Field(min_length=1)]] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None


class ToolFunction(Part):
    name: Annotated[str, Field(min_length=1)]
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(Part):
    type: Literal["function"] = "function"
    function: ToolFunction


Format = Literal["", "json"] | dict[str, Any]
Think = bool | Literal["low", "medium", "high"]
KeepAlive = Number | str
ModelName = Annotated[str, Field(min_length=1)]


class _Request(Model):
    param_roots: ClassVar[frozenset[str]] = frozenset({"format", "think", "keep_alive"})
    root_messages: ClassVar[Mapping[str, str]] = {
        "format": FORMAT_MESSAGE,
        "think": THINK_MESSAGE,
        "keep_alive": KEEP_ALIVE_MESSAGE,
    }

    model: ModelName
    options: Options | None = None
    keep_alive: KeepAlive | None = None


class ChatRequest(_Request):
    """`/api/chat`; an empty `messages` loads the model (`keep_alive: 0`: unloads it)."""

    messages: list[Message] | None = None
    tools: list[Tool] | None = None
    format: Format | None = None
    stream: bool | None = None  # None: true
    think: Think | None = None


class GenerateRequest(_Request):
    """`/api/generate`; an empty `prompt` loads the model (`keep_alive: 0`: unloads it)."""

    prompt: str | None = None
    system: str | None = None
    images: list[Annotated[str, Field(min_length=1)]] | None = None
    raw: bool | None = None
    suffix: str | None = None  # fill-in-the-middle: refused
    template: str | None = None  # template overrides: refused
    context: list[Int] | None = None  # the deprecated conversation state: ignored
    format: Format | None = None
    stream: bool | None = None
    think: Think | None = None


class EmbedRequest(_Request):
    param_roots: ClassVar[frozenset[str]] = frozenset({"input", "keep_alive"})
    root_messages: ClassVar[Mapping[str, str]] = {
        "input": "'input' must be a string or an array of strings",
        "keep_alive": KEEP_ALIVE_MESSAGE,
    }

    input: str | list[str]
    truncate: bool | None = None  # None: true
    dimensions: Annotated[Int, Field(ge=1)] | None = None


class EmbeddingsRequest(_Request):
    """The legacy `/api/embeddings`: one `prompt`."""

    prompt: str | None = None


class PullRequest(Model):
    """`/api/pull`: a Hugging Face repo id (`org/name`, optionally `hf.co/org/name` or with
    `:latest`)."""

    model: str | None = None
    name: str | None = None  # the older clients' field
    insecure: bool | None = None  # accepted, ignored
    stream: bool | None = None  # None: true


class ShowRequest(Model):
    model: str | None = None
    name: str | None = None  # the older clients' field
    verbose: bool | None = None


# -- responses (for the OpenAPI document; the renderers write plain dicts of these shapes) --------


class ModelDetails(Response):
    parent_model: str
    format: str
    family: str
    families: list[str] | None
    parameter_size: str
    quantization_level: str


class TagModel(Response):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class Tags(Response):
    models: list[TagModel]


class RunningModel(TagModel):
    expires_at: str
    size_vram: int
    context_length: int


class Running(Response):
    models: list[RunningModel]


class ShowResponse(Response):
    license: str
    modelfile: str
    parameters: str
    template: str
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class Version(Response):
    version: str


class CalledFunctionOut(Response):
    index: int
    name: str
    arguments: dict[str, Any]


class ToolCallOut(Response):
    id: str
    function: CalledFunctionOut


class MessageOut(Response):
    role: Literal["assistant"]
    content: str
    thinking: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class _Answer(Response):
    """One NDJSON line of a stream (`done: false`), or the last / the whole answer (`done: true`,
    with `done_reason`, the counts and the durations in nanoseconds)."""

    model: str
    created_at: str
    done: bool
    done_reason: Literal["stop", "length", "load", "unload"] | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class ChatAnswer(_Answer):
    message: MessageOut


class GenerateAnswer(_Answer):
    response: str
    thinking: str | None = None


class Embedded(Response):
    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int
    prompt_eval_count: int


class EmbeddedLegacy(Response):
    embedding: list[float]


class OllamaError(Response):
    error: str


class PullStatus(Response):
    """One line of a pull: `pulling manifest`, then progress (`digest`, `total`, `completed`
    bytes), then `success`."""

    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None
