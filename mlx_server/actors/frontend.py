"""One loaded model as the generation path sees it (`generation.ModelPort`): template
rendering and tokenization, grammar checks, detokenizing, embedding jobs, and the stream actors.

Callers never touch MLX, the tokenizer or the actors' internals; they send messages
(`PromptSpec`, `GenerationRequest`) and read `StreamEvent`s. Chat templating and tokenization run
in a worker thread so a long prompt never stalls the event loop.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import attrs
import trio

from ..engine.constrain import ConstraintError
from ..engine.constrain import check as check_constraint
from ..engine.embeddings import EmbeddingBatch, EmbeddingsUnsupported, hidden_size, plan_batches
from ..engine.images import DecodedImage, ImagePolicy
from ..engine.model import LoadedModel
from ..engine.model_info import ModelInfo
from ..errors import (
    InvalidRequest,
    Overloaded,
    RequestTimeout,
    ServiceUnavailable,
)
from ..messages import (
    ConstraintSpec,
    Deadline,
    GenerationRequest,
    ImageRef,
    OutputSpec,
    PromptSpec,
    StreamEvent,
    VisionInput,
)
from ..tools.detect import OutputFormat, detect_format
from ..tools.output import OutputParser
from .executor import Job
from .scheduler import EngineEvent, Scheduler
from .stream import RequestStream

if TYPE_CHECKING:
    from ..engine.vision_rows import PromptKeys


class Frontend:
    def __init__(
        self,
        loaded: LoadedModel,
        scheduler: Scheduler,
        nursery: trio.Nursery,
        *,
        timeout: float,
        default_max_tokens: int,
        submit_job: Callable[[Job], None] | None = None,
        images: ImagePolicy | None = None,
    ) -> None:
        self._loaded = loaded
        self.images = images or ImagePolicy()
        self._submit_job = submit_job
        self._scheduler = scheduler
        self._nursery = nursery
        self.default_max_tokens = default_max_tokens
        self.vocab_size = loaded.tokenizer.vocab_size
        self.timeout = timeout
        self.streams = 0  # stream actors alive
        self._streams_done = trio.Event()
        self.model_name = loaded.name
        ctx = loaded.config.get("max_position_embeddings")
        self.context_length: int = int(ctx) if isinstance(ctx, int) and ctx > 0 else 1 << 20

    @property
    def scheduler(self) -> Scheduler:
        return self._scheduler

    @property
    def sampling_defaults(self) -> Mapping[str, Any] | None:
        """The model's own sampling defaults (its `generation_config.json`), when known."""
        return getattr(self._loaded, "sampling_defaults", None)

    async def prompt_ids(
        self, spec: PromptSpec, *, param: str = "prompt", what: str = ""
    ) -> tuple[int, ...]:
        """Render and tokenize a prompt off the event loop."""
        if spec.token_ids is not None:
            vocab = self._loaded.tokenizer.vocab_size
            bad = [t for t in spec.token_ids if not 0 <= t < vocab]
            if bad:
                where = f"{what}: " if what else ""
                raise InvalidRequest(
                    f"{where}token id {bad[0]} is out of range [0, {vocab})", param=param
                )
            return spec.token_ids
        return await trio.to_thread.run_sync(self._render_and_encode, spec)

    @property
    def vision(self) -> bool:
        """Whether the model reads images."""
        return self._loaded.vision is not None

    async def chat_prompt(
        self, spec: PromptSpec, *, param: str = "messages"
    ) -> tuple[tuple[int, ...], VisionInput | None]:
        """A chat that may hold images: its ids and, with images, what the vision encoder
        reads. The ids of an image prompt key each image's tokens by its content hash (the
        prefix cache's key). Images are decoded (URLs fetched, where allowed) off the event
        loop, within the server's limits; a text-only model refuses them."""
        refs = [r for m in spec.chat or () for r in m.images]
        if not refs:
            return await self.prompt_ids(spec, param=param), None
        if self._loaded.vision is None:
            raise InvalidRequest(
                f"model {self.model_name!r} does not accept images",
                param=refs[0].param,
                code="model_not_vision",
            )
        return await trio.to_thread.run_sync(self._vision_prompt, spec)

    def _vision_prompt(self, spec: PromptSpec) -> tuple[tuple[int, ...], VisionInput]:
        chat = tuple(
            attrs.evolve(m, images=tuple(self._decoded(r) for r in m.images))
            for m in spec.chat or ()
        )
        text = self._render(attrs.evolve(spec, chat=chat))
        refs = [r for m in chat for r in sorted(m.images, key=lambda r: r.offset) if r.image]
        pictures: list[DecodedImage] = [r.image for r in refs if r.image is not None]
        ids = self._prompt_keys.key(text, pictures, [r.param for r in refs])
        return ids, VisionInput(text=text, images=tuple(pictures))

    def _decoded(self, ref: ImageRef) -> ImageRef:
        if ref.image is not None:
            return ref
        image = self.images.decode(ref.source, param=ref.param)
        return attrs.evolve(ref, image=image, source="")

    @functools.cached_property
    def _prompt_keys(self) -> PromptKeys:
        from ..engine.vision_rows import PromptKeys

        return PromptKeys(self._loaded.vision)

    async def check_constraint(
        self, spec: ConstraintSpec | None, *, param: str = "response_format"
    ) -> None:
        """Compile a structured-output constraint off the event loop, so one the engine cannot
        enforce is a 400 naming `param` before any stream starts (the compiled grammar is
        cached: the executor's own compile is then a copy)."""
        if spec is None:
            return
        tok = self._loaded.tokenizer
        try:
            await trio.to_thread.run_sync(check_constraint, spec, tok)
        except ConstraintError as exc:
            raise InvalidRequest(str(exc), param=param) from None

    def _render_and_encode(self, spec: PromptSpec) -> tuple[int, ...]:
        tok = self._loaded.tokenizer
        if spec.chat is not None:
            return tuple(tok.encode(self._render(spec)))
        return tuple(tok.encode(spec.text or "", add_special_tokens=True))

    def _render(self, spec: PromptSpec) -> str:
        """A chat through the model's template (with the assistant prefill, if any)."""
        messages = [m.template_json() for m in spec.chat or ()]
        tools = [t.template_json() for t in spec.tools] or None
        text = self._loaded.template.render(
            messages,
            add_generation_prompt=spec.add_generation_prompt,
            tools=tools,
            **dict(spec.template_kwargs),
        )
        if spec.prefill:
            if text.rstrip().endswith("<think>"):
                text += "\n</think>\n\n"  # a forced tool call comes without thinking
            text += spec.prefill
        return text

    def deadline(self) -> Deadline:
        """A new request's deadline, from now (`--timeout`)."""
        return Deadline.starting(trio.current_time(), self.timeout)

    async def embed(
        self,
        inputs: Sequence[tuple[int, ...]],
        *,
        dimensions: int | None = None,
        deadline: Deadline | None = None,
    ) -> list[list[float]]:
        """Embed tokenized inputs with the loaded model (`engine.embeddings` documents the
        pooling); vectors in input order.

        The work runs on the executor thread as `Job`s, one chunk of one padded batch per job,
        so generation steps go on between them and the event loop never waits for MLX."""
        if self._submit_job is None:
            raise ServiceUnavailable("embeddings are not available on this server")
        size = hidden_size(self._loaded.config)
        if dimensions is not None and size is not None and not 1 <= dimensions <= size:
            raise InvalidRequest(
                f"'dimensions' must be between 1 and {size} (this model's hidden size), "
                f"got {dimensions}",
                param="dimensions",
            )
        submit = self._submit_job
        until = deadline or self.deadline()

        async def on_executor(fn: Callable[[LoadedModel], Any]) -> Any:
            done = trio.Event()
            outcome: list[Any] = [None, None]

            def on_done(result: Any, error: BaseException | None) -> None:
                outcome[:] = [result, error]
                done.set()

            submit(Job(fn, on_done))
            with trio.move_on_at(until.at):
                await done.wait()
            if not done.is_set():
                raise RequestTimeout(until.message("the embedding"))
            result, error = outcome
            if isinstance(error, EmbeddingsUnsupported):
                raise InvalidRequest(f"{error}: no embeddings from this model", param="model")
            if error is not None:
                raise error
            return result

        vectors: list[list[float]] = [[] for _ in inputs]
        for rows in plan_batches([len(x) for x in inputs]):
            part = [inputs[i] for i in rows]
            batch: EmbeddingBatch = await on_executor(
                lambda loaded, part=part: EmbeddingBatch(loaded.model, part, dimensions=dimensions)
            )
            try:
                while not await on_executor(lambda _, batch=batch: batch.step()):
                    pass
                result: list[list[float]] = await on_executor(lambda _, batch=batch: batch.result())
            finally:
                if not batch.closed:  # failed, timed out or cancelled: free it where it lives
                    submit(Job(lambda _, batch=batch: batch.close(), lambda _r, _e: None))
            for i, vector in zip(rows, result, strict=True):
                vectors[i] = vector
        return vectors

    async def detokenize(self, ids: Sequence[int]) -> tuple[str, tuple[str, ...]]:
        """The text of `ids` (special tokens kept) and each token's own text, off the event
        loop: `echo` and prompt-token logprobs in the completions API need them."""
        tok = self._loaded.tokenizer

        def work() -> tuple[str, tuple[str, ...]]:
            pieces = tuple(tok.decode([t], skip_special_tokens=False) for t in ids)
            return tok.decode(list(ids), skip_special_tokens=False), pieces

        return await trio.to_thread.run_sync(work)

    async def _counted(self, run: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run a stream actor, counted in `streams` (a model with streams is not idle)."""
        self.streams += 1
        try:
            await run(*args)
        finally:
            self.streams -= 1
            if not self.streams:
                self._streams_done.set()
                self._streams_done = trio.Event()

    @property
    def idle(self) -> bool:
        """No request queued, running, or still streaming its last events."""
        s = self._scheduler
        return not (self.streams or s.running or s.waiting)

    async def wait_idle(self) -> None:
        while not self.idle:
            if self.streams:
                await self._streams_done.wait()
            else:
                await self._scheduler.wait_idle()

    def start_stream(
        self,
        request: GenerationRequest,
        output: OutputSpec | None = None,
        deadline: Deadline | None = None,
    ) -> StreamHandle[StreamEvent]:
        """Submit a request and start its stream actor; raises Overloaded (before anything is
        sent to the client) when the server is full.

        The actor lives in the runtime's streams nursery, not in the HTTP task, so no cancel
        scope ever spans a response body's yields. Closing the handle (the response ended, or
        the client went away) cancels the actor, whose exit removes the request from the
        executor; a handle nobody closes still ends at the request's hard deadline."""
        actor = self._actor(request, self._scheduler.submit(request), output, deadline)
        out_send, out_recv = trio.open_memory_channel[StreamEvent](64)
        scope = trio.CancelScope()
        self._nursery.start_soon(self._counted, actor.run, out_send, scope)
        return StreamHandle(out_recv, scope)

    def start_streams(
        self,
        requests: Sequence[GenerationRequest],
        output: OutputSpec | None = None,
        deadline: Deadline | None = None,
    ) -> StreamHandle[tuple[int, StreamEvent]]:
        """Several requests sharing one response (`n` > 1, several prompts): they are queued
        together (all or none: Overloaded aborts the ones already queued), batch together in
        the executor, and their events arrive tagged with the request's index."""
        queued: list[trio.MemoryReceiveChannel[EngineEvent]] = []
        try:
            for request in requests:
                queued.append(self._scheduler.submit(request))
        except Overloaded:
            for request, events in zip(requests, queued, strict=False):
                events.close()
                self._scheduler.abort(request.request_id)
            raise
        out_send, out_recv = trio.open_memory_channel[tuple[int, StreamEvent]](64)
        scope = trio.CancelScope()
        self._nursery.start_soon(
            self._counted,
            self._run_group,
            list(zip(requests, queued, strict=True)),
            out_send,
            scope,
            output,
            deadline or self.deadline(),
        )
        return StreamHandle(out_recv, scope)

    async def _run_group(
        self,
        members: list[tuple[GenerationRequest, trio.MemoryReceiveChannel[EngineEvent]]],
        out: trio.MemorySendChannel[tuple[int, StreamEvent]],
        scope: trio.CancelScope,
        output: OutputSpec | None,
        deadline: Deadline,
    ) -> None:
        async def forward(index: int, events: trio.MemoryReceiveChannel[StreamEvent]) -> None:
            async with events:
                async for event in events:
                    await out.send((index, event))

        with scope:
            async with out, trio.open_nursery() as nursery:
                for index, (request, engine_events) in enumerate(members):
                    send, recv = trio.open_memory_channel[StreamEvent](64)
                    nursery.start_soon(
                        self._actor(request, engine_events, output, deadline).run,
                        send,
                        trio.CancelScope(),
                    )
                    nursery.start_soon(forward, index, recv)

    def _actor(
        self,
        request: GenerationRequest,
        events: trio.MemoryReceiveChannel[EngineEvent],
        output: OutputSpec | None = None,
        deadline: Deadline | None = None,
    ) -> RequestStream:
        return RequestStream(
            request,
            events,
            self._scheduler,
            self._loaded.tokenizer,
            deadline=deadline or self.deadline(),
            output=self._output_parser(request, output),
            keep_special=self._marker_ids if output is not None else frozenset(),
        )

    # -- tool calls and reasoning (mlx_server.tools) ------------------------------------------

    @property
    def model_info(self) -> ModelInfo | None:
        """What `/v1/models` tells clients (`engine.model_info`)."""
        return self._loaded.info

    @property
    def output_format(self) -> OutputFormat:
        """The model's tool-call markup and reasoning style, from its type and template."""
        return self._format

    @functools.cached_property
    def _format(self) -> OutputFormat:
        template = self._loaded.template
        return detect_format(
            self._loaded.config.get("model_type"),
            template.source,
            tool_fallback=getattr(template, "tool_fallback", None),
        )

    @functools.cached_property
    def _marker_ids(self) -> frozenset[int]:
        """Special tokens that are the family's tool-call or channel markup ([TOOL_CALLS],
        <|python_tag|>, Harmony's <|channel|>, Kimi's and DeepSeek's call markers): the
        detokenizer keeps them so the parser sees them."""
        tok = self._loaded.tokenizer
        markers = {"[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "<|python_tag|>"}
        markers.update(self.output_format.markers)
        ids = (tok.token_to_id(m) for m in sorted(markers))
        return frozenset(i for i in ids if i is not None) & tok.special_ids()

    @property
    def special_markers(self) -> Mapping[str, int]:
        """The family's markup strings that are single special tokens, with their ids: a
        forced call's grammar matches them as those tokens (`generation.call_grammar`)."""
        return self._special_markers

    @functools.cached_property
    def _special_markers(self) -> Mapping[str, int]:
        tok = self._loaded.tokenizer
        special = tok.special_ids()
        ids = {m: tok.token_to_id(m) for m in self.output_format.markers}
        return {m: i for m, i in ids.items() if i is not None and i in special}

    def _output_parser(
        self, request: GenerationRequest, output: OutputSpec | None
    ) -> OutputParser | None:
        if output is None:
            return None
        tail_ids = [t for t in request.prompt_ids[-32:] if t >= 0]  # (images: negative keys)
        tail = self._loaded.tokenizer.decode(tail_ids, skip_special_tokens=False)
        if output.prefill and tail.endswith(output.prefill):
            tail = tail[: len(tail) - len(output.prefill)]
        parser = OutputParser(self.output_format, output, prompt_tail=tail)
        return parser if parser.active else None


T = TypeVar("T")


class StreamHandle(Generic[T]):
    """The consumer side of one request's stream; use as a (sync) context manager."""

    def __init__(self, events: trio.MemoryReceiveChannel[T], scope: trio.CancelScope) -> None:
        self.events = events
        self._scope = scope

    def close(self) -> None:
        self._scope.cancel()
        self.events.close()

    def __enter__(self) -> trio.MemoryReceiveChannel[T]:
        return self.events

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def aclose(self) -> None:
        self.close()
