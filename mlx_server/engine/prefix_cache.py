"""A trie over token ids that finds the longest cached prefix of a prompt, with LRU eviction
under a byte budget. Pure Python: it stores handles and sizes, never the arrays themselves.

An entry is either cuttable (plain KV state: it serves any prefix of its tokens) or whole-only
(recurrent state, a sliding window that has moved on: it serves only prompts that continue all
of its tokens)."""

from __future__ import annotations

import collections
from collections.abc import Sequence

import attrs


@attrs.define(eq=False)
class _Node:
    children: dict[int, _Node] = attrs.field(factory=dict)
    handles: set[int] = attrs.field(factory=set)  # every entry through this node
    cuttable: set[int] = attrs.field(factory=set)  # the cuttable ones among them
    ends: set[int] = attrs.field(factory=set)  # entries whose tokens end here


@attrs.define(eq=False)
class _Entry:
    tokens: tuple[int, ...]
    nbytes: int
    cuttable: bool = True


class PrefixCache:
    """Maps stored KV states (by handle) to the token sequences they cover."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.used = 0
        self._root = _Node()
        self._entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, tokens: Sequence[int]) -> tuple[int, int] | None:
        """(handle, length) of the longest stored prefix of `tokens`, or None."""
        node = self._root
        best: tuple[int, int] | None = None
        for depth, tok in enumerate(tokens, start=1):
            child = node.children.get(tok)
            if child is None or not child.handles:
                break
            node = child
            usable = node.cuttable | node.ends
            if usable:
                best = (max(usable), depth)  # the newest entry that serves this prefix
        if best is not None:
            self._entries.move_to_end(best[0])
        return best

    def insert(
        self, handle: int, tokens: Sequence[int], nbytes: int, *, cuttable: bool = True
    ) -> list[int]:
        """Store an entry; return the handles evicted to stay within the budget (possibly
        including this one, when it alone exceeds the budget)."""
        if nbytes > self.budget or not tokens:
            return [handle]
        entry = _Entry(tokens=tuple(tokens), nbytes=nbytes, cuttable=cuttable)
        self._entries[handle] = entry
        self.used += nbytes
        node = self._root
        for tok in entry.tokens:
            node = node.children.setdefault(tok, _Node())
            node.handles.add(handle)
            if cuttable:
                node.cuttable.add(handle)
        node.ends.add(handle)
        # Entries the new one covers go first; only then evict least recently used ones.
        evicted = self._drop_covered(handle)
        while self.used > self.budget and self._entries:
            old = next(iter(self._entries))
            self.remove(old)
            evicted.append(old)
        return evicted

    def remove(self, handle: int) -> None:
        entry = self._entries.pop(handle, None)
        if entry is None:
            return
        self.used -= entry.nbytes
        node = self._root
        path: list[tuple[_Node, int]] = []
        for tok in entry.tokens:
            child = node.children[tok]
            child.handles.discard(handle)
            child.cuttable.discard(handle)
            child.ends.discard(handle)
            path.append((node, tok))
            node = child
        for parent, tok in reversed(path):
            if not parent.children[tok].handles:
                del parent.children[tok]

    def _drop_covered(self, handle: int) -> list[int]:
        """An older entry whose tokens are a prefix of a new cuttable one is redundant."""
        entry = self._entries.get(handle)
        if entry is None or not entry.cuttable:
            return []
        node = self._root
        covered: set[int] = set()
        for tok in entry.tokens:
            node = node.children[tok]
        # every handle on the path that ends at or before this node and is not longer
        node = self._root
        for depth, tok in enumerate(entry.tokens, start=1):
            node = node.children[tok]
            for h in node.handles:
                if h != handle and len(self._entries[h].tokens) == depth:
                    covered.add(h)
        for h in covered:
            self.remove(h)
        return sorted(covered)
