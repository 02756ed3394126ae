# mlx-server developer tasks. `uv run just <task>` works without installing just globally.

default:
    @just --list

# Serve the default model (or pass flags: just serve --model mlx-community/...)
serve *ARGS:
    uv run mlx-server {{ARGS}}

# The whole test suite (what CI runs)
test *ARGS:
    uv run pytest {{ARGS}}

# The fast tier: no server process, no real model (the inner loop)
fast *ARGS:
    uv run pytest -m "not slow" {{ARGS}}

# Everything CI checks: lint, format, types, the whole suite (each runs; fails if any failed)
ci:
    bash .ci/run

# Lint and format check
lint:
    uv run ruff check mlx_server tests bench examples
    uv run ruff format --check mlx_server tests bench examples

# Format in place
fmt:
    uv run ruff format mlx_server tests bench examples
    uv run ruff check --fix mlx_server tests bench examples

# Static type check
typecheck:
    uv run pyright

# Benchmarks: our server vs mlx_lm.server vs mlx-lm without HTTP (try: just bench --tiny --quick)
bench *ARGS:
    uv run python -m bench.load {{ARGS}}

# Client-compatibility tier: real Codex CLI and Claude Code (pinned, from npm) vs a scripted model
clients:
    npm install --prefix .clients --no-audit --no-fund @openai/codex@0.171.0 @anthropic-ai/claude-code@2.1.332
    uv run pytest -m clients tests/test_agent_clients.py
