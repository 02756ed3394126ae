"""A coding agent's session as Claude Code drives the Anthropic API, for tests that measure
the prefix cache through a real server: a billing header that changes every request, a long
system prompt, adaptive thinking with an effort, `context_management`, a forced `Bash` call
each turn, its result sent back, and a mid-conversation system entry every other turn.

`run_agent_session` returns each turn's (`input_tokens`, `cache_read_input_tokens`);
`hit_rates` prints them as a table (`pytest -s`) and returns the per-turn hit rates."""

from __future__ import annotations

from typing import Any

import httpx
import jsonschema

from . import openapi

BASH = {
    "name": "Bash",
    "description": "Run a shell command and return its output.",
    "input_schema": {
        "type": "object",
        "properties": {
            "command": {"type": "string", "maxLength": 16},
            "timeout": {"type": "integer", "minimum": 1, "maximum": 600},
        },
        "required": ["command"],
    },
}
AGENT_SYSTEM = (
    "You are an agent working in a shell on the user's repository. Use the Bash tool to look "
    "around before you change anything, keep answers short, and report what you did. " * 8
)


def agent_body(messages: list[dict[str, Any]], turn: int, model: str) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": 48,
        "temperature": 1.0,
        "system": [
            {
                "type": "text",
                "text": f"x-anthropic-billing-header: cc_version=2.1.197; cch={turn};",
            },
            {"type": "text", "text": AGENT_SYSTEM},
        ],
        "messages": messages,
        "tools": [BASH],
        "tool_choice": {"type": "tool", "name": "Bash"},
        "thinking": {"type": "adaptive"},
        "output_config": {"effort": "xhigh"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "metadata": {"user_id": "session-1"},
    }


def run_agent_session(http: httpx.Client, turns: int, model: str) -> list[tuple[int, int]]:
    """`turns` requests of one conversation; (input_tokens, cache_read_input_tokens) each."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Tidy up the repository."}]
    usage: list[tuple[int, int]] = []
    for turn in range(1, turns + 1):
        r = http.post("/v1/messages", json=agent_body(messages, turn, model))
        assert r.status_code == 200, r.text
        body = r.json()
        openapi.validate("anthropic.Message", body)
        assert body["stop_reason"] == "tool_use"
        calls = [b for b in body["content"] if b["type"] == "tool_use"]
        assert len(calls) == 1 and calls[0]["name"] == "Bash"
        jsonschema.validate(calls[0]["input"], BASH["input_schema"])
        usage.append((body["usage"]["input_tokens"], body["usage"]["cache_read_input_tokens"]))
        messages.append({"role": "assistant", "content": body["content"]})
        result = {"type": "tool_result", "tool_use_id": calls[0]["id"], "content": "a.txt b.txt"}
        messages.append({"role": "user", "content": [result]})
        if turn % 2 == 0:
            reminder = f"<system-reminder>Turn {turn}: the todo list is empty.</system-reminder>"
            messages.append({"role": "system", "content": reminder})
    return usage


def hit_rates(usage: list[tuple[int, int]]) -> list[float]:
    """cache_read / (input + cache_read) per turn, printed as a table (`pytest -s`)."""
    rates = [cached / (fresh + cached) for fresh, cached in usage]
    print("\nturn  prompt  cache_read  input_tokens  hit rate")
    for turn, ((fresh, cached), rate) in enumerate(zip(usage, rates, strict=True), 1):
        print(f"{turn:>4}  {fresh + cached:>6}  {cached:>10}  {fresh:>12}  {rate:8.1%}")
    return rates


def check_prefix_reuse(usage: list[tuple[int, int]], *, generation_prompt: int = 4) -> None:
    """Each later turn read all of the previous turn's prompt from the cache, but for the
    generation prompt (`<|im_start|>assistant\\n`): only the answer as the template rewrites
    it, the tool's result and a reminder were new."""
    totals = [fresh + cached for fresh, cached in usage]
    for n in range(1, len(usage)):
        assert usage[n][1] >= totals[n - 1] - generation_prompt, usage
