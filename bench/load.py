"""Load generator: our server vs mlx_lm.server vs mlx-lm without HTTP, same model, same run.

Drives real HTTP (httpx on trio, streaming OpenAI chat completions, temperature 0) through a set
of workloads, then prints TTFT p50/p95, inter-token latency p50/p95, per-stream and aggregate
tokens/s for each system, and the ratios the performance targets name.

    uv run python -m bench.load                      # default model (SmolLM2-135M, 4-bit GGUF)
    uv run python -m bench.load --tiny               # tiny random llama: per-step overhead
    uv run python -m bench.load --tiny --quick       # smoke run (what the test runs)
    uv run python -m bench.load --tokens 32 --systems ours,mlx_lm_server,raw
    uv run python -m bench.load --model DIR_OR_GGUF --workloads single,concurrent
    uv run python -m bench.load --model DIR --systems ours,mlx_lm_server,raw_shipped \
        --tokens 256 --streams 8,32 --mix uniform        # a GPU run (see README)

Systems (`--systems`, comma-separated; default: all; with --quick: ours,mlx_lm_server,raw_fp32):
    ours                our server (`mlx-server`), as it configures itself: on Linux CPU with
                        the system OpenBLAS it preloads it and runs float32 weights
    mlx_lm_server       `python -m mlx_lm server` as shipped: weights as stored, MLX's BLAS
    mlx_lm_server_fp32  mlx_lm.server on the same weights as ours: OpenBLAS preloaded, float32
    raw                 = raw_shipped,raw_fp32: mlx-lm's `generate_step`, no HTTP (the ceiling),
                        as shipped and on the same weights as ours; for the concurrent
                        workload, mlx-lm's `BatchGenerator` with all streams inserted at once

Workloads (`--workloads`, default: all):
    single      one stream, `--tokens` tokens
    concurrent  `--streams` streams at once (a comma-separated list runs each count in
                turn), a mix of short chats (one short question, `--tokens`/2 tokens) and long
                chats (a ~`--long-chat-tokens` history, `--tokens` tokens); with `--mix
                uniform`, every stream a short chat of `--tokens` tokens
    multiturn   `--conversations` concurrent conversations of `--turns` turns; each turn
                extends the conversation (with the reply as received), so a prompt cache applies
    long        time to first token of a cold ~`--long-tokens`-token prompt
    prefix      a ~`--prefix-tokens`-token prefix sent once, then a request extending it
                ("cached"), against the same request with a different first line ("cold")

Generation never stops at EOS: our server gets `ignore_eos: true`; mlx_lm.server, which lacks
it, gets a `logit_bias` of -1000 on the EOS ids; `generate_step` ignores EOS by itself. Token
counts come from each stream's usage chunk.

All systems start first, one at a time, and warm up; then every round of every workload runs on
each system in turn, never two at once (an idle system uses no CPU). On a shared machine the
background load drifts; interleaving spreads the drift over all systems alike, but single runs
stay noisy: compare ratios from one run, and repeat (`--repeats`) when it matters.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import math
import os
import platform
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import httpx
import trio

SYSTEMS = ("ours", "mlx_lm_server", "mlx_lm_server_fp32", "raw_shipped", "raw_fp32")
SYSTEM_ALIASES = {"raw": ("raw_shipped", "raw_fp32"), "all": SYSTEMS}
SHORT_NAMES = {
    "ours": "ours",
    "mlx_lm_server": "mlx_lm.server",
    "mlx_lm_server_fp32": "mlx_lm.server fp32",
    "raw_shipped": "raw shipped",
    "raw_fp32": "raw fp32",
}
WORKLOADS = ("single", "concurrent", "multiturn", "long", "prefix")
QUICK_SYSTEMS = "ours,mlx_lm_server,raw_fp32"  # one of each kind: all the code paths
HTTP_SYSTEMS = ("ours", "mlx_lm_server", "mlx_lm_server_fp32")
EOS_BIAS = -1000.0

_WORDS = (
    "the sea light keeper night storm ship harbor wave rock island lamp wind rain cliff tide "
    "boat sailor map compass star cloud shore gull rope anchor fog bell tower stair window "
    "letter winter summer morning evening silver green blue old young quiet loud long short "
    "river road village market bread salt fish net house door garden stone bridge north south "
    "east west journey story song memory promise secret friend stranger mother father child "
    "year day hour clock candle fire smoke ash iron wood glass paper ink book page chapter"
).split()


# --- prompts ---------------------------------------------------------------------------------


class PromptBuilder:
    """Deterministic filler text measured in the model's own tokens, and chat prompts of a
    target length (counted with the model's chat template, rendered as Hugging Face does)."""

    def __init__(self, model_dir: Path, seed: int) -> None:
        import jinja2.sandbox
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
        self.bos = config.get("bos_token") or ""
        self.eos = config.get("eos_token") or ""
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self.template = env.from_string(config["chat_template"])
        self.rng = random.Random(seed)

    def tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def prompt_tokens(self, messages: Sequence[dict[str, str]]) -> int:
        text = self.template.render(
            messages=list(messages),
            add_generation_prompt=True,
            bos_token=self.bos,
            eos_token=self.eos,
        )
        return self.tokens(text)

    def nonce(self) -> str:
        return f"{self.rng.getrandbits(40):010x}"

    def filler(self, n_tokens: int) -> str:
        if n_tokens <= 0:
            return ""
        words = [self.rng.choice(_WORDS) for _ in range(n_tokens * 2)]
        for i in range(12, len(words), 13):
            words[i] += "."
        text = " ".join(words)
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        return text[: enc.offsets[min(n_tokens, len(enc.ids)) - 1][1]]

    def system(self) -> dict[str, str]:
        """A system message whose first tokens are unique, so no prompt cache can serve it."""
        return {"role": "system", "content": f"Session {self.nonce()}. You are a helpful writer."}

    def sized(self, messages: list[dict[str, str]], target: int) -> list[dict[str, str]]:
        """Pad the last message with filler so the whole prompt is about `target` tokens."""
        overhead = self.prompt_tokens(messages)
        last = dict(messages[-1])
        last["content"] += "\n" + self.filler(target - overhead - 1)
        return [*messages[:-1], last]

    def short_chat(self) -> list[dict[str, str]]:
        topic = " ".join(self.rng.choice(_WORDS) for _ in range(3))
        return [self.system(), {"role": "user", "content": f"Write a long story about {topic}."}]

    def long_chat(self, target: int) -> list[dict[str, str]]:
        third = max(target // 3, 8)
        messages = [
            self.system(),
            {"role": "user", "content": "Here are my notes: " + self.filler(third)},
            {"role": "assistant", "content": "Thank you. " + self.filler(third)},
            {"role": "user", "content": "Now write a long story from these notes."},
        ]
        return self.sized(messages, target)


@dataclass
class Request:
    messages: list[dict[str, str]]
    max_tokens: int


@dataclass
class Plan:
    """Every prompt of the run, built once so that all systems see the same requests."""

    warmup: list[Request]
    single: list[Request]  # the same shape `--repeats` times, each with its own first line
    concurrent: dict[int, list[Request]]  # by stream count
    concurrent_warm: dict[int, list[Request]]  # the same shapes, other prompts (no cache hits)
    conversations: list[tuple[dict[str, str], list[str]]]  # (system message, user turns)
    reply_tokens: int  # max_tokens of each multi-turn reply
    long: Request
    prefix_prime: Request
    prefix_cold_system: dict[str, str]
    prefix_question: str


def build_plan(p: PromptBuilder, args: argparse.Namespace) -> Plan:
    warmup = [Request(p.short_chat(), 4) for _ in range(1 + min(args.streams, 4))]

    def concurrent_requests(n: int) -> list[Request]:
        if args.mix == "uniform":
            return [Request(p.short_chat(), args.tokens) for _ in range(n)]
        return [
            Request(p.short_chat(), max(args.tokens // 2, 2))
            if i % 2 == 0
            else Request(p.long_chat(args.long_chat_tokens), args.tokens)
            for i in range(n)
        ]

    concurrent = {n: concurrent_requests(n) for n in args.stream_counts}
    concurrent_warm = {
        n: concurrent_requests(n) if args.warm_concurrent else [] for n in args.stream_counts
    }
    conversations = []
    for _ in range(args.conversations):
        turns = [
            f"Turn {t + 1}: continue the story, and mention {p.filler(args.turn_tokens)}"
            for t in range(args.turns)
        ]
        conversations.append((p.system(), turns))
    long_msgs = p.sized(
        [p.system(), {"role": "user", "content": "Summarize these notes:"}], args.long_tokens
    )
    prime_msgs = p.sized(
        [p.system(), {"role": "user", "content": "Read this document:"}], args.prefix_tokens
    )
    return Plan(
        warmup=warmup,
        single=[Request(p.short_chat(), args.tokens) for _ in range(args.repeats)],
        concurrent=concurrent,
        concurrent_warm=concurrent_warm,
        conversations=conversations,
        reply_tokens=max(args.tokens // 2, 2),
        long=Request(long_msgs, 4),
        prefix_prime=Request(prime_msgs, 8),
        prefix_cold_system=p.system(),
        prefix_question="Which words in the document appear most often? " + p.filler(24),
    )


# --- measuring -------------------------------------------------------------------------------


@dataclass
class Sample:
    """One request: all times in seconds from the same clock (`time.perf_counter`)."""

    row: str
    start: float
    arrivals: list[float] = field(default_factory=list)  # each content chunk
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    text: str = ""
    error: str | None = "incomplete"
    round_: int = 0  # which round of its workload (the single stream runs several)


async def stream_chat(client: httpx.AsyncClient, body: dict[str, Any], sample: Sample) -> Sample:
    """POST a streaming chat completion and record when each content chunk arrives."""
    sample.start = time.perf_counter()
    chunks: list[str] = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            sample.error = f"HTTP {r.status_code}: {r.text[:200]}"
            return sample
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank lines, ": keepalive" comments
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                sample.error = str(chunk["error"])[:200]
                return sample
            if usage := chunk.get("usage"):
                sample.completion_tokens = usage.get("completion_tokens", 0)
                sample.prompt_tokens = usage.get("prompt_tokens", 0)
                details = usage.get("prompt_tokens_details") or {}
                sample.cached_tokens = details.get("cached_tokens") or 0
            for choice in chunk.get("choices", ()):
                if content := (choice.get("delta") or {}).get("content"):
                    sample.arrivals.append(time.perf_counter())
                    chunks.append(content)
    sample.text = "".join(chunks)
    if not sample.completion_tokens:  # no usage chunk: count content chunks
        sample.completion_tokens = len(sample.arrivals)
    sample.error = None if sample.arrivals else "no content"
    return sample


@dataclass
class Row:
    system: str
    row: str
    requests: int
    ok: int
    prompt_tokens: float | None
    cached_share: float | None
    ttft_p50: float | None
    ttft_p95: float | None
    itl_p50_ms: float | None
    itl_p95_ms: float | None
    stream_tok_s: float | None
    aggregate_tok_s: float | None
    note: str = ""


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(system: str, row: str, samples: Sequence[Sample], note: str = "") -> Row:
    ok = [s for s in samples if s.error is None and s.arrivals]
    ttft = [s.arrivals[0] - s.start for s in ok]
    itl = [b - a for s in ok for a, b in zip(s.arrivals, s.arrivals[1:], strict=False)]
    rates = [  # a stream whose chunks all came at once (a stalled client) has no rate
        (s.completion_tokens - 1) / (s.arrivals[-1] - s.arrivals[0])
        for s in ok
        if s.completion_tokens > 1 and s.arrivals[-1] - s.arrivals[0] > 1e-3
    ]
    by_round: dict[int, list[Sample]] = {}
    for s in ok:
        by_round.setdefault(s.round_, []).append(s)
    aggregates = []  # per round: the rounds of the single stream are interleaved with others
    for group in by_round.values():
        span = max(s.arrivals[-1] for s in group) - min(s.start for s in group)
        if span > 0:
            aggregates.append(sum(s.completion_tokens for s in group) / span)
    aggregate = percentile(aggregates, 0.5)
    prompt = sum(s.prompt_tokens for s in ok)
    errors = sorted({s.error for s in samples if s.error is not None})
    if errors:
        note = "; ".join(filter(None, [note, *errors]))[:120]
    return Row(
        system=system,
        row=row,
        requests=len(samples),
        ok=len(ok),
        prompt_tokens=prompt / len(ok) if ok and prompt else None,
        cached_share=(
            sum(s.cached_tokens for s in ok) / prompt if prompt and system in HTTP_SYSTEMS else None
        ),
        ttft_p50=percentile(ttft, 0.5),
        ttft_p95=percentile(ttft, 0.95),
        itl_p50_ms=_ms(percentile(itl, 0.5)),
        itl_p95_ms=_ms(percentile(itl, 0.95)),
        stream_tok_s=percentile(rates, 0.5),
        aggregate_tok_s=aggregate,
        note=note,
    )


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000


# --- systems ---------------------------------------------------------------------------------

Result = tuple[list[Sample], str]
"""One workload round on one system: its samples and a note (empty, or why it fell short)."""


class HttpSystem:
    """A server speaking the OpenAI chat API; each workload round is its own `trio.run`."""

    def __init__(
        self, name: str, base_url: str, extra: dict[str, Any], plan: Plan, args: argparse.Namespace
    ) -> None:
        self.name, self.base_url, self.extra, self.plan, self.args = (
            name,
            base_url,
            extra,
            plan,
            args,
        )

    def supports(self, workload: str) -> bool:
        return True

    def run(self, workload: str, round_: int) -> Result:
        return trio.run(self._run, getattr(self, f"w_{workload}"), round_)

    def warm_up(self) -> Result:
        got = trio.run(self._run, self.w_warmup, 0)
        if self.args.warm_concurrent:  # every batch size once (GPU kernels compile on first use)
            for round_ in range(len(self.args.stream_counts)):
                trio.run(self._run, functools.partial(self.w_concurrent, warm=True), round_)
        return got

    async def _run(self, fn: Callable[..., Any], round_: int) -> Result:
        timeout = httpx.Timeout(self.args.timeout, connect=30.0)
        limits = httpx.Limits(
            max_connections=max(self.args.stream_counts) + self.args.conversations + 4
        )
        samples: list[Sample] = []
        async with httpx.AsyncClient(base_url=self.base_url, timeout=timeout, limits=limits) as c:
            with trio.move_on_after(self.args.timeout) as scope:
                await fn(c, samples, round_)
        note = f"timed out after {self.args.timeout:.0f}s" if scope.cancelled_caught else ""
        return samples, note

    def body(self, req: Request) -> dict[str, Any]:
        return {
            **self.extra,
            "messages": req.messages,
            "max_tokens": req.max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    async def one(
        self, client: httpx.AsyncClient, samples: list[Sample], row: str, req: Request
    ) -> Sample:
        sample = Sample(row=row, start=time.perf_counter())
        samples.append(sample)
        try:
            return await stream_chat(client, self.body(req), sample)
        except (httpx.HTTPError, ValueError) as exc:  # a failed request is a row note, not a crash
            sample.error = f"{type(exc).__name__}: {exc}"[:200]
            return sample

    async def w_warmup(self, c: httpx.AsyncClient, samples: list[Sample], _: int) -> None:
        first, *rest = self.plan.warmup
        await self.one(c, samples, "warm-up", first)
        async with trio.open_nursery() as nursery:
            for req in rest:
                nursery.start_soon(self.one, c, samples, "warm-up", req)

    async def w_single(self, c: httpx.AsyncClient, samples: list[Sample], round_: int) -> None:
        await self.one(c, samples, "1 stream", self.plan.single[round_])

    async def w_concurrent(
        self, c: httpx.AsyncClient, samples: list[Sample], round_: int, warm: bool = False
    ) -> None:
        n = self.args.stream_counts[round_]
        row = "warm-up" if warm else concurrent_row(n, self.args)
        async with trio.open_nursery() as nursery:
            for req in (self.plan.concurrent_warm if warm else self.plan.concurrent)[n]:
                nursery.start_soon(self.one, c, samples, row, req)

    async def w_multiturn(self, c: httpx.AsyncClient, samples: list[Sample], _: int) -> None:
        async def conversation(system: dict[str, str], turns: list[str]) -> None:
            messages = [system]
            for t, user in enumerate(turns):
                messages = [*messages, {"role": "user", "content": user}]
                row = "multi-turn, turn 1" if t == 0 else "multi-turn, turns 2+"
                s = await self.one(c, samples, row, Request(messages, self.plan.reply_tokens))
                if s.error is not None:
                    return
                messages = [*messages, {"role": "assistant", "content": s.text}]

        async with trio.open_nursery() as nursery:
            for system, turns in self.plan.conversations:
                nursery.start_soon(conversation, system, turns)

    async def w_long(self, c: httpx.AsyncClient, samples: list[Sample], _: int) -> None:
        await self.one(c, samples, "long prompt, cold", self.plan.long)

    async def w_prefix(self, c: httpx.AsyncClient, samples: list[Sample], _: int) -> None:
        plan = self.plan
        prime = await self.one(c, samples, "prefix, prime", plan.prefix_prime)
        if prime.error is not None:
            return
        tail = [
            {"role": "assistant", "content": prime.text},
            {"role": "user", "content": plan.prefix_question},
        ]
        cold = [plan.prefix_cold_system, *plan.prefix_prime.messages[1:], *tail]
        await self.one(c, samples, "prefix, cold", Request(cold, 4))
        cached = [*plan.prefix_prime.messages, *tail]
        await self.one(c, samples, "prefix, cached", Request(cached, 4))


def _die_with_parent() -> None:
    """Children get SIGKILL if the benchmark itself dies (Linux), so none outlive it."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


_PREEXEC = _die_with_parent if sys.platform.startswith("linux") else None


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _bench_env() -> dict[str, str]:
    """This environment without the developer's own MLX_SERVER_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_SERVER_")}
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class LineReader:
    """Lines from a child's stdout, each with a deadline (select on the fd, our own buffer)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def readline(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                chunk = os.read(self.fd, 1 << 16)
                if not chunk:
                    raise EOFError
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode(errors="replace")


class RawSystem:
    """mlx-lm's generate_step in its own process (the BLAS choice precedes MLX's import),
    one request at a time over stdin/stdout: the single-stream and long-prompt workloads."""

    ROWS: ClassVar[dict[str, str]] = {"single": "1 stream", "long": "long prompt, cold"}
    args: argparse.Namespace

    def __init__(
        self,
        name: str,
        proc: subprocess.Popen[bytes],
        log_path: Path,
        plan: Plan,
        args: argparse.Namespace,
    ):
        assert proc.stdout is not None
        self.name, self.proc, self.log_path, self.plan = name, proc, log_path, plan
        self.args = args
        self.reader = LineReader(proc.stdout.fileno())
        self.dead: str | None = None

    def supports(self, workload: str) -> bool:
        return workload in self.ROWS or workload == "concurrent"

    def read(self, predicate: Callable[[str], bool], timeout: float) -> str:
        try:
            while not predicate(line := self.reader.readline(timeout)):
                pass
        except (TimeoutError, EOFError) as exc:
            self.dead = "timed out" if isinstance(exc, TimeoutError) else "exited"
            self.proc.kill()
            raise RuntimeError(f"{self.name} {self.dead}:\n{_tail(self.log_path)}") from None
        return line

    def request(self, req: Request, row: str, timeout: float) -> Sample:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(asdict(req)).encode() + b"\n")
        self.proc.stdin.flush()
        reply = json.loads(self.read(lambda line: line.startswith("{"), timeout))
        return Sample(
            row=row,
            start=reply["start"],
            arrivals=reply["arrivals"],
            completion_tokens=len(reply["arrivals"]),
            prompt_tokens=reply["prompt_tokens"],
            error=None,
        )

    def batch(self, reqs: list[Request], row: str, timeout: float) -> list[Sample]:
        """All requests at once through mlx-lm's BatchGenerator (continuous batching)."""
        assert self.proc.stdin is not None
        line = json.dumps({"batch": [asdict(r) for r in reqs]})
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        reply = json.loads(self.read(lambda line: line.startswith("{"), timeout))
        return [
            Sample(
                row=row,
                start=reply["start"],
                arrivals=r["arrivals"],
                completion_tokens=len(r["arrivals"]),
                prompt_tokens=r["prompt_tokens"],
                error=None,
            )
            for r in reply["replies"]
        ]

    def run(self, workload: str, round_: int, timeout: float) -> Result:
        if workload == "concurrent":
            n = self.args.stream_counts[round_]
            row = concurrent_row(n, self.args)
            if self.dead:
                return [Sample(row=row, start=0.0, error=self.dead)], ""
            try:
                return self.batch(self.plan.concurrent[n], row, timeout), ""
            except RuntimeError:
                return [Sample(row=row, start=0.0, error=self.dead)], ""
        row = self.ROWS[workload]
        if self.dead:
            return [Sample(row=row, start=0.0, error=self.dead)], ""
        req = self.plan.single[round_] if workload == "single" else self.plan.long
        try:
            return [self.request(req, row, timeout)], ""
        except RuntimeError:
            return [Sample(row=row, start=0.0, error=self.dead)], ""


System = HttpSystem | RawSystem


@dataclass
class Bench:
    args: argparse.Namespace
    plan: Plan
    model_dir: Path
    fp32_dir: Path
    eos: list[int]
    tmp: Path

    def start(self, name: str) -> contextlib.AbstractContextManager[tuple[System, str]]:
        """A context that starts system `name` (and warms it up) and stops it on exit."""
        if name == "ours":
            return self.start_ours()
        if name.startswith("mlx_lm_server"):
            return self.start_mlx_lm(fp32=name.endswith("fp32"))
        return self.start_raw(name.removeprefix("raw_"))

    @contextlib.contextmanager
    def start_ours(self) -> Iterator[tuple[System, str]]:
        from mlx_server.testing.server import run_server

        with run_server(
            ["--model", str(self.model_dir), "--log-level", "info", *self.args.ours_args.split()],
            env={k: "" for k in os.environ if k.startswith("MLX_SERVER_")},
            log_path=self.tmp / "ours.log",
            ready_timeout=self.args.start_timeout,
        ) as server:
            extra = {"model": "default", "ignore_eos": True}
            system = HttpSystem("ours", server.base_url, extra, self.plan, self.args)
            system.warm_up()
            notes = [line for line in server.log().splitlines() if "weights" in line]
            yield system, notes[-1].split(": ", 2)[-1] if notes else "(no weights line in its log)"

    @contextlib.contextmanager
    def start_mlx_lm(self, *, fp32: bool) -> Iterator[tuple[System, str]]:
        from mlx_server.testing.server import free_port

        name = "mlx_lm_server_fp32" if fp32 else "mlx_lm_server"
        port = free_port()
        if fp32:
            cmd = [sys.executable, "-m", "bench.workers", "mlx-lm-server", "--blas", "openblas"]
            cmd += ["--", "--model", str(self.fp32_dir)]
        else:
            cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", str(self.model_dir)]
        cmd += ["--host", "127.0.0.1", "--port", str(port)]
        log_path = self.tmp / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=_bench_env(), preexec_fn=_PREEXEC
            )
        base_url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + self.args.start_timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{_tail(log_path)}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{base_url}/health", timeout=2.0).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} not ready after {self.args.start_timeout}s")
                time.sleep(0.2)
            # It has no ignore_eos: a large negative bias on the EOS ids does the same.
            extra = {"model": "default_model", "logit_bias": {str(i): EOS_BIAS for i in self.eos}}
            system = HttpSystem(name, base_url, extra, self.plan, self.args)
            system.warm_up()
            how = "OpenBLAS preloaded, float32 weights" if fp32 else "as shipped: weights as stored"
            yield system, f"{how}; EOS banned by logit_bias {self.eos}"
        finally:
            _stop(proc)

    @contextlib.contextmanager
    def start_raw(self, variant: str) -> Iterator[tuple[System, str]]:
        name = f"raw_{variant}"
        log_path = self.tmp / f"{name}.log"
        cmd = [sys.executable, "-m", "bench.workers", "raw", "--model", str(self.model_dir)]
        cmd += ["--variant", variant]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=_bench_env(),
                preexec_fn=_PREEXEC,
            )
        try:
            system = RawSystem(name, proc, log_path, self.plan, self.args)
            ready = system.read(lambda line: line.startswith("READY"), self.args.start_timeout)
            info = json.loads(ready.removeprefix("READY"))
            system.request(self.plan.warmup[0], "warm-up", self.args.timeout)
            if self.args.warm_concurrent:
                for n in self.args.stream_counts:
                    system.batch(self.plan.concurrent_warm[n], "warm-up", self.args.timeout)
            device = f"device: {info['device']}; " if "device" in info else ""
            yield system, f"{device}BLAS: {info['blas']}; weights: {info['weights']}"
        finally:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            _stop(proc)  # type: ignore[arg-type]


# --- model preparation -----------------------------------------------------------------------


def prepare_models(args: argparse.Namespace, tmp: Path) -> tuple[Path, Path]:
    """The MLX directory every system loads, and its float32 twin (for mlx_lm_server_fp32)."""
    if args.tiny:
        from mlx_server.testing.tiny import build_tiny_model  # imports mlx: fine in the parent

        model_dir = tmp / "tiny-llama"
        build_tiny_model(model_dir, "llama")
        return model_dir, model_dir
    if args.model and Path(args.model).is_dir():
        model_dir = Path(args.model)
    else:
        gguf = args.model
        if gguf is None:
            from mlx_server.engine.model import default_model_path

            gguf = str(default_model_path())
        model_dir = tmp / "model"
        out = subprocess.run(
            [sys.executable, "-m", "mlx_server", "convert", gguf, str(model_dir)],
            capture_output=True,
            text=True,
            timeout=args.start_timeout,
        )
        if out.returncode != 0:
            raise RuntimeError(f"convert failed:\n{out.stderr[-2000:]}")
    if "mlx_lm_server_fp32" not in args.system_list:
        return model_dir, model_dir
    out = subprocess.run(
        [sys.executable, "-m", "bench.workers", "fp32-dir", str(model_dir), str(tmp / "fp32")],
        capture_output=True,
        text=True,
        timeout=args.start_timeout,
    )
    if out.returncode != 0:
        raise RuntimeError(f"fp32-dir failed:\n{out.stderr[-2000:]}")
    last = out.stdout.strip().splitlines()[-1]
    return model_dir, (model_dir if last == "same" else Path(last))


def eos_ids(model_dir: Path) -> list[int]:
    from tokenizers import Tokenizer

    ids: set[int] = set()
    gen = model_dir / "generation_config.json"
    if gen.exists():
        value = json.loads(gen.read_text()).get("eos_token_id")
        ids.update([value] if isinstance(value, int) else value or [])
    eos = json.loads((model_dir / "tokenizer_config.json").read_text()).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if eos:
        token_id = Tokenizer.from_file(str(model_dir / "tokenizer.json")).token_to_id(eos)
        if token_id is not None:
            ids.add(token_id)
    return sorted(ids)


# --- report ----------------------------------------------------------------------------------


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: Sequence[Row]) -> None:
    header = (
        f"{'system':<19}{'workload':<22}{'ok':>5}{'prompt':>7}{'cached':>7}"
        f"{'TTFT p50':>10}{'p95':>8}{'ITL p50':>9}{'p95':>8}{'tok/s/str':>10}{'agg tok/s':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        cached = "-" if r.cached_share is None else f"{100 * r.cached_share:.0f}%"
        print(
            f"{SHORT_NAMES[r.system]:<19}{r.row:<22}{f'{r.ok}/{r.requests}':>5}"
            f"{_f(r.prompt_tokens, '.0f'):>7}{cached:>7}"
            f"{_f(r.ttft_p50, '.3f'):>9}s{_f(r.ttft_p95, '.3f'):>7}s"
            f"{_f(r.itl_p50_ms, '.1f'):>7}ms{_f(r.itl_p95_ms, '.1f'):>6}ms"
            f"{_f(r.stream_tok_s, '.2f'):>10}{_f(r.aggregate_tok_s, '.2f'):>10}"
            + (f"  ({r.note})" if r.note else "")
        )


def ratios(rows: Sequence[Row], args: argparse.Namespace) -> list[tuple[str, float | None, str]]:
    def get(system: str, row: str, attr: str) -> float | None:
        for r in rows:
            if r.system == system and r.row == row:
                return getattr(r, attr)
        return None

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    tiny = "tiny model: " if args.tiny else ""
    single_target = ">= 0.9" if args.tiny else ">= 0.95"
    out: list[tuple[str, float | None, str]] = []
    ours_1 = get("ours", "1 stream", "stream_tok_s")
    out.append(
        (
            f"{tiny}ours 1-stream decode / raw fp32 (same weights)",
            ratio(ours_1, get("raw_fp32", "1 stream", "stream_tok_s")),
            single_target,
        )
    )
    out.append(
        (
            f"{tiny}ours 1-stream decode / raw shipped",
            ratio(ours_1, get("raw_shipped", "1 stream", "stream_tok_s")),
            "",
        )
    )
    for server, raw in (("mlx_lm_server", "raw_shipped"), ("mlx_lm_server_fp32", "raw_fp32")):
        out.append(
            (
                f"{tiny}{SHORT_NAMES[server]} 1-stream decode / {SHORT_NAMES[raw]}",
                ratio(
                    get(server, "1 stream", "stream_tok_s"), get(raw, "1 stream", "stream_tok_s")
                ),
                "(0.73 seen, tiny)" if args.tiny and server == "mlx_lm_server" else "",
            )
        )
    for n in args.stream_counts:
        conc = concurrent_row(n, args)
        ours_agg = get("ours", conc, "aggregate_tok_s")
        out.append(
            (
                f"ours {n}-stream aggregate / mlx_lm.server (as shipped)",
                ratio(ours_agg, get("mlx_lm_server", conc, "aggregate_tok_s")),
                "" if args.tiny else ">= 3",
            )
        )
        out.append(
            (
                f"ours {n}-stream aggregate / mlx_lm.server fp32",
                ratio(ours_agg, get("mlx_lm_server_fp32", conc, "aggregate_tok_s")),
                "",
            )
        )
        for raw in ("raw_shipped", "raw_fp32"):
            out.append(
                (
                    f"ours {n}-stream aggregate / {SHORT_NAMES[raw]} (BatchGenerator)",
                    ratio(ours_agg, get(raw, conc, "aggregate_tok_s")),
                    "",
                )
            )
        out.append(
            (
                f"ours {n}-stream aggregate tok/s (absolute)",
                ours_agg,
                "> 55 (llama.cpp)" if not args.tiny else "",
            )
        )
    out.append(
        (
            f"ours TTFT, {args.long_tokens}-token cold prompt (s)",
            get("ours", "long prompt, cold", "ttft_p50"),
            "<= 5" if not args.tiny else "",
        )
    )
    for system in HTTP_SYSTEMS:
        out.append(
            (
                f"{SHORT_NAMES[system]} TTFT cached prefix / cold ({args.prefix_tokens} tokens)",
                ratio(
                    get(system, "prefix, cached", "ttft_p50"),
                    get(system, "prefix, cold", "ttft_p50"),
                ),
                "<= 0.05" if system == "ours" else "",
            )
        )
    return out


def print_ratios(items: Sequence[tuple[str, float | None, str]]) -> None:
    width = max(len(name) for name, _, _ in items) + 2
    print(f"{'ratio':<{width}}{'value':>8}  target")
    for name, value, target in items:
        if value is None:
            continue
        print(f"{name:<{width}}{value:>8.2f}  {target}")


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", help="MLX directory or .gguf (default: the bundled model)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random-weight llama")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few, short requests")
    parser.add_argument(
        "--systems",
        help=f"comma-separated: {', '.join(SYSTEMS)}, raw, all "
        f"(default: all; quick: {QUICK_SYSTEMS})",
    )
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument(
        "--tokens", type=int, help="tokens per long reply (default 64, tiny 256; quick 8)"
    )
    parser.add_argument(
        "--streams", help="concurrent streams, or a comma-separated list (default 8; quick 4)"
    )
    parser.add_argument(
        "--mix",
        choices=("mixed", "uniform"),
        default="mixed",
        help="concurrent requests: short and long chats (mixed), or all short chats of "
        "--tokens tokens (uniform)",
    )
    parser.add_argument("--long-chat-tokens", type=int, help="history of a long chat (256; 96)")
    parser.add_argument("--conversations", type=int, help="multi-turn conversations (2; 1)")
    parser.add_argument("--turns", type=int, help="turns per conversation (4; 2)")
    parser.add_argument("--repeats", type=int, help="single-stream runs, medians reported (3; 1)")
    parser.add_argument("--turn-tokens", type=int, default=24, help="new tokens per user turn")
    parser.add_argument("--long-tokens", type=int, help="long-prompt length (643; 160)")
    parser.add_argument("--prefix-tokens", type=int, help="cached prefix length (1500; 400)")
    parser.add_argument("--timeout", type=float, help="seconds per workload (900; 60)")
    parser.add_argument("--start-timeout", type=float, default=240.0)
    parser.add_argument("--ours-args", default="", help="extra flags for our server")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--settle", type=float, default=0.5, help="pause between measurements (seconds)"
    )
    parser.add_argument(
        "--warm-concurrent",
        action="store_true",
        help="each system's warm-up also runs every concurrent workload once (unmeasured), so "
        "that no system pays for compiling the kernels of a batch size during a measurement "
        "(MLX's CUDA backend compiles kernels on first use)",
    )
    parser.add_argument("--json", type=Path, help="also write every row here")
    parser.add_argument("--log-dir", type=Path, help="copy every system's log here at the end")
    args = parser.parse_args(argv)
    defaults = {
        "tokens": (64, 8),
        "streams": ("8", "4"),
        "long_chat_tokens": (256, 96),
        "conversations": (2, 1),
        "turns": (4, 2),
        "repeats": (3, 1),
        "long_tokens": (643, 160),
        "prefix_tokens": (1500, 400),
        "timeout": (900.0, 60.0),
    }
    if args.tiny:
        defaults["tokens"] = (256, 8)
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.systems is None:
        args.systems = QUICK_SYSTEMS if args.quick else "all"
    systems: list[str] = []
    for name in args.systems.split(","):
        name = name.strip()
        for s in SYSTEM_ALIASES.get(name, (name,)):
            if s not in SYSTEMS:
                parser.error(f"unknown system {s!r}; choose from {', '.join(SYSTEMS)}, raw, all")
            if s not in systems:
                systems.append(s)
    args.system_list = systems
    try:
        args.stream_counts = [int(n) for n in str(args.streams).split(",") if n.strip()]
    except ValueError:
        parser.error(f"--streams: not a number or list of numbers: {args.streams!r}")
    if not args.stream_counts or min(args.stream_counts) < 1:
        parser.error("--streams: at least one count, each >= 1")
    args.streams = args.stream_counts[0]
    args.workload_list = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for w in args.workload_list:
        if w not in WORKLOADS:
            parser.error(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    return args


def _loadavg() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


def _progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def rounds(workload: str, args: argparse.Namespace) -> int:
    if workload == "concurrent":
        return len(args.stream_counts)
    return args.repeats if workload == "single" else 1


def concurrent_row(n: int, args: argparse.Namespace) -> str:
    return f"{n} streams, {args.mix}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = _loadavg()
    # SIGTERM behaves like Ctrl-C, so every `finally` below runs and no server outlives us.
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    notes: dict[str, str] = {}
    samples: dict[tuple[str, str], list[Sample]] = {}
    row_notes: dict[tuple[str, str], set[str]] = {}
    failed = False
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="mlx-bench-") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        model_dir, fp32_dir = prepare_models(args, tmp)
        plan = build_plan(PromptBuilder(model_dir, args.seed), args)
        bench = Bench(args, plan, model_dir, fp32_dir, eos_ids(model_dir), tmp)
        _progress(f"models ready in {time.perf_counter() - t0:.1f}s")
        with contextlib.ExitStack() as stack:
            try:
                # Start (and warm up) every system first, one at a time; idle, each uses no CPU.
                systems: dict[str, System] = {}
                for name in args.system_list:
                    t1 = time.perf_counter()
                    try:
                        systems[name], notes[name] = stack.enter_context(bench.start(name))
                    except Exception as exc:  # one broken system still leaves a table
                        _progress(f"{name} failed to start: {exc}")
                        notes[name] = f"FAILED: {str(exc).splitlines()[0][:200]}"
                        failed = True
                        continue
                    _progress(f"{name}: started and warmed up in {time.perf_counter() - t1:.1f}s")
                # Then every round of every workload on each system in turn: the shared machine's
                # load drifts, and interleaving spreads that drift over all systems alike.
                for workload in args.workload_list:
                    for round_ in range(rounds(workload, args)):
                        for name, system in systems.items():
                            if not system.supports(workload):
                                continue
                            t1 = time.perf_counter()
                            try:
                                if isinstance(system, RawSystem):
                                    got, note = system.run(workload, round_, args.timeout)
                                else:
                                    got, note = system.run(workload, round_)
                            except Exception as exc:
                                got, note = [], f"{type(exc).__name__}: {exc}"[:200]
                                failed = True
                            for sample in got:
                                sample.round_ = round_
                                samples.setdefault((name, sample.row), []).append(sample)
                                if note:
                                    row_notes.setdefault((name, sample.row), set()).add(note)
                            _progress(
                                f"{name}: {workload} #{round_ + 1} in "
                                f"{time.perf_counter() - t1:.1f}s {note}"
                            )
                            time.sleep(args.settle)
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop the systems, report so far
                _progress("interrupted: stopping the systems; the table holds what ran")
                interrupted = True
                failed = True
        if args.log_dir:  # the systems have stopped: their logs are complete
            args.log_dir.mkdir(parents=True, exist_ok=True)
            for log in tmp.glob("*.log"):
                shutil.copy(log, args.log_dir / log.name)
    rows = [
        summarize(system, row, group, "; ".join(sorted(row_notes.get((system, row), ()))))
        for (system, row), group in samples.items()
    ]
    order = {s: i for i, s in enumerate(args.system_list)}
    row_order = [
        "1 stream",
        *(concurrent_row(n, args) for n in args.stream_counts),
        "multi-turn, turn 1",
        "multi-turn, turns 2+",
        "long prompt, cold",
        "prefix, prime",
        "prefix, cold",
        "prefix, cached",
    ]
    rows.sort(key=lambda r: (order[r.system], row_order.index(r.row) if r.row in row_order else 99))
    print()
    print(f"command: {' '.join(['python -m bench.load', *(argv or sys.argv[1:])])}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, load average (1/5/15 min) "
        f"{load_before} at the start, {_loadavg()} at the end; model: "
        f"{'tiny random llama' if args.tiny else (args.model or 'default (SmolLM2-135M Q4 GGUF)')}"
    )
    print(
        ("INTERRUPTED before the end; " if interrupted else "")
        + f"tokens {args.tokens}, streams {','.join(map(str, args.stream_counts))} ({args.mix}), "
        f"turns {args.conversations}x{args.turns}, "
        f"long prompt {args.long_tokens}, prefix {args.prefix_tokens}; greedy, EOS ignored"
    )
    for system in args.system_list:
        if system in notes:
            print(f"  {SHORT_NAMES[system]:<19} {notes[system]}")
    print()
    print_table(rows)
    print()
    print_ratios(ratios(rows, args))
    print(
        "\nTTFT: request sent -> first content chunk. ITL: gap between content chunks. "
        "tok/s/str: median per-stream decode rate after the first token. "
        "agg tok/s: all completion tokens / (last token - first request), median over rounds."
    )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM, after every system was stopped
        print("interrupted", file=sys.stderr)
        sys.exit(130)
