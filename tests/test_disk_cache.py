"""Prompt cache on disk (`engine.disk_cache`, `--prompt-cache-dir`).

- a long prompt's state is written by the worker thread; a new engine and a new index over the
  same directory (a restart) load it for a prompt that continues it, read only the rest, and
  give the tokens a cold run gives;
- a corrupt (a flipped byte), truncated, foreign (another model) or unreadable file is ignored
  with a warning: the request reads its prompt cold and its output is unchanged;
- a state that continues a stored one replaces it; past the byte budget the least recently used
  files are deleted;
- the server writes and, after a restart, reuses a state (prompt-cache hit tokens in the usage).
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlx.nn as nn
import pytest

from mlx_server.engine.batch import BatchEngine
from mlx_server.engine.disk_cache import DiskCache
from mlx_server.messages import Admit, GenerationRequest, SamplingParams, SequenceFinished, TokenOut
from mlx_server.testing.tiny import build_tiny_model

PROMPT = tuple(range(100, 700))
N = 10


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    m, _ = build_tiny_model(tmp_path_factory.mktemp("d") / "llama", "llama")
    return m


def run(
    model: nn.Module, disk: DiskCache | None, prompt: tuple[int, ...]
) -> tuple[list[int], SequenceFinished]:
    engine = BatchEngine(model, eos_token_ids=[], vocab_size=49152, disk=disk)
    request = GenerationRequest(
        request_id="a",
        prompt_ids=prompt,
        sampling=SamplingParams(temperature=0.0),
        max_tokens=N,
        ignore_eos=True,
    )
    engine.admit(Admit(request=request))
    tokens: list[int] = []
    done = None
    while engine.has_work:
        for ev in engine.step():
            if isinstance(ev, TokenOut):
                tokens.append(ev.token_id)
            elif isinstance(ev, SequenceFinished):
                done = ev
    assert done is not None
    return tokens, done


def first_session(model: nn.Module, directory: Path) -> tuple[int, ...]:
    """Run one request with a disk cache, write its state; returns the follow-up prompt."""
    disk = DiskCache(directory, budget=1 << 30, model_id="tiny")
    tokens, _ = run(model, disk, PROMPT)
    disk.flush()
    assert disk.writes == 1
    disk.close()
    return (*PROMPT, *tokens, 5, 6, 7)


def test_state_survives_a_restart(model: nn.Module, tmp_path: Path) -> None:
    follow = first_session(model, tmp_path)
    cold, cold_done = run(model, None, follow)
    assert cold_done.cached_tokens == 0
    disk = DiskCache(tmp_path, budget=1 << 30, model_id="tiny")  # the restart
    warm, done = run(model, disk, follow)
    assert done.cached_tokens >= len(PROMPT) + N - 1
    assert disk.hits == 1
    assert warm == cold
    # Short prompts are not written; a shorter prefix of a stored state is not written again.
    assert not disk.put(PROMPT[:100], [])
    disk.close()


def _damage(directory: Path, how: str) -> None:
    data = next(directory.glob("*.safetensors"))
    head = next(directory.glob("*.json"))
    if how == "flipped":
        blob = bytearray(data.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        data.write_bytes(bytes(blob))
    elif how == "truncated":
        data.write_bytes(data.read_bytes()[:1000])
    elif how == "foreign":
        head.write_text(head.read_text().replace('"model": "tiny"', '"model": "other"'))
    elif how == "garbage header":
        head.write_text("{not json")


@pytest.mark.parametrize("how", ["flipped", "truncated", "foreign", "garbage header"])
def test_a_bad_file_is_ignored_with_a_warning(
    model: nn.Module, tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    follow = first_session(model, tmp_path)
    cold, _ = run(model, None, follow)
    _damage(tmp_path, how)
    with caplog.at_level(logging.WARNING):
        disk = DiskCache(tmp_path, budget=1 << 30, model_id="tiny")
        tokens, done = run(model, disk, follow)
    assert done.cached_tokens == 0
    assert tokens == cold
    assert "prompt cache file" in caplog.text and "ignored" in caplog.text
    assert disk.hits == 0
    disk.close()


def test_longer_states_replace_shorter_ones_and_the_budget_evicts(
    model: nn.Module, tmp_path: Path
) -> None:
    disk = DiskCache(tmp_path, budget=1 << 30, model_id="tiny")
    tokens, _ = run(model, disk, PROMPT)
    disk.flush()
    follow = (*PROMPT, *tokens, 5, 6, 7)
    run(model, disk, follow)  # continues the first state: replaces it
    disk.flush()
    assert len(list(tmp_path.glob("*.json"))) == 1
    one = next(tmp_path.glob("*.safetensors")).stat().st_size
    other = tuple(range(1000, 1400))
    run(model, disk, other)
    disk.flush()
    assert len(list(tmp_path.glob("*.json"))) == 2
    disk.close()
    # A budget for one file: a restart keeps the most recently used one.
    small = DiskCache(tmp_path, budget=one + 1, model_id="tiny")
    assert len(list(tmp_path.glob("*.json"))) == 1
    assert small.lookup((*other, 1, 2)) is not None
    assert small.lookup(follow) is None
    small.close()


@pytest.mark.slow
async def test_server_reuses_a_state_after_a_restart(tmp_path: Path) -> None:
    import httpx

    from mlx_server.testing.server import run_server

    model_dir = tmp_path / "tiny-llama"
    build_tiny_model(model_dir, "llama")
    cache_dir = tmp_path / "kv"
    text = " ".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(40))
    first = [{"role": "user", "content": text}]
    args = ["--model", str(model_dir), "--prompt-cache-dir", str(cache_dir)]

    async def ask(server_url: str, messages: list[dict[str, str]]) -> dict[str, object]:
        async with httpx.AsyncClient(base_url=server_url, timeout=120) as client:
            body = {"model": "tiny-llama", "messages": messages, "max_tokens": 8, "temperature": 0}
            r = await client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()

    with run_server(args, log_path=tmp_path / "one.log") as server:
        answer = await ask(server.base_url, first)
    assert list(cache_dir.glob("*.safetensors"))  # written before the server exited
    reply = answer["choices"][0]["message"]["content"]  # type: ignore[index]
    turn = [{"role": "assistant", "content": reply}, {"role": "user", "content": "Go on."}]
    follow = [*first, *turn]
    with run_server(args, log_path=tmp_path / "two.log") as server:
        again = await ask(server.base_url, follow)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            metrics = (await client.get("/metrics")).text
    usage = again["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 256, usage  # type: ignore[index]
    assert "mlx_server_prompt_cache_disk_hits_total 1.0" in metrics
    assert "mlx_server_kv_cache_bytes " in metrics
