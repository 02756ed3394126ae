"""Every supported architecture, token for token against mlx-lm's own generation.

For llama, mistral, qwen2, qwen3 and qwen3_next (hybrid gated-delta linear attention with
recurrent state caches, full attention with KV caches, mixture of experts) a tiny random-weight
model is built with mlx-lm's classes and saved in the Hugging Face layout. Then:

- our batch engine, in process, gives mlx-lm's greedy tokens for one request alone and for
  requests that join and leave one batch at different steps (small prefill chunks, so prompts
  are read while other rows decode; different token limits; one abort; a late arrival);
- the real server gives mlx-lm's text for one chat request alone and for 4 concurrent ones;
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
from mlx_lm.models.cache import ArraysCache, KVCache, make_prompt_cache

from mlx_server.engine.batch import BatchEngine
from mlx_server.engine.model import SUPPORTED_MODEL_TYPES, LoadedModel, load
from mlx_server.errors import ModelLoadError
from mlx_server.messages import Admit, GenerationRequest, SamplingParams, TokenOut
from mlx_server.testing.server import ServerProcess, run_server
from mlx_server.testing.tiny import TINY_ARGS, alternating_bits, build_tiny_model

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "qwen3_next")
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
    """mlx-lm's greedy continuation of each chat prompt, EOS ignored."""

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


def mlx_lm_reference(model_dir: Path, n: int = N_TOKENS) -> Reference:
    model, tok = mlx_lm.load(str(model_dir))[:2]
    prompts = tuple(
        tuple(tok.apply_chat_template(chat(t), add_generation_prompt=True)) for t in TOPICS
    )
    tokens = tuple(
        tuple(
            int(tok_id)
            for tok_id, _ in generate_step(
                mx.array(p), model, max_tokens=n, sampler=lambda lp: mx.argmax(lp, axis=-1)
            )
        )
        for p in prompts
    )
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

    with concurrent.futures.ThreadPoolExecutor(len(ARCHS)) as pool:
        futures = {arch: pool.submit(start, arch) for arch in ARCHS}
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


def test_every_supported_type_has_a_tiny_model() -> None:
    assert set(ARCHS) == set(SUPPORTED_MODEL_TYPES)
    assert set(ARCHS) <= set(TINY_ARGS)


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
    caches = make_prompt_cache(loaded.model)
    if arch == "qwen3_next":
        # The hybrid really mixes recurrent state (linear attention) and KV caches.
        assert [type(c) for c in caches] == [ArraysCache, KVCache] * 2
    else:
        assert all(type(c) is KVCache for c in caches)
    ours = tuple(tuple(loaded.tokenizer.encode(loaded.template.render(chat(t)))) for t in TOPICS)
    assert ours == ref.prompts
    engine = engine_for(loaded)

    alone = drive(engine, [greedy("alone", ref.prompts[0], N_TOKENS)])
    assert alone.tokens["alone"] == list(ref.tokens[0])

    # Four requests at once with different token limits (rows leave at different steps), one
    # aborted mid-decode, one more arriving while the others decode.
    limits = (N_TOKENS, 10, N_TOKENS, 15)
    run = drive(
        engine,
        [greedy(str(i), p, n) for i, (p, n) in enumerate(zip(ref.prompts, limits, strict=True))],
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
    assert run.widest >= 3
    assert not engine.running and engine.batch_cache is None


async def ask(client: httpx.AsyncClient, name: str, topic: str) -> dict[str, Any]:
    r = await client.post(
        "/v1/chat/completions",
        json={"model": name, "messages": chat(topic), "max_tokens": N_TOKENS, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("arch", ARCHS)
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

    ref = mlx_lm_reference(path, n=12)
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


def test_unsupported_model_type_lists_the_supported_ones(tmp_path: Path) -> None:
    path = tmp_path / "m"
    build_tiny_model(path, "llama")
    config = json.loads((path / "config.json").read_text())
    # A type mlx-lm itself could run, but that we have not verified, and no type at all.
    for model_type in ("gemma3_text", None):
        (path / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
        with pytest.raises(ModelLoadError) as info:
            load(str(path))
        message = str(info.value)
        assert f"unsupported model_type {model_type!r}" in message
        assert "supported: " + ", ".join(SUPPORTED_MODEL_TYPES) in message
