"""Which tool-call markup and reasoning style a model uses, from its type and chat template."""

from __future__ import annotations

import attrs


@attrs.frozen
class OutputFormat:
    """What a model's generations look like: its tool-call family (a key of
    `parsers.PARSERS`) and whether it reasons in `<think>…</think>`."""

    tool_family: str
    reasoning: bool
    mistral_args: bool = False  # Mistral's `[TOOL_CALLS]name[ARGS]{...}` form

    def forced_prefill(self, name: str | None) -> str:
        """The start of a tool call in this family's markup, to prefill the assistant turn
        when a call is required (`name` None: any tool)."""
        if self.tool_family == "qwen3_coder":
            return "<tool_call>\n" + (f"<function={name}>\n" if name else "<function=")
        if self.tool_family == "llama3":
            return f'{{"name": "{name}", "parameters": ' if name else '{"name": "'
        if self.tool_family == "mistral":
            if self.mistral_args:
                return f"[TOOL_CALLS]{name}[ARGS]" if name else "[TOOL_CALLS]"
            return f'[TOOL_CALLS][{{"name": "{name}", "arguments": ' if name else "[TOOL_CALLS]"
        return "<tool_call>\n" + (f'{{"name": "{name}", "arguments": ' if name else "")


def detect_format(model_type: str | None, template: str | None) -> OutputFormat:
    """The template's own markup wins (it is what the model was trained on); the model type
    decides when the template does not say; Hermes is the fallback."""
    t = template or ""
    reasoning = "<think>" in t or "</think>" in t
    if "<function=" in t and "<parameter=" in t:
        family = "qwen3_coder"
    elif "[TOOL_CALLS]" in t:
        family = "mistral"
    elif "<tool_call>" in t:
        family = "hermes"
    elif "<|python_tag|>" in t or ("<|start_header_id|>" in t and "ipython" in t):
        family = "llama3"
    elif model_type == "qwen3_next":
        family = "qwen3_coder"
    elif model_type == "mistral":
        family = "mistral"
    elif model_type == "llama" and "<|start_header_id|>" in t:
        family = "llama3"
    else:
        family = "hermes"
    return OutputFormat(tool_family=family, reasoning=reasoning, mistral_args="[ARGS]" in t)
