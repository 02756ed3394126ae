"""Settings resolution (defaults < environment < flags), validation and the CLI entry point."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

import mlx_server
from mlx_server import cli
from mlx_server.config import Settings, load_settings, parse_size
from mlx_server.engine import cpu
from mlx_server.errors import ModelLoadError

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Keep the developer's own MLX_SERVER_* / LOG_LEVEL out of every test."""
    for name in list(os.environ):
        if name.startswith("MLX_SERVER_") or name == "LOG_LEVEL":
            monkeypatch.delenv(name)
    yield


def assert_usage_error(excinfo: pytest.ExceptionInfo[SystemExit], err: str) -> str:
    assert excinfo.value.code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mlx-server: error: ")
    return lines[0]


# --------------------------------------------------------------------------- resolution


def test_defaults() -> None:
    settings = load_settings([], {})
    assert settings == Settings()
    assert settings.model is None
    assert settings.host == "0.0.0.0"
    assert settings.port == 8000
    assert settings.max_tokens == 32768
    assert settings.api_key is None
    assert settings.rate_limit == 0
    assert settings.timeout == 300.0
    assert settings.log_level == "info"
    assert settings.max_batch_size == 0  # auto
    assert settings.max_queue == 256
    assert settings.prefill_chunk == 0  # auto
    assert settings.prompt_cache_bytes == 1 << 30
    assert settings.served_model_name is None


ENV = {
    "MLX_SERVER_MODEL": "mlx-community/Qwen3-0.6B-4bit",
    "MLX_SERVER_HOST": "127.0.0.1",
    "MLX_SERVER_PORT": "9000",
    "MLX_SERVER_MAX_TOKENS": "128",
    "MLX_SERVER_API_KEY": "sk-env",
    "MLX_SERVER_RATE_LIMIT": "60",
    "MLX_SERVER_TIMEOUT": "12.5",
    "MLX_SERVER_LOG_LEVEL": "DEBUG",
    "MLX_SERVER_MAX_BATCH_SIZE": "8",
    "MLX_SERVER_MAX_QUEUE": "16",
    "MLX_SERVER_PREFILL_CHUNK": "64",
    "MLX_SERVER_PROMPT_CACHE_BYTES": "512M",
    "MLX_SERVER_SERVED_MODEL_NAME": "qwen",
}


def test_env_overrides_defaults() -> None:
    assert load_settings([], ENV) == Settings(
        model="mlx-community/Qwen3-0.6B-4bit",
        host="127.0.0.1",
        port=9000,
        max_tokens=128,
        api_key="sk-env",
        rate_limit=60,
        timeout=12.5,
        log_level="debug",
        max_batch_size=8,
        max_queue=16,
        prefill_chunk=64,
        prompt_cache_bytes=512 << 20,
        served_model_name="qwen",
    )


def test_flags_override_env() -> None:
    argv = [
        "--model=/models/llama.gguf",
        "--host",
        "::1",
        "--port",
        "9100",
        "--max-tokens",
        "256",
        "--api-key",
        "sk-flag",
        "--rate-limit",
        "0",
        "--timeout",
        "30",
        "--log-level",
        "warning",
        "--max-batch-size",
        "4",
        "--max-queue",
        "2",
        "--prefill-chunk",
        "1024",
        "--prompt-cache-bytes",
        "2G",
        "--served-model-name",
        "llama",
    ]
    assert load_settings(argv, ENV) == Settings(
        model="/models/llama.gguf",
        host="::1",
        port=9100,
        max_tokens=256,
        api_key="sk-flag",
        rate_limit=0,
        timeout=30.0,
        log_level="warning",
        max_batch_size=4,
        max_queue=2,
        prefill_chunk=1024,
        prompt_cache_bytes=2 << 30,
        served_model_name="llama",
    )


def test_flags_and_env_mix() -> None:
    settings = load_settings(["--port", "1"], {"MLX_SERVER_PORT": "2", "MLX_SERVER_HOST": "h"})
    assert (settings.port, settings.host) == (1, "h")


def test_flag_overrides_bad_env_value() -> None:
    assert load_settings(["--port", "8080"], {"MLX_SERVER_PORT": "nope"}).port == 8080


def test_empty_env_var_is_unset() -> None:
    settings = load_settings([], {"MLX_SERVER_API_KEY": "", "MLX_SERVER_PORT": ""})
    assert settings.api_key is None
    assert settings.port == 8000


def test_log_level_fallback_env() -> None:
    assert load_settings([], {"LOG_LEVEL": "Error"}).log_level == "error"
    both = {"LOG_LEVEL": "error", "MLX_SERVER_LOG_LEVEL": "critical"}
    assert load_settings([], both).log_level == "critical"
    assert load_settings(["--log-level", "DEBUG"], both).log_level == "debug"


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLX_SERVER_MAX_QUEUE", "7")
    assert load_settings([]).max_queue == 7


def test_model_tilde_expanded() -> None:
    assert load_settings(["--model=~/m"], {}).model == os.path.expanduser("~/m")


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]


# --------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        (["--port", "70000"], {}, "argument --port: invalid port '70000' (must be 1-65535)"),
        (["--port", "abc"], {}, "argument --port: invalid port 'abc'"),
        (["--port", "0"], {}, "argument --port: invalid port '0'"),
        (["--max-tokens", "-5"], {}, "argument --max-tokens: invalid max tokens '-5'"),
        (["--max-tokens", "0"], {}, "argument --max-tokens:"),
        (["--timeout", "0"], {}, "argument --timeout: invalid timeout '0'"),
        (["--timeout", "nan"], {}, "argument --timeout:"),
        (["--rate-limit", "-1"], {}, "argument --rate-limit:"),
        (["--max-batch-size", "0"], {}, "argument --max-batch-size:"),
        (["--max-queue", "0"], {}, "argument --max-queue:"),
        (["--prefill-chunk", "0"], {}, "argument --prefill-chunk:"),
        (["--prompt-cache-bytes", "lots"], {}, "argument --prompt-cache-bytes:"),
        (["--log-level", "loud"], {}, "argument --log-level: invalid log level 'loud'"),
        (["--host", ""], {}, "argument --host:"),
        (["--port"], {}, "argument --port: expected one argument"),
        (["--bogus"], {}, "unrecognized arguments: --bogus"),
        (
            [],
            {"MLX_SERVER_PORT": "70000"},
            "MLX_SERVER_PORT: invalid port '70000' (must be 1-65535)",
        ),
        ([], {"MLX_SERVER_PORT": "abc"}, "MLX_SERVER_PORT: invalid port 'abc'"),
        ([], {"MLX_SERVER_MAX_TOKENS": "-1"}, "MLX_SERVER_MAX_TOKENS: invalid max tokens"),
        ([], {"MLX_SERVER_TIMEOUT": "0"}, "MLX_SERVER_TIMEOUT: invalid timeout '0'"),
        ([], {"MLX_SERVER_PROMPT_CACHE_BYTES": "1Q"}, "MLX_SERVER_PROMPT_CACHE_BYTES:"),
        ([], {"MLX_SERVER_LOG_LEVEL": "verbose"}, "MLX_SERVER_LOG_LEVEL: invalid log level"),
        ([], {"LOG_LEVEL": "verbose"}, "LOG_LEVEL: invalid log level"),
    ],
)
def test_bad_values_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    environ: dict[str, str],
    expected: str,
) -> None:
    with pytest.raises(SystemExit) as excinfo:
        load_settings(argv, environ)
    captured = capsys.readouterr()
    assert captured.out == ""
    line = assert_usage_error(excinfo, captured.err)
    assert expected in line


def test_bad_flag_error_names_the_flag_not_the_env(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        load_settings(["--port", "70000"], {"MLX_SERVER_PORT": "9000"})
    line = assert_usage_error(excinfo, capsys.readouterr().err)
    assert "--port" in line
    assert "MLX_SERVER_PORT" not in line


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("1073741824", 1 << 30),
        ("512", 512),
        ("512B", 512),
        ("4k", 4 << 10),
        ("4KB", 4 << 10),
        ("4KiB", 4 << 10),
        ("512M", 512 << 20),
        ("512mb", 512 << 20),
        ("2G", 2 << 30),
        ("1GiB", 1 << 30),
        ("1.5G", 3 << 29),
        (" 1 GiB ", 1 << 30),
        ("1T", 1 << 40),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "-1", "1X", "1GG", "one", "1iB", "1.2.3M"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_size_flag_and_env() -> None:
    assert (
        load_settings([], {"MLX_SERVER_PROMPT_CACHE_BYTES": "2GiB"}).prompt_cache_bytes == 2 << 30
    )
    assert load_settings(["--prompt-cache-bytes", "0"], {}).prompt_cache_bytes == 0


def test_draft_model_flags(capsys: pytest.CaptureFixture[str]) -> None:
    settings = load_settings(["--draft-model", "~/m/draft", "--speculative", "draft"], {})
    assert settings.draft_model == os.path.expanduser("~/m/draft")
    assert settings.speculative == "draft"
    assert load_settings([], {"MLX_SERVER_DRAFT_MODEL": "org/small"}).draft_model == "org/small"
    for argv, message in (
        (["--speculative", "draft"], "--speculative draft needs --draft-model"),
        (["--speculative", "ngram", "--draft-model", "x"], "not used with --speculative ngram"),
        (["--speculative", "off", "--draft-model", "x"], "not used with --speculative off"),
    ):
        with pytest.raises(SystemExit) as excinfo:
            load_settings(argv, {})
        assert message in assert_usage_error(excinfo, capsys.readouterr().err)


# --------------------------------------------------------------------------- help / version


def test_help_lists_every_flag_env_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        load_settings(["--help"], {})
    assert excinfo.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for flag, env, default in [
        ("--model", "MLX_SERVER_MODEL", "bundled default model"),
        ("--host", "MLX_SERVER_HOST", "0.0.0.0"),
        ("--port", "MLX_SERVER_PORT", "8000"),
        ("--max-tokens", "MLX_SERVER_MAX_TOKENS", "32768"),
        ("--api-key", "MLX_SERVER_API_KEY", "none"),
        ("--rate-limit", "MLX_SERVER_RATE_LIMIT", "0"),
        ("--timeout", "MLX_SERVER_TIMEOUT", "300"),
        ("--log-level", "MLX_SERVER_LOG_LEVEL", "info"),
        ("--max-batch-size", "MLX_SERVER_MAX_BATCH_SIZE", "auto"),
        ("--max-queue", "MLX_SERVER_MAX_QUEUE", "256"),
        ("--prefill-chunk", "MLX_SERVER_PREFILL_CHUNK", "auto"),
        ("--prompt-cache-bytes", "MLX_SERVER_PROMPT_CACHE_BYTES", "1GiB"),
        ("--served-model-name", "MLX_SERVER_SERVED_MODEL_NAME", "derived from the model"),
    ]:
        assert flag in out
        assert env in out
        bracket = out.split(f"[env: {env}", 1)[1].split("]", 1)[0]
        assert "default: " in bracket, (flag, bracket)
        assert default in bracket.split("default: ", 1)[1], (flag, bracket)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as excinfo:
        load_settings(["--version"], {})
    assert excinfo.value.code == 0
    assert capsys.readouterr().out.strip() == f"mlx-server {version('mlx-server')}"


# --------------------------------------------------------------------------- main()


@pytest.fixture
def fake_runtime(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """Stand in for ``mlx_server.runtime`` (written elsewhere); ``behaviour`` drives ``run``."""
    state = types.SimpleNamespace(calls=[], behaviour=None)

    def run(settings: Settings) -> int | None:
        state.calls.append(settings)
        if isinstance(state.behaviour, BaseException):
            raise state.behaviour
        return state.behaviour

    module = types.ModuleType("mlx_server.runtime")
    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mlx_server.runtime", module)
    monkeypatch.setattr(mlx_server, "runtime", module, raising=False)
    levels: list[str] = []
    monkeypatch.setattr(cli, "configure_logging", lambda s: levels.append(s.log_level))
    # The BLAS preload is the runtime's business too (and looking for a library may start
    # ldconfig): these tests are about the CLI around it.
    monkeypatch.setattr(cpu, "preload_blas", lambda: None)
    state.levels = levels
    return state


def test_main_runs_runtime_with_settings(fake_runtime: types.SimpleNamespace) -> None:
    fake_runtime.behaviour = 0
    assert cli.main(["--port", "1234", "--log-level", "debug"]) == 0
    (settings,) = fake_runtime.calls
    assert settings.port == 1234
    assert fake_runtime.levels == ["debug"]


def test_main_returns_runtime_result(fake_runtime: types.SimpleNamespace) -> None:
    fake_runtime.behaviour = None
    assert cli.main([]) is None


def test_main_model_load_error(
    fake_runtime: types.SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_runtime.behaviour = ModelLoadError("no such model:\n  /nope")
    assert cli.main(["--model", "/nope"]) == 1
    err = capsys.readouterr().err
    assert err == "mlx-server: error: no such model: /nope\n"


def test_main_model_load_error_in_group(
    fake_runtime: types.SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_runtime.behaviour = ExceptionGroup("trio", [ModelLoadError("bad weights")])
    assert cli.main([]) == 1
    assert capsys.readouterr().err == "mlx-server: error: bad weights\n"


@pytest.mark.parametrize(
    "exc",
    [KeyboardInterrupt(), BaseExceptionGroup("trio", [KeyboardInterrupt()])],
    ids=["plain", "group"],
)
def test_main_keyboard_interrupt(
    fake_runtime: types.SimpleNamespace, capsys: pytest.CaptureFixture[str], exc: BaseException
) -> None:
    fake_runtime.behaviour = exc
    assert cli.main([]) == 130
    assert capsys.readouterr().err == ""


def test_main_unexpected_error_propagates(fake_runtime: types.SimpleNamespace) -> None:
    fake_runtime.behaviour = RuntimeError("bug")
    with pytest.raises(RuntimeError, match="bug"):
        cli.main([])


def test_main_bad_flag_never_imports_runtime(
    fake_runtime: types.SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["--timeout", "0"])
    assert_usage_error(excinfo, capsys.readouterr().err)
    assert fake_runtime.calls == []


# --------------------------------------------------------------------------- subprocess


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("MLX_SERVER_") and k != "LOG_LEVEL"
    }
    return subprocess.run(
        [sys.executable, "-m", "mlx_server", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=60,
    )


@pytest.mark.slow  # starts a process
def test_module_bad_port_exits_2() -> None:
    proc = run_module("--port", "70000")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        "mlx-server: error: argument --port: invalid port '70000' (must be 1-65535)"
    ]


@pytest.mark.slow  # starts a process
def test_module_help() -> None:
    proc = run_module("--help")
    assert proc.returncode == 0, proc.stderr
    assert "MLX_SERVER_PORT" in proc.stdout
    assert "--served-model-name" in proc.stdout
