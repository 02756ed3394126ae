"""A test model that emits a scripted text, to drive the real serving path (tool-call and
reasoning parsing, both APIs, streaming) deterministically.

`ScriptedModel` replaces a loaded model's network. It keeps its own one-layer KV cache (a plain
mlx-lm `KVCache`, so the batch engine merges, extends, filters and extracts it like any other)
in which every position stores the token id and whether it was read as prompt (prefill calls
use single-sequence caches) or generated (decode calls use the batched cache); left padding is
all zeros. So at every call each row knows its own prompt and what it has generated so far,
however requests join and leave the batch, and its logits are one-hot on the next token of its
script (then EOS). The script is chosen per row by regexes over the prompt text, so one server
can, for instance, answer with a tool call until the prompt holds a tool result, then with the
final answer. When the prompt already ends with the start of the script (a prefilled forced
tool call), the script goes on from there.

A script's text is tokenized whole (`chunk: "token"`) or one character at a time
(`chunk: "char"`: every token is one character, so markup arrives in the smallest pieces).

The weights are never run: build a model directory with `build_scripted_model` (a tiny llama
with SmolLM2's tokenizer and the chat template of the family under test, `TEMPLATES`), and serve
it with `python -m mlx_server.testing.scripted_server --script FILE --model DIR ...`, which is
the real CLI with the loaded model wrapped. The prompt cache is disabled there: a stored KV
state would mark an earlier answer's tokens as generated.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import BatchKVCache, KVCache

from ..engine.tokenizer import Tokenizer

PROMPT, GENERATED = 1.0, 2.0


@attrs.frozen(kw_only=True)
class Script:
    text: str
    when: str | None = None  # a regex searched in the prompt text; None: always
    chunk: Literal["token", "char"] = "token"


def load_scripts(path: str | Path) -> list[Script]:
    """`{"scripts": [{"text": ..., "when": ..., "chunk": ...}, ...]}`; the first match wins."""
    data: Any = json.loads(Path(path).read_text(encoding="utf-8"))
    return [Script(**item) for item in data["scripts"]]


def write_scripts(path: Path, scripts: Sequence[Script]) -> Path:
    path.write_text(json.dumps({"scripts": [attrs.asdict(s) for s in scripts]}, indent=2))
    return path


@attrs.define(eq=False)
class _Plan:
    tokenizer: Tokenizer
    scripts: list[Script]
    eos_id: int
    memo: dict[tuple[int, ...], list[int]] = attrs.field(factory=dict)

    def tokens_for(self, prompt: tuple[int, ...]) -> list[int]:
        ids = self.memo.get(prompt)
        if ids is None:
            ids = self._tokens(prompt)
            if len(self.memo) > 256:
                self.memo.clear()
            self.memo[prompt] = ids
        return ids

    def _tokens(self, prompt: tuple[int, ...]) -> list[int]:
        text = self.tokenizer.decode(list(prompt), skip_special_tokens=False)
        script = next((s for s in self.scripts if s.when is None or re.search(s.when, text)), None)
        if script is None:
            return []
        rest = script.text
        for k in range(min(len(rest), len(text)), 2, -1):  # a prefill the prompt ends with
            if text.endswith(rest[:k]):
                rest = rest[k:]
                break
        if script.chunk == "char":
            return [t for ch in rest for t in self.tokenizer.encode(ch)]
        return self.tokenizer.encode(rest)


class ScriptedModel(nn.Module):
    """Logits one-hot on each row's next scripted token (see the module docstring)."""

    # Prompts are read one request at a time: a left-padded batch would record its padding
    # as prompt tokens and read its last prompt tokens through a batched cache.
    batched_prefill = False
    # One position's logits per call: drafts cannot be verified (speculative decoding is off).
    multi_token_logits = False

    def __init__(self, tokenizer: Tokenizer, scripts: list[Script], vocab_size: int) -> None:
        super().__init__()
        eos = sorted(tokenizer.eos_token_ids)
        end = tokenizer.token_to_id("<|im_end|>")
        self._plan = _Plan(tokenizer, scripts, end if end in eos else eos[0])
        self._vocab = vocab_size

        # The engine runs prompt chunks through `model.model` (the backbone) and only the last
        # prompt token and decode steps through the model itself.
        self.model = _PromptChunks(self)

    def make_cache(self) -> list[Any]:
        return [KVCache()]

    def __call__(self, inputs: mx.array, cache: list[Any] | None = None) -> mx.array:
        assert cache is not None
        store = cache[0]
        if isinstance(store, BatchKVCache):
            kind = GENERATED
        else:
            # A lone row decodes in its own plain cache: the first call that is not a prompt
            # chunk reads the last prompt token; every later one (or any on a cache that
            # already holds generated tokens) is a decode step.
            started = getattr(store, "scripted_started", False)
            kind = GENERATED if started or _has_generated(store) else PROMPT
            store.scripted_started = True
        return self._record(inputs, store, kind)

    def _record(self, inputs: mx.array, store: Any, kind: float) -> mx.array:
        ids = inputs.astype(mx.float32)
        entry = mx.stack([ids, mx.full(ids.shape, kind)], axis=-1)[:, None, :, :]
        keys, _ = store.update_and_fetch(entry, entry)
        history = np.array(keys[:, 0, :, :].astype(mx.float32))
        logits = np.full((inputs.shape[0], 1, self._vocab), -1e4, dtype=np.float32)
        for row in range(history.shape[0]):
            kinds = history[row, :, 1]
            tokens = history[row, :, 0].astype(np.int64)
            prompt = tuple(int(t) for t in tokens[kinds == PROMPT])
            done = int((kinds == GENERATED).sum())
            script = self._plan.tokens_for(prompt)
            nxt = script[done] if done < len(script) else self._plan.eos_id
            logits[row, 0, nxt] = 0.0
        return mx.array(logits)


class _PromptChunks:
    """`ScriptedModel.model`: what the engine runs prompt chunks through (a plain object, not a
    module, so the model's module tree stays acyclic)."""

    def __init__(self, owner: ScriptedModel) -> None:
        self._owner = owner

    def __call__(self, inputs: mx.array, cache: list[Any] | None = None) -> mx.array:
        assert cache is not None
        return self._owner._record(inputs, cache[0], PROMPT)


def _has_generated(store: Any) -> bool:
    if store.keys is None or not store.offset:
        return False
    kinds = np.array(store.keys[0, 0, : store.offset, 1].astype(mx.float32))
    return bool((kinds == GENERATED).any())


def wrap_loaded(loaded: Any, scripts: list[Script]) -> Any:
    """Replace a `LoadedModel`'s network with the scripted one (same tokenizer, template)."""
    vocab = int(loaded.config.get("vocab_size") or loaded.tokenizer.vocab_size)
    loaded.model = ScriptedModel(loaded.tokenizer, scripts, vocab)
    return loaded


def build_scripted_model(out_dir: Path, template: str, *, model_type: str = "llama") -> Path:
    """A tiny model directory whose chat template is `template` (a key of `TEMPLATES` or the
    template's source)."""
    from .tiny import build_tiny_model

    build_tiny_model(out_dir, model_type)
    config_file = out_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = TEMPLATES.get(template, template)
    config_file.write_text(json.dumps(config, indent=2))
    return out_dir


# -- chat templates of the families under test (compact versions of the real ones) ------------

_TOOLS_SYSTEM = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>

TOOL_INSTRUCTIONS<|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}"""

_CHATML_TURNS = """\
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}\
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{% if message.content %}{{ message.content }}
{% endif %}{% for tc in message.tool_calls or [] %}TOOL_CALL_MARKUP{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
GENERATION_TAIL{% endif %}"""

_HERMES_INSTRUCTIONS = """\
For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>"""

_HERMES_CALL = """\
<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>
"""

_XML_INSTRUCTIONS = """\
If you choose to call a function ONLY reply in the following format:
<tool_call>
<function=example_function_name>
<parameter=example_parameter_1>
value_1
</parameter>
</function>
</tool_call>"""

_XML_CALL = """\
<tool_call>
<function={{ tc.function.name }}>
{% for key, value in tc.function.arguments.items() %}<parameter={{ key }}>
{{ value if value is string else value | tojson }}
</parameter>
{% endfor %}</function>
</tool_call>
"""


def _chatml(instructions: str, call: str, tail: str = "") -> str:
    system = _TOOLS_SYSTEM.replace("TOOL_INSTRUCTIONS", instructions)
    turns = _CHATML_TURNS.replace("TOOL_CALL_MARKUP", call).replace("GENERATION_TAIL", tail)
    return system + turns


_QWEN3_TAIL = (
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% endif %}"
)

LLAMA3_TEMPLATE = """\
{{- bos_token }}<|start_header_id|>system<|end_header_id|>

Environment: ipython
{% if messages[0].role == 'system' %}{{ messages[0].content }}{% endif %}
{% if tools %}Given the following functions, please respond with a JSON for a function call \
with its proper arguments that best answers the given prompt.
Respond in the format {"name": function name, "parameters": dictionary of argument name and \
its value}. Do not use variables.
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}{% endif %}<|eot_id|>
{%- for message in messages %}
{%- if message.role == 'assistant' and message.tool_calls %}\
<|start_header_id|>assistant<|end_header_id|>

{% for tc in message.tool_calls %}<|python_tag|>{"name": "{{ tc.function.name }}", \
"parameters": {{ tc.function.arguments | tojson }}}{% endfor %}<|eot_id|>
{%- elif message.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>

{{ message.content }}<|eot_id|>
{%- elif message.role != 'system' %}<|start_header_id|>{{ message.role }}<|end_header_id|>

{{ message.content }}<|eot_id|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

MISTRAL_TEMPLATE = """\
{{- bos_token }}
{%- for message in messages %}
{%- if message.role == 'user' %}\
{% if loop.last and tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}\
[INST]{{ message.content }}[/INST]
{%- elif message.role == 'system' %}[INST]{{ message.content }}[/INST]
{%- elif message.role == 'assistant' and message.tool_calls %}[TOOL_CALLS][\
{% for tc in message.tool_calls %}{"name": "{{ tc.function.name }}", \
"arguments": {{ tc.function.arguments | tojson }}}{% if not loop.last %}, {% endif %}\
{% endfor %}]{{ eos_token }}
{%- elif message.role == 'assistant' %}{{ message.content }}{{ eos_token }}
{%- elif message.role == 'tool' %}[TOOL_RESULTS]{"content": {{ message.content | tojson }}}\
[/TOOL_RESULTS]
{%- endif %}
{%- endfor %}"""

TEMPLATES: dict[str, str] = {
    "hermes": _chatml(_HERMES_INSTRUCTIONS, _HERMES_CALL),
    # Qwen3: Hermes calls, `<think>` reasoning, an empty think block when thinking is off.
    "qwen3": _chatml(_HERMES_INSTRUCTIONS, _HERMES_CALL, _QWEN3_TAIL),
    # Thinking-only Qwen3 (2507): the generation prompt opens `<think>` itself.
    "qwen3_thinking": _chatml(_HERMES_INSTRUCTIONS, _HERMES_CALL, "<think>\n"),
    "qwen3_coder": _chatml(_XML_INSTRUCTIONS, _XML_CALL),
    "llama3": LLAMA3_TEMPLATE,
    "mistral": MISTRAL_TEMPLATE,
}
