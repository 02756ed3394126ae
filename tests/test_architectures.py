"""Architectures of every cache type, token for token against mlx-lm's own generation.

The server runs whatever architecture the pinned mlx-lm has a model for; these are the families
people run, covering every cache type mlx-lm uses: plain KV (llama, mistral, qwen2, qwen3,
phi3, olmo2, granite), mixtures of experts (mixtral, qwen3_moe, glm4_moe, deepseek_v3 with
latent attention), sliding-window rotating KV caches (gemma3_text, gpt_oss), hybrids with
recurrent state caches (qwen3_next, qwen3_5: gated delta nets; lfm2: short convolutions), and
chunked attention whose caches cannot batch (llama4: one request decodes at a time). For each,
a tiny random-weight model is built with mlx-lm's classes and saved in the Hugging Face layout.
Then:

- our batch engine, in process, gives mlx-lm's greedy tokens for one request alone and for
  requests that join and leave one batch at different steps (small prefill chunks, so prompts
  are read while other rows decode; different token limits; one abort; a late arrival);
- a follow-up prompt that continues a finished request's prompt and answer hits the prompt
  cache (whole-only states too) and still gives mlx-lm's tokens, alone and in a batch; a
  prompt that shares only a prefix reuses it where the cache can be cut;
- the real server gives mlx-lm's text for one chat request alone and for 4 concurrent ones
  (one architecture per cache type);
- sharded, bfloat16, float16 and per-layer quantized directories load and match mlx-lm too.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
import trio
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from mlx_server.engine import caches as cache_ops
from mlx_server.engine.batch import BatchEngine
from mlx_server.engine.model import LoadedModel, load
from mlx_server.engine.prefix_cache import PrefixCache
from mlx_server.messages import (
    Admit,
    CachedPrefix,
    GenerationRequest,
    SamplingParams,
    SequenceFinished,
    TokenOut,
)
from mlx_server.testing.server import ServerProcess, run_server
from mlx_server.testing.tiny import TINY_ARGS, alternating_bits, build_tiny_model

# Each architecture's cache types (`make_prompt_cache`), as the test expects them.
KINDS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "mixtral",
            "qwen3_moe",
            "glm4_moe",
            "phi3",
            "deepseek_v3",
            "olmo2",
            "granite",
        ),
        ("KVCache",),
    ),
    "gemma3_text": ("RotatingKVCache", "KVCache"),
    "gpt_oss": ("RotatingKVCache", "KVCache"),
    "qwen3_next": ("ArraysCache", "KVCache"),
    "qwen3_5": ("ArraysCache", "KVCache"),
    "lfm2": ("ArraysCache", "KVCache"),
    # Chunked attention: mlx-lm's ChunkedKVCache cannot join a batch or be kept for reuse.
    "llama4": ("ChunkedKVCache", "KVCache"),
}
ARCHS = tuple(KINDS)
ONE_AT_A_TIME = {"llama4"}
# The real server runs one architecture of each cache type (starting 16 would take minutes).
SERVED = ("llama", "qwen3_moe", "gemma3_text", "qwen3_next", "lfm2")
# Prompt lengths differ (the chat template adds ~30 tokens to each).
TOPICS = (
    "cats",
    "the sea and the sky and everything under and above them, told at some length",
    "x",
    "prime numbers 1 2 3 5 7 11 13",
)
N_TOKENS = 24


@attrs.frozen
class Reference:
    """mlx-lm's greedy continuation of each chat prompt, EOS ignored. The last prompt is the
    follow-up turn of the first: its prompt, its answer and a new user message."""

    prompts: tuple[tuple[int, ...], ...]
    tokens: tuple[tuple[int, ...], ...]
    eos: frozenset[int]
    tokenizer: Any

    def text(self, i: int, n: int) -> tuple[str, str]:
        """(content, finish_reason) the server should answer for prompt i with max_tokens n."""
        out: list[int] = []
        for t in self.tokens[i][:n]:
            if t in self.eos:
                return self.tokenizer.decode(out, skip_special_tokens=True), "stop"
            out.append(t)
        return self.tokenizer.decode(out, skip_special_tokens=True), "length"


def chat(topic: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Tell me about {topic}"}]


def mlx_lm_reference(model_dir: Path, n: int = N_TOKENS, follow_up: bool = True) -> Reference:
    model, tok = mlx_lm.load(str(model_dir))[:2]
    prompts = tuple(
        tuple(tok.apply_chat_template(chat(t), add_generation_prompt=True)) for t in TOPICS
    )

    def greedy_tokens(p: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(
            int(tok_id)
            for tok_id, _ in generate_step(
                mx.array(p), model, max_tokens=n, sampler=lambda lp: mx.argmax(lp, axis=-1)
            )
        )

    tokens = tuple(greedy_tokens(p) for p in prompts)
    if follow_up:
        turn = tok.encode(
            "<|im_end|>\n<|im_start|>user\nAnd more?<|im_end|>\n<|im_start|>assistant\n"
        )
        prompts += ((*prompts[0], *tokens[0], *turn),)
        tokens += (greedy_tokens(prompts[-1]),)
    return Reference(
        prompts=prompts, tokens=tokens, eos=frozenset(tok.eos_token_ids), tokenizer=tok
    )


def greedy(rid: str, prompt: tuple[int, ...], n: int) -> Admit:
    return Admit(
        request=GenerationRequest(
            request_id=rid,
            prompt_ids=prompt,
            sampling=SamplingParams(temperature=0.0),
            max_tokens=n,
            ignore_eos=True,
        )
    )


@attrs.define
class Run:
    tokens: dict[str, list[int]]
    widest: int  # the most rows decoded together in one step


def drive(
    engine: BatchEngine,
    admits: list[Admit],
    *,
    admit_later: tuple[str, int, Admit] | None = None,
    abort: tuple[str, int] | None = None,
) -> Run:
    """Step the engine to the end. `admit_later=(rid, k, admit)` admits one more request once
    request rid has k tokens; `abort=(rid, k)` aborts rid once it has k tokens."""
    tokens: dict[str, list[int]] = collections.defaultdict(list)
    widest = 0
    for a in admits:
        engine.admit(a)
    while engine.has_work:
        if admit_later is not None and len(tokens[admit_later[0]]) >= admit_later[1]:
            engine.admit(admit_later[2])
            admit_later = None
        if abort is not None and len(tokens[abort[0]]) >= abort[1]:
            assert engine.abort(abort[0]) is not None
            abort = None
        widest = max(widest, len(engine.running))
        for ev in engine.step():
            if isinstance(ev, TokenOut):
                tokens[ev.request_id].append(ev.token_id)
    assert admit_later is None and abort is None
    return Run(tokens=dict(tokens), widest=widest)


def engine_for(loaded: LoadedModel, prefill_chunk: int = 16) -> BatchEngine:
    """Chunks small enough that prompts (~30-45 tokens) are read over several steps while
    other rows decode."""
    return BatchEngine(
        loaded.model,
        eos_token_ids=[],
        vocab_size=loaded.tokenizer.vocab_size,
        prefill_chunk=prefill_chunk,
    )


def run_cached(
    engine: BatchEngine, admits: list[Admit]
) -> tuple[dict[str, list[int]], dict[str, SequenceFinished]]:
    tokens: dict[str, list[int]] = {a.request.request_id: [] for a in admits}
    done: dict[str, SequenceFinished] = {}
    for a in admits:
        engine.admit(a)
    while engine.has_work:
        for ev in engine.step():
            if isinstance(ev, TokenOut):
                tokens[ev.request_id].append(ev.token_id)
            elif isinstance(ev, SequenceFinished):
                done[ev.request_id] = ev
    return tokens, done


def check_prefix_cache(arch: str, engine: BatchEngine, ref: Reference) -> None:
    """The first prompt's state is kept; the follow-up turn (its prompt, its answer, a new
    user message) finds it in the prefix trie, reads only the rest, and gives mlx-lm's tokens,
    alone and batched with others. A prompt that shares only the first prompt reuses that
    much where the state can be cut, and reads everything anew where it cannot."""
    trie = PrefixCache(1 << 30)
    tokens, done = run_cached(engine, [greedy("first", ref.prompts[0], N_TOKENS)])
    assert tokens["first"] == list(ref.tokens[0])
    stored = done["first"].stored
    assert stored is not None
    # The prompt and every token but the last, or all of them (when the pass after the last
    # one was already launched): a prefix of the follow-up turn either way.
    follow = ref.prompts[-1]
    assert len(stored.token_ids) >= len(ref.prompts[0]) + N_TOKENS - 1
    assert follow[: len(stored.token_ids)] == stored.token_ids
    assert (
        trie.insert(stored.handle, stored.token_ids, stored.nbytes, cuttable=stored.cuttable) == []
    )
    found = trie.lookup(follow[:-1])
    assert found is not None and found == (stored.handle, len(stored.token_ids)), arch
    for others in ([], [1, 3]):
        hit = Admit(
            request=greedy("hit", follow, N_TOKENS).request,
            prefix=CachedPrefix(handle=found[0], length=found[1]),
        )
        admits = [hit, *(greedy(str(i), ref.prompts[i], N_TOKENS) for i in others)]
        tokens, done = run_cached(engine, admits)
        assert done["hit"].cached_tokens == found[1], arch
        assert tokens["hit"] == list(ref.tokens[-1]), f"{arch}: prefix hit, with {others}"
        for i in others:
            assert tokens[str(i)] == list(ref.tokens[i]), f"{arch}: request {i} beside a hit"
    # Only the first prompt in common (another question after it).
    other = (*ref.prompts[0], *ref.prompts[1])
    found = trie.lookup(other[:-1])
    shared = len(ref.prompts[0])
    kinds = KINDS[arch]
    if "ArraysCache" in kinds or ("RotatingKVCache" in kinds and not stored.cuttable):
        assert not stored.cuttable
        assert found is None  # a whole-only state serves no shorter prefix
    else:
        assert stored.cuttable and found is not None and found == (stored.handle, shared)
        admit = Admit(
            request=greedy("cut", other, 4).request,
            prefix=CachedPrefix(handle=found[0], length=found[1]),
        )
        _, done = run_cached(engine, [admit])
        assert done["cut"].cached_tokens == shared


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archs")
    dirs = {arch: root / f"tiny-{arch}" for arch in ARCHS}
    for arch, path in dirs.items():
        build_tiny_model(path, arch)
    return dirs


@pytest.fixture(scope="module")
def references(model_dirs: dict[str, Path]) -> dict[str, Reference]:
    return {arch: mlx_lm_reference(path) for arch, path in model_dirs.items()}


@pytest.fixture(scope="module")
def servers(
    model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, concurrent.futures.Future[ServerProcess]]]:
    """One real server per architecture, all started (and stopped) at once in the background:
    start-up is mostly Python imports on one core each, so the in-process tests that request
    this fixture run while the servers boot; a test waits only for the server it uses."""
    logs = tmp_path_factory.mktemp("arch-servers")
    env = {n: "" for n in os.environ if n.startswith("MLX_SERVER_") or n == "LOG_LEVEL"}
    started: list[contextlib.AbstractContextManager[ServerProcess]] = []

    def start(arch: str) -> ServerProcess:
        cm = run_server(
            ["--model", str(model_dirs[arch]), "--prefill-chunk", "8"],
            env=env,
            log_path=logs / f"{arch}.log",
        )
        server = cm.__enter__()
        started.append(cm)
        return server

    with concurrent.futures.ThreadPoolExecutor(len(SERVED)) as pool:
        futures = {arch: pool.submit(start, arch) for arch in SERVED}
        try:
            yield futures
        finally:
            concurrent.futures.wait(futures.values())
            list(pool.map(lambda cm: cm.__exit__(None, None, None), started))


@pytest.fixture
def server(
    arch: str, servers: dict[str, concurrent.futures.Future[ServerProcess]]
) -> ServerProcess:
    return servers[arch].result()


# --------------------------------------------------------------------------- the tests


def test_every_listed_type_has_a_tiny_model() -> None:
    assert set(ARCHS) == set(TINY_ARGS)


@pytest.mark.usefixtures("servers")  # they boot in the background meanwhile
@pytest.mark.parametrize("arch", ARCHS)
def test_engine_equals_mlx_lm(
    arch: str, model_dirs: dict[str, Path], references: dict[str, Reference]
) -> None:
    ref = references[arch]
    for toks in ref.tokens:  # a degenerate model (one token forever) would prove little
        assert len(set(toks)) > 4, f"{arch}: reference output is degenerate: {toks}"
    loaded = load(str(model_dirs[arch]))
    assert loaded.config["model_type"] == arch
    # The model really has the cache types its family is chosen for.
    assert cache_ops.kinds(make_prompt_cache(loaded.model)) == KINDS[arch]
    ours = tuple(tuple(loaded.tokenizer.encode(loaded.template.render(chat(t)))) for t in TOPICS)
    assert ours == ref.prompts[: len(TOPICS)]
    engine = engine_for(loaded)
    alone_only = arch in ONE_AT_A_TIME
    assert engine.batchable == engine.can_reuse == engine.batch_prefill == (not alone_only)

    alone = drive(engine, [greedy("alone", ref.prompts[0], N_TOKENS)])
    assert alone.tokens["alone"] == list(ref.tokens[0])

    # Four requests at once with different token limits (rows leave at different steps), one
    # aborted mid-decode, one more arriving while the others decode.
    limits = (N_TOKENS, 10, N_TOKENS, 15)
    run = drive(
        engine,
        [
            greedy(str(i), p, n)
            for i, (p, n) in enumerate(zip(ref.prompts[: len(TOPICS)], limits, strict=True))
        ],
        admit_later=("0", 8, greedy("late", ref.prompts[1], N_TOKENS)),
        abort=("2", 5),
    )
    for i, n in enumerate(limits):
        if i == 2:
            got = run.tokens["2"]
            assert len(got) == 5 and got == list(ref.tokens[2][:5])
        else:
            assert run.tokens[str(i)] == list(ref.tokens[i][:n]), f"{arch}: request {i}"
    assert run.tokens["late"] == list(ref.tokens[1])
    assert run.widest == 1 if alone_only else run.widest >= 3
    assert not engine.running and engine.batch_cache is None
    if alone_only:
        return

    check_prefix_cache(arch, engine, ref)

    # Prompts that arrive together are read in one padded batch (one step reads all four),
    # whatever the cache types.
    together = engine_for(loaded, prefill_chunk=512)
    for i, p in enumerate(ref.prompts[: len(TOPICS)]):
        together.admit(greedy(str(i), p, N_TOKENS))
    first = together.step()
    assert not together.prefilling and len(together.running) == len(TOPICS), arch
    tokens = collections.defaultdict(list)
    for ev in first:
        if isinstance(ev, TokenOut):
            tokens[ev.request_id].append(ev.token_id)
    run = drive(together, [])
    for i in range(len(TOPICS)):
        got = tokens[str(i)] + run.tokens.get(str(i), [])
        assert got == list(ref.tokens[i]), f"{arch}: request {i} read in a batch"


async def ask(client: httpx.AsyncClient, name: str, topic: str) -> dict[str, Any]:
    r = await client.post(
        "/v1/chat/completions",
        json={"model": name, "messages": chat(topic), "max_tokens": N_TOKENS, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("arch", SERVED)
async def test_server_equals_mlx_lm(
    arch: str, server: ServerProcess, references: dict[str, Reference]
) -> None:
    ref = references[arch]
    name = f"tiny-{arch}"
    answers: dict[int, dict[str, Any]] = {}
    async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
        alone = await ask(client, name, TOPICS[1])

        async def one(i: int) -> None:
            answers[i] = await ask(client, name, TOPICS[i])

        async with trio.open_nursery() as nursery:
            for i in range(len(TOPICS)):
                nursery.start_soon(one, i)

    for i, answer in [(1, alone), *sorted(answers.items())]:
        text, reason = ref.text(i, N_TOKENS)
        choice = answer["choices"][0]
        assert choice["message"]["content"] == text, f"{arch}: request {i}"
        assert choice["finish_reason"] == reason


VARIANTS: dict[str, dict[str, Any]] = {
    "sharded": {"shards": 2},
    "bf16": {"dtype": mx.bfloat16},
    "q8-q4-per-layer": {"bits": 4, "layer_bits": alternating_bits},
    "fp16": {"dtype": mx.float16},  # (quantized with fp16 scales is very slow on the CPU)
    "sharded-bf16-per-layer": {
        "shards": 2,
        "dtype": mx.bfloat16,
        "bits": 4,
        "layer_bits": alternating_bits,
    },
}


@pytest.mark.slow  # runs long: several seconds of CPU
@pytest.mark.parametrize(
    ("arch", "variant"),
    [
        ("llama", "sharded"),
        ("llama", "bf16"),
        ("llama", "q8-q4-per-layer"),
        ("qwen3", "sharded-bf16-per-layer"),
        ("mistral", "fp16"),
        ("qwen3_next", "sharded-bf16-per-layer"),
    ],
)
def test_variant_equals_mlx_lm(arch: str, variant: str, tmp_path: Path) -> None:
    path = tmp_path / f"tiny-{arch}-{variant}"
    kwargs = VARIANTS[variant]
    build_tiny_model(path, arch, **kwargs)
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if kwargs.get("shards"):
        assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == set(files)
    else:
        assert files == ["model.safetensors"]

    ref = mlx_lm_reference(path, n=12, follow_up=False)
    engine = engine_for(load(str(path)))
    model: Any = engine.model
    if "dtype" in kwargs:
        assert model.model.norm.weight.dtype == kwargs["dtype"]
    if "bits" in kwargs:
        assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    if "layer_bits" in kwargs:
        quant = json.loads((path / "config.json").read_text())["quantization"]
        assert quant["bits"] == 4
        assert {q["bits"] for k, q in quant.items() if k.startswith("model.layers.0.")} == {8}
        # The loaded layers carry the per-layer widths of config.json.
        assert quantized_bits(model, "model.layers.0.") == {8}
        assert 4 in quantized_bits(model, "model.layers.1.")
    run = drive(engine, [greedy(str(i), p, 12) for i, p in enumerate(ref.prompts)])
    for i in range(len(TOPICS)):
        assert run.tokens[str(i)] == list(ref.tokens[i]), f"{arch} {variant}: request {i}"
    assert run.widest >= 3


def quantized_bits(model: nn.Module, prefix: str) -> set[int]:
    return {
        int(m.bits)
        for path, m in model.named_modules()
        if path.startswith(prefix) and hasattr(m, "bits")
    }
