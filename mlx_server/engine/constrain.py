"""Constrained decoding: compile a `ConstraintSpec` against a tokenizer into a per-request
matcher that says, before every step, which token ids may come next.

Built on llguidance (Earley parser over a lexer, token masks computed from a prefix tree of the
vocabulary: tens of microseconds per step on a 49k vocabulary; see the README's "Structured
output" for the figures that chose it). No MLX here: masks are numpy arrays; `engine.sampling`
applies them to the logits on the executor thread.

The spec kinds (`messages.ConstraintSpec`):

- `json_object`: any JSON object.
- `json_schema`: `source` is a JSON Schema (JSON text). Types, properties/required,
  additionalProperties, patternProperties, min/maxProperties, items/prefixItems, min/maxItems,
  min/maxLength, pattern, format (date-time, date, time, duration, email, hostname, ipv4, ipv6,
  uuid, uri), enum/const, anyOf/oneOf/allOf, $ref/$defs (recursion included), minimum/maximum,
  exclusiveMinimum/exclusiveMaximum, multipleOf. A keyword it cannot enforce (`not`,
  `if`/`then`, `uniqueItems`, `contains`, `propertyNames`, another `format`, ...) is a
  `ConstraintError`, never silently ignored.
- `regex`: `source` is a regular expression the whole output must match.
- `lark`: `source` is a Lark grammar in llguidance's dialect
  (https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md). Its `start` rule is the
  whole output. It may embed JSON Schemas (`args: %json {"type": "object", ...}`), regexes
  (`/[0-9]+/`) and special tokens by name (`<|im_end|>`) or id (`<[2]>`).

JSON is generated compact (no whitespace between tokens), so a JSON value ends as soon as it
closes; a schema may override that with llguidance's `"x-guidance": {"whitespace_flexible":
true}`. The output is complete when the grammar accepts and cannot go on (`Constraint.done`), or
when the model picks an end-of-sequence token, which is allowed only where the grammar accepts;
the engine then finishes the request with "stop". A request that runs out of `max_tokens` first
ends with "length" and its text is a prefix of a valid output.

Use (tool calling, for instance, forcing a call of one named function):

    spec = ConstraintSpec.lark(
        'start: "<tool_call>\\n" %json ' + json.dumps(call_schema) + ' "\\n</tool_call>"'
    )
    await frontend.check_constraint(spec, param="tool_choice")  # 400 if it cannot compile
    GenerationRequest(..., constraint=spec)

or `ConstraintSpec.json_schema({"type": "object", "properties": {"name": {"const": "f"},
"arguments": {...}}, "required": ["name", "arguments"], "additionalProperties": False})`.
In code that holds a tokenizer: `check(spec, tokenizer)` raises `ConstraintError`;
`start(spec, tokenizer)` returns a fresh `Constraint`. Compiled grammars are cached by spec, so
checking a spec in the frontend makes the executor's `start` a cheap copy.
"""

from __future__ import annotations

import collections
import logging
import threading
import weakref
from typing import TYPE_CHECKING

import llguidance
import numpy as np
from llguidance.numpy import fill_next_token_bitmask

from ..messages import ConstraintSpec
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# Compact JSON: a random or confused model cannot pad forever with whitespace, and a value ends
# where it closes. A schema's own "x-guidance" options come after these defaults.
JSON_DEFAULTS: JsonCompileOptions = {"whitespace_flexible": False}

log = logging.getLogger(__name__)

CACHE_SIZE = 64
"""Compiled grammars kept per tokenizer (requests often repeat the same schema)."""


class ConstraintError(ValueError):
    """The spec cannot be enforced: malformed JSON, a schema keyword that is not supported, a
    grammar that does not compile, or a tokenizer llguidance cannot read. The message is meant
    for the client."""


class Constraint:
    """One request's matcher: the allowed next tokens, advanced by each chosen token."""

    def __init__(
        self, matcher: llguidance.LLMatcher, vocab_size: int, eos_ids: tuple[int, ...] = ()
    ) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._eos_ids = eos_ids
        self._bitmask = np.zeros((1, (vocab_size + 31) // 32), dtype=np.int32)

    def allowed(self, width: int) -> np.ndarray:
        """A boolean mask of the ids that may come next, over `width` ids (the model's logits
        may be wider than the tokenizer's vocabulary: the extra ids are never allowed)."""
        fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")
        mask = np.zeros(width, dtype=np.bool_)
        n = min(width, self._vocab_size)
        mask[:n] = bits[:n]
        if not mask.any():  # only after a matcher error (a parser limit hit): end the output
            log.warning("constrained decoding failed: %s", self.error or "no token allowed")
            mask[[i for i in self._eos_ids if i < width]] = True
        return mask

    def advance(self, token_id: int) -> bool:
        """Consume the chosen token; False if the grammar does not allow it (the matcher is
        then in error and `done`)."""
        if self._matcher.is_stopped():
            return False
        return self._matcher.consume_token(token_id)

    @property
    def done(self) -> bool:
        """Nothing more may follow: the output is complete (or the matcher failed)."""
        return self._matcher.is_stopped() or self._matcher.is_error()

    @property
    def accepting(self) -> bool:
        return self._matcher.is_accepting()

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() if self._matcher.is_error() else None


class _Compiler:
    """The llguidance tokenizer of one `Tokenizer` (about 0.4 s to build for a 49k
    vocabulary) and an LRU of grammars compiled against it."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        try:
            self.lltok = llguidance.LLTokenizer(
                tokenizer.backend.to_str(),
                n_vocab=tokenizer.vocab_size,
                eos_token=sorted(tokenizer.eos_token_ids) or None,
            )
        except Exception as exc:  # llguidance raises ValueError/RuntimeError on odd tokenizers
            raise ConstraintError(
                f"structured output is not available for this model's tokenizer: {exc}"
            ) from exc
        self.vocab_size = self.lltok.vocab_size
        self.eos_ids = tuple(sorted(tokenizer.eos_token_ids))
        self._lock = threading.Lock()
        self._compiled: collections.OrderedDict[ConstraintSpec, llguidance.LLMatcher] = (
            collections.OrderedDict()
        )

    def matcher(self, spec: ConstraintSpec) -> llguidance.LLMatcher:
        with self._lock:
            pristine = self._compiled.get(spec)
            if pristine is not None:
                self._compiled.move_to_end(spec)
                return pristine.deep_copy()
        grammar = grammar_of(spec)
        try:
            matcher = llguidance.LLMatcher(self.lltok, grammar, log_level=0)
        except Exception as exc:  # documented never to raise for grammar errors; be sure
            raise ConstraintError(_describe(spec, str(exc))) from exc
        if matcher.is_error():
            raise ConstraintError(_describe(spec, matcher.get_error()))
        with self._lock:
            self._compiled[spec] = matcher.deep_copy()
            while len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
        return matcher


_compilers: weakref.WeakKeyDictionary[Tokenizer, _Compiler] = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def _compiler(tokenizer: Tokenizer) -> _Compiler:
    with _compilers_lock:
        compiler = _compilers.get(tokenizer)
        if compiler is None:
            compiler = _compilers[tokenizer] = _Compiler(tokenizer)
        return compiler


def grammar_of(spec: ConstraintSpec) -> str:
    """The llguidance grammar (JSON text) of a spec; ConstraintError for malformed JSON."""
    try:
        if spec.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema(
                {"type": "object"}, defaults=JSON_DEFAULTS
            )
        if spec.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(
                spec.source, defaults=JSON_DEFAULTS
            )
        if spec.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec.source)
        if spec.kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(spec.source)
    except (ValueError, TypeError) as exc:
        raise ConstraintError(_describe(spec, str(exc))) from exc
    raise ConstraintError(f"unknown constraint kind {spec.kind!r}")


def _describe(spec: ConstraintSpec, error: str) -> str:
    what = {
        "json_object": "JSON object grammar",
        "json_schema": "JSON schema",
        "regex": "regular expression",
        "lark": "grammar",
    }.get(spec.kind, "constraint")
    return f"the {what} cannot be enforced: {error.strip()}"


def check(spec: ConstraintSpec, tokenizer: Tokenizer) -> None:
    """Compile `spec` (or find it compiled); ConstraintError if it cannot be enforced. Blocks
    for the compile (milliseconds; the first call per tokenizer also builds llguidance's
    tokenizer): call it off the event loop."""
    _compiler(tokenizer).matcher(spec)


def start(spec: ConstraintSpec, tokenizer: Tokenizer) -> Constraint:
    """A fresh matcher for one request; ConstraintError if the spec cannot be enforced."""
    compiler = _compiler(tokenizer)
    return Constraint(compiler.matcher(spec), compiler.vocab_size, compiler.eos_ids)
