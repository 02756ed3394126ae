"""OpenAI's `response_format`, parsed into a `ConstraintSpec` (structured output).

Only the shape is checked here; whether the schema can be enforced is the frontend's
`check_constraint`, which compiles it off the event loop.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..errors import InvalidRequest
from ..messages import ConstraintSpec

PARAM = "response_format"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def parse_response_format(value: Any, *, param: str = PARAM) -> ConstraintSpec | None:
    """`{"type": "text"}` (or null) -> None; `{"type": "json_object"}` -> any JSON object;
    `{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}` ->
    that schema (enforced whether or not `strict` is set). Anything else is a 400."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest(f"'{param}' must be an object", param=param)
    kind = value.get("type")
    if kind in ("text", None):  # a missing type was always read as text here
        return None
    if kind == "json_object":
        return ConstraintSpec.json_object()
    if kind == "json_schema":
        return ConstraintSpec.json_schema(_schema(value.get("json_schema"), param))
    raise InvalidRequest(
        f"'{param}.type' must be one of 'text', 'json_object', 'json_schema'; got {kind!r}",
        param=param,
    )


def _schema(spec: Any, param: str) -> str:
    where = f"{param}.json_schema"
    if not isinstance(spec, dict):
        raise InvalidRequest(f"'{where}' must be an object", param=param)
    name = spec.get("name")
    if name is not None and (not isinstance(name, str) or not _NAME.fullmatch(name)):
        raise InvalidRequest(
            f"'{where}.name' must be 1-64 letters, digits, '_' or '-'", param=param
        )
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidRequest(f"'{where}.strict' must be a boolean", param=param)
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise InvalidRequest(f"'{where}.schema' must be a JSON Schema object", param=param)
    return json.dumps(schema)
