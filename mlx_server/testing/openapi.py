"""Validate JSON bodies against OpenAI's published OpenAPI description.

The description lives outside the package, in ``shared/specs/openai-openapi.yaml`` beside the
repository (``<repo_root>/../shared``; a checkout that carries ``shared/`` inside the repository
works too). It declares OpenAPI 3.1 but still uses the 3.0 keyword ``nullable: true``, which a
JSON Schema 2020-12 validator ignores; the loader rewrites it into a type union with ``"null"``
before anything is validated.

    from mlx_server.testing.openapi import validate
    validate("CreateChatCompletionResponse", response.json())   # AssertionError when invalid
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import referencing
import referencing.jsonschema
import yaml
from jsonschema.exceptions import ValidationError, best_match, relevance

SPEC_NAME = "openai-openapi.yaml"
DOCUMENT_URI = "urn:mlx-server:openai-openapi"
REPO_ROOT = Path(__file__).resolve().parent.parent.parent


class SpecNotFound(FileNotFoundError):
    """The OpenAPI description is not where the tests expect it."""


class SpecValidationError(AssertionError):
    """A JSON instance does not match its schema; the message lists where and why."""

    def __init__(self, message: str, errors: list[ValidationError]) -> None:
        super().__init__(message)
        self.errors = errors


def spec_candidates() -> list[Path]:
    return [
        REPO_ROOT.parent / "shared" / "specs" / SPEC_NAME,
        REPO_ROOT / "shared" / "specs" / SPEC_NAME,
    ]


def spec_path() -> Path:
    for candidate in spec_candidates():
        if candidate.is_file():
            return candidate
    tried = "\n  ".join(str(p) for p in spec_candidates())
    raise SpecNotFound(
        f"the OpenAI OpenAPI description {SPEC_NAME} was not found; tried:\n  {tried}\n"
        "copy shared/specs/ beside the repository checkout"
    )


def rewrite_nullable(node: Any) -> Any:
    """Return a copy of ``node`` with every OpenAPI 3.0 ``nullable`` turned into JSON Schema.

    ``{type: T, nullable: true}`` becomes ``{type: [T, "null"]}`` (and ``null`` joins an
    ``enum``); a nullable schema without a single ``type`` (a ``$ref``, ``anyOf``, ``oneOf``,
    or no type at all) becomes ``{anyOf: [<schema>, {type: "null"}]}``. ``nullable: false`` is
    dropped."""
    if isinstance(node, list):
        return [rewrite_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: rewrite_nullable(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable") is not True:
        return out
    kind = out.get("type")
    if isinstance(kind, str | list):
        kinds = [kind] if isinstance(kind, str) else list(kind)
        if "null" not in kinds:
            kinds.append("null")
        out["type"] = kinds
        if isinstance(out.get("enum"), list) and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
        return out
    return {"anyOf": [out, {"type": "null"}]}


@functools.cache
def load_spec() -> dict[str, Any]:
    """The whole OpenAPI document, ``nullable`` already rewritten (loaded once per process)."""
    path = spec_path()
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with path.open("rb") as fh:
        document = yaml.load(fh, Loader=loader)
    if not isinstance(document, dict) or "components" not in document:
        raise ValueError(f"{path} is not an OpenAPI document with components")
    return rewrite_nullable(document)


@functools.cache
def _registry() -> referencing.Registry[Any]:
    resource = referencing.Resource.from_contents(
        load_spec(), default_specification=referencing.jsonschema.DRAFT202012
    )
    return referencing.Registry().with_resource(DOCUMENT_URI, resource).crawl()


def schema_names() -> list[str]:
    return sorted(load_spec()["components"]["schemas"])


@functools.cache
def validator(schema_name: str) -> jsonschema.Draft202012Validator:
    """A validator for ``#/components/schemas/<schema_name>``, ``$ref``s resolved in the
    document."""
    if schema_name not in load_spec()["components"]["schemas"]:
        raise KeyError(f"no schema {schema_name!r} in {SPEC_NAME}")
    schema = {"$ref": f"{DOCUMENT_URI}#/components/schemas/{schema_name}"}
    return jsonschema.Draft202012Validator(schema, registry=_registry())


def errors(schema_name: str, instance: Any) -> list[ValidationError]:
    """Every error of ``instance`` against the schema, the most relevant first."""
    return sorted(validator(schema_name).iter_errors(instance), key=relevance)


def _describe(error: ValidationError) -> str:
    # Descend into anyOf/oneOf branches to the error that most likely explains the failure.
    deepest = best_match([error]) or error
    return f"at {deepest.json_path}: {deepest.message}"


def validate(schema_name: str, instance: Any) -> None:
    """Raise ``SpecValidationError`` (an ``AssertionError``) unless ``instance`` is a valid
    ``#/components/schemas/<schema_name>``."""
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
