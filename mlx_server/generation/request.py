"""The internal request every dialect converts into, and the sampling defaults applied once."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs

from ..messages import ChatMessage, ConstraintSpec, PromptSpec, SamplingParams, ToolSpec

ReasoningMode = Literal["split", "drop"]

# A seed is taken mod 2**63: MLX keys take 0..2**64-1, and this leaves room for `seed + j`.
SEED_RANGE = 2**63


@attrs.frozen(kw_only=True)
class Sampling:
    """The sampling fields a request set; None where it said nothing (`resolve_sampling`
    fills those in from the model's and the API's defaults)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0


_DEFAULTED = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)


def resolve_sampling(sampling: Sampling, defaults: Mapping[str, Any] | None) -> SamplingParams:
    """The one place sampling defaults are applied: what the request set, else the model's
    default (`generation_config.json`, when the model provides one), else the API default."""
    api = SamplingParams()
    values: dict[str, Any] = {}
    for name in _DEFAULTED:
        value = getattr(sampling, name)
        if value is None and defaults is not None:
            value = defaults.get(name)
        values[name] = getattr(api, name) if value is None else value
    seed = None if sampling.seed is None else sampling.seed % SEED_RANGE
    return SamplingParams(
        **values,
        seed=seed,
        logit_bias=sampling.logit_bias,
        logprobs=sampling.logprobs,
        top_logprobs=sampling.top_logprobs,
    )


@attrs.frozen(kw_only=True)
class ToolChoice:
    """How the tools may be used: "auto", "none" (left out of the template), or "required"
    (one call, of the function `name` when set); `parallel` False keeps only the first call."""

    mode: Literal["auto", "none", "required"] = "auto"
    name: str | None = None
    parallel: bool = True


@attrs.frozen(kw_only=True)
class Request:
    """One generation request, whatever API it came through.

    Either `chat` (rendered by the model's chat template, with `tools`, `template_kwargs` and an
    assistant `prefill` the generation continues) or `prompts` (raw texts or token ids, one
    group of `n` choices each)."""

    id: str
    model: object = None  # as the request named it; the pool resolves it
    chat: tuple[ChatMessage, ...] | None = None
    prompts: tuple[PromptSpec, ...] = ()
    prompt_param: str = "messages"  # the field a prompt error names
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice = ToolChoice()
    reasoning: ReasoningMode = "split"
    enable_thinking: bool | None = None
    template_kwargs: Mapping[str, Any] = attrs.field(factory=dict, eq=False)
    prefill: str | None = None
    sampling: Sampling = Sampling()
    max_tokens: int | None = None  # None: the server's default
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    constraint: ConstraintSpec | None = None
    constraint_param: str = "response_format"
    stream: bool = False
