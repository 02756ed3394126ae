"""Fuzzing the real server with schemathesis, driven by the server's own `/openapi.json`.

The server runs a tiny random-weight model with a 64-token context, so every generation is
bounded whatever `max_tokens` or `n` a generated request asks for, and `--api-key` is on (the
fuzzer sends the key; `tests/test_e2e_access.py` covers the refusals). Every route in the
document is fuzzed with positive and negative data (schemathesis' coverage phase, then
Hypothesis-generated cases) and each answer is checked:

- `not_a_server_error`: no 5xx, ever;
- no hang: each request has a client timeout, and a stream must end properly (`[DONE]`, or
  `message_stop`/`error`) instead of going quiet;
- the answer conforms to the document: its status code is documented for the route, its content
  type and headers too, its body (each event of a stream) matches the documented schema;
- `negative_data_rejection`: a request the document calls invalid is refused with a 4xx, so the
  request schemas are no looser than the handlers.

The document's own validity (OpenAPI 3.1, valid JSON Schemas, every app route documented and
every documented route served) is checked first.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import attrs
import httpx
import hypothesis
import jsonschema
import pytest
import referencing
import referencing.jsonschema
import schemathesis
from hypothesis import strategies as st
from schemathesis import Case, CheckContext, Response
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from mlx_server.api.app import create_app
from mlx_server.api.openapi import openapi_document
from mlx_server.api.state import ServerState
from mlx_server.config import Settings
from mlx_server.testing.server import ServerProcess, run_server
from mlx_server.testing.tiny import build_tiny_model

pytestmark = pytest.mark.slow

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONTEXT = 64  # tokens: bounds every generation, whatever max_tokens and n say
# Seconds per request, a stream included: longer is a hang. The slowest legitimate case (128
# completion choices, each filling the context) takes about 15 s on a busy 2-core machine; the
# server's own --timeout is longer still, so a slow request is never a 504.
REQUEST_TIMEOUT = 60.0
MIN_CASES = 1000

# Hypothesis-generated cases per operation (positive and negative together), on top of the
# examples in the document and the coverage phase's deterministic cases (about 1,400: boundary
# values, each constraint broken in turn, missing fields, wrong methods).
MAX_EXAMPLES = {
    "/v1/chat/completions": 50,
    "/v1/completions": 50,
    "/v1/messages": 50,
    "/v1/messages/count_tokens": 50,
    "/v1/embeddings": 50,
    "/v1/models/{model_id}": 25,
    "/api/chat": 30,
    "/api/generate": 30,
    "/api/embed": 20,
    "/api/embeddings": 10,
    "/api/show": 10,
    "/admin/models/load": 10,
    "/admin/models/unload": 10,
    "/admin/models/pull": 10,
    "/api/pull": 10,
}
STREAMING = {"/v1/chat/completions", "/v1/completions", "/v1/messages"}


@attrs.define
class Tally:
    """What the fuzzer sent and got back, printed at the end of the module."""

    cases: int = 0
    streams: int = 0
    server_errors: int = 0
    seconds: float = 0.0
    by_route: Counter[str] = attrs.field(factory=Counter)
    by_status: Counter[int] = attrs.field(factory=Counter)
    slowest: tuple[float, str] = (0.0, "")
    failures: list[str] = attrs.field(factory=list)

    def add(self, case: Case, response: Response, seconds: float) -> None:
        self.cases += 1
        self.seconds += seconds
        self.by_route[case.operation.label] += 1
        self.by_status[response.status_code] += 1
        if (response.headers.get("content-type") or [""])[0].startswith("text/event-stream"):
            self.streams += 1
        if response.status_code >= 500:
            self.server_errors += 1
            self.failures.append(f"{response.status_code} {case.as_curl_command(headers=AUTH)}")
        if seconds > self.slowest[0]:
            self.slowest = (seconds, case.operation.label)

    def report(self) -> str:
        routes = ", ".join(f"{label}: {n}" for label, n in sorted(self.by_route.items()))
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(self.by_status.items()))
        return (
            f"fuzz: {self.cases} generated requests ({self.streams} streamed), "
            f"{self.server_errors} answered 5xx, "
            f"{self.seconds:.0f} s in requests (slowest {self.slowest[0]:.1f} s, "
            f"{self.slowest[1]})\n  by route: {routes}\n  by status: {statuses}"
        )


TALLY = Tally()


# --------------------------------------------------------------------------- fixtures


def _clean_env() -> dict[str, str]:
    """Blank out the developer's own MLX_SERVER_* / LOG_LEVEL (an empty variable is unset)."""
    return {n: "" for n in os.environ if n.startswith("MLX_SERVER_") or n == "LOG_LEVEL"}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    path = tmp_path_factory.mktemp("fuzz") / "tiny-llama"
    build_tiny_model(path, "llama", max_position_embeddings=CONTEXT)
    log = tmp_path_factory.mktemp("fuzz-srv") / "server.log"
    args = ["--model", str(path), "--max-tokens", "8", "--timeout", "300", "--log-level", "warning"]
    env = {**_clean_env(), "MLX_SERVER_API_KEY": KEY}
    with run_server(args, env=env, log_path=log) as server:
        yield server
    print("\n" + TALLY.report())  # at the end, whatever passed or failed


@pytest.fixture(scope="module")
def document(fuzz_server: ServerProcess) -> dict[str, Any]:
    r = httpx.get(f"{fuzz_server.base_url}/openapi.json", timeout=10)  # open: no key
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    return r.json()


@pytest.fixture(scope="module")
def api_schema(fuzz_server: ServerProcess) -> schemathesis.BaseSchema:
    config = schemathesis.Config.from_dict(
        {
            "headers": AUTH,
            "request-timeout": REQUEST_TIMEOUT,
            "max-stream-events": 100_000,  # read every stream to its end
            "output": {"sanitization": {"enabled": False}},  # show the key-like fields
            "generation": {"mode": "all"},  # positive and negative data
            "phases": {
                "stateful": {"enabled": False},
                # Every method but OPTIONS: an OPTIONS request with a body gets quart's automatic
                # 200 without the body being read, and the next request on that keep-alive
                # connection can hang (app.py closes such connections only after errors).
                "coverage": {
                    "unexpected-methods": [
                        "get",
                        "put",
                        "post",
                        "delete",
                        "patch",
                        "trace",
                        "query",
                    ]
                },
            },
            "operations": [
                {"include-path": path, "generation": {"max-examples": n}}
                for path, n in MAX_EXAMPLES.items()
            ],
        }
    )
    schema = schemathesis.openapi.from_url(
        f"{fuzz_server.base_url}/openapi.json", config=config, timeout=10
    )
    schema.hook(flatmap_body)
    return schema


def flatmap_body(context: schemathesis.HookContext, body: Any) -> st.SearchStrategy[Any]:
    """Send about half the generated bodies of the generating routes as streams: an optional
    boolean among thirty fields is rarely drawn true, and streams are where hangs hide."""
    operation = context.operation
    if operation is None or operation.path not in STREAMING or not isinstance(body, dict):
        return st.just(body)
    if "stream" in body:
        return st.just(body)
    return st.sampled_from([body, {**body, "stream": True}])


# --------------------------------------------------------------------------- the document


def test_document_is_valid_openapi_31(document: dict[str, Any], api_schema: Any) -> None:
    assert document["openapi"].startswith("3.1")
    api_schema.validate()  # against the OpenAPI 3.1 meta-schema
    for name, schema in document["components"]["schemas"].items():
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:  # pragma: no cover - the message is the point
            pytest.fail(f"components.schemas.{name} is not a valid JSON Schema: {exc}")
    labels = {result.ok().label for result in api_schema.get_all_operations()}
    assert {
        "POST /v1/chat/completions",
        "POST /v1/completions",
        "POST /v1/embeddings",
        "POST /v1/messages",
        "POST /v1/messages/count_tokens",
        "GET /v1/models",
        "GET /v1/models/{model_id}",
        "GET /health",
        "GET /metrics",
    } <= labels  # schemathesis leaves out the document's own route, GET /openapi.json
    assert "get" in document["paths"]["/openapi.json"]


def test_examples_match_their_schemas(document: dict[str, Any]) -> None:
    resource = referencing.Resource.from_contents(
        document, default_specification=referencing.jsonschema.DRAFT202012
    )
    registry: referencing.Registry[Any] = referencing.Registry().with_resource("urn:doc", resource)
    seen = 0
    for path, item in document["paths"].items():
        for method, op in item.items():
            media = op.get("requestBody", {}).get("content", {}).get("application/json")
            if media is None:
                continue
            ref = media["schema"]["$ref"].replace("#", "urn:doc#", 1)
            validator = jsonschema.Draft202012Validator({"$ref": ref}, registry=registry)
            for name, example in media["examples"].items():
                errors = [e.message for e in validator.iter_errors(example["value"])]
                assert not errors, (method, path, name, errors)
                seen += 1
    assert seen >= 9


def _app_routes() -> set[tuple[str, str]]:
    """Every (method, OpenAPI path) the app serves, read from its URL map."""
    app = create_app(Settings(), ServerState())
    out: set[tuple[str, str]] = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.endpoint.startswith("web."):
            continue  # the chat page and its files are no API
        path = rule.rule.replace("<path:", "{").replace("<", "{").replace(">", "}")
        out.update((m, path) for m in rule.methods or () if m not in ("HEAD", "OPTIONS"))
    return out


def test_every_route_is_documented_and_served(
    document: dict[str, Any], fuzz_server: ServerProcess
) -> None:
    documented = {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    }
    assert _app_routes() == documented
    model = document["paths"]["/v1/models/{model_id}"]["get"]["parameters"][0]["schema"]["enum"][0]
    with httpx.Client(base_url=fuzz_server.base_url, headers=AUTH, timeout=30) as http:
        for method, path in sorted(documented):
            url = path.replace("{model_id}", model).replace("{response_id}", "resp_missing")
            r = http.request(method, url, json={} if method == "POST" else None)
            # A documented route exists: the empty body is refused by the route itself (400
            # naming a field), never a 404/405 from the router; an unknown stored response is
            # the route's own 404.
            expected = 400 if method == "POST" else 200
            if "{response_id}" in path:
                expected = 404
            assert r.status_code == expected, (method, path, r.status_code, r.text)
            responses = document["paths"][path][method.lower()]["responses"]
            assert str(r.status_code) in responses, (method, path, r.status_code)


def test_document_follows_the_server() -> None:
    """Model names, aliases, the vocabulary and --api-key shape the document."""
    loading = openapi_document()
    assert {} in loading["security"]  # no --api-key: no key needed
    served = openapi_document(
        model_names=["org/Model-1", "Model-1", "default"],
        model_aliases=["claude-*"],
        vocab_size=100,
        auth_required=True,
    )
    assert {} not in served["security"]
    model = served["components"]["schemas"]["MessagesRequest"]["properties"]["model"]
    validator = jsonschema.Draft202012Validator(model)
    for ok in ("org/Model-1", "MODEL-1", "default", "claude-3-5-haiku", "Claude-x"):
        assert validator.is_valid(ok), ok
    for bad in ("model-2", "", "gpt-4o", 5):
        assert not validator.is_valid(bad), bad
    prompt = served["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]
    assert jsonschema.Draft202012Validator(prompt).is_valid([0, 99])
    assert not jsonschema.Draft202012Validator(prompt).is_valid([100])


# --------------------------------------------------------------------------- fuzzing


def stream_completes(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """A stream ends as its API says (OpenAI `[DONE]`; Anthropic `message_stop` or `error`;
    Responses `response.completed`, `.incomplete` or `.failed`)
    within the request timeout, instead of going quiet (a hang)."""
    content_type = (response.headers.get("content-type") or [""])[0]
    if not content_type.startswith("text/event-stream"):
        return None
    assert not response.stream_cut_short, "the stream went quiet or ran past the timeout"
    events = [block for block in response.content.split(b"\n\n") if b"data:" in block]
    assert events, "an empty stream"
    last = events[-1].decode()
    if case.operation.path.startswith("/v1/messages"):
        assert last.startswith(("event: message_stop\n", "event: error\n")), last
    elif case.operation.path == "/v1/responses":
        ends = ("response.completed", "response.incomplete", "response.failed")
        assert last.startswith(tuple(f"event: {e}\n" for e in ends)), last
    elif case.operation.path == "/admin/models/pull":
        assert last.startswith(("event: done\n", "event: error\n")), last
    else:
        assert last == "data: [DONE]", last
    return True


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    stream_completes,
]

lazy_schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture
def _nodeid_shim(request: pytest.FixtureRequest) -> None:
    """schemathesis 4.32's lazy schemas rename the running test through `node._nodeid`, which
    pytest 9.2 no longer has (it keeps the id in `_id`); give the node the attribute back."""
    node: Any = request.node
    if not hasattr(node, "_nodeid"):
        node._nodeid = node.nodeid


@pytest.mark.usefixtures("_nodeid_shim")
@lazy_schema.parametrize()
@hypothesis.settings(
    deadline=None,
    database=None,
    derandomize=True,  # the same cases every run, in CI too
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],  # no shrinking: too slow
    suppress_health_check=[
        hypothesis.HealthCheck.too_slow,
        hypothesis.HealthCheck.filter_too_much,
        hypothesis.HealthCheck.data_too_large,
        hypothesis.HealthCheck.large_base_example,
    ],
)
def test_fuzz(case: Case) -> None:
    start = time.monotonic()
    response = case.call(headers=AUTH, timeout=REQUEST_TIMEOUT)
    seconds = time.monotonic() - start
    TALLY.add(case, response, seconds)
    assert seconds < REQUEST_TIMEOUT, f"{case.operation.label} took {seconds:.1f} s"
    case.validate_response(response, checks=CHECKS, headers=AUTH)


def test_fuzz_totals(fuzz_server: ServerProcess) -> None:
    """At least MIN_CASES requests, no 5xx, and afterwards the server is idle and healthy."""
    assert TALLY.server_errors == 0, "\n".join(TALLY.failures)
    assert TALLY.cases >= MIN_CASES, TALLY.report()
    deadline = time.monotonic() + 30
    while True:
        health = httpx.get(f"{fuzz_server.base_url}/health", timeout=10).json()
        if health["running"] == 0 and health["waiting"] == 0:
            break
        assert time.monotonic() < deadline, f"work left behind: {health}"
        time.sleep(0.1)
    assert health["status"] == "ok"
