"""gpt-oss's Harmony format: every message of the assistant turn is
`<|start|>assistant<|channel|>CHANNEL[ to=RECIPIENT][ <|constrain|>json]<|message|>BODY<|end|>`
(the first one without `<|start|>assistant`, which the generation prompt already holds; the
turn ends with `<|return|>` or, after a call, `<|call|>`, both end-of-generation tokens).

Channels: `analysis` is reasoning, `final` is the answer, `commentary` carries tool calls
(`to=functions.NAME`, the body is the JSON arguments) or a preamble shown as text. The recipient
may also stand before the channel (`<|start|>assistant to=functions.NAME<|channel|>commentary`).

`HarmonyParser` is fed text in pieces of any size and returns `("reasoning", text)`,
`("content", text)` and `ToolCall`s; a marker split across pieces is held back until whole.
Text outside any message header (a model that skips the markup) is content.
"""

from __future__ import annotations

import re
from typing import Literal

from .base import ToolCall, _arguments_text, _held_suffix

MESSAGE = "<|message|>"
ENDS = ("<|end|>", "<|call|>", "<|return|>")
STARTS = ("<|start|>", "<|channel|>")
MARKERS = (*STARTS, MESSAGE, *ENDS, "<|constrain|>")
_RECIPIENT = re.compile(r"to=([^\s<]+)")
_CHANNEL = re.compile(r"<\|channel\|>\s*([A-Za-z_]+)")

Part = tuple[Literal["reasoning", "content"], str] | ToolCall


class HarmonyParser:
    def __init__(self) -> None:
        self._buf = ""
        self._state = "header"  # "header": before <|message|>; "body": inside a message
        self._channel = "final"
        self._recipient: str | None = None
        self._body = ""  # a tool call's arguments so far
        self._lead = True  # at the start of a body: whitespace is dropped
        self.calls = 0

    def feed(self, text: str) -> list[Part]:
        self._buf += text
        return self._run(final=False)

    def finish(self) -> list[Part]:
        out = self._run(final=True)
        if self._state == "body":
            out.extend(self._close())
        elif self._buf.strip() and not self._buf.lstrip().startswith("<|"):
            out.append(("content", self._buf))
        self._buf = ""
        return out

    def _run(self, *, final: bool) -> list[Part]:
        out: list[Part] = []
        while self._buf:
            if self._state == "header":
                head = self._buf.lstrip()
                if not head:
                    break
                if not head.startswith("<|") and not "<|".startswith(head):
                    # No markup: the model answers plainly.
                    self._open("final", None)
                    continue
                at = self._buf.find(MESSAGE)
                if at < 0:
                    break  # the header is not complete yet
                header = self._buf[:at]
                self._buf = self._buf[at + len(MESSAGE) :]
                channel = _CHANNEL.search(header)
                recipient = _RECIPIENT.search(header)
                self._open(
                    channel.group(1) if channel else "final",
                    recipient.group(1) if recipient else None,
                )
                continue
            # body
            ends = [(i, m) for m in ENDS if (i := self._buf.find(m)) >= 0]
            starts = [(i, m) for m in STARTS if (i := self._buf.find(m)) >= 0]
            if ends or starts:
                at, marker = min(ends + starts)
                out.extend(self._emit(self._buf[:at]))
                out.extend(self._close())
                self._buf = self._buf[at + len(marker) if marker in ENDS else at :]
                continue
            keep = 0 if final else _held_suffix(self._buf, MARKERS)
            out.extend(self._emit(self._buf[: len(self._buf) - keep]))
            self._buf = self._buf[len(self._buf) - keep :]
            break
        return out

    def _open(self, channel: str, recipient: str | None) -> None:
        self._state = "body"
        self._channel = channel
        self._recipient = recipient
        self._body = ""
        self._lead = True

    def _emit(self, text: str) -> list[Part]:
        if self._lead:
            text = text.lstrip()
            if not text:
                return []
            self._lead = False
        if not text:
            return []
        if self._recipient is not None:
            self._body += text
            return []
        if self._channel == "analysis":
            return [("reasoning", text)]
        return [("content", text)]

    def _close(self) -> list[Part]:
        self._state = "header"
        recipient, self._recipient = self._recipient, None
        if recipient is None:
            return []
        name = recipient.removeprefix("functions.")
        args = _arguments_text(self._body.strip())
        body, self._body = self._body, ""
        if args is None or not name:
            return [("content", body)] if body.strip() else []
        self.calls += 1
        return [ToolCall(name=name, arguments=args)]
