"""Split `<think>…</think>` reasoning from the answer, incrementally.

Qwen3-style models think first: the output starts with `<think>` (or the chat template already
put `<think>` in the generation prompt, so the output starts inside the reasoning) and the answer
follows `</think>`. Fed text in pieces of any size, `ThinkSplitter` returns
`("reasoning", text)` and `("content", text)` pieces; a marker split across pieces is held
back until it is whole, and the whitespace around the markers is trimmed. Pure code.
"""

from __future__ import annotations

from typing import Literal

from .parsers import _held_suffix

Channel = Literal["reasoning", "content"]
Part = tuple[Channel, str]


class ThinkSplitter:
    def __init__(
        self, *, start: str = "<think>", end: str = "</think>", inside: bool = False
    ) -> None:
        self.start = start
        self.end = end
        # "begin": the output may open with `start`; "reasoning"; "content"
        self._state = "reasoning" if inside else "begin"
        self._buf = ""
        self._trim = inside  # drop whitespace at the start of the next channel
        self.saw_reasoning = inside

    def feed(self, text: str) -> list[Part]:
        self._buf += text
        return self._run(final=False)

    def finish(self) -> list[Part]:
        out = self._run(final=True)
        if self._buf:
            channel: Channel = "reasoning" if self._state == "reasoning" else "content"
            text = self._buf.rstrip() if channel == "reasoning" else self._buf
            if text:
                out.append((channel, text))
            self._buf = ""
        return out

    def _run(self, *, final: bool) -> list[Part]:
        out: list[Part] = []
        while self._buf:
            if self._trim:
                self._buf = self._buf.lstrip()
                if not self._buf:
                    break
                self._trim = False
            if self._state == "begin":
                head = self._buf.lstrip()
                if head.startswith(self.start):
                    self._buf = head[len(self.start) :]
                    self._state = "reasoning"
                    self.saw_reasoning = True
                    self._trim = True
                    continue
                if not final and self.start.startswith(head):
                    break  # may still become `<think>`
                self._state = "content"
            if self._state == "content":
                out.append(("content", self._buf))
                self._buf = ""
                break
            # reasoning
            at = self._buf.find(self.end)
            if at >= 0:
                text = self._buf[:at].rstrip()
                if text:
                    out.append(("reasoning", text))
                self._buf = self._buf[at + len(self.end) :]
                self._state = "content"
                self._trim = True
                continue
            if final:
                break
            keep = _held_suffix(self._buf, (self.end,))
            text = self._buf[: len(self._buf) - keep]
            # Trailing whitespace waits: it may be the space before `</think>`.
            release = text.rstrip()
            if release:
                out.append(("reasoning", release))
            self._buf = self._buf[len(release) :]
            break
        return out
