"""Which tool-call markup and reasoning style a model uses, from its chat template's markup
first (it is what the model was trained on), then its model type."""

from __future__ import annotations

import attrs

from .parsers import deepseek

# Markup of each family that tokenizers often declare as special tokens: the detokenizer must
# keep them (`OutputFormat.markers`) or the parser never sees them.
_MARKERS: dict[str, tuple[str, ...]] = {
    "mistral": ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"),
    "llama3": ("<|python_tag|>",),
    "glm": (
        "<tool_call>",
        "</tool_call>",
        "<arg_key>",
        "</arg_key>",
        "<arg_value>",
        "</arg_value>",
    ),
    "kimi_k2": (
        "<|tool_calls_section_begin|>",
        "<|tool_calls_section_end|>",
        "<|tool_call_begin|>",
        "<|tool_call_argument_begin|>",
        "<|tool_call_end|>",
    ),
    "deepseek": (
        deepseek.CALLS_BEGIN,
        deepseek.CALLS_END,
        deepseek.CALL_BEGIN,
        deepseek.CALL_END,
        deepseek.SEP,
    ),
    "gemma4": ("<|tool_call>", "<tool_call|>", '<|"|>'),
    "function_gemma": ("<start_function_call>", "<end_function_call>", "<escape>"),
    "pythonic": ("<|python_start|>", "<|python_end|>", "<|tool_call_start|>", "<|tool_call_end|>"),
    "harmony": (
        "<|start|>",
        "<|channel|>",
        "<|message|>",
        "<|end|>",
        "<|constrain|>",
        "<|call|>",
        "<|return|>",
    ),
}


@attrs.frozen
class OutputFormat:
    """What a model's generations look like: its tool-call family (a key of
    `parsers.PARSERS`, or `harmony`) and whether it reasons (in `<think>…</think>`, or in
    Harmony's analysis channel)."""

    tool_family: str
    reasoning: bool
    mistral_args: bool = False  # Mistral's `[TOOL_CALLS]name[ARGS]{...}` form

    @property
    def harmony(self) -> bool:
        """gpt-oss: channels carry reasoning, answer and calls (`parsers.harmony`)."""
        return self.tool_family == "harmony"

    @property
    def markers(self) -> tuple[str, ...]:
        """This family's markup strings; the ones a tokenizer marks special must be kept
        when detokenizing (the frontend intersects them with the special tokens)."""
        return _MARKERS.get(self.tool_family, ())

    def forced_prefill(self, name: str | None) -> str:
        """The start of a tool call in this family's markup, to prefill the assistant turn
        when a call is required (`name` None: any tool)."""
        family = self.tool_family
        if family == "qwen3_coder":
            return "<tool_call>\n" + (f"<function={name}>\n" if name else "<function=")
        if family == "llama3":
            return f'{{"name": "{name}", "parameters": ' if name else '{"name": "'
        if family == "mistral":
            if self.mistral_args:
                return f"[TOOL_CALLS]{name}[ARGS]" if name else "[TOOL_CALLS]"
            return f'[TOOL_CALLS][{{"name": "{name}", "arguments": ' if name else "[TOOL_CALLS]"
        if family == "glm":
            return "<tool_call>" + (name or "")
        if family == "kimi_k2":
            head = "<|tool_calls_section_begin|><|tool_call_begin|>functions."
            return head + (f"{name}:0<|tool_call_argument_begin|>" if name else "")
        if family == "deepseek":
            head = deepseek.CALLS_BEGIN + deepseek.CALL_BEGIN
            return head + (f"{name}{deepseek.SEP}" if name else "")
        if family == "gemma4":
            return "<|tool_call>call:" + (name or "")
        if family == "function_gemma":
            return "<start_function_call>call:" + (name or "")
        if family == "pythonic":
            return f"[{name}(" if name else "["
        if family == "harmony":
            return "<|channel|>commentary to=functions." + (
                f"{name} <|constrain|>json<|message|>" if name else ""
            )
        return "<tool_call>\n" + (f'{{"name": "{name}", "arguments": ' if name else "")


def detect_format(
    model_type: str | None, template: str | None, *, tool_fallback: bool | None = None
) -> OutputFormat:
    """The template's own markup wins; the model type decides when the template does not say;
    Hermes is the fallback, and the format of the generic tool prompt for templates that
    ignore tools (`tool_fallback`: `ChatTemplate.tool_fallback`, found by a probe render; when
    not given, a template that never mentions `tools` is taken to ignore them)."""
    t = template or ""
    reasoning = "<think>" in t or "</think>" in t
    if "<|channel|>" in t or model_type == "gpt_oss":
        return OutputFormat(tool_family="harmony", reasoning=True)
    if "<function=" in t and "<parameter=" in t:
        family = "qwen3_coder"
    elif "[TOOL_CALLS]" in t:
        family = "mistral"
    elif "<arg_key>" in t:
        family = "glm"
    elif "<|tool_calls_section_begin|>" in t:
        family = "kimi_k2"
    elif "tool\u2581calls\u2581begin" in t:
        family = "deepseek"
    elif "<|tool_call>" in t:
        family = "gemma4"
    elif "<start_function_call>" in t:
        family = "function_gemma"
    elif "<tool_call>" in t:
        family = "hermes"
    elif "<|python_tag|>" in t or ("<|start_header_id|>" in t and "ipython" in t):
        family = "llama3"
    elif "<|python_start|>" in t or "<|tool_call_start|>" in t or "tool_code" in t:
        family = "pythonic"
    elif "func_name1(" in t or "[func_name" in t:  # Llama 3.2's pythonic instructions
        family = "pythonic"
    elif tool_fallback or (tool_fallback is None and t and "tools" not in t):
        family = "hermes"  # the template ignores tools: the generic tool prompt's format
    else:
        family = _BY_TYPE.get(model_type or "", "hermes")
        if family == "llama3" and "<|start_header_id|>" not in t:
            family = "hermes"
    return OutputFormat(tool_family=family, reasoning=reasoning, mistral_args="[ARGS]" in t)


_BY_TYPE = {
    "qwen3_next": "qwen3_coder",
    "qwen3_5": "qwen3_coder",
    "qwen3_5_moe": "qwen3_coder",
    "mistral": "mistral",
    "llama": "llama3",
    "glm4_moe": "glm",
    "glm4_moe_lite": "glm",
    "kimi_k2": "kimi_k2",
    "deepseek_v3": "deepseek",
    "deepseek_v32": "deepseek",
    "gemma4": "gemma4",
    "gemma4_text": "gemma4",
    "llama4": "pythonic",
    "lfm2": "pythonic",
    "lfm2_moe": "pythonic",
}
