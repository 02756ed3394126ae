"""What the OpenAPI document's parts share (`api/openapi.py` and each dialect's `openapi.py`):
the schema type, the table of protocol models the document names, and a reference to one."""

from __future__ import annotations

from typing import Any, Literal

import pydantic

Schema = dict[str, Any]
# name in the document -> (protocol model, whether it is read (a request) or written (an answer))
ModelTable = dict[str, tuple[type[pydantic.BaseModel], Literal["validation", "serialization"]]]


def ref(name: str) -> Schema:
    """A reference to the named schema of the document's components."""
    return {"$ref": f"#/components/schemas/{name}"}
