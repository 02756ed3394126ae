"""Typed access to JSON request fields, each failure a 400 that names the field."""

from __future__ import annotations

import json
import math
from typing import Any

from quart import request

from ..errors import InvalidRequest
from ..messages import PromptSpec


async def json_body() -> dict[str, Any]:
    ctype = request.headers.get("content-type", "")
    raw = await request.get_data(as_text=False)
    if not raw:
        raise InvalidRequest("the request body is empty; send a JSON object")
    if ctype and "json" not in ctype and "text/plain" not in ctype:
        raise InvalidRequest(f"unsupported content type {ctype!r}; send application/json")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


class Fields:
    """Reads fields of one JSON object, reporting bad ones with their path."""

    def __init__(self, body: dict[str, Any], prefix: str = "") -> None:
        self.body = body
        self.prefix = prefix

    def _name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def present(self, key: str) -> bool:
        return self.body.get(key) is not None

    def raw(self, key: str) -> Any:
        return self.body.get(key)

    def number(
        self, key: str, default: float | None, *, lo: float | None = None, hi: float | None = None
    ) -> float | None:
        value = self.body.get(key)
        if value is None:
            return default
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise InvalidRequest(f"'{self._name(key)}' must be a number", param=self._name(key))
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise InvalidRequest(
                f"'{self._name(key)}' must be between {lo} and {hi}, got {value}",
                param=self._name(key),
            )
        return float(value)

    def integer(
        self, key: str, default: int | None, *, lo: int | None = None, hi: int | None = None
    ) -> int | None:
        value = self.body.get(key)
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequest(f"'{self._name(key)}' must be an integer", param=self._name(key))
        if lo is not None and value < lo:
            raise InvalidRequest(
                f"'{self._name(key)}' must be at least {lo}, got {value}", param=self._name(key)
            )
        if hi is not None and value > hi:
            raise InvalidRequest(
                f"'{self._name(key)}' must be at most {hi}, got {value}", param=self._name(key)
            )
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.body.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise InvalidRequest(f"'{self._name(key)}' must be a boolean", param=self._name(key))
        return value

    def string(self, key: str, default: str | None = None) -> str | None:
        value = self.body.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise InvalidRequest(f"'{self._name(key)}' must be a string", param=self._name(key))
        return value

    def obj(self, key: str) -> dict[str, Any] | None:
        value = self.body.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise InvalidRequest(f"'{self._name(key)}' must be an object", param=self._name(key))
        return value

    def stop_list(self, key: str, *, max_items: int = 4) -> tuple[str, ...]:
        value = self.body.get(key)
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,) if value else ()
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            if len(value) > max_items:
                raise InvalidRequest(
                    f"'{self._name(key)}' takes at most {max_items} sequences",
                    param=self._name(key),
                )
            return tuple(s for s in value if s)
        raise InvalidRequest(
            f"'{self._name(key)}' must be a string or a list of strings", param=self._name(key)
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def prompt_inputs(
    raw: Any, *, param: str, allow_empty_text: bool = True, max_items: int | None = None
) -> list[PromptSpec]:
    """A string, a list of strings, a list of token ids, or a list of lists of token ids (the
    input forms of /v1/completions and /v1/embeddings), one PromptSpec per input."""
    if raw is None:
        raise InvalidRequest(f"'{param}' is required", param=param)
    if isinstance(raw, str):
        raw = [raw]
    elif not isinstance(raw, list):
        raise InvalidRequest(
            f"'{param}' must be a string, a list of strings, a list of token ids or a list of "
            "lists of token ids",
            param=param,
        )
    if not raw:
        raise InvalidRequest(f"'{param}' must not be empty", param=param)
    if all(_is_int(t) for t in raw):
        return [PromptSpec(token_ids=tuple(raw))]
    if max_items is not None and len(raw) > max_items:
        raise InvalidRequest(f"'{param}' takes at most {max_items} inputs", param=param)
    if all(isinstance(x, str) for x in raw):
        for i, text in enumerate(raw):
            if not text and not allow_empty_text:
                raise InvalidRequest(f"'{param}[{i}]' is an empty string", param=param)
        return [PromptSpec(text=text) for text in raw]
    if all(isinstance(x, list) for x in raw):
        out: list[PromptSpec] = []
        for i, ids in enumerate(raw):
            if not ids or not all(_is_int(t) for t in ids):
                raise InvalidRequest(
                    f"'{param}[{i}]' must be a non-empty list of token ids", param=param
                )
            out.append(PromptSpec(token_ids=tuple(ids)))
        return out
    raise InvalidRequest(
        f"'{param}' mixes types: use only strings, only token ids, or only lists of token ids",
        param=param,
    )
