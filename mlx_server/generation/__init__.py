"""The one dialect-neutral generation path, under every API dialect and over the actors.

A dialect (`api/openai`, `api/anthropic`, ...) converts its request into one `Request`
(`request.py`); `prepare` plans tools and reasoning, compiles grammars, renders the template,
tokenizes and checks the context window; `fanout` makes one engine request per choice (`n`,
several prompts, seeds); `accumulate` gathers stream events into per-choice results. Nothing
here knows HTTP: no quart, and the model is reached only through `ModelPort`.
"""

from __future__ import annotations

from .accumulate import ChoiceResult, Tally, collect
from .fanout import choice_requests, nothing_to_generate
from .port import ModelPort
from .prepare import Prepared, count_tokens, prepare
from .request import Request, Sampling, ToolChoice, resolve_sampling

__all__ = [
    "ChoiceResult",
    "ModelPort",
    "Prepared",
    "Request",
    "Sampling",
    "Tally",
    "ToolChoice",
    "choice_requests",
    "collect",
    "count_tokens",
    "nothing_to_generate",
    "prepare",
    "resolve_sampling",
]
