"""Stored responses for `store: true`, `previous_response_id`, and GET/DELETE by id.

A record keeps the response body as returned and the whole conversation it continued (earlier
turns' input and output items, then this turn's input), so a later request naming it as
`previous_response_id` rebuilds the full history without walking a chain. The store is bounded
by bytes (the records' JSON size) and evicts the least recently used records first; an evicted
or unknown id is simply absent, which the API reports as a 404. Lives on the event loop only.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import attrs


def json_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


@attrs.frozen(kw_only=True)
class StoredResponse:
    response: dict[str, Any]
    conversation: tuple[dict[str, Any], ...]
    nbytes: int

    @classmethod
    def of(cls, response: dict[str, Any], conversation: list[dict[str, Any]]) -> StoredResponse:
        items = tuple(conversation)
        return cls(
            response=response,
            conversation=items,
            nbytes=json_size(response) + json_size(list(items)),
        )

    def history(self) -> list[dict[str, Any]]:
        """The items a follow-up turn starts from: this turn's conversation, then its output."""
        return [*self.conversation, *self.response.get("output", [])]


@attrs.define
class ResponseStore:
    """Byte-bounded LRU of stored responses."""

    max_bytes: int
    _records: OrderedDict[str, StoredResponse] = attrs.field(factory=OrderedDict)
    nbytes: int = 0
    evictions: int = 0

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.max_bytes

    def put(self, response_id: str, record: StoredResponse) -> bool:
        """Keep `record`, evicting the least recently used ones to make room; a record larger
        than the whole budget is not kept (False)."""
        self.delete(response_id)
        if not self.fits(record.nbytes):
            return False
        while self._records and self.nbytes + record.nbytes > self.max_bytes:
            _, old = self._records.popitem(last=False)
            self.nbytes -= old.nbytes
            self.evictions += 1
        self._records[response_id] = record
        self.nbytes += record.nbytes
        return True

    def get(self, response_id: str) -> StoredResponse | None:
        record = self._records.get(response_id)
        if record is not None:
            self._records.move_to_end(response_id)
        return record

    def delete(self, response_id: str) -> bool:
        record = self._records.pop(response_id, None)
        if record is None:
            return False
        self.nbytes -= record.nbytes
        return True

    def __len__(self) -> int:
        return len(self._records)
