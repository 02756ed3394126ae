"""The prefix trie with whole-only entries (recurrent state, a moved sliding window): such an
entry serves only prompts that continue all of its tokens, and a cuttable entry serves any
prefix of its tokens."""

from __future__ import annotations

from mlx_server.engine.prefix_cache import PrefixCache


def test_whole_only_entries_serve_only_prompts_that_continue_them() -> None:
    cache = PrefixCache(1000)
    assert cache.insert(1, (1, 2, 3, 4), 10, cuttable=False) == []
    assert cache.lookup((1, 2, 3)) is None  # shorter: a recurrent state cannot be cut
    assert cache.lookup((1, 2, 9)) is None
    assert cache.lookup((1, 2, 3, 4)) == (1, 4)
    assert cache.lookup((1, 2, 3, 4, 5, 6)) == (1, 4)
    # A longer whole-only entry does not make the shorter one redundant.
    assert cache.insert(2, (1, 2, 3, 4, 5, 6), 10, cuttable=False) == []
    assert cache.lookup((1, 2, 3, 4, 5, 6, 7)) == (2, 6)
    assert cache.lookup((1, 2, 3, 4, 5, 9)) == (1, 4)
    # A cuttable entry over both serves every prefix: they go.
    assert cache.insert(3, (1, 2, 3, 4, 5, 6, 7, 8), 10) == [1, 2]
    assert cache.lookup((1, 2, 3, 4, 5, 9)) == (3, 5)
    assert cache.lookup((1, 2)) == (3, 2)
    assert len(cache) == 1 and cache.used == 10


def test_mixed_entries_take_the_deepest_usable_one() -> None:
    cache = PrefixCache(1000)
    cache.insert(1, (1, 2, 3), 10)  # cuttable
    cache.insert(2, (1, 2, 3, 4, 5, 6), 10, cuttable=False)
    # Through the whole-only entry but leaving it early: only the cuttable one serves.
    assert cache.lookup((1, 2, 3, 4, 5, 0)) == (1, 3)
    assert cache.lookup((1, 2, 3, 4, 5, 6, 0)) == (2, 6)
    cache.remove(2)
    assert cache.lookup((1, 2, 3, 4, 5, 6, 0)) == (1, 3)
    assert cache.used == 10
