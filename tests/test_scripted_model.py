"""The scripted test model in the real batch engine: every row follows its own script,
whatever joins and leaves the batch, with chunked prefill; then EOS."""

from __future__ import annotations

from mlx_server.engine.batch import BatchEngine
from mlx_server.messages import Admit, GenerationRequest, SamplingParams, SequenceFinished, TokenOut
from mlx_server.testing.scripted import Script, ScriptedModel
from mlx_server.testing.tiny import default_tokenizer

SCRIPTS = [
    Script(when="weather", text='<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'),
    Script(when="count", text="one two three four five six", chunk="char"),
    Script(text="Hello there."),
]


def test_rows_follow_their_own_scripts() -> None:
    tok = default_tokenizer()
    eos = tok.token_to_id("<|im_end|>")
    assert eos is not None
    model = ScriptedModel(tok, SCRIPTS, tok.vocab_size)
    engine = BatchEngine(
        model, eos_token_ids=[eos], vocab_size=tok.vocab_size, prefill_chunk=5, keep_caches=False
    )
    prompts = {
        "a": "<|im_start|>user\nweather please<|im_end|>\n<|im_start|>assistant\n",
        "b": "<|im_start|>user\ncount to six, a longer prompt than the others<|im_end|>\n"
        "<|im_start|>assistant\n",
        "c": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        # A prompt that already ends with the start of its script (a prefill): it goes on.
        "d": "<|im_start|>user\nweather again<|im_end|>\n<|im_start|>assistant\n<tool_call>\n",
    }
    expected = {
        "a": SCRIPTS[0].text,
        "b": SCRIPTS[1].text,
        "c": SCRIPTS[2].text,
        "d": SCRIPTS[0].text.removeprefix("<tool_call>\n"),
    }
    tokens: dict[str, list[int]] = {k: [] for k in prompts}
    finished: dict[str, SequenceFinished] = {}
    order = list(prompts)
    steps = 0
    greedy = SamplingParams(temperature=1.0, seed=1)  # sampling too: the logits are one-hot
    while len(finished) < len(prompts):
        if order and steps % 3 == 0:  # requests join while others are generating
            rid = order.pop(0)
            ids = tuple(tok.encode(prompts[rid]))
            request = GenerationRequest(
                request_id=rid, prompt_ids=ids, sampling=greedy, max_tokens=200
            )
            engine.admit(Admit(request=request))
        for event in engine.step():
            if isinstance(event, TokenOut):
                tokens[event.request_id].append(event.token_id)
            elif isinstance(event, SequenceFinished):
                finished[event.request_id] = event
        steps += 1
        assert steps < 500
    for rid, text in expected.items():
        assert tok.decode(tokens[rid]) == text, rid
        assert finished[rid].finish_reason == "stop", rid
    assert len(tokens["b"]) == len(SCRIPTS[1].text)  # one token per character
