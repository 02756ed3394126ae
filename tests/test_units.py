"""Unit tests of the pure engine pieces the stream and cache actors build on."""

from __future__ import annotations

import pytest

from mlx_server.engine.detokenizer import REPLACEMENT, StreamingDetokenizer
from mlx_server.engine.prefix_cache import PrefixCache
from mlx_server.engine.stop import StopMatcher
from mlx_server.engine.tokenizer import Tokenizer
from mlx_server.testing.fakes import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return tiny_tokenizer()


def feed_all(matcher: StopMatcher, pieces: list[str]) -> tuple[list[str], str | None]:
    out: list[str] = []
    for piece in pieces:
        text, stop = matcher.feed(piece)
        out.append(text)
        if stop is not None:
            return out, stop
    return out, None


# --------------------------------------------------------------------------------------------
# StopMatcher
# --------------------------------------------------------------------------------------------


def test_stop_without_stops_passes_text_through() -> None:
    m = StopMatcher(())
    assert m.feed("abc") == ("abc", None)
    assert m.flush() == ""


def test_stop_empty_strings_are_ignored() -> None:
    m = StopMatcher(("",))
    assert m.stops == ()
    assert m.feed("abc") == ("abc", None)


def test_stop_holds_back_a_partial_stop_across_pieces() -> None:
    m = StopMatcher(("END",))
    assert m.feed("Hello E") == ("Hello ", None)  # "E" may start "END"
    assert m.feed("N") == ("", None)  # "EN" still may
    assert m.feed("D and more") == ("", "END")  # text before the stop was already out


def test_stop_releases_held_text_once_it_cannot_match() -> None:
    m = StopMatcher(("END",))
    assert m.feed("Hello EN") == ("Hello ", None)
    assert m.feed("X") == ("ENX", None)
    assert m.feed("") == ("", None)


def test_stop_cuts_text_before_the_stop_string() -> None:
    m = StopMatcher(("\n\n",))
    assert m.feed("one\ntwo\n\nthree") == ("one\ntwo", "\n\n")


def test_stop_overlapping_partial_matches() -> None:
    m = StopMatcher(("aab",))
    assert m.feed("aa") == ("", None)
    assert m.feed("a") == ("a", None)  # "aaa": only the last "aa" may still start a stop
    assert m.feed("b") == ("", "aab")


def test_stop_earliest_match_among_several_wins() -> None:
    m = StopMatcher(("world", "lo"))
    assert m.feed("Hello world") == ("Hel", "lo")
    m = StopMatcher(("lo", "Hello"))
    assert m.feed("Hello world") == ("", "Hello")


def test_stop_hold_back_is_the_longest_partial_of_any_stop() -> None:
    m = StopMatcher(("xyz", "yq"))
    # "xy" may start "xyz"; "y" may start "yq": hold the longer, 2 characters.
    assert m.feed("abxy") == ("ab", None)
    assert m.feed("q") == ("x", "yq")


def test_stop_match_spanning_many_single_character_pieces() -> None:
    m = StopMatcher(("</answer>",))
    pieces = list("The answer</answer>tail")
    out, stop = feed_all(m, pieces)
    assert stop == "</answer>"
    assert "".join(out) == "The answer"


def test_stop_flush_returns_the_held_back_text() -> None:
    m = StopMatcher(("END",))
    assert m.feed("the E") == ("the ", None)
    assert m.flush() == "E"
    assert m.flush() == ""


# --------------------------------------------------------------------------------------------
# StreamingDetokenizer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Hello world",
        "Hello café!",
        "🙂",
        "emoji 🙂🙃 and CJK 你好, é è ü",
        " caf\u00e9 STOP 日本語 Hello",
    ],
)
def test_detokenizer_never_splits_a_character(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    detok = StreamingDetokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    for piece in pieces:
        assert REPLACEMENT not in piece
    assert "".join(pieces) == tokenizer.decode(ids) == text


def test_detokenizer_holds_back_a_split_character(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("🙂")
    assert len(ids) == 4  # one byte token each: the test relies on the split
    detok = StreamingDetokenizer(tokenizer)
    assert [detok.add(i) for i in ids] == ["", "", "", "🙂"]
    assert detok.flush() == ""


def test_detokenizer_words_come_out_with_their_spaces(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Hello world stop")
    detok = StreamingDetokenizer(tokenizer)
    assert [detok.add(i) for i in ids] == ["Hello", " world", " stop"]


def test_detokenizer_skips_special_tokens(tokenizer: Tokenizer) -> None:
    (eos,) = tokenizer.eos_token_ids
    detok = StreamingDetokenizer(tokenizer)
    pieces = [detok.add(i) for i in [*tokenizer.encode("Hello"), eos]]
    assert "".join(pieces) + detok.flush() == "Hello"


def test_detokenizer_flush_releases_an_incomplete_tail(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("a🙂")[:-1]  # the emoji's last byte never comes
    detok = StreamingDetokenizer(tokenizer)
    assert "".join(detok.add(i) for i in ids) == "a"
    assert detok.flush() == REPLACEMENT  # what is left is shown, not silently lost


# --------------------------------------------------------------------------------------------
# PrefixCache
# --------------------------------------------------------------------------------------------


def test_prefix_cache_longest_prefix() -> None:
    cache = PrefixCache(1000)
    assert cache.insert(1, (1, 2), 10) == []
    assert cache.insert(2, (1, 2, 3, 4), 10) == [1]  # (1, 2) is covered by the newer entry
    assert cache.insert(3, (1, 5), 10) == []
    assert cache.lookup((1, 2, 3, 4, 5, 6)) == (2, 4)
    assert cache.lookup((1, 2, 3, 9)) == (2, 3)  # a partial prefix of a stored entry
    assert cache.lookup((1, 5, 7)) == (3, 2)
    assert cache.lookup((1, 7)) in {(2, 1), (3, 1)}
    assert cache.lookup((9, 1, 2)) is None
    assert cache.lookup(()) is None


def test_prefix_cache_lru_eviction_under_budget() -> None:
    cache = PrefixCache(30)
    assert cache.insert(1, (1,), 10) == []
    assert cache.insert(2, (2,), 10) == []
    assert cache.insert(3, (3,), 10) == []
    assert cache.used == 30
    assert cache.lookup((1, 9)) == (1, 1)  # touch 1: now 2 is the least recently used
    assert cache.insert(4, (4,), 10) == [2]
    assert cache.used == 30
    assert cache.lookup((2,)) is None
    assert cache.insert(5, (5,), 20) == [3, 1]
    assert len(cache) == 2
    assert cache.used == 30
    assert cache.lookup((4,)) == (4, 1)
    assert cache.lookup((5,)) == (5, 1)


def test_prefix_cache_rejects_an_entry_bigger_than_the_budget() -> None:
    cache = PrefixCache(30)
    assert cache.insert(1, (1, 2), 10) == []
    assert cache.insert(2, (1, 2, 3), 31) == [2]
    assert len(cache) == 1
    assert cache.used == 10
    assert cache.lookup((1, 2, 3, 4)) == (1, 2)


def test_prefix_cache_disabled_with_zero_budget() -> None:
    cache = PrefixCache(0)
    assert cache.insert(1, (1, 2), 1) == [1]
    assert cache.lookup((1, 2)) is None


def test_prefix_cache_rejects_empty_tokens() -> None:
    cache = PrefixCache(100)
    assert cache.insert(1, (), 1) == [1]
    assert len(cache) == 0


def test_prefix_cache_remove_cleans_the_trie() -> None:
    cache = PrefixCache(100)
    cache.insert(1, (1, 2, 3), 10)
    cache.insert(2, (1, 4), 10)
    cache.remove(1)
    assert cache.used == 10
    assert len(cache) == 1
    assert cache.lookup((1, 2, 3)) == (2, 1)  # only the shared first token is left
    root = cache._root
    assert set(root.children) == {1}
    assert set(root.children[1].children) == {4}
    assert root.children[1].handles == {2}
    cache.remove(2)
    assert root.children == {}
    assert cache.used == 0
    cache.remove(2)  # removing twice is harmless


def test_prefix_cache_drops_an_entry_that_is_a_prefix_of_a_newer_one() -> None:
    cache = PrefixCache(100)
    cache.insert(1, (1, 2), 10)
    cache.insert(2, (1, 2, 3), 10)
    assert cache.insert(3, (1, 2, 3, 4, 5), 10) == [2]  # 1 went when 2 came
    assert len(cache) == 1
    assert cache.used == 10
    assert cache.lookup((1, 2, 9)) == (3, 2)


def test_prefix_cache_same_tokens_replace_the_older_entry() -> None:
    cache = PrefixCache(100)
    cache.insert(1, (1, 2), 10)
    assert cache.insert(2, (1, 2), 10) == [1]
    assert cache.lookup((1, 2)) == (2, 2)


def test_prefix_cache_keeps_a_longer_older_entry() -> None:
    cache = PrefixCache(100)
    cache.insert(1, (1, 2, 3), 10)
    assert cache.insert(2, (1, 2), 10) == []  # the newer one is the shorter: both stay
    assert len(cache) == 2
    assert cache.lookup((1, 2, 3)) == (1, 3)


def test_prefix_cache_drops_covered_entries_before_evicting_others() -> None:
    cache = PrefixCache(100)
    cache.insert(1, (9,), 30)
    cache.insert(2, (1, 2), 60)
    assert cache.insert(3, (1, 2, 3), 60) == [2]
    assert cache.lookup((9,)) == (1, 1)
