"""Server settings: defaults, then ``MLX_SERVER_*`` environment variables, then CLI flags.

Every setting has a flag (``--port``) and an environment variable (``MLX_SERVER_PORT``).
Later sources win: a flag overrides the environment, which overrides the default.

Bad values are reported through the parser's ``error``, which prints a single
``mlx-server: error: ...`` line on stderr (no usage block) and exits with status 2.
A bad environment value is reported under the variable's name; a bad flag under the flag's.
An environment variable that a flag overrides is not checked. An empty environment
variable counts as unset.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from importlib import metadata
from typing import Any, NoReturn

import attrs

PROG = "mlx-server"
ENV_PREFIX = "MLX_SERVER_"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@attrs.frozen(kw_only=True)
class Settings:
    """Everything the server needs to start. ``model=None`` means the bundled default model."""

    model: str | None = None
    host: str = "0.0.0.0"
    port: int = 8000
    max_tokens: int = 32768
    api_key: str | None = None
    rate_limit: int = 0
    timeout: float = 300.0
    log_level: str = "info"
    max_batch_size: int = 0  # 0: auto, from free memory and the model's KV bytes per token
    max_queue: int = 256
    prefill_chunk: int = 0  # 0: auto, from the device (engine.memory.prefill_budget)
    prompt_cache_bytes: int = 1 << 30
    responses_store_bytes: int = 64 << 20
    served_model_name: str | None = None
    cpu_dequantize: str = "auto"
    shutdown_grace: float = 10.0
    model_aliases: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 32 << 20
    record_trace: str | None = None
    model_memory_bytes: int = 0
    parallel: str = "auto"
    rank_timeout: float = 15.0
    # Sampling defaults for requests that omit them (over the model's generation_config.json).
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    idle_unload: float = 0.0
    # Speculative decoding: prompt lookup (engine/speculative.py) or a draft model
    # (engine/draft.py).
    speculative: str = "auto"
    draft_tokens: int = 6
    draft_model: str | None = None
    # Dense matmuls for quantized layers at row counts MLX's kernel is slow for (engine/qmatmul.py).
    dense_matmul: str = "auto"
    # Quantized KV cache (engine/kv_quant.py): 0 keeps it in the model's dtype.
    kv_bits: int = 0
    kv_group_size: int = 64
    # Prompt cache on disk (engine/disk_cache.py): off without a directory.
    prompt_cache_dir: str | None = None
    prompt_cache_disk_bytes: int = 8 << 30
    # Images (engine/images.py): limits, and whether http(s) image URLs are fetched.
    allow_image_urls: bool = False
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    # The second and later `--model` values (several models in one server).
    more_models: tuple[str, ...] = ()

    @property
    def sampling_overrides(self) -> dict[str, float]:
        """The sampling flags given (`engine.model.load` merges them over the model's own
        defaults: request > these flags > generation_config.json > the API's defaults)."""
        given = {"temperature": self.temperature, "top_p": self.top_p}
        given |= {"top_k": self.top_k, "min_p": self.min_p}
        return {k: v for k, v in given.items() if v is not None}

    @property
    def models(self) -> tuple[str | None, ...]:
        """Every model to serve, the first (default) one first; None is the bundled model."""
        return (self.model, *self.more_models)


class _BadValue(ValueError):
    """A value a converter rejected; its message names the problem, not the source."""


# --------------------------------------------------------------------------- converters


def _int(value: str, what: str) -> int:
    try:
        return int(value.strip(), 10)
    except ValueError:
        raise _BadValue(f"invalid {what} {value!r} (must be an integer)") from None


def _choice(what: str, choices: tuple[str, ...]) -> Callable[[str], str]:
    def convert(value: str) -> str:
        v = value.strip().lower()
        if v not in choices:
            raise _BadValue(f"invalid {what} {value!r} (must be one of {', '.join(choices)})")
        return v

    return convert


def _port(value: str) -> int:
    try:
        port = int(value.strip(), 10)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise _BadValue(f"invalid port {value!r} (must be 1-65535)")
    return port


def _at_least(minimum: int, what: str) -> Callable[[str], int]:
    def convert(value: str) -> int:
        number = _int(value, what)
        if number < minimum:
            raise _BadValue(f"invalid {what} {value!r} (must be >= {minimum})")
        return number

    return convert


def _auto_or_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """`auto` (stored as 0: decided when the model loads) or an integer >= minimum."""
    number = _at_least(minimum, what)

    def convert(value: str) -> int:
        return 0 if value.strip().lower() == "auto" else number(value)

    return convert


def _number(
    what: str, low: float, high: float, *, open_low: bool = False
) -> Callable[[str], float]:
    """A float within [low, high] ((low, high] when `open_low`)."""
    interval = f"{'(' if open_low else '['}{low:g}, {high:g}]"

    def convert(value: str) -> float:
        try:
            number = float(value.strip())
        except ValueError:
            number = math.nan
        if not (low < number if open_low else low <= number) or not number <= high:
            raise _BadValue(f"invalid {what} {value!r} (must be a number in {interval})")
        return number

    return convert


def _timeout(value: str) -> float:
    try:
        seconds = float(value.strip())
    except ValueError:
        raise _BadValue(f"invalid timeout {value!r} (must be a number of seconds)") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise _BadValue(f"invalid timeout {value!r} (must be a number of seconds > 0)")
    return seconds


def _seconds(what: str) -> Callable[[str], float]:
    def convert(value: str) -> float:
        try:
            seconds = float(value.strip())
        except ValueError:
            raise _BadValue(f"invalid {what} {value!r} (must be a number of seconds)") from None
        if not math.isfinite(seconds) or seconds < 0:
            raise _BadValue(f"invalid {what} {value!r} (must be a number of seconds >= 0)")
        return seconds

    return convert


def _aliases(value: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    if not names:
        raise _BadValue(f"invalid model aliases {value!r} (comma-separated names)")
    return names


def _origins(value: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in value.split(",") if o.strip())
    bad = [o for o in origins if o != "*" and "://" not in o]
    if not origins or bad:
        raise _BadValue(
            f"invalid CORS origins {value!r} (comma-separated origins such as "
            "'https://app.example.com', or '*')"
        )
    return origins


def _body_size(value: str) -> int:
    size = parse_size(value)
    if size < 1024:
        raise _BadValue(f"invalid max body bytes {value!r} (must be at least 1K)")
    return size


def _log_level(value: str) -> str:
    level = value.strip().lower()
    if level not in LOG_LEVELS:
        raise _BadValue(f"invalid log level {value!r} (must be one of {', '.join(LOG_LEVELS)})")
    return level


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(value: str) -> int:
    """Parse a byte count: ``1073741824``, ``512M``, ``2G``, ``1GiB``, ``1.5g``, ``64KB``.

    Suffixes K, M, G, T are binary (powers of 1024), with or without a trailing ``B``/``iB``.
    Raises :class:`ValueError` on anything else (including negative sizes).
    """
    match = _SIZE_RE.match(value)
    if match is None or (match.group(3) and match.group(3).lower() == "ib" and not match.group(2)):
        raise _BadValue(f"invalid size {value!r} (use bytes or a suffix: 512M, 2G, 1GiB)")
    number, unit = match.group(1), match.group(2).lower()
    # Fraction keeps "1.5G" exact; a fractional byte count is rounded to the nearest byte.
    return round(Fraction(number) * 1024 ** _SIZE_POWERS[unit])


def _size(value: str) -> int:
    return parse_size(value)


def _text(what: str) -> Callable[[str], str]:
    def convert(value: str) -> str:
        if not value.strip():
            raise _BadValue(f"invalid {what} {value!r} (must not be empty)")
        return value

    return convert


def _path(what: str) -> Callable[[str], str]:
    def convert(value: str) -> str:
        value = _text(what)(value).strip()
        return os.path.expanduser(value) if value.startswith("~") else value

    return convert


def _switch(what: str) -> Callable[[str], bool]:
    """on/off (also true/false, yes/no, 1/0)."""

    def convert(value: str) -> bool:
        v = value.strip().lower()
        if v in ("on", "true", "yes", "1"):
            return True
        if v in ("off", "false", "no", "0"):
            return False
        raise _BadValue(f"invalid {what} {value!r} (must be on or off)")

    return convert


def _model(value: str) -> str:
    value = _text("model")(value).strip()
    # ``--model=~/models/x`` reaches us unexpanded; a hub id never starts with "~".
    return os.path.expanduser(value) if value.startswith("~") else value


# --------------------------------------------------------------------------- the table


@attrs.frozen
class _Option:
    field: str
    convert: Callable[[str], Any]
    help: str
    metavar: str
    shown_default: str
    repeatable: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.field.upper()


_OPTIONS: tuple[_Option, ...] = (
    _Option(
        "model",
        _model,
        "Model to serve: a local MLX model directory, a .gguf file, or a Hugging Face "
        "repo id (fetched through the Hugging Face cache, ~/.cache/huggingface/hub). "
        "When unset, the bundled default model is served. Give it more than once (or "
        "comma-separated in the environment) to serve several models; NAME=PATH_OR_REPO "
        "names one. The first is the default model.",
        "PATH_OR_REPO",
        "unset, i.e. the bundled default model",
        repeatable=True,
    ),
    _Option("host", _text("host"), "Address to bind.", "HOST", "0.0.0.0"),
    _Option("port", _port, "Port to bind (1-65535).", "PORT", "8000"),
    _Option(
        "max_tokens",
        _at_least(1, "max tokens"),
        "Default maximum number of tokens to generate per request.",
        "N",
        "32768",
    ),
    _Option(
        "api_key",
        _text("api key"),
        "Bearer token clients must send; authentication is off when unset.",
        "KEY",
        "none",
    ),
    _Option(
        "rate_limit",
        _at_least(0, "rate limit"),
        "Requests per minute per client; 0 disables rate limiting.",
        "N",
        "0",
    ),
    _Option("timeout", _timeout, "Request timeout in seconds.", "SECONDS", "300"),
    _Option(
        "log_level",
        _log_level,
        f"Log level: {', '.join(LOG_LEVELS)} (case-insensitive).",
        "LEVEL",
        "info",
    ),
    _Option(
        "max_batch_size",
        _auto_or_at_least(1, "max batch size"),
        "Most requests decoded together in one step; auto sizes it from the memory left "
        "after loading the model and the model's KV-cache bytes per token (8 to 128 rows).",
        "N|auto",
        "auto",
    ),
    _Option(
        "max_queue",
        _at_least(1, "max queue"),
        "Most requests waiting for a batch slot; more are refused with 429.",
        "N",
        "256",
    ),
    _Option(
        "prefill_chunk",
        _auto_or_at_least(1, "prefill chunk"),
        "Prompt tokens processed per step, between decode passes; auto: 2048 on a GPU, "
        "512 on the CPU.",
        "N|auto",
        "auto",
    ),
    _Option(
        "prompt_cache_bytes",
        _size,
        "Memory for the prompt (KV prefix) cache: bytes, or with a binary suffix such as "
        "512M, 2G, 1GiB; 0 disables it.",
        "SIZE",
        "1GiB",
    ),
    _Option(
        "responses_store_bytes",
        _size,
        "Memory for stored Responses API responses (store: true, previous_response_id), "
        "least recently used evicted first: bytes or a binary suffix; 0 stores nothing.",
        "SIZE",
        "64MiB",
    ),
    _Option(
        "served_model_name",
        _text("served model name"),
        "Model name reported by /v1/models and echoed in responses; derived from the "
        "model when unset.",
        "NAME",
        "derived from the model",
    ),
    _Option(
        "cpu_dequantize",
        _choice("cpu dequantize", ("auto", "always", "never")),
        "Run the model in float32 on the CPU: auto does so when an optimized BLAS was found "
        "and the float32 weights fit in 8 GiB (much faster prompts); always; or never.",
        "auto|always|never",
        "auto",
    ),
    _Option(
        "model_aliases",
        _aliases,
        "Other model names (comma-separated, shell-style patterns allowed, e.g. 'claude-*,gpt-4o') "
        "that requests may use for the served model; other unknown names get 404.",
        "NAMES",
        "none",
    ),
    _Option(
        "shutdown_grace",
        _seconds("shutdown grace"),
        "On SIGTERM/SIGINT, how long in-flight requests may run on before they are ended "
        "with an error event.",
        "SECONDS",
        "10",
    ),
    _Option(
        "cors_origins",
        _origins,
        "Browser origins allowed to call the API (CORS), comma-separated, e.g. "
        "'https://app.example.com,http://localhost:3000', or '*' for any; CORS is off when unset.",
        "ORIGINS",
        "none (CORS off)",
    ),
    _Option(
        "max_body_bytes",
        _body_size,
        "Largest request body accepted: bytes, or with a binary suffix such as 512K, 32M; "
        "larger bodies get 413.",
        "SIZE",
        "32MiB",
    ),
    _Option(
        "record_trace",
        _path("trace file"),
        "Append one JSON line per API request to FILE: the request (secrets redacted), its "
        "arrival time and its outcome, for `python -m mlx_server.replay`.",
        "FILE",
        "none (not recording)",
    ),
    _Option(
        "model_memory_bytes",
        _size,
        "Memory budget for the weights of the models loaded at once (with several --model): "
        "bytes or a suffix such as 8G; the least recently used idle model is unloaded to make "
        "room. 0 means three quarters of the machine's memory.",
        "SIZE",
        "0 (three quarters of memory)",
    ),
    _Option(
        "parallel",
        _choice("parallel mode", ("auto", "tensor", "pipeline")),
        "Distributed serving (under mlx.launch): how the model is split over the ranks. tensor "
        "splits every layer (needs head counts divisible by the ranks); pipeline gives each "
        "rank a run of layers; auto picks tensor when it can.",
        "auto|tensor|pipeline",
        "auto",
    ),
    _Option(
        "rank_timeout",
        _timeout,
        "Distributed serving: seconds a rank may stay silent on the control connection before "
        "it counts as dead (the server then ends its requests with an error and exits).",
        "SECONDS",
        "15",
    ),
    _Option(
        "idle_unload",
        _seconds("idle unload"),
        "Unload a model once it has been idle (no request, no stream) for this many seconds; "
        "its next request loads it again. 0 keeps models loaded.",
        "SECONDS",
        "0 (never)",
    ),
)

_OPTIONS += (
    _Option(
        "temperature",
        _number("temperature", 0.0, 2.0),
        "Sampling temperature for requests that send none (0: greedy). Overrides the "
        "model's generation_config.json.",
        "T",
        "the model's generation_config.json, else 1 (SmolLM2 default model: 0.2)",
    ),
    _Option(
        "top_p",
        _number("top p", 0.0, 1.0, open_low=True),
        "Nucleus sampling for requests that send no top_p. Overrides the model's "
        "generation_config.json.",
        "P",
        "the model's generation_config.json, else 1 (SmolLM2 default model: 0.5)",
    ),
    _Option(
        "top_k",
        _at_least(0, "top k"),
        "Sample among the K likeliest tokens for requests that send no top_k (0: off). "
        "Overrides the model's generation_config.json.",
        "K",
        "the model's generation_config.json, else 0",
    ),
    _Option(
        "min_p",
        _number("min p", 0.0, 1.0),
        "Drop tokens less likely than MIN_P times the likeliest, for requests that send "
        "no min_p. Overrides the model's generation_config.json.",
        "MIN_P",
        "the model's generation_config.json, else 0",
    ),
)

_OPTIONS += (
    _Option(
        "speculative",
        _choice("speculative mode", ("off", "ngram", "draft", "auto")),
        "Speculative decoding inside the batch: rows draft tokens, verified in the batch's "
        "forward pass. ngram drafts the tokens that followed the row's latest n-gram in its "
        "own prompt and output (prompt lookup); draft has --draft-model propose them; both "
        "draft for sampled rows too (rejection sampling keeps their distribution). auto uses "
        "the draft model when one is given, else prompt lookup, on a GPU for greedy rows "
        "where drafts pay (off on a CPU, where verifying costs about as much as decoding each "
        "token); off. Only models whose caches can be cut (plain KV attention) draft.",
        "off|ngram|draft|auto",
        "auto",
    ),
    _Option(
        "draft_tokens",
        _at_least(1, "draft tokens"),
        "Most tokens a row drafts per step (speculative decoding).",
        "N",
        "6",
    ),
    _Option(
        "draft_model",
        _model,
        "A small model with the same tokenizer that drafts tokens for the served model "
        "(speculative decoding: --speculative draft, or auto on a GPU). A path or a Hugging "
        "Face repo id, as --model. Text models only; its caches must be plain KV.",
        "PATH|REPO",
        "none",
    ),
    _Option(
        "dense_matmul",
        _choice("dense matmul mode", ("auto", "on", "off")),
        "Quantized layers multiply several rows at once (batched decode, verification passes, "
        "the new part of a prompt) by dequantizing their weight and using the dense product, "
        "for the row counts where that was measured faster than MLX's quantized kernel (timed "
        "at load on the model's largest layer). auto: on MLX's CUDA backend, whose kernel for "
        "a few rows is slow; on: on any GPU; off: always MLX's kernel.",
        "auto|on|off",
        "auto",
    ),
    _Option(
        "kv_bits",
        lambda v: int(_choice("kv bits", ("0", "4", "8"))(v)),
        "Store the KV cache quantized to 4 or 8 bits (batched, prompt cache included): about "
        "0.28x or 0.53x the bytes per token of a 16-bit cache, at some decode speed. 0 keeps "
        "the model's dtype. Plain-KV models only; quantized rows do not draft.",
        "0|4|8",
        "0",
    ),
    _Option(
        "kv_group_size",
        lambda v: int(_choice("kv group size", ("32", "64", "128"))(v)),
        "Group size of the quantized KV cache (values per scale and bias); must divide the "
        "model's head dimension.",
        "32|64|128",
        "64",
    ),
    _Option(
        "prompt_cache_dir",
        _path("prompt cache directory"),
        "Keep the KV states of long prompts (256 tokens and more) in files under DIR, written "
        "by a worker thread, so that a prompt sharing such a prefix after a restart loads it "
        "instead of reading it again. Files of another model, corrupt or truncated files are "
        "ignored with a warning. Plain-KV models without --kv-bits only.",
        "DIR",
        "none (off)",
    ),
    _Option(
        "prompt_cache_disk_bytes",
        _size,
        "Disk budget of --prompt-cache-dir: bytes or a binary suffix such as 8G; the least "
        "recently used files are deleted past it.",
        "SIZE",
        "8GiB",
    ),
)

_OPTIONS += (
    _Option(
        "allow_image_urls",
        _switch("allow-image-urls"),
        "Fetch http(s) image URLs sent in requests (OpenAI image_url, Anthropic url sources, "
        "Responses input_image), within --max-image-bytes and a 10 s time limit. Off: only "
        "images sent inline (base64, data URLs) are read, and a URL is a 400.",
        "on|off",
        "off",
    ),
    _Option(
        "max_image_bytes",
        _size,
        "Largest encoded image accepted (bytes, or with a unit: 20MB, 8MiB).",
        "SIZE",
        "20MiB",
    ),
    _Option(
        "max_image_pixels",
        _at_least(1, "max image pixels"),
        "Most pixels (width x height) an image may declare; larger ones are 400s before "
        "any pixel is decompressed (decompression bombs cost a header read).",
        "PIXELS",
        "40000000",
    ),
)

# Environment variables read, in order, for each field (the first set one wins).
_ENV_NAMES: dict[str, tuple[str, ...]] = {o.field: (o.env,) for o in _OPTIONS}
_ENV_NAMES["log_level"] = ("MLX_SERVER_LOG_LEVEL", "LOG_LEVEL")

assert {o.field for o in _OPTIONS} | {"more_models"} == {f.name for f in attrs.fields(Settings)}


def _version() -> str:
    try:
        return metadata.version("mlx-server")
    except metadata.PackageNotFoundError:
        return "unknown"


def _flag_type(option: _Option) -> Callable[[str], Any]:
    """Wrap a converter so argparse reports its message under the flag's name."""

    def convert(value: str) -> Any:
        try:
            return option.convert(value)
        except _BadValue as exc:
            # argparse prints ArgumentTypeError messages verbatim after "argument --flag: ".
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = option.field
    return convert


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a single ``mlx-server: error: ...`` line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=(
            "OpenAI- and Anthropic-compatible inference server for MLX. Every setting can "
            "also come from an environment variable; flags override the environment, which "
            "overrides the defaults."
        ),
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    for option in _OPTIONS:
        envs = " or ".join(_ENV_NAMES[option.field])
        parser.add_argument(
            option.flag,
            dest=option.field,
            type=_flag_type(option),
            default=None,
            action="append" if option.repeatable else "store",
            metavar=option.metavar,
            help=f"{option.help} [env: {envs}; default: {option.shown_default}]",
        )
    return parser


def load_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Resolve settings from defaults, ``environ`` (default ``os.environ``) and ``argv``.

    ``argv`` excludes the program name (default ``sys.argv[1:]``). On a bad value, an
    unknown flag, ``--help`` or ``--version`` this raises :class:`SystemExit` like argparse.
    """
    env = os.environ if environ is None else environ
    parser = build_parser()
    flags = parser.parse_args(None if argv is None else list(argv))

    values: dict[str, Any] = {}
    for option in _OPTIONS:
        flag_value = getattr(flags, option.field)
        if flag_value is not None:
            values[option.field] = flag_value
            continue
        for name in _ENV_NAMES[option.field]:
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            try:
                if option.repeatable:
                    parts = [p for p in raw.split(",") if p.strip()]
                    values[option.field] = [option.convert(p) for p in parts] or None
                else:
                    values[option.field] = option.convert(raw)
            except _BadValue as exc:
                parser.error(f"{name}: {exc}")
            break
    mode, draft = values.get("speculative"), values.get("draft_model")
    if mode == "draft" and draft is None:
        parser.error("--speculative draft needs --draft-model")
    if draft is not None and mode in ("off", "ngram"):
        parser.error(f"--draft-model is not used with --speculative {mode}")
    models = values.pop("model", None)
    if models:
        values["model"], values["more_models"] = models[0], tuple(models[1:])
        if len(set(models)) != len(models):
            parser.error(f"--model: the same model is given twice: {models}")
    return Settings(**values)
