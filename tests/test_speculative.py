"""Prompt-lookup speculative decoding inside the batch (`engine.speculative`).

- greedy output is token for token the output without drafts, for rows that join and leave
  one batch at different steps, beside rows that cannot draft (logprobs, penalties), on
  tiny models of the plain-KV families (dense, q/k-normed, mixture of experts, latent
  attention). Two weight sets per family: the plain random model (its attention matters a lot
  and drafts are mostly rejected) and one whose attention output is scaled down (its output
  falls into loops, so long drafts are accepted): both partial and whole acceptances happen;
- a finished row's stored state covers exactly its prompt and output, so a follow-up turn
  that reuses it gives the same tokens as without drafts;
- sampled output keeps the model's distribution: on an 8-token vocabulary the distribution of
  each of the first four tokens is computed exactly (every continuation enumerated) and
  compared with 1,500 seeded speculative samples by a chi-square test;
- models whose caches cannot be cut never draft;
- a draft model (`engine.draft`) gives the same guarantees: greedy output token for token
  with a draft model that always agrees (the model itself), one that often does (a perturbed
  copy) and one that rarely does (other weights); sampled output keeps the target's
  distribution when the drafts are drawn from another distribution; a draft model of another
  vocabulary is refused.
"""

from __future__ import annotations

import collections
import math
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_map, tree_map_with_path
from mlx_lm.models.cache import BatchKVCache, KVCache

from mlx_server.engine.batch import BatchEngine
from mlx_server.engine.draft import Drafter, DraftError, check_pair
from mlx_server.engine.speculative import NgramIndex, accept_greedy, resolve, trim_rows
from mlx_server.messages import (
    Admit,
    CachedPrefix,
    GenerationRequest,
    SamplingParams,
    SequenceFinished,
    TokenOut,
)
from mlx_server.testing.tiny import build_tiny_model

VOCAB = 64


def test_ngram_index_drafts_what_followed_the_latest_occurrence() -> None:
    index = NgramIndex([1, 2, 3, 4, 9, 1, 2, 3, 5, 6], min_n=2, max_n=3)
    assert not index.has_draft()  # (5, 6) and (3, 5, 6) never appeared before
    assert index.draft(4) == []
    index.extend([1, 2])
    assert index.has_draft()
    assert index.draft(3) == [3, 5, 6]  # the latest "1 2" was followed by 3 5 6
    index.extend([3, 4])
    assert index.draft(8) == [9, 1, 2, 3, 5, 6, 1, 2]  # "2 3 4" once, followed by 9 ...
    assert NgramIndex([7]).draft(3) == []


def test_accept_greedy_keeps_the_agreeing_prefix_and_one_model_token() -> None:
    assert accept_greedy([4, 5, 6, 7], [4, 5, 6]) == [4, 5, 6, 7]
    assert accept_greedy([4, 9, 6, 7], [4, 5, 6]) == [4, 9]
    assert accept_greedy([3, 5, 6, 7], [4, 5, 6]) == [3]


def test_auto_is_off_on_a_cpu_only() -> None:
    on_cpu = mx.default_device() == mx.cpu
    assert resolve("auto") == ("off" if on_cpu else "auto")
    assert resolve("ngram") == "ngram"
    assert resolve("off") == "off"


def test_trim_rows_cuts_each_row_of_a_batched_cache_to_its_own_length() -> None:
    rows = [mx.random.normal((1, 2, n, 4)) for n in (5, 3, 7)]
    singles = []
    for r in rows:
        c = KVCache()
        c.update_and_fetch(r, r * 2)
        singles.append(c)
    batch = BatchKVCache.merge(singles)
    new = mx.random.normal((3, 2, 4, 4))
    batch.update_and_fetch(new, new * 2)
    keep = [4, 1, 2]
    trim_rows([batch], keep, 4)
    for i, (r, k) in enumerate(zip(rows, keep, strict=True)):
        one = batch.extract(i)
        assert one.keys is not None and one.values is not None
        want = mx.concatenate([r, new[i : i + 1, :, :k]], axis=2)
        assert one.offset == want.shape[2]
        assert mx.array_equal(one.keys[..., : one.offset, :], want)
        assert mx.array_equal(one.values[..., : one.offset, :], want * 2)
    assert batch.offset.tolist() == [5 + 4, 3 + 1, 7 + 2]


def tiny(tmp: Path, arch: str, attention: float) -> tuple[nn.Module, int]:
    model, config = build_tiny_model(tmp / arch, arch, vocab_size=VOCAB)
    if attention != 1.0:
        model.update(
            tree_map_with_path(
                lambda p, w: w * attention if "o_proj" in p else w, model.parameters()
            )
        )
    return model, int(config["vocab_size"])


PROMPTS = (
    tuple([5, 6, 7, 8, 9, 10] * 5),
    tuple(range(10, 40)),
    tuple([3, 4] * 7),
    tuple(range(60)),
)


def request(
    rid: str, prompt: tuple[int, ...], n: int, sampling: SamplingParams | None = None
) -> GenerationRequest:
    return GenerationRequest(
        request_id=rid,
        prompt_ids=prompt,
        sampling=sampling or SamplingParams(temperature=0.0),
        max_tokens=n,
        ignore_eos=True,
    )


def drive(
    engine: BatchEngine, admits: list[Admit], later: Admit | None = None
) -> tuple[dict[str, list[int]], dict[str, SequenceFinished]]:
    """Step to the end; `later` joins once the first request has 20 tokens."""
    tokens: dict[str, list[int]] = collections.defaultdict(list)
    done: dict[str, SequenceFinished] = {}
    for a in admits:
        engine.admit(a)
    first = admits[0].request.request_id
    while engine.has_work:
        if later is not None and len(tokens[first]) >= 20:
            engine.admit(later)
            later = None
        for ev in engine.step():
            if isinstance(ev, TokenOut):
                tokens[ev.request_id].append(ev.token_id)
            elif isinstance(ev, SequenceFinished):
                done[ev.request_id] = ev
                stored = ev.stored
                if stored is not None:  # the state covers exactly the tokens it names
                    caches, total = engine.stored[stored.handle]
                    assert total == len(stored.token_ids)
                    assert all(getattr(c, "offset", total) == total for c in caches)
    return dict(tokens), done


def workload() -> tuple[list[Admit], Admit]:
    admits = [Admit(request=request(str(i), p, 90 + 7 * i)) for i, p in enumerate(PROMPTS)]
    # Rows that never draft, decoded in the same passes.
    logprobs = SamplingParams(temperature=0.0, logprobs=True, top_logprobs=2)
    admits.append(Admit(request=request("logprobs", PROMPTS[0], 40, logprobs)))
    penalised = SamplingParams(temperature=0.0, repetition_penalty=1.3)
    admits.append(Admit(request=request("penalised", PROMPTS[2], 50, penalised)))
    later = Admit(request=request("late", PROMPTS[1][:9] * 3, 60))
    return admits, later


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen3", "mixtral", "deepseek_v3"])
def test_greedy_output_is_identical_with_drafts(tmp_path: Path, arch: str) -> None:
    drafted = accepted = 0
    for attention in (1.0, 0.3):
        model, vocab = tiny(tmp_path, arch, attention)
        runs: dict[str, Any] = {}
        for mode in ("off", "ngram"):
            engine = BatchEngine(
                model, eos_token_ids=[], vocab_size=vocab, prefill_chunk=24, speculative=mode
            )
            assert engine.speculative == mode
            admits, later = workload()
            runs[mode] = drive(engine, admits, later)[0]
            if mode == "ngram":
                drafted += engine.drafted
                accepted += engine.accepted
        assert runs["ngram"] == runs["off"], f"{arch}, attention x{attention}"
        assert len(runs["ngram"]) == len(PROMPTS) + 3
    # Both kinds of verdict happened: drafts accepted and drafts rejected.
    assert 0 < accepted < drafted, (arch, drafted, accepted)


@pytest.mark.slow
def test_stored_state_after_drafts_serves_a_follow_up_turn(tmp_path: Path) -> None:
    model, vocab = tiny(tmp_path, "llama", 0.3)
    results = []
    for mode in ("off", "ngram"):
        engine = BatchEngine(model, eos_token_ids=[], vocab_size=vocab, speculative=mode)
        tokens, done = drive(engine, [Admit(request=request("a", PROMPTS[0], 61))])
        stored = done["a"].stored
        assert stored is not None
        follow = (*PROMPTS[0], *tokens["a"], 11, 12, 13)
        assert follow[: len(stored.token_ids)] == stored.token_ids
        hit = Admit(
            request=request("b", follow, 50),
            prefix=CachedPrefix(handle=stored.handle, length=len(stored.token_ids)),
        )
        tokens2, done2 = drive(engine, [hit, Admit(request=request("c", PROMPTS[3], 30))])
        assert done2["b"].cached_tokens == len(stored.token_ids)
        results.append((tokens, tokens2))
        if mode == "ngram":
            assert engine.accepted > 0
    assert results[0] == results[1]


@pytest.mark.slow
def test_auto_mode_drafts_for_greedy_rows_only(tmp_path: Path) -> None:
    model, vocab = tiny(tmp_path, "llama", 0.3)
    engine = BatchEngine(model, eos_token_ids=[], vocab_size=vocab, speculative="auto")
    sampled = SamplingParams(temperature=0.7, seed=1)
    drive(engine, [Admit(request=request("s", PROMPTS[0], 60, sampled))])
    assert engine.drafted == 0
    greedy, _ = drive(engine, [Admit(request=request("g", PROMPTS[0], 60))])
    assert 0 < engine.accepted <= engine.drafted
    off = BatchEngine(model, eos_token_ids=[], vocab_size=vocab, speculative="off")
    assert drive(off, [Admit(request=request("g", PROMPTS[0], 60))])[0] == greedy


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gemma3_text", "qwen3_next"])
def test_caches_that_cannot_be_cut_never_draft(tmp_path: Path, arch: str) -> None:
    model, vocab = tiny(tmp_path, arch, 1.0)
    engine = BatchEngine(model, eos_token_ids=[], vocab_size=vocab, speculative="ngram")
    assert engine.speculative == "off"
    drive(engine, [Admit(request=request("a", PROMPTS[0], 20))])
    assert engine.drafted == 0


# -- a draft model ------------------------------------------------------------------------


def perturbed(model: nn.Module, noise: float) -> nn.Module:
    """A copy of `model` with every weight scaled by (1 + noise * N(0, 1))."""
    copy = type(model)(model.args)  # type: ignore[call-arg, attr-defined]
    mx.random.seed(0)
    copy.update(tree_map(lambda w: w * (1 + noise * mx.random.normal(w.shape)), model.parameters()))
    return copy


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen3", "mixtral", "deepseek_v3"])
def test_greedy_output_is_identical_with_a_draft_model(tmp_path: Path, arch: str) -> None:
    model, vocab = tiny(tmp_path, arch, 0.3)
    # The draft model needs only the vocabulary: a llama drafts for every family.
    other, _ = build_tiny_model(tmp_path / "other", "llama", vocab_size=VOCAB, seed=5)
    off = BatchEngine(model, eos_token_ids=[], vocab_size=vocab, prefill_chunk=24)
    want = drive(off, *workload())[0]
    assert len(want) == len(PROMPTS) + 3
    rates = {}
    for name, draft in (
        ("itself", model),
        ("perturbed", perturbed(model, 0.05)),
        ("other", other),
    ):
        engine = BatchEngine(
            model,
            eos_token_ids=[],
            vocab_size=vocab,
            prefill_chunk=24,
            speculative="draft",
            drafter=Drafter(draft, vocab),
        )
        assert engine.speculative == "draft" and engine.drafter is not None
        assert drive(engine, *workload())[0] == want, name
        assert engine.drafted > 0, name
        rates[name] = engine.accepted / engine.drafted
        assert engine.drafter.rows == 0 and engine.drafter.cache is None  # every row left
    assert rates["itself"] == 1.0
    assert rates["other"] < rates["perturbed"] < 1.0, rates


def test_a_draft_model_of_another_vocabulary_is_refused(tmp_path: Path) -> None:
    model, _ = build_tiny_model(tmp_path / "m", "llama", vocab_size=VOCAB)
    vocab = {f"t{i}": i for i in range(VOCAB)}
    check_pair(vocab, dict(vocab), model)
    with pytest.raises(DraftError, match="same vocabulary"):
        check_pair(vocab, {**vocab, "t1": 2, "t2": 1}, model)
    window, _ = build_tiny_model(tmp_path / "g", "gemma3_text", vocab_size=VOCAB)
    with pytest.raises(DraftError, match="plain KV"):
        check_pair(vocab, dict(vocab), window)


# -- sampled output keeps the target distribution ---------------------------------------------

SMALL_VOCAB = 8
STEPS = 4
SAMPLES = 1500
# Chi-square critical value for 7 degrees of freedom at p = 0.001.
CHI2_7_0001 = 24.32


def exact_marginals(model: nn.Module, prompt: tuple[int, ...], params: SamplingParams) -> Any:
    """P(token k = v) for k < STEPS, by enumerating every continuation of STEPS - 1 tokens."""
    from mlx_server.engine.sampling import filter_logits

    conts = [()]
    for _ in range(STEPS - 1):
        conts = [(*c, v) for c in conts for v in range(SMALL_VOCAB)]
    seqs = mx.array([list(prompt) + list(c) for c in conts])
    logits = model(seqs).astype(mx.float32)  # (N, L, V)
    base = len(prompt) - 1
    cond = []  # cond[k][n] = p(token k | prompt, conts[n][:k])
    for k in range(STEPS):
        rows = logits[:, base + k, :]
        filtered = mx.stack([filter_logits(rows[n], params) for n in range(rows.shape[0])])
        cond.append(mx.softmax(filtered, axis=-1).tolist())
    marg = [[0.0] * SMALL_VOCAB for _ in range(STEPS)]
    for n, c in enumerate(conts):
        path = math.prod(cond[k][n][c[k]] for k in range(STEPS - 1))
        for k in range(STEPS - 1):
            marg[k][c[k]] += path
        for v in range(SMALL_VOCAB):
            marg[STEPS - 1][v] += path * cond[STEPS - 1][n][v]
    return marg


def chi_square(observed: list[int], expected: list[float]) -> float:
    total = sum(observed)
    return sum(
        (o - total * e) ** 2 / (total * e) for o, e in zip(observed, expected, strict=True) if e
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=5),
    ],
)
@pytest.mark.parametrize("source", ["ngram", "draft"])
def test_sampled_output_keeps_the_target_distribution(
    tmp_path: Path, params: SamplingParams, source: str
) -> None:
    model, _ = build_tiny_model(
        tmp_path / "llama", "llama", vocab_size=SMALL_VOCAB, scale=1.5, seed=3
    )
    prompt = (1, 2, 3, 1, 2, 3, 4, 1, 2)
    expected = exact_marginals(model, prompt, params)
    drafter = None
    if source == "draft":  # other weights: drafts drawn from a distribution q != p
        draft, _ = build_tiny_model(
            tmp_path / "draft", "llama", vocab_size=SMALL_VOCAB, scale=1.5, seed=4
        )
        drafter = Drafter(draft, SMALL_VOCAB)
    engine = BatchEngine(
        model,
        eos_token_ids=[],
        vocab_size=SMALL_VOCAB,
        speculative=source,
        keep_caches=False,
        drafter=drafter,
    )
    counts = [[0] * SMALL_VOCAB for _ in range(STEPS)]
    batch = 250
    for start in range(0, SAMPLES, batch):
        admits = [
            Admit(
                request=request(
                    str(i), prompt, STEPS, SamplingParams(**{**_fields(params), "seed": i})
                )
            )
            for i in range(start, start + batch)
        ]
        tokens, _ = drive(engine, admits)
        for toks in tokens.values():
            assert len(toks) == STEPS
            for k, t in enumerate(toks):
                counts[k][t] += 1
    # Drafts were proposed, and both accepted and rejected.
    assert 0 < engine.accepted < engine.drafted
    for k in range(STEPS):
        assert abs(sum(expected[k]) - 1.0) < 1e-4
        for v in range(SMALL_VOCAB):  # what the filter removes never appears
            if expected[k][v] == 0.0:
                assert counts[k][v] == 0
        stat = chi_square(counts[k], expected[k])
        dof = sum(1 for e in expected[k] if e) - 1
        limit = CHI2_7_0001 if dof == 7 else _chi2_limit(dof)
        assert stat < limit, (k, stat, counts[k], [round(SAMPLES * e, 1) for e in expected[k]])


def _fields(params: SamplingParams) -> dict[str, Any]:
    return {
        "temperature": params.temperature,
        "top_k": params.top_k,
        "top_p": params.top_p,
        "min_p": params.min_p,
    }


def _chi2_limit(dof: int) -> float:
    """The p = 0.001 critical value (Wilson-Hilferty approximation)."""
    z = 3.09
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


# -- through the real server ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("source", ["ngram", "draft"])
async def test_server_drafts_and_answers_as_mlx_lm(tmp_path: Path, source: str) -> None:
    """Concurrent greedy chat requests through the server give mlx-lm's own text, and
    /metrics counts the drafts proposed and accepted. (ngram and draft: auto is off on a
    CPU. The draft model is a perturbed copy of the model, saved as a model directory.)"""
    import httpx
    import mlx_lm
    import trio
    from mlx_lm.generate import generate_step

    from mlx_server.testing.server import run_server
    from mlx_server.testing.tiny import default_tokenizer, save_model_dir

    model_dir = tmp_path / "tiny-loop"
    model, config = build_tiny_model(model_dir, "llama")
    # Attention and MLP outputs scaled down: the model mostly repeats its last token, so its
    # greedy output falls into runs that prompt lookup drafts.
    model.update(
        tree_map_with_path(
            lambda p, w: w * 0.1 if "o_proj" in p or "down_proj" in p else w, model.parameters()
        )
    )
    save_model_dir(model_dir, model, config, default_tokenizer())
    topics = ["cats", "the sea", "a b a b a b", "x"]
    n = 40

    def body(topic: str) -> dict[str, Any]:
        return {
            "model": "tiny-loop",
            "messages": [{"role": "user", "content": f"Repeat: {topic}"}],
            "max_tokens": n,
            "temperature": 0,
        }

    args = ["--model", str(model_dir), "--speculative", source]
    if source == "draft":
        draft_dir = tmp_path / "draft"
        draft = perturbed(model, 0.05)
        save_model_dir(draft_dir, draft, config, default_tokenizer())
        args += ["--draft-model", str(draft_dir)]
    with run_server(args, log_path=tmp_path / "server.log") as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            texts: dict[str, str] = {}

            async def one(topic: str) -> None:
                r = await client.post("/v1/chat/completions", json=body(topic))
                assert r.status_code == 200, r.text
                texts[topic] = r.json()["choices"][0]["message"]["content"]

            async with trio.open_nursery() as nursery:
                for t in topics:
                    nursery.start_soon(one, t)
            metrics = (await client.get("/metrics")).text

    def counter(name: str) -> float:
        lines = [ln for ln in metrics.splitlines() if ln.startswith(name + "_total ")]
        assert lines, name
        return float(lines[0].split()[1])

    proposed = counter("mlx_server_draft_tokens")
    accepted = counter("mlx_server_draft_accepted_tokens")
    assert 0 < accepted <= proposed, (proposed, accepted, sorted(texts.items()))

    ref_model, tok = mlx_lm.load(str(model_dir))[:2]
    eos = set(tok.eos_token_ids)
    for t in topics:
        prompt = tok.apply_chat_template(body(t)["messages"], add_generation_prompt=True)
        ref: list[int] = []
        for token, _ in generate_step(
            mx.array(prompt), ref_model, max_tokens=n, sampler=lambda lp: mx.argmax(lp, axis=-1)
        ):
            if int(token) in eos:
                break
            ref.append(int(token))
        assert texts[t] == tok.decode(ref, skip_special_tokens=True), t


def test_the_draft_model_drafts_for_the_first_model_only() -> None:
    """Named or not, the first --model gets the draft model; the others, and a model sharded
    over processes, do not."""
    from types import SimpleNamespace
    from typing import cast

    from mlx_server.actors.service import ModelService
    from mlx_server.config import load_settings

    argv = ["--model", "big=/m/big", "--model", "/m/b", "--draft-model", "/d"]
    settings = load_settings(argv, {})

    def loader(default: bool, rank0: Any = None) -> object:
        slot = SimpleNamespace(name="x", spec="/m/big" if default else "/m/b", default=default)
        service = ModelService(slot, settings, cast(Any, None), rank0=rank0)
        return service._draft_loader()

    assert callable(loader(True))
    assert loader(False) is None
    assert loader(True, rank0=object()) is None
    plain = load_settings(["--model", "/m/big"], {})
    slot = SimpleNamespace(name="x", spec="/m/big", default=True)
    assert ModelService(slot, plain, cast(Any, None))._draft_loader() is None


@pytest.mark.slow
def test_draft_rows_follow_the_batch_through_aborts(tmp_path: Path) -> None:
    """Rows aborted mid-generation and a row joining late: the draft cache keeps one row per
    decoding row, in order, and the rows left give the tokens they give without drafts."""
    model, vocab = tiny(tmp_path, "llama", 0.3)

    def run(drafter: Drafter | None) -> dict[str, list[int]]:
        engine = BatchEngine(
            model,
            eos_token_ids=[],
            vocab_size=vocab,
            prefill_chunk=24,
            speculative="off" if drafter is None else "draft",
            drafter=drafter,
        )
        for i, p in enumerate(PROMPTS):
            engine.admit(Admit(request=request(str(i), p, 60)))
        tokens: dict[str, list[int]] = collections.defaultdict(list)
        steps = 0
        while engine.has_work:
            steps += 1
            if steps == 6:
                engine.abort("1")
            if steps == 9:
                engine.admit(Admit(request=request("late", PROMPTS[2][:5], 30)))
            if steps == 12:
                engine.abort("late")
            for ev in engine.step():
                if isinstance(ev, TokenOut):
                    tokens[ev.request_id].append(ev.token_id)
            if drafter is not None:
                assert drafter.rows == len(engine.running), steps
        if drafter is not None:
            assert engine.drafted > 0
        tokens.pop("1", None)
        tokens.pop("late", None)
        return dict(tokens)

    drafter = Drafter(perturbed(model, 0.05), vocab)
    assert run(drafter) == run(None)
    assert drafter.cache is None and drafter.rows == 0
