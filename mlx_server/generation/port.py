"""What the generation path needs from a loaded model (`actors.frontend.Frontend` is one)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from ..messages import (
    ConstraintSpec,
    GenerationRequest,
    OutputSpec,
    PromptSpec,
    StreamEvent,
    VisionInput,
)
from ..tools.detect import OutputFormat


class StreamHandleLike(Protocol):
    events: Any

    def close(self) -> None: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> None: ...


class ModelPort(Protocol):
    model_name: str
    vocab_size: int
    context_length: int
    default_max_tokens: int

    @property
    def output_format(self) -> OutputFormat: ...

    @property
    def sampling_defaults(self) -> Mapping[str, Any] | None: ...

    @property
    def special_markers(self) -> Mapping[str, int]: ...

    async def prompt_ids(self, spec: PromptSpec, *, param: str = ...) -> tuple[int, ...]: ...

    async def chat_prompt(
        self, spec: PromptSpec, *, param: str = ...
    ) -> tuple[tuple[int, ...], VisionInput | None]:
        """A chat with images: its ids (image tokens keyed by content) and what the vision
        encoder reads; a 400 for a model that takes no images or an image it will not read."""
        ...

    async def check_constraint(self, spec: ConstraintSpec | None, *, param: str = ...) -> None: ...

    async def detokenize(self, ids: Sequence[int]) -> tuple[str, tuple[str, ...]]: ...

    def start_streams(
        self, requests: Sequence[GenerationRequest], output: OutputSpec | None = None
    ) -> StreamHandleLike: ...


__all__ = ["ModelPort", "StreamEvent", "StreamHandleLike"]
