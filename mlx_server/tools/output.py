"""Turn a generation's text into stream events: reasoning, answer text and tool calls.

`OutputParser` chains the `<think>` splitter (reasoning never reaches the tool parser or the
answer) and the model family's tool parser, and speaks the server's `StreamEvent` vocabulary:
`ReasoningDelta`, `TextDelta`, then per call `ToolCallStart` and `ToolCallArgsDelta`.
gpt-oss's Harmony channels carry reasoning, answer and calls at once: one `HarmonyParser`
does both jobs. A call's
name is sent once its markup is complete and parses (so malformed markup can still become
text), and its arguments right after. Pure code, fed by the per-request stream actor.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

from ..messages import (
    OutputSpec,
    ReasoningDelta,
    StreamEvent,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallStart,
)
from .detect import OutputFormat
from .parsers import ToolCall, ToolParser, make_parser
from .parsers.harmony import HarmonyParser
from .reasoning import ThinkSplitter


def new_call_id() -> str:
    return uuid.uuid4().hex[:24]


class OutputParser:
    def __init__(self, fmt: OutputFormat, spec: OutputSpec, *, prompt_tail: str = "") -> None:
        """`prompt_tail` is the end of the rendered prompt (before any prefill): a template
        that opens `<think>` in the generation prompt makes the output start inside it."""
        self._spec = spec
        self._think: ThinkSplitter | None = None
        if fmt.reasoning and spec.reasoning != "off":
            inside = prompt_tail.rstrip().endswith("<think>")
            self._think = ThinkSplitter(inside=inside)
        self._tools: ToolParser | None = None
        self._harmony = HarmonyParser() if fmt.harmony else None
        if self._harmony is not None:
            self._think = None
        elif spec.tools_json is not None:
            tools: Any = json.loads(spec.tools_json)
            self._tools = make_parser(fmt.tool_family, tools if isinstance(tools, list) else [])
        self.tool_calls = 0
        self._dropped_calls = 0
        self._prefill_events: list[StreamEvent] = []
        if spec.prefill:
            self._prefill_events = self.feed(spec.prefill)

    @property
    def active(self) -> bool:
        return self._think is not None or self._tools is not None or self._harmony is not None

    def feed(self, text: str) -> list[StreamEvent]:
        if not text:
            return []
        if self._harmony is not None:
            return self._harmony_events(self._harmony.feed(text))
        parts = self._think.feed(text) if self._think is not None else [("content", text)]
        return self._events(parts, final=False)

    def finish(self) -> list[StreamEvent]:
        if self._harmony is not None:
            return self._harmony_events(self._harmony.finish())
        parts = self._think.finish() if self._think is not None else []
        return self._events(parts, final=True)

    def _events(self, parts: Sequence[tuple[str, str]], *, final: bool) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        for channel, text in parts:
            if channel == "reasoning":
                if self._spec.reasoning == "split" and text:
                    out.append(ReasoningDelta(text=text))
            elif self._tools is None:
                if text:
                    out.append(TextDelta(text=text))
            else:
                out.extend(self._pieces(self._tools.feed(text)))
        if final and self._tools is not None:
            out.extend(self._pieces(self._tools.finish()))
        return out

    def _harmony_events(self, parts: Sequence[Any]) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        for part in parts:
            if isinstance(part, ToolCall):
                if self._spec.tools_json is not None:
                    out.extend(self._pieces([part]))
            elif part[0] == "reasoning":
                if self._spec.reasoning == "split":
                    out.append(ReasoningDelta(text=part[1]))
                elif self._spec.reasoning == "off":  # not split: the analysis is text too
                    out.append(TextDelta(text=part[1]))
            elif part[1]:
                out.append(TextDelta(text=part[1]))
        return out

    def _pieces(self, pieces: list[str | ToolCall]) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        for piece in pieces:
            if isinstance(piece, str):
                if piece:
                    out.append(TextDelta(text=piece))
                continue
            limit = self._spec.max_calls
            if limit is not None and self.tool_calls >= limit:
                self._dropped_calls += 1
                continue
            index = self.tool_calls
            self.tool_calls += 1
            out.append(ToolCallStart(index=index, call_id=new_call_id(), name=piece.name))
            out.append(ToolCallArgsDelta(index=index, arguments=piece.arguments))
        return out
