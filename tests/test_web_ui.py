"""The chat page at `/`, in a real headless browser against real server processes.

Debian's Chromium (`/usr/bin/chromium`) is driven by Playwright's Python package (no browser
download: Playwright only speaks the DevTools protocol to the system's Chromium). The servers run
the scripted test model (`mlx_server.testing.scripted`) with Qwen3's chat template, so answers
are exact and fast: reasoning in `<think>`, Markdown with a code block, a Hermes tool call, and a
long answer to stop half-way. The page is a client like any other: everything it shows comes
through `/v1/models` and streamed `/v1/chat/completions`.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from mlx_server.api.app import create_app
from mlx_server.api.state import ServerState
from mlx_server.api.web import CSP, asset_names
from mlx_server.config import Settings
from mlx_server.testing.scripted import Script, build_scripted_model, write_scripts
from mlx_server.testing.server import ServerProcess, run_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
KEY = "s3cret-key"
TIMEOUT_MS = 30_000
DEADLINE_S = 4
SECOND = "second-model"

REASONING = "The user wants **code**."
ANSWER = (
    "# Answer\n\nHere is *some* `inline code` and a [link](https://example.com/docs).\n\n"
    "```python\ndef add(x: int) -> int:\n    # add one\n    return x + 1\n```\n\n"
    '- one\n- two\n\n<img src=x onerror="window.pwned = 1"> <script>window.pwned = 2</script>'
)
TOOL_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TOOLS_JSON = (
    '[{"type": "function", "function": {"name": "get_weather", "parameters": '
    '{"type": "object", "properties": {"city": {"type": "string"}}}}}]'
)
LONG = "word " * 20_000
SCRIPTS = [
    Script(when="THANKS", text="You are welcome."),
    Script(when="STOP ME", text=LONG),
    Script(when="WEATHER", text=TOOL_CALL, chunk="char"),
    Script(text=f"<think>\n{REASONING}\n</think>\n\n{ANSWER}", chunk="char"),
]


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"the chat page tests need Debian's Chromium at {CHROMIUM}: install it with "
            "`apt-get update && apt-get install -y chromium` (as root); .ci/run does this in CI",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    # launch() starts Chromium with a fresh temporary profile (user-data dir) of its own.
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            chromium.close()


def _scripted(
    tmp_path_factory: pytest.TempPathFactory, *args: str, models: int = 1
) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("web")
    model_dir = build_scripted_model(root / "scripted-qwen3", "qwen3")
    if models == 2:
        second = build_scripted_model(root / "second", "qwen3")
        args = (*args, "--model", f"{SECOND}={second}")
    script = write_scripts(root / "scripts.json", SCRIPTS)
    launcher = [sys.executable, "-m", "mlx_server.testing.scripted_server", "--script", str(script)]
    env = {name: "" for name in os.environ if name.startswith("MLX_SERVER_")}
    with run_server(
        ["--model", str(model_dir), *args], env=env, log_path=root / "server.log", launcher=launcher
    ) as server:
        yield server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from _scripted(tmp_path_factory, models=2)


@pytest.fixture(scope="module")
def key_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # A short deadline: a long answer ends with the API's in-band error after some text.
    yield from _scripted(tmp_path_factory, "--api-key", KEY, "--timeout", str(DEADLINE_S))


class Page:
    """A fresh browser context (own storage) on one server, failing on any script error."""

    def __init__(self, browser: Any, server: ServerProcess, permissions: list[str]) -> None:
        self.server = server
        self.context = browser.new_context(
            viewport={"width": 1000, "height": 800}, permissions=permissions
        )
        self.context.set_default_timeout(TIMEOUT_MS)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def open(self, *, ready: bool = True) -> Any:
        self.page.goto(f"{self.server.base_url}/")
        if ready:
            self.page.wait_for_selector("body[data-ready=true]", state="attached")
        return self.page

    def send(self, text: str) -> None:
        self.page.fill("#input", text)
        self.page.keyboard.press("Enter")

    def wait_answer(self, n: int = 1) -> Any:
        """The n-th answer's figures line once that answer has ended; returns the element."""
        stats = self.page.locator(".msg.assistant .stats").nth(n - 1)
        stats.wait_for(state="attached")
        self.page.wait_for_function(
            "n => document.querySelectorAll('.msg.assistant .stats[data-finish]').length >= n",
            arg=n,
        )
        return stats

    def close(self) -> None:
        self.context.close()
        assert not self.errors, f"script errors on the page: {self.errors}"


@pytest.fixture
def page_on(browser: Any) -> Iterator[Callable[..., Page]]:
    pages: list[Page] = []

    def make(server: ServerProcess, permissions: tuple[str, ...] = ()) -> Page:
        pages.append(Page(browser, server, list(permissions)))
        return pages[-1]

    yield make
    for page in pages:
        page.close()


def api_chat(server: ServerProcess, content: str, **body: Any) -> httpx.Response:
    return httpx.post(
        f"{server.base_url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": content}], **body},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )


def running(server: ServerProcess) -> int:
    return int(httpx.get(f"{server.base_url}/health", timeout=10).json()["running"])


def generation_tokens(server: ServerProcess) -> float:
    metrics = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    found = re.search(r"^mlx_server_generation_tokens_total (\S+)$", metrics, re.M)
    assert found, metrics
    return float(found.group(1))


def access_lines(server: ServerProcess) -> list[dict[str, str]]:
    marker = "mlx_server.access: "
    lines = [line.split(marker, 1)[1] for line in server.log().splitlines() if marker in line]
    return [dict(re.findall(r"(\w+)=(\S+)", line)) for line in lines]


def wait_until(what: str, check: Callable[[], bool], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- serving the page --------------------------------------------------------------------------


async def test_page_and_assets_in_process() -> None:
    """The routes, in process (no model): the page and every file it loads are served without
    the key, with the right types; nothing else is; /v1 keeps asking for the key."""
    app = create_app(Settings(api_key=KEY), ServerState())
    client = app.test_client()
    page = await client.get("/")
    assert page.status_code == 200 and page.headers["content-security-policy"] == CSP
    html = await page.get_data(as_text=True)
    names = set(asset_names())
    assert names == {"index.html", "app.js", "markdown.js", "highlight.js", "style.css"}
    linked = set(re.findall(r'(?:src|href)="/ui/([^"]+)"', html))
    for name in names - {"index.html"}:
        r = await client.get(f"/ui/{name}")
        assert r.status_code == 200, name
        text = await r.get_data(as_text=True)
        linked |= set(re.findall(r'from "\./([^"]+)"', text))  # module imports
        assert "content-security-policy" not in r.headers
        assert r.headers["x-content-type-options"] == "nosniff"
    assert linked == names - {"index.html"}  # everything the page loads exists, nothing spare
    for path in ["/ui/missing.js", "/ui/..%2F_routes.py", "/ui/%2e%2e/__init__.py", "/static/x"]:
        r = await client.get(path)
        assert r.status_code == 404, path
        assert (await r.get_json())["error"]["code"] == "not_found"
    r = await client.get("/v1/models")
    assert r.status_code == 401
    r = await client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 503  # past the key: still "loading" (no model in this app)


@pytest.mark.slow
def test_the_page_needs_no_key_but_every_api_call_does(key_server: ServerProcess) -> None:
    base = key_server.base_url
    page = httpx.get(f"{base}/", headers={"Origin": "http://elsewhere.example"}, timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "access-control-allow-origin" not in page.headers  # CORS stays off
    assert '<script type="module" src="/ui/app.js">' in page.text
    for name, kind in [("app.js", "text/javascript"), ("style.css", "text/css")]:
        asset = httpx.get(f"{base}/ui/{name}", timeout=10)
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
    for missing in ["/ui/nope.js", "/ui/..%2F__init__.py", "/ui/../_routes.py", "/ui/"]:
        r = httpx.get(f"{base}{missing}", timeout=10)
        assert r.status_code == 404, missing
        assert r.json()["error"]["code"] == "not_found"
    assert httpx.post(f"{base}/", timeout=10).status_code == 405
    # The API keeps its auth: the page has no way around it.
    assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 401
    assert api_chat(key_server, "hi", stream=True).status_code == 200
    no_key = httpx.post(f"{base}/v1/chat/completions", json={}, timeout=10)
    assert no_key.status_code == 401


# -- in the browser ----------------------------------------------------------------------------


@pytest.mark.slow
def test_streams_markdown_code_reasoning_and_figures(
    server: ServerProcess, page_on: Callable[..., Page]
) -> None:
    expected = api_chat(server, "Hello").json()
    tab = page_on(server)
    page = tab.open()
    assert page.locator("#model option").all_inner_texts() == ["scripted-qwen3", SECOND]
    assert page.input_value("#model") == "scripted-qwen3"  # the server's first model
    # Record the answer's text length at every change: streaming shows it growing.
    page.evaluate(
        """() => {
            window.lengths = [];
            new MutationObserver(() => {
                const c = document.querySelector('.msg.assistant .content');
                if (c) window.lengths.push(c.textContent.length);
            }).observe(document.getElementById('chat'),
                       {subtree: true, childList: true, characterData: true});
        }"""
    )
    tab.send("Hello")
    stats = tab.wait_answer()
    answer = page.locator(".msg.assistant .content")
    final = len(answer.text_content() or "")
    lengths = page.evaluate("window.lengths")
    # Text appears before the answer ends (the stop test watches a long one grow for longer).
    assert any(0 < n < final for n in lengths), f"no partial answer shown: {sorted(set(lengths))}"

    # Markdown, rendered; the model's HTML shown as text, never run.
    assert answer.locator("h1").inner_text() == "Answer"
    assert answer.locator("em").inner_text() == "some"
    assert answer.locator(":not(pre) > code").inner_text() == "inline code"
    assert answer.locator("a").get_attribute("href") == "https://example.com/docs"
    assert answer.locator("li").all_inner_texts() == ["one", "two"]
    assert answer.locator(".code-lang").inner_text() == "python"
    code = answer.locator("pre code")
    assert code.inner_text() == "def add(x: int) -> int:\n    # add one\n    return x + 1"
    assert answer.locator(".hl-keyword").first.inner_text() == "def"
    assert answer.locator(".hl-comment").inner_text() == "# add one"
    assert '<img src=x onerror="window.pwned = 1">' in answer.inner_text()
    assert page.locator("#chat img, #chat script").count() == 0
    assert page.evaluate("window.pwned") is None

    # Reasoning: shown apart from the answer, collapsed once the answer began, opens on click.
    reasoning = page.locator(".msg.assistant details.reasoning")
    assert reasoning.get_attribute("open") is None
    assert not page.locator(".reasoning-body").is_visible()
    reasoning.locator("summary").click()
    assert page.locator(".reasoning-body").inner_text() == "The user wants code."
    assert page.locator(".reasoning-body strong").inner_text() == "code"
    assert REASONING not in answer.inner_text()

    # Figures from the stream: exact token count (usage), time to first token, tokens/s.
    usage = expected["usage"]
    assert stats.get_attribute("data-exact") == "true"
    assert stats.get_attribute("data-tokens") == str(usage["completion_tokens"])
    assert stats.get_attribute("data-finish") == "stop"
    assert stats.get_attribute("data-rate") == "decode"
    assert float(stats.get_attribute("data-ttft-ms") or 0) > 0
    assert float(stats.get_attribute("data-tps") or 0) > 0
    text = stats.inner_text()
    assert f"{usage['completion_tokens']} tokens" in text and "tok/s" in text and "TTFT" in text
    assert f"prompt {usage['prompt_tokens']} tokens" in text
    assert page.locator("#send").is_visible() and not page.locator("#stop").is_visible()
    page.screenshot(path=str(server.log_path.parent / "answer.png"))


@pytest.mark.slow
def test_tool_calls_are_shown_and_kept_in_the_conversation(
    server: ServerProcess, page_on: Callable[..., Page]
) -> None:
    tab = page_on(server)
    page = tab.open()
    page.click("#settings-toggle")
    page.fill("#tools", TOOLS_JSON)
    with page.expect_request("**/v1/chat/completions") as sent:
        tab.send("What is the WEATHER in Paris?")
    body = sent.value.post_data_json
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["tools"][0]["function"]["name"] == "get_weather"
    stats = tab.wait_answer()
    assert stats.get_attribute("data-finish") == "tool_calls"
    # The parser hands the call over whole: its speed is over the whole request.
    assert stats.get_attribute("data-rate") == "request"
    call = page.locator(".msg.assistant .tool-call")
    assert call.locator(".tool-name").inner_text() == "get_weather"
    assert call.locator(".tool-args").inner_text() == '{\n  "city": "Paris"\n}'
    assert "<tool_call>" not in page.locator("#chat").inner_text()

    # The call goes back as the assistant's turn; the server takes the conversation on.
    with page.expect_request("**/v1/chat/completions") as sent:
        tab.send("THANKS")
    history = sent.value.post_data_json["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user"]
    assert history[1]["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": '{"city": "Paris"}',
    }
    tab.wait_answer(2)
    assert page.locator(".msg.assistant .content").nth(1).inner_text() == "You are welcome."


@pytest.mark.slow
def test_stop_ends_the_generation_on_the_server(
    server: ServerProcess, page_on: Callable[..., Page]
) -> None:
    tab = page_on(server)
    page = tab.open()
    before = len(access_lines(server))
    tokens_before = generation_tokens(server)
    tab.send("Please STOP ME when you like")
    shown = "document.querySelector('.msg.assistant .content')?.textContent.length ?? 0"
    for size in (100, 200, 400):  # the answer grows on the page while the server generates
        page.wait_for_function(f"() => ({shown}) > {size}")
        assert running(server) == 1
    assert page.locator("#stop").is_visible()
    page.click("#stop")
    stats = tab.wait_answer()
    assert stats.get_attribute("data-finish") == "stopped"
    assert "stopped" in stats.inner_text()
    assert 400 < len(page.locator(".msg.assistant .content").inner_text()) < len(LONG) - 1000

    wait_until("the server to stop generating", lambda: running(server) == 0)

    def chat_lines() -> list[dict[str, str]]:
        return [x for x in access_lines(server)[before:] if x["endpoint"] == "/v1/chat/completions"]

    wait_until("the access-log line of the stopped request", lambda: bool(chat_lines()))
    line = chat_lines()[-1]
    assert line["finish_reason"] == "disconnected" and line["stream"] == "true"
    generated = generation_tokens(server) - tokens_before
    assert 40 < generated < len(LONG.split()) // 2, generated  # cut short by the stop
    assert page.locator("#send").is_visible()
    # The partial answer stays in the conversation; the next question goes on from it.
    tab.send("THANKS")
    tab.wait_answer(2)
    assert page.locator(".msg.assistant .content").nth(1).inner_text() == "You are welcome."


@pytest.mark.slow
def test_api_errors_are_shown(server: ServerProcess, page_on: Callable[..., Page]) -> None:
    message = api_chat(server, "Hello", temperature=5).json()["error"]["message"]
    tab = page_on(server)
    page = tab.open()
    page.click("#settings-toggle")
    page.fill("#temperature", "5")
    tab.send("Hello")
    stats = tab.wait_answer()
    assert stats.get_attribute("data-finish") == "error"
    error = page.locator(".msg.assistant .error")
    assert error.is_visible() and error.inner_text() == message
    assert "temperature" in message

    # A failed turn is not sent again; bad tools JSON is caught before sending.
    page.fill("#temperature", "")
    page.fill("#tools", "[not json")
    tab.send("Hello again")
    assert page.locator("#banner").is_visible()
    assert "Tools are not valid JSON" in page.locator("#banner-text").inner_text()
    page.fill("#tools", "")
    with page.expect_request("**/v1/chat/completions") as sent:
        tab.send("Hello again")
    assert [m["content"] for m in sent.value.post_data_json["messages"]] == ["Hello again"]
    assert tab.wait_answer(2).get_attribute("data-finish") == "stop"


@pytest.mark.slow
def test_api_key_prompt(key_server: ServerProcess, page_on: Callable[..., Page]) -> None:
    tab = page_on(key_server)
    page = tab.open(ready=False)
    dialog = page.locator("#key-dialog")
    dialog.wait_for(state="visible")
    assert page.locator("#key-message").inner_text() == "This server needs an API key."
    page.fill("#key-input", "wrong")
    page.keyboard.press("Enter")
    page.wait_for_function(
        "() => document.getElementById('key-message').textContent.includes('refused')"
    )
    assert "invalid API key" in page.locator("#key-message").inner_text()
    assert dialog.is_visible()
    page.fill("#key-input", KEY)
    page.click("#key-submit")
    page.wait_for_selector("body[data-ready=true]", state="attached")
    assert not dialog.is_visible()
    assert page.evaluate("sessionStorage.getItem('mlx-server.api-key')") == KEY
    with page.expect_request("**/v1/chat/completions") as sent:
        tab.send("THANKS")
    assert sent.value.headers["authorization"] == f"Bearer {KEY}"
    tab.wait_answer()
    assert page.locator(".msg.assistant .content").inner_text() == "You are welcome."
    # The key lasts for the tab's session: a reload asks no more.
    page.reload()
    page.wait_for_selector("body[data-ready=true]", state="attached")
    assert not dialog.is_visible()

    # An error in the middle of a stream (the server's --timeout): shown under the partial text.
    tab.send("STOP ME")
    stats = tab.wait_answer()
    assert stats.get_attribute("data-finish") == "error"
    assert page.locator(".msg.assistant .content").inner_text().startswith("word word")
    error = page.locator(".msg.assistant .error")
    assert error.is_visible() and "timed out" in error.inner_text()
    assert stats.get_attribute("data-exact") == "false"  # no usage: counted from the stream


@pytest.mark.slow
def test_markdown_renderer_never_makes_markup_from_text(
    server: ServerProcess, page_on: Callable[..., Page]
) -> None:
    page = page_on(server).open()
    hostile = [
        "<script>window.pwned = 1</script>",
        '<img src=x onerror="window.pwned = 2">',
        "[click](javascript:window.pwned=3)",
        "[click]( JavaScript:window.pwned=4 )",
        "![img](https://example.com/x.png)",
        "<javascript:window.pwned=5>",
        "[x](data:text/html,<script>window.pwned=6</script>)",
        '```"><img src=x onerror="window.pwned=7">\ncode\n```',
        "| a | <b>b</b> |\n|---|---|\n| <iframe src=x> | 2 |",
        "> <svg onload=window.pwned=8>",
        "* <a href=javascript:1>x</a>\n  1. `<b>`",
    ]
    result = page.evaluate(
        """async (inputs) => {
            const { markdownToFragment } = await import('/ui/markdown.js');
            const host = document.createElement('div');
            for (const text of inputs) host.append(markdownToFragment(text));
            document.body.append(host);
            await new Promise((resolve) => setTimeout(resolve, 50));
            const tags = [...host.querySelectorAll('*')].map((e) => e.tagName.toLowerCase());
            const hrefs = [...host.querySelectorAll('a')].map((a) => a.getAttribute('href'));
            const attrs = [...host.querySelectorAll('*')].flatMap((e) =>
                [...e.attributes].map((a) => a.name));
            return { tags, hrefs, attrs, text: host.textContent, pwned: window.pwned ?? null };
        }""",
        hostile,
    )
    assert result["pwned"] is None
    assert not {"script", "img", "iframe", "svg", "b", "object", "embed"} & set(result["tags"])
    assert result["hrefs"] == ["https://example.com/x.png"]
    allowed = {"href", "target", "rel", "class", "data-lang", "type", "title", "start"}
    assert set(result["attrs"]) <= allowed
    assert "<script>window.pwned = 1</script>" in result["text"]
    assert "<iframe src=x>" in result["text"]

    structure = page.evaluate(
        """async () => {
            const { markdownToFragment } = await import('/ui/markdown.js');
            const host = document.createElement('div');
            host.append(markdownToFragment(
                '3. three\\n4. four\\n   - sub\\n\\n| x | y |\\n|:-|-:|\\n| 1 | 2 |\\n\\n' +
                '***\\n\\n**bold _and em_** ~~gone~~ \\\\*literal\\\\*\\n\\n' +
                '```js\\nconst a = "unclosed'));
            return {
                start: host.querySelector('ol').getAttribute('start'),
                nested: host.querySelector('ol li ul li')?.textContent,
                cells: [...host.querySelectorAll('td')].map((td) => [td.textContent, td.className]),
                hr: host.querySelectorAll('hr').length,
                strong: host.querySelector('strong')?.textContent,
                em: host.querySelector('strong em')?.textContent,
                del: host.querySelector('del')?.textContent,
                literal: host.querySelector(':scope > p:last-of-type')?.textContent,
                code: host.querySelector('pre code')?.textContent,
                string: host.querySelector('pre .hl-string')?.textContent,
            };
        }"""
    )
    assert structure == {
        "start": "3",
        "nested": "sub",
        "cells": [["1", "align-left"], ["2", "align-right"]],
        "hr": 1,
        "strong": "bold and em",
        "em": "and em",
        "del": "gone",
        "literal": "bold and em gone *literal*",
        "code": 'const a = "unclosed',
        "string": '"unclosed',
    }


# -- conveniences ------------------------------------------------------------------------------


@pytest.mark.slow
def test_keyboard_settings_and_new_chat(
    server: ServerProcess, page_on: Callable[..., Page]
) -> None:
    tab = page_on(server)
    page = tab.open()
    page.fill("#input", "line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    assert page.input_value("#input") == "line one\nline two"
    assert page.locator(".msg").count() == 0  # Shift+Enter is a new line, not a send

    page.click("#settings-toggle")
    page.fill("#system", "You are terse.")
    page.fill("#temperature", "0.3")
    page.fill("#max-tokens", "7")
    page.select_option("#model", SECOND)
    with page.expect_request("**/v1/chat/completions") as sent:
        page.keyboard.press("Enter")  # focus is still in the settings: Enter there sends not
        page.focus("#input")
        page.keyboard.press("Enter")
    body = sent.value.post_data_json
    assert body["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "line one\nline two"},
    ]
    assert body["temperature"] == 0.3 and body["max_tokens"] == 7
    assert body["model"] == SECOND
    assert page.locator(".msg.user").count() == 1
    assert page.locator(".msg.user").inner_text() == "line one\nline two"
    stats = tab.wait_answer()
    assert stats.get_attribute("data-finish") == "length"
    assert stats.get_attribute("data-tokens") == "7"
    assert "cut at the token limit" in stats.inner_text()

    # Settings and the model choice outlive a reload; the conversation does not.
    page.reload()
    page.wait_for_selector("body[data-ready=true]", state="attached")
    assert page.input_value("#system") == "You are terse."
    assert page.input_value("#temperature") == "0.3"
    assert page.input_value("#max-tokens") == "7"
    assert page.input_value("#model") == SECOND
    assert page.locator(".msg").count() == 0
    page.click("#settings-toggle")
    page.fill("#max-tokens", "")

    # Escape stops an answer.
    tab.send("STOP ME")
    page.wait_for_function(
        "() => (document.querySelector('.msg.assistant .content')?.textContent.length ?? 0) > 50"
    )
    page.keyboard.press("Escape")
    assert tab.wait_answer().get_attribute("data-finish") == "stopped"
    wait_until("the server to stop generating", lambda: running(server) == 0)

    # New chat while an answer streams: it stops, and the next request starts afresh.
    tab.send("STOP ME")
    page.wait_for_function(
        "() => (document.querySelectorAll('.msg.assistant .content')[1]?.textContent.length ?? 0)"
        " > 50"
    )
    page.click("#clear")
    assert page.locator(".msg").count() == 0 and page.locator("#empty").is_visible()
    wait_until("the server to stop generating", lambda: running(server) == 0)
    with page.expect_request("**/v1/chat/completions") as sent:
        tab.send("THANKS")
    assert [m["content"] for m in sent.value.post_data_json["messages"]] == [
        "You are terse.",
        "THANKS",
    ]  # nothing from before New chat
    tab.wait_answer()
    assert page.locator(".msg.assistant .content").inner_text() == "You are welcome."
    assert page.evaluate("document.activeElement.id") == "input"


@pytest.mark.slow
def test_copy_button_copies_the_code(server: ServerProcess, page_on: Callable[..., Page]) -> None:
    tab = page_on(server, ("clipboard-read", "clipboard-write"))
    page = tab.open()
    tab.send("Hello")
    tab.wait_answer()
    button = page.locator(".msg.assistant .code-block .copy")
    button.click()
    page.wait_for_function(
        "() => document.querySelector('.code-block .copy').textContent === 'Copied'"
    )
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied == "def add(x: int) -> int:\n    # add one\n    return x + 1"


@pytest.mark.slow
def test_a_server_still_loading_is_retried(
    server: ServerProcess, page_on: Callable[..., Page]
) -> None:
    """The page opened while the model loads: it says so and tries again by itself. The 503 is
    the one this server's app really answers while loading (in process, no model)."""

    async def loading_answer() -> tuple[int, bytes]:
        client = create_app(Settings(), ServerState()).test_client()
        r = await client.get("/v1/models")
        return r.status_code, await r.get_data()

    status, body = trio.run(loading_answer)
    assert status == 503
    tab = page_on(server)
    page = tab.page
    answered: list[int] = []

    def models_route(route: Any) -> None:
        if not answered:
            answered.append(status)
            route.fulfill(status=status, body=body, content_type="application/json")
        else:
            answered.append(200)
            route.continue_()

    page.route("**/v1/models", models_route)
    tab.open(ready=False)
    page.locator("#banner").wait_for(state="visible")
    text = page.locator("#banner-text").inner_text()
    assert "the model is still loading" in text and "trying again" in text
    page.wait_for_selector("body[data-ready=true]", state="attached")
    assert answered == [503, 200] and not page.locator("#banner").is_visible()
    assert page.locator("#model option").count() == 2
