"""The prompt-cache manager actor: decides which stored KV states to keep and which prompt
prefix a new request can reuse. It owns a `PrefixCache` (handles and sizes only); the arrays
stay on the executor thread, which it tells what to free."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import attrs
import trio

from ..engine.prefix_cache import PrefixCache
from ..messages import CachedPrefix, ExecutorCommand, ReleaseCache, StoredCache

log = logging.getLogger(__name__)


@attrs.frozen(kw_only=True)
class _Lookup:
    prompts: tuple[tuple[int, ...], ...]
    reply: trio.MemorySendChannel[list[CachedPrefix | None]]


@attrs.frozen(kw_only=True)
class _Store:
    stored: StoredCache


class CacheManager:
    def __init__(self, budget_bytes: int, send_to_executor: Callable[[ExecutorCommand], None]):
        self._cache = PrefixCache(budget_bytes)
        self._to_executor = send_to_executor
        self._send, self._recv = trio.open_memory_channel[_Lookup | _Store](1024)
        self.hits = 0
        self.lookups = 0

    @property
    def enabled(self) -> bool:
        return self._cache.budget > 0

    @property
    def used_bytes(self) -> int:
        return self._cache.used

    async def lookup(self, prompt_ids: tuple[int, ...]) -> CachedPrefix | None:
        return (await self.lookup_many([prompt_ids]))[0]

    async def lookup_many(self, prompts: Sequence[tuple[int, ...]]) -> list[CachedPrefix | None]:
        """Several prompts' prefixes in one round trip (a burst of arrivals)."""
        if not self.enabled or not prompts:
            return [None] * len(prompts)
        reply_send, reply_recv = trio.open_memory_channel[list[CachedPrefix | None]](1)
        await self._send.send(_Lookup(prompts=tuple(prompts), reply=reply_send))
        async with reply_recv:
            return await reply_recv.receive()

    def store(self, stored: StoredCache) -> None:
        try:
            self._send.send_nowait(_Store(stored=stored))
        except trio.WouldBlock:
            self._to_executor(ReleaseCache(handles=(stored.handle,)))

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for msg in self._recv:
            if isinstance(msg, _Lookup):
                replies: list[CachedPrefix | None] = []
                for prompt_ids in msg.prompts:
                    self.lookups += 1
                    # Reuse at most all but the last prompt token: the last one yields the logits.
                    found = self._cache.lookup(prompt_ids[:-1])
                    if found is not None:
                        self.hits += 1
                    replies.append(
                        CachedPrefix(handle=found[0], length=found[1]) if found else None
                    )
                with msg.reply:
                    msg.reply.send_nowait(replies)
            else:
                s = msg.stored
                evicted = self._cache.insert(s.handle, s.token_ids, s.nbytes, cuttable=s.cuttable)
                if evicted:
                    self._to_executor(ReleaseCache(handles=tuple(evicted)))
