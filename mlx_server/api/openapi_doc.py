"""The server's own OpenAPI 3.1 document, served open (no key) at `GET /openapi.json`.

Schemas are plain dicts, written to match what the handlers actually check, so that generic
tools (schemathesis, client generators) can rely on them:

- A field the handler reads with a type check is documented with that type and range; an
  optional field also admits `null`, because every handler treats `null` as absent.
- A field the handler accepts but ignores (`user` on chat, a message's `name`, ...) is documented
  without a type: anything is accepted. Unknown fields are ignored everywhere, so no object
  sets `additionalProperties: false`.
- Checks that depend on the running server (the model's name and aliases, the vocabulary size,
  whether `--api-key` is set) come from it: the document is built per request from the loaded
  model, so `model`, token ids and `logit_bias` keys are exact. While the model loads these are
  left open.
- Streams (`"stream": true`) are `text/event-stream`. As OpenAPI 3.1 has it, the stream's schema
  describes one event, `{"event": name, "data": text}`; `data` is JSON described with
  `contentMediaType`/`contentSchema` (OpenAI streams end with the literal `[DONE]`).
- Errors: OpenAI's `{"error": {...}}` on OpenAI routes, Anthropic's `{"type": "error", "error":
  {...}}` on `/v1/messages*`, with every status a route can answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import metadata
from typing import Any

from quart import Quart

from ..config import Settings
from .openai import protocol as openai
from .state import state

Schema = dict[str, Any]

OPENAPI_VERSION = "3.1.0"
DOCUMENT_PATH = "/openapi.json"

# Limits the handlers enforce: their own constants where they have one, else the literal they
# check (tests/test_fuzz.py's negative fuzzing fails when a documented limit is not enforced).
CHAT_MAX_N = openai.MAX_N
COMPLETIONS_MAX_N = openai.MAX_N
COMPLETIONS_MAX_LOGPROBS = openai.MAX_LOGPROBS
EMBEDDINGS_MAX_INPUTS = openai.MAX_EMBEDDING_INPUTS
MAX_STOP_SEQUENCES = 4  # params.Fields.stop_list
MAX_TOP_LOGPROBS = 20  # openai.chat_completions


def _version() -> str:
    try:
        return metadata.version("mlx-server")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0.0.0"


# -- small schema builders -----------------------------------------------------------------------


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema) -> Schema:
    """`schema` or `null` (every handler treats a `null` field as absent)."""
    kind = schema.get("type")
    if isinstance(kind, str) and "enum" not in schema and "const" not in schema:
        return {**schema, "type": [kind, "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def _number(lo: float, hi: float, description: str) -> Schema:
    return _nullable({"type": "number", "minimum": lo, "maximum": hi, "description": description})


def _integer(description: str, lo: int | None = None, hi: int | None = None) -> Schema:
    schema: Schema = {"type": "integer", "description": description}
    if lo is not None:
        schema["minimum"] = lo
    if hi is not None:
        schema["maximum"] = hi
    return _nullable(schema)


def _boolean(description: str) -> Schema:
    return _nullable({"type": "boolean", "description": description})


def _obj(properties: dict[str, Schema], required: Sequence[str] = (), **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    schema.update(extra)
    return schema


def _openai_tool_fields() -> dict[str, Schema]:
    """Tool calling and reasoning fields of a chat request (`api.tools`)."""
    function = _obj(
        {
            "name": {"type": "string", "minLength": 1},
            "description": _nullable({"type": "string"}),
            "parameters": _nullable({"type": "object", "description": "A JSON Schema."}),
        },
        ["name"],
    )
    named = _obj(
        {"type": {"const": "function"}, "function": _obj({"name": {"type": "string"}}, ["name"])},
        ["type", "function"],
    )
    return {
        "tools": _nullable(
            {
                "type": "array",
                "items": _obj({"type": {"const": "function"}, "function": function}, ["function"]),
                "description": "Functions the model may call; calls are parsed out of its "
                "output in its family's markup.",
            }
        ),
        "tool_choice": _nullable(
            {
                "anyOf": [{"enum": ["none", "auto", "required"]}, named],
                "description": "'required' or a named function (one of `tools`, else 400) "
                "forces a call; 'none' parses none. Needs `tools` unless 'none' or 'auto'.",
            }
        ),
        "parallel_tool_calls": _boolean("false: only the first call is returned."),
        "chat_template_kwargs": _nullable(
            {"type": "object", "description": "Extra chat template variables (enable_thinking)."}
        ),
        "reasoning_effort": _nullable(
            {"type": "string", "description": "'none' renders with enable_thinking false."}
        ),
    }


def _anthropic_tool_fields() -> dict[str, Schema]:
    no_parallel = _boolean("true: only the first tool_use block is returned.")
    return {
        "tool_choice": _nullable(
            {
                "anyOf": [
                    _obj(
                        {
                            "type": {"enum": ["auto", "any", "none"]},
                            "disable_parallel_tool_use": no_parallel,
                        },
                        ["type"],
                    ),
                    _obj(
                        {
                            "type": {"const": "tool"},
                            "name": {"type": "string", "minLength": 1},
                            "disable_parallel_tool_use": no_parallel,
                        },
                        ["type", "name"],
                    ),
                ],
                "description": "'any' / 'tool' (a name in `tools`, else 400) force a call.",
            }
        ),
        "thinking": _nullable(
            {
                "anyOf": [
                    _obj(
                        {
                            "type": {"const": "enabled"},
                            "budget_tokens": {"type": "integer", "minimum": 1},
                        },
                        ["type", "budget_tokens"],
                    ),
                    _obj({"type": {"const": "disabled"}}, ["type"]),
                ],
                "description": "Enabled: reasoning comes back as thinking blocks (the budget is "
                "not enforced); else it is dropped and the template gets enable_thinking false.",
            }
        ),
    }


_TOOL_CALL_SCHEMA = _obj(
    {
        "id": {"type": "string"},
        "type": {"const": "function"},
        "function": _obj(
            {"name": {"type": "string"}, "arguments": {"type": "string"}}, ["name", "arguments"]
        ),
    },
    ["id", "type", "function"],
)
_ANTHROPIC_BLOCKS = [
    _obj({"type": {"const": "text"}, "text": {"type": "string"}}, ["type", "text"]),
    _obj(
        {
            "type": {"const": "thinking"},
            "thinking": {"type": "string"},
            "signature": {"type": "string"},
        },
        ["type", "thinking", "signature"],
    ),
    _obj(
        {
            "type": {"const": "tool_use"},
            "id": {"type": "string"},
            "name": {"type": "string"},
            "input": {"type": "object"},
        },
        ["type", "id", "name", "input"],
    ),
]


def _response_format() -> Schema:
    """Structured output (`api.structured`): plain text, any JSON object, or a JSON Schema,
    enforced by constrained decoding; a schema that cannot be enforced is a 400."""
    schema = {
        "type": "object",
        "properties": {
            "name": _nullable({"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}),
            "strict": _boolean("Accepted; the schema is always enforced."),
            "schema": {"type": "object", "description": "A JSON Schema."},
            "description": {"description": "Accepted and ignored."},
        },
        "required": ["schema"],
    }
    return _nullable(
        {
            "anyOf": [
                _obj({"type": {"enum": ["text", None]}}),
                _obj({"type": {"const": "json_object"}}, required=["type"]),
                _obj(
                    {"type": {"const": "json_schema"}, "json_schema": schema},
                    required=["type", "json_schema"],
                ),
            ],
            "description": "Structured output, enforced by constrained decoding.",
        }
    )


_REGEX_SPECIALS = set("\\^$.|?*+()[]{}")


def _literal(c: str) -> str:
    """One character of a name as an ECMA-262 regex, matching either case."""
    if len(c.upper()) == 1 and c.lower() != c.upper():
        return f"[{c.lower()}{c.upper()}]"
    return "\\" + c if c in _REGEX_SPECIALS else c


def _name_pattern(name: str) -> str:
    """A regex matching `name` case-insensitively, as `Frontend.serves` compares names."""
    return "^" + "".join(_literal(c) for c in name) + "$"


def _glob_pattern(glob: str) -> str:
    """A regex for a shell-style alias pattern (`claude-*`), case-insensitive like `fnmatch`
    on lowered names."""
    out: list[str] = []
    i = 0
    while i < len(glob):
        c = glob[i]
        if c == "*":
            out.append("[\\s\\S]*")
        elif c == "?":
            out.append("[\\s\\S]")
        elif c == "[" and "]" in glob[i + 2 :]:
            end = glob.index("]", i + 2)
            body = glob[i + 1 : end]
            negate = body.startswith("!")
            body = body[1:] if negate else body
            chars = "".join("\\" + ch if ch in "\\^]" else ch for ch in body.lower())
            chars += "".join("\\" + ch if ch in "\\^]" else ch for ch in body.upper())
            out.append("[" + ("^" if negate else "") + chars + "]")
            i = end
        else:
            out.append(_literal(c))
        i += 1
    return "^" + "".join(out) + "$"


# -- the document --------------------------------------------------------------------------------


class _Builder:
    """Builds the document for one server: its model names, vocabulary and auth setting."""

    def __init__(
        self,
        *,
        model_names: Sequence[str],
        model_aliases: Sequence[str],
        vocab_size: int | None,
        context_length: int | None,
        auth_required: bool,
    ) -> None:
        self.model_names = list(model_names)
        self.model_aliases = list(model_aliases)
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.auth_required = auth_required

    # -- shared pieces ------------------------------------------------------------------------

    def model_name(self, *, required: bool) -> Schema:
        """A served model's name. Names are matched case-insensitively; aliases may be patterns."""
        description = (
            "The served model: its name (case-insensitive), the last part of a repo id, "
            "'default', or an alias (`--model-aliases`). Other names get 404 model_not_found."
        )
        if not self.model_names:
            named: Schema = {"type": "string", "minLength": 1}
        else:
            patterns = [_name_pattern(n) for n in dict.fromkeys(self.model_names)]
            patterns += [_glob_pattern(a) for a in self.model_aliases]
            named = {
                "type": "string",
                "minLength": 1,
                "anyOf": [{"pattern": p} for p in patterns],
                "examples": [self.model_names[0]],
            }
        if required:
            return {**named, "description": description}
        return {
            "anyOf": [named, {"type": "string", "maxLength": 0}, {"type": "null"}],
            "description": description + " Optional: absent, null or '' mean the served model.",
        }

    def context_note(self) -> str:
        if self.context_length is None:
            return ""
        return f" The model's context holds {self.context_length} tokens, prompt included."

    def token_id(self) -> Schema:
        schema: Schema = {"type": "integer", "minimum": 0}
        if self.vocab_size:
            schema["maximum"] = self.vocab_size - 1
        return schema

    def token_id_key(self) -> Schema:
        """A `logit_bias` key: a token id written in decimal."""
        return {"type": "string", "pattern": "^[0-9]+$"}

    def stop(self, description: str) -> Schema:
        return {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOP_SEQUENCES},
                {"type": "null"},
            ],
            "description": description,
        }

    def sampling(self) -> dict[str, Schema]:
        """The sampling fields of the OpenAI routes (`openai.parse_sampling`)."""
        return {
            "temperature": _number(0, 2, "Sampling temperature; 0 is greedy. Default 1."),
            "top_p": _number(0, 1, "Nucleus sampling mass. Default 1 (off)."),
            "top_k": _integer("Sample from the k most likely tokens; 0 is off.", lo=0),
            "min_p": _number(0, 1, "Drop tokens below min_p x the top probability. Default 0."),
            "repetition_penalty": _number(0.01, 10, "Penalty for repeated tokens. Default 1."),
            "presence_penalty": _number(-2, 2, "OpenAI's presence penalty. Default 0."),
            "frequency_penalty": _number(-2, 2, "OpenAI's frequency penalty. Default 0."),
            "seed": _integer(
                "Same seed, same output (with n > 1 choice j uses seed + j).", -(2**63), 2**63 - 1
            ),
            "logit_bias": _nullable(
                {
                    "type": "object",
                    "description": "Token id (as a string) -> bias in [-100, 100].",
                    "propertyNames": self.token_id_key(),
                    "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                }
            ),
        }

    def stream_options(self) -> Schema:
        return _nullable(
            {
                "type": "object",
                "description": "Only with `stream: true` (else 400).",
                "properties": {
                    "include_usage": {
                        "description": "Truthy: a last chunk with `usage` and no choices."
                    }
                },
            }
        )

    # -- requests -----------------------------------------------------------------------------

    def chat_request(self) -> Schema:
        text_part = _obj(
            {"type": {"enum": ["text", "input_text"]}, "text": {"type": "string"}},
            required=["type", "text"],
        )
        content = {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"anyOf": [{"type": "string"}, text_part]}},
            ]
        }
        common: dict[str, Schema] = {
            "name": {"description": "Passed to the chat template when a string; else ignored."},
            "tool_calls": {"description": "Passed to the chat template as given."},
            "tool_call_id": {"description": "Passed to the chat template as given."},
            "reasoning_content": {"description": "Passed to the chat template as given."},
        }
        message = {
            "anyOf": [
                _obj(
                    {
                        "role": {"enum": ["system", "developer", "user"]},
                        "content": content,
                        **common,
                    },
                    required=["role", "content"],
                ),
                _obj(
                    {
                        "role": {"enum": ["assistant", "tool", "function"]},
                        "content": {"anyOf": [content, {"type": "null"}]},
                        **common,
                    },
                    required=["role"],
                ),
            ]
        }
        return _obj(
            {
                "model": self.model_name(required=False),
                "messages": {"type": "array", "minItems": 1, "items": message},
                "stream": _boolean("Stream chunks as server-sent events."),
                "stream_options": self.stream_options(),
                "n": _integer("Choices to generate (they batch together).", 1, CHAT_MAX_N),
                "max_completion_tokens": _integer(
                    "Most tokens to generate; clamped to the room left in the context."
                    + self.context_note(),
                    lo=1,
                ),
                "max_tokens": {
                    "description": "Older name of max_completion_tokens: an integer >= 1 or "
                    "null, read (and checked) only when max_completion_tokens is absent or null."
                },
                **self.sampling(),
                "logprobs": _boolean("Return each generated token's log-probability."),
                "top_logprobs": _integer(
                    "Most likely alternatives per token (needs logprobs: true).",
                    0,
                    MAX_TOP_LOGPROBS,
                ),
                "stop": self.stop("Up to 4 stop sequences."),
                "response_format": _response_format(),
                **_openai_tool_fields(),
                "ignore_eos": _boolean("Keep generating past the end-of-sequence token."),
                "user": {"description": "Accepted and ignored."},
            },
            required=["messages"],
            # The handler reads max_tokens only when max_completion_tokens is absent or null.
            **{
                "if": {
                    "required": ["max_completion_tokens"],
                    "properties": {"max_completion_tokens": {"not": {"type": "null"}}},
                },
                "else": {"properties": {"max_tokens": _integer("Most tokens to generate.", lo=1)}},
            },
        )

    def prompt(self) -> Schema:
        tokens = {"type": "array", "minItems": 1, "items": self.token_id()}
        return {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                tokens,
                {"type": "array", "minItems": 1, "items": tokens},
            ],
            "description": "A string, a list of strings, token ids, or lists of token ids. "
            "Text is tokenized without a chat template; each prompt needs at least one token.",
        }

    def completion_request(self) -> Schema:
        return _obj(
            {
                "model": self.model_name(required=False),
                "prompt": self.prompt(),
                "suffix": _nullable(
                    {"type": "string", "maxLength": 0, "description": "Not supported."}
                ),
                "n": _integer("Choices per prompt.", 1, COMPLETIONS_MAX_N),
                "best_of": _integer("Must equal n.", 1, COMPLETIONS_MAX_N),
                "max_tokens": _integer("Most tokens to generate (0: none). Default 16.", lo=0),
                **self.sampling(),
                "logprobs": _integer(
                    "Alternatives per token to return.", 0, COMPLETIONS_MAX_LOGPROBS
                ),
                "echo": _boolean("Return the prompt before the completion."),
                "stop": self.stop("Up to 4 stop sequences."),
                "stream": _boolean("Stream chunks as server-sent events."),
                "stream_options": self.stream_options(),
                "ignore_eos": _boolean("Keep generating past the end-of-sequence token."),
                "response_format": _response_format(),
                "user": {"description": "Accepted and ignored."},
            },
            required=["prompt"],
        )

    def embedding_request(self) -> Schema:
        tokens = {"type": "array", "minItems": 1, "items": self.token_id()}
        text = {"type": "string", "minLength": 1}
        return _obj(
            {
                "model": self.model_name(required=False),
                "input": {
                    "anyOf": [
                        text,
                        {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": EMBEDDINGS_MAX_INPUTS,
                            "items": text,
                        },
                        tokens,
                        {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": EMBEDDINGS_MAX_INPUTS,
                            "items": tokens,
                        },
                    ],
                    "description": "A string, a list of strings, token ids or lists of them. "
                    "Each vector is the mean of the final hidden states, L2-normalised.",
                },
                "encoding_format": {
                    "enum": ["float", "base64", None],
                    "description": "float (default) or base64 (little-endian float32).",
                },
                "dimensions": _integer(
                    "Truncate (and renormalise) to this many dimensions, at most the model's "
                    "hidden size.",
                    lo=1,
                ),
                "user": _nullable({"type": "string"}),
            },
            required=["input"],
        )

    def anthropic_blocks(self) -> dict[str, Schema]:
        text_block = _obj(
            {"type": {"const": "text"}, "text": {"type": "string"}}, required=["type", "text"]
        )
        dropped = _obj(
            {"type": {"enum": ["thinking", "redacted_thinking"]}},
            required=["type"],
            description="Thinking of earlier turns: dropped, as Anthropic does.",
        )
        tool_use = _obj(
            {
                "type": {"enum": ["tool_use", "server_tool_use"]},
                "name": {"type": "string"},
                "id": {},
                "input": {},
            },
            required=["type", "name"],
        )

        def tool_result(inner: Schema) -> Schema:
            return _obj(
                {
                    "type": {"const": "tool_result"},
                    "tool_use_id": {},
                    "is_error": {},
                    "content": {"anyOf": [{"type": "string"}, inner, {"type": "null"}]},
                },
                required=["type"],
            )

        # A tool result's content may hold blocks too (one level is documented; the server
        # takes any depth).
        leaf = tool_result({"type": "array", "items": {"anyOf": [text_block, dropped, tool_use]}})
        nested = {"type": "array", "items": {"anyOf": [text_block, dropped, tool_use, leaf]}}
        return {
            "AnthropicContentBlock": {
                "anyOf": [text_block, dropped, tool_use, tool_result(nested)],
                "description": "Text blocks become text for the template, an assistant's "
                "tool_use blocks its tool calls, a user's tool_result blocks tool turns; image "
                "and document blocks are refused (text-only model).",
            }
        }

    def anthropic_prompt(self) -> dict[str, Schema]:
        text_block = _obj(
            {"type": {"const": "text"}, "text": {"type": "string"}}, required=["type", "text"]
        )
        message = _obj(
            {
                "role": {"enum": ["user", "assistant"]},
                "content": {
                    "anyOf": [
                        {"type": "string"},
                        {"type": "array", "items": _ref("AnthropicContentBlock")},
                    ],
                    "description": "Must not be empty, except in a final assistant message "
                    "(a prefill the answer continues).",
                },
            },
            required=["role", "content"],
        )
        custom_tool = _obj(
            {
                "type": {"enum": ["custom", None]},
                "name": {"type": "string"},
                "description": {},
                "input_schema": {"type": "object"},
            },
            required=["name", "input_schema"],
        )
        server_tool = _obj(
            {
                "type": {"not": {"enum": ["custom", None]}},
                "name": {"type": "string"},
            },
            required=["type", "name"],
            description="A server tool (web search, ...): given to the template as it is.",
        )
        return {
            "model": self.model_name(required=True),
            "messages": {"type": "array", "minItems": 1, "items": message},
            "system": {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": text_block},
                    {"type": "null"},
                ]
            },
            "tools": _nullable({"type": "array", "items": {"anyOf": [custom_tool, server_tool]}}),
            **_anthropic_tool_fields(),
        }

    def messages_request(self) -> Schema:
        return _obj(
            {
                **self.anthropic_prompt(),
                "max_tokens": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "Most tokens to generate; clamped to the room left."
                    + self.context_note(),
                },
                "temperature": _number(0, 1, "Sampling temperature (Anthropic's range 0..1)."),
                "top_p": _number(0, 1, "Nucleus sampling mass."),
                "top_k": _integer("Sample from the k most likely tokens; 0 is off.", lo=0),
                "stop_sequences": _nullable({"type": "array", "items": {"type": "string"}}),
                "stream": _boolean("Stream Anthropic's events as server-sent events."),
                "metadata": _nullable(
                    _obj({"user_id": _nullable({"type": "string"})}, description="Accepted.")
                ),
            },
            required=["model", "messages", "max_tokens"],
        )

    def count_tokens_request(self) -> Schema:
        return _obj(self.anthropic_prompt(), required=["model", "messages"])

    # -- responses ----------------------------------------------------------------------------

    def components(self) -> Schema:
        count = {"type": "integer", "minimum": 0}
        usage = _obj(
            {
                "prompt_tokens": count,
                "completion_tokens": count,
                "total_tokens": count,
                "prompt_tokens_details": _obj({"cached_tokens": count}, ["cached_tokens"]),
            },
            ["prompt_tokens", "completion_tokens", "total_tokens"],
        )
        top_logprob = _obj(
            {
                "token": {"type": "string"},
                "logprob": {"type": "number"},
                "bytes": {"type": ["array", "null"], "items": {"type": "integer"}},
            },
            ["token", "logprob", "bytes"],
        )
        token_logprob = _obj(
            {**top_logprob["properties"], "top_logprobs": {"type": "array", "items": top_logprob}},
            ["token", "logprob", "bytes", "top_logprobs"],
        )
        chat_logprobs = _nullable(
            _obj(
                {
                    "content": {"type": ["array", "null"], "items": token_logprob},
                    "refusal": {"type": ["array", "null"]},
                },
                ["content"],
            )
        )
        finish = {"enum": ["stop", "length", "tool_calls"]}
        envelope = {
            "id": {"type": "string"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "system_fingerprint": {"type": "string"},
        }
        completion_logprobs = _nullable(
            _obj(
                {
                    "tokens": {"type": "array", "items": {"type": "string"}},
                    "token_logprobs": {"type": "array", "items": {"type": ["number", "null"]}},
                    "top_logprobs": {
                        "type": "array",
                        "items": {
                            "type": ["object", "null"],
                            "additionalProperties": {"type": "number"},
                        },
                    },
                    "text_offset": {"type": "array", "items": {"type": "integer"}},
                },
                ["tokens", "token_logprobs", "top_logprobs", "text_offset"],
            )
        )
        model = _obj(
            {
                "id": {"type": "string"},
                "object": {"const": "model"},
                "created": {"type": "integer"},
                "owned_by": {"type": "string"},
            },
            ["id", "object", "created", "owned_by"],
        )
        anthropic_usage = _obj(
            {
                "input_tokens": count,
                "output_tokens": count,
                "cache_creation_input_tokens": {"type": ["integer", "null"]},
                "cache_read_input_tokens": {"type": ["integer", "null"]},
            },
            ["input_tokens", "output_tokens"],
        )
        stop_reason = {"enum": ["end_turn", "max_tokens", "stop_sequence", "tool_use", None]}
        schemas: dict[str, Schema] = {
            "OpenAIError": _obj(
                {
                    "error": _obj(
                        {
                            "message": {"type": "string"},
                            "type": {"type": "string"},
                            "param": {"type": ["string", "null"]},
                            "code": {"type": ["string", "null"]},
                        },
                        ["message", "type", "param", "code"],
                    )
                },
                ["error"],
                description="OpenAI's error shape.",
            ),
            "AnthropicError": _obj(
                {
                    "type": {"const": "error"},
                    "error": _obj(
                        {
                            "type": {
                                "enum": [
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
                            },
                            "message": {"type": "string"},
                        },
                        ["type", "message"],
                    ),
                },
                ["type", "error"],
                description="Anthropic's error shape.",
            ),
            "Usage": usage,
            "TokenLogprob": token_logprob,
            "ChatCompletion": _obj(
                {
                    **envelope,
                    "object": {"const": "chat.completion"},
                    "choices": {
                        "type": "array",
                        "minItems": 1,
                        "items": _obj(
                            {
                                "index": count,
                                "message": _obj(
                                    {
                                        "role": {"const": "assistant"},
                                        "content": {"type": ["string", "null"]},
                                        "refusal": {"type": ["string", "null"]},
                                        "tool_calls": {"type": "array", "items": _TOOL_CALL_SCHEMA},
                                        "reasoning_content": {"type": "string"},
                                    },
                                    ["role", "content"],
                                ),
                                "logprobs": chat_logprobs,
                                "finish_reason": finish,
                            },
                            ["index", "message", "logprobs", "finish_reason"],
                        ),
                    },
                    "usage": _ref("Usage"),
                },
                ["id", "object", "created", "model", "choices", "usage"],
            ),
            "ChatCompletionChunk": _obj(
                {
                    **envelope,
                    "object": {"const": "chat.completion.chunk"},
                    "choices": {
                        "type": "array",
                        "items": _obj(
                            {
                                "index": count,
                                "delta": _obj(
                                    {
                                        "role": {"const": "assistant"},
                                        "content": {"type": ["string", "null"]},
                                        "reasoning_content": {"type": "string"},
                                        "tool_calls": {
                                            "type": "array",
                                            "description": "index, id, type and name first; "
                                            "then fragments of function.arguments.",
                                            "items": _obj(
                                                {
                                                    "index": count,
                                                    "id": {"type": "string"},
                                                    "type": {"const": "function"},
                                                    "function": {"type": "object"},
                                                },
                                                ["index"],
                                            ),
                                        },
                                    }
                                ),
                                "logprobs": chat_logprobs,
                                "finish_reason": {"enum": ["stop", "length", "tool_calls", None]},
                            },
                            ["index", "delta", "finish_reason"],
                        ),
                    },
                    "usage": {"anyOf": [_ref("Usage"), {"type": "null"}]},
                },
                ["id", "object", "created", "model", "choices"],
            ),
            "Completion": _obj(
                {
                    **envelope,
                    "object": {"const": "text_completion"},
                    "choices": {
                        "type": "array",
                        "items": _obj(
                            {
                                "text": {"type": "string"},
                                "index": count,
                                "logprobs": completion_logprobs,
                                "finish_reason": {"enum": ["stop", "length", None]},
                            },
                            ["text", "index", "logprobs", "finish_reason"],
                        ),
                    },
                    "usage": _ref("Usage"),
                },
                ["id", "object", "created", "model", "choices"],
                description="A whole completion (with usage) or one stream chunk.",
            ),
            "Embeddings": _obj(
                {
                    "object": {"const": "list"},
                    "data": {
                        "type": "array",
                        "items": _obj(
                            {
                                "object": {"const": "embedding"},
                                "index": count,
                                "embedding": {
                                    "anyOf": [
                                        {"type": "array", "items": {"type": "number"}},
                                        {"type": "string", "contentEncoding": "base64"},
                                    ]
                                },
                            },
                            ["object", "index", "embedding"],
                        ),
                    },
                    "model": {"type": "string"},
                    "usage": _obj(
                        {"prompt_tokens": count, "total_tokens": count},
                        ["prompt_tokens", "total_tokens"],
                    ),
                },
                ["object", "data", "model", "usage"],
            ),
            "Model": model,
            "ModelList": _obj(
                {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}},
                ["object", "data"],
            ),
            "AnthropicUsage": anthropic_usage,
            "AnthropicMessage": _obj(
                {
                    "id": {"type": "string"},
                    "type": {"const": "message"},
                    "role": {"const": "assistant"},
                    "model": {"type": "string"},
                    "content": {"type": "array", "items": {"anyOf": _ANTHROPIC_BLOCKS}},
                    "stop_reason": stop_reason,
                    "stop_sequence": {"type": ["string", "null"]},
                    "usage": _ref("AnthropicUsage"),
                },
                ["id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"],
            ),
            "AnthropicTokenCount": _obj({"input_tokens": count}, ["input_tokens"]),
            "Health": _obj(
                {
                    "status": {"enum": ["loading", "ok", "failed", "stopping"]},
                    "model": {"type": "string"},
                    "running": count,
                    "waiting": count,
                },
                ["status"],
            ),
            "ChatCompletionRequest": self.chat_request(),
            "CompletionRequest": self.completion_request(),
            "EmbeddingRequest": self.embedding_request(),
            "MessagesRequest": self.messages_request(),
            "CountTokensRequest": self.count_tokens_request(),
            **self.anthropic_blocks(),
            "ChatCompletionStreamEvent": _openai_event("ChatCompletionChunk"),
            "CompletionStreamEvent": _openai_event("Completion"),
            "AnthropicStreamEvent": {
                "anyOf": [
                    *(
                        _sse_event(_json_text(payload), event={"const": name})
                        for name, payload in self.anthropic_events(stop_reason).items()
                    ),
                ],
                "description": "One event of an Anthropic stream: message_start, ping, "
                "content_block_start/_delta/_stop, message_delta, message_stop, or error.",
            },
        }
        return schemas

    def anthropic_events(self, stop_reason: Schema) -> dict[str, Schema]:
        def payload(kind: str, properties: dict[str, Schema], required: Sequence[str]) -> Schema:
            return _obj({"type": {"const": kind}, **properties}, ["type", *required])

        index = {"type": "integer", "minimum": 0}
        return {
            "message_start": payload(
                "message_start", {"message": _ref("AnthropicMessage")}, ["message"]
            ),
            "ping": payload("ping", {}, []),
            "content_block_start": payload(
                "content_block_start",
                {
                    "index": index,
                    "content_block": {"anyOf": _ANTHROPIC_BLOCKS},
                },
                ["index", "content_block"],
            ),
            "content_block_delta": payload(
                "content_block_delta",
                {
                    "index": index,
                    "delta": {
                        "anyOf": [
                            _obj({"type": {"const": kind}, key: {"type": "string"}}, ["type", key])
                            for kind, key in (
                                ("text_delta", "text"),
                                ("thinking_delta", "thinking"),
                                ("signature_delta", "signature"),
                                ("input_json_delta", "partial_json"),
                            )
                        ]
                    },
                },
                ["index", "delta"],
            ),
            "content_block_stop": payload("content_block_stop", {"index": index}, ["index"]),
            "message_delta": payload(
                "message_delta",
                {
                    "delta": _obj(
                        {"stop_reason": stop_reason, "stop_sequence": {"type": ["string", "null"]}},
                        ["stop_reason", "stop_sequence"],
                    ),
                    "usage": _ref("AnthropicUsage"),
                },
                ["delta", "usage"],
            ),
            "message_stop": payload("message_stop", {}, []),
            "error": _ref("AnthropicError"),
        }

    # -- operations ---------------------------------------------------------------------------

    def responses(
        self,
        ok: dict[str, Any],
        *,
        anthropic: bool = False,
        statuses: Sequence[int] = (),
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"200": ok}
        error_ref = "#/components/responses/" + ("Anthropic" if anthropic else "OpenAI")
        for status in statuses:
            out[str(status)] = {"$ref": f"{error_ref}{status}"}
        return out

    def error_responses(self, *, anthropic: bool) -> dict[str, Any]:
        name = "Anthropic" if anthropic else "OpenAI"
        schema = _ref("AnthropicError" if anthropic else "OpenAIError")
        descriptions = {
            400: "Invalid request: bad JSON, a wrong type or range (`param` names the field), "
            "a prompt longer than the context.",
            401: "Missing or wrong API key (only with --api-key).",
            404: "Unknown model (`model_not_found`) or no such route.",
            405: "Another method on this path: not allowed (with an Allow header).",
            413: "Request body larger than --max-body-bytes.",
            429: "Rate limit (--rate-limit, with Retry-After)"
            + ("." if anthropic else " or the queue is full (overloaded)."),
            500: "An internal failure (a bug, or the executor failed).",
            503: "The model is still loading, or the server is shutting down.",
            504: "The request ran past --timeout.",
            529: "Overloaded: the queue is full.",
        }
        headers = {
            "Retry-After": {
                "description": "Seconds to wait (rate limit answers).",
                "schema": {"type": "integer", "minimum": 1},
            }
        }
        out: dict[str, Any] = {}
        for status, description in descriptions.items():
            if status == 529 and not anthropic:
                continue
            response: dict[str, Any] = {
                "description": description,
                "content": {"application/json": {"schema": schema}},
            }
            if status == 429:
                response["headers"] = headers
            out[f"{name}{status}"] = response
        return out

    def post(
        self,
        *,
        summary: str,
        operation_id: str,
        tag: str,
        request: str,
        ok: dict[str, Any],
        anthropic: bool = False,
        generates: bool = True,
    ) -> dict[str, Any]:
        statuses: list[int] = [400, 401, 404, 405, 413, 429, 500, 503, 504]
        if anthropic:
            statuses.append(529)
        if not generates:
            statuses.remove(504)
        op: dict[str, Any] = {
            "summary": summary,
            "operationId": operation_id,
            "tags": [tag],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": _ref(request),
                        "examples": self.examples(request),
                    }
                },
            },
            "responses": self.responses(ok, anthropic=anthropic, statuses=statuses),
        }
        if anthropic:
            op["parameters"] = [
                {
                    "name": "anthropic-version",
                    "in": "header",
                    "required": False,
                    "description": "Accepted (any version) and ignored.",
                    "schema": {"type": "string"},
                }
            ]
        return op

    def examples(self, request: str) -> dict[str, Any]:
        """Example requests (the fuzzer sends them too): a plain one and a streamed one."""
        model = self.model_names[0] if self.model_names else "default"
        question = "What is the capital of France?"
        chat = [{"role": "user", "content": question}]
        plain: dict[str, Any]
        streamed: dict[str, Any] | None = None
        if request == "ChatCompletionRequest":
            plain = {"model": model, "messages": chat, "max_completion_tokens": 16}
            streamed = {
                **plain,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
                "logprobs": True,
                "top_logprobs": 2,
            }
        elif request == "CompletionRequest":
            plain = {"model": model, "prompt": "The capital of France is", "max_tokens": 8}
            streamed = {**plain, "stream": True, "echo": True, "logprobs": 2, "n": 2, "seed": 7}
        elif request == "EmbeddingRequest":
            plain = {"model": model, "input": ["Paris", "Rome"]}
            return {
                "float": {"value": plain},
                "base64": {"value": {**plain, "encoding_format": "base64"}},
            }
        elif request == "MessagesRequest":
            plain = {"model": model, "max_tokens": 16, "messages": chat}
            streamed = {**plain, "system": "Answer briefly.", "stream": True, "temperature": 0}
        else:
            plain = {"model": model, "messages": chat, "system": "Answer briefly."}
        out: dict[str, Any] = {"plain": {"value": plain}}
        if streamed is not None:
            out["streamed"] = {"value": streamed}
        return out

    def get(
        self,
        *,
        summary: str,
        operation_id: str,
        tag: str,
        ok: dict[str, Any],
        statuses: Sequence[int] = (401, 405, 429, 503),
        open_route: bool = False,
    ) -> dict[str, Any]:
        op: dict[str, Any] = {
            "summary": summary,
            "operationId": operation_id,
            "tags": [tag],
            "responses": self.responses(ok, statuses=statuses),
        }
        if open_route:
            op["security"] = []
        return op

    def paths(self) -> dict[str, Any]:
        def json_ok(description: str, schema: str) -> dict[str, Any]:
            return {
                "description": description,
                "content": {"application/json": {"schema": _ref(schema)}},
            }

        def streaming_ok(description: str, schema: str, event: str) -> dict[str, Any]:
            ok = json_ok(description, schema)
            ok["content"]["text/event-stream"] = {"schema": _ref(event)}
            return ok

        anthropic_headers = {
            "request-id": {
                "description": "An id for this request, as Anthropic sends.",
                "schema": {"type": "string"},
            }
        }
        messages_ok = streaming_ok(
            "The message, or (`stream: true`) Anthropic's event stream.",
            "AnthropicMessage",
            "AnthropicStreamEvent",
        )
        messages_ok["headers"] = anthropic_headers
        count_ok = json_ok("The prompt's token count.", "AnthropicTokenCount")
        count_ok["headers"] = anthropic_headers
        model_id = {
            "name": "model_id",
            "in": "path",
            "required": True,
            "description": "A served model name (or alias); others get 404.",
            "schema": {"type": "string", "minLength": 1},
        }
        if self.model_names:
            model_id["schema"] = {"enum": sorted(set(self.model_names))}
        return {
            "/v1/chat/completions": {
                "post": self.post(
                    summary="Create a chat completion (OpenAI)",
                    operation_id="createChatCompletion",
                    tag="OpenAI",
                    request="ChatCompletionRequest",
                    ok=streaming_ok(
                        "The completion, or (`stream: true`) chunks ending with `data: [DONE]`.",
                        "ChatCompletion",
                        "ChatCompletionStreamEvent",
                    ),
                )
            },
            "/v1/completions": {
                "post": self.post(
                    summary="Create a text completion (OpenAI legacy)",
                    operation_id="createCompletion",
                    tag="OpenAI",
                    request="CompletionRequest",
                    ok=streaming_ok(
                        "The completion, or (`stream: true`) chunks ending with `data: [DONE]`.",
                        "Completion",
                        "CompletionStreamEvent",
                    ),
                )
            },
            "/v1/embeddings": {
                "post": self.post(
                    summary="Create embeddings (OpenAI)",
                    operation_id="createEmbedding",
                    tag="OpenAI",
                    request="EmbeddingRequest",
                    ok=json_ok("The vectors, in input order.", "Embeddings"),
                )
            },
            "/v1/messages": {
                "post": self.post(
                    summary="Create a message (Anthropic)",
                    operation_id="createMessage",
                    tag="Anthropic",
                    request="MessagesRequest",
                    ok=messages_ok,
                    anthropic=True,
                )
            },
            "/v1/messages/count_tokens": {
                "post": self.post(
                    summary="Count a message request's input tokens (Anthropic)",
                    operation_id="countMessageTokens",
                    tag="Anthropic",
                    request="CountTokensRequest",
                    ok=count_ok,
                    anthropic=True,
                    generates=False,
                )
            },
            "/v1/models": {
                "get": self.get(
                    summary="List the served model",
                    operation_id="listModels",
                    tag="OpenAI",
                    ok=json_ok("The served model.", "ModelList"),
                )
            },
            "/v1/models/{model_id}": {
                "get": {
                    **self.get(
                        summary="Describe the served model",
                        operation_id="retrieveModel",
                        tag="OpenAI",
                        ok=json_ok("The served model.", "Model"),
                        statuses=(401, 404, 405, 429, 503),
                    ),
                    "parameters": [model_id],
                }
            },
            "/health": {
                "get": {
                    "summary": "Readiness: 200 once the model is loaded, else 503",
                    "operationId": "health",
                    "tags": ["Server"],
                    "security": [],
                    "responses": {
                        "200": json_ok("Ready.", "Health"),
                        "503": json_ok("Loading, failed or stopping.", "Health"),
                    },
                }
            },
            "/metrics": {
                "get": self.get(
                    summary="Prometheus metrics",
                    operation_id="metrics",
                    tag="Server",
                    ok={
                        "description": "Prometheus text format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    statuses=(),
                    open_route=True,
                )
            },
            DOCUMENT_PATH: {
                "get": self.get(
                    summary="This OpenAPI document",
                    operation_id="openapi",
                    tag="Server",
                    ok={
                        "description": "OpenAPI 3.1 document.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    statuses=(),
                    open_route=True,
                )
            },
        }

    def document(self) -> dict[str, Any]:
        security: list[dict[str, list[str]]] = [{"bearerAuth": []}, {"apiKeyAuth": []}]
        if not self.auth_required:
            security.append({})  # no --api-key: no key needed
        return {
            "openapi": OPENAPI_VERSION,
            "info": {
                "title": "mlx-server",
                "version": _version(),
                "description": "OpenAI- and Anthropic-compatible inference server for MLX.",
            },
            "tags": [
                {"name": "OpenAI", "description": "OpenAI-compatible routes."},
                {"name": "Anthropic", "description": "Anthropic Messages API routes."},
                {"name": "Server", "description": "Health, metrics and this document (open)."},
            ],
            "security": security,
            "paths": self.paths(),
            "components": {
                "schemas": self.components(),
                "responses": {
                    **self.error_responses(anthropic=False),
                    **self.error_responses(anthropic=True),
                },
                "securitySchemes": {
                    "bearerAuth": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "`Authorization: Bearer <--api-key>` (OpenAI style).",
                    },
                    "apiKeyAuth": {
                        "type": "apiKey",
                        "in": "header",
                        "name": "x-api-key",
                        "description": "`x-api-key: <--api-key>` (Anthropic style).",
                    },
                },
            },
        }


def _openai_event(chunk: str) -> Schema:
    """One event of an OpenAI stream: a chunk, an in-band error (then [DONE]), or the final
    `data: [DONE]`."""
    payload = {"anyOf": [_ref(chunk), _ref("OpenAIError")]}
    return _sse_event(
        {"anyOf": [{"const": "[DONE]"}, _json_text(payload)]},
        event={"const": "message"},
        description=_openai_event.__doc__,
    )


def _json_text(schema: Schema) -> Schema:
    """A string holding JSON that matches `schema`."""
    return {"type": "string", "contentMediaType": "application/json", "contentSchema": schema}


def _sse_event(data: Schema, *, event: Schema, description: str | None = None) -> Schema:
    """One server-sent event as OpenAPI 3.1 tools read a stream: `{event, data, id?, retry?}`."""
    schema = _obj({"event": event, "data": data}, ["data"])
    if description:
        schema["description"] = description
    return schema


def openapi_document(
    *,
    model_names: Sequence[str] = (),
    model_aliases: Sequence[str] = (),
    vocab_size: int | None = None,
    context_length: int | None = None,
    auth_required: bool = False,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document for a server serving `model_names` (empty while it loads)."""
    return _Builder(
        model_names=model_names,
        model_aliases=model_aliases,
        vocab_size=vocab_size,
        context_length=context_length,
        auth_required=auth_required,
    ).document()


def install_openapi(app: Quart, settings: Settings) -> None:
    """Serve `GET /openapi.json` (open, like /health) for this server's model and settings."""

    @app.get(DOCUMENT_PATH)
    async def _openapi() -> dict[str, Any]:
        pool = state().models
        if pool is None:
            return openapi_document(auth_required=settings.api_key is not None)
        names = [n for s in pool.slots for n in (s.name, s.name.rsplit("/", 1)[-1])]
        fe = pool.default.frontend
        single = fe is not None and len(pool.slots) == 1
        return openapi_document(
            model_names=[*names, "default"],
            model_aliases=pool.default.aliases,
            vocab_size=fe.vocab_size if single and fe else None,
            context_length=fe.context_length if single and fe else None,
            auth_required=settings.api_key is not None,
        )
