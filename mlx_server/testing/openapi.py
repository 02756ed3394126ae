"""Validate response bodies against the OpenAI and Anthropic APIs' response shapes.

The schemas come from the typed models of the official ``openai`` and ``anthropic`` packages,
tightened (see ``mlx_server.testing.schemas``); nothing is read from outside the installed
packages. Names are the contracts' own (``"openai.ChatCompletion"``,
``"anthropic.MessageStreamEvent"``) or the OpenAPI component names the tests used before
(``"CreateChatCompletionResponse"``, ``"Message"``, ``"ErrorEvent"`` ...).

    from mlx_server.testing.openapi import validate
    validate("CreateChatCompletionResponse", response.json())   # AssertionError when invalid
"""

from __future__ import annotations

import functools
from typing import Any

import jsonschema
from jsonschema.exceptions import ValidationError, best_match, relevance

from mlx_server.testing import schemas

__all__ = ["SpecValidationError", "errors", "schema_names", "validate", "validator"]


class SpecValidationError(AssertionError):
    """A JSON instance does not match its schema; the message lists where and why."""

    def __init__(self, message: str, errors: list[ValidationError]) -> None:
        super().__init__(message)
        self.errors = errors


def schema_names() -> list[str]:
    """Every name ``validate`` accepts (contract names and their aliases)."""
    return sorted(schemas.BY_NAME)


@functools.cache
def validator(schema_name: str) -> jsonschema.Draft202012Validator:
    schema = schemas.schema_of(schema_name)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def errors(schema_name: str, instance: Any) -> list[ValidationError]:
    """Every error of ``instance`` against the schema, the most relevant first."""
    return sorted(validator(schema_name).iter_errors(instance), key=relevance)


def _describe(error: ValidationError) -> str:
    # Descend into anyOf/oneOf branches to the error that most likely explains the failure.
    deepest = best_match([error]) or error
    return f"at {deepest.json_path}: {deepest.message}"


def validate(schema_name: str, instance: Any) -> None:
    """Raise ``SpecValidationError`` (an ``AssertionError``) unless ``instance`` is a valid
    ``schema_name``."""
    found = errors(schema_name, instance)
    if not found:
        return
    lines = [_describe(e) for e in found[:8]]
    if len(found) > 8:
        lines.append(f"... and {len(found) - 8} more")
    summary = "\n  ".join(lines)
    raise SpecValidationError(
        f"instance is not a valid {schema_name}:\n  {summary}\ninstance: {instance!r:.2000}",
        found,
    )
