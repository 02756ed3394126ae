#!/usr/bin/env bash
# mlx-server with curl: every generation endpoint, whole and streamed.
#
#   examples/curl.sh [BASE_URL]
#
# The base URL comes from the first argument, else MLX_SERVER_URL, else http://localhost:8000.
# With MLX_SERVER_API_KEY set, it is sent as a bearer token. Any HTTP error stops the script
# (curl --fail-with-body prints the error body).
set -euo pipefail

URL="${1:-${MLX_SERVER_URL:-http://localhost:8000}}"
URL="${URL%/}"
URL="${URL%/v1}"
MODEL="${MODEL:-default}"
AUTH=()
if [ -n "${MLX_SERVER_API_KEY:-}" ]; then
  AUTH=(-H "Authorization: Bearer ${MLX_SERVER_API_KEY}")
fi

post() { # post PATH JSON [extra curl args...]
  local path="$1" body="$2"
  shift 2
  curl -sS --fail-with-body "${AUTH[@]+"${AUTH[@]}"}" \
    -H "Content-Type: application/json" -d "$body" "$@" "${URL}${path}"
  echo
}

echo "== GET /v1/models"
curl -sS --fail-with-body "${AUTH[@]+"${AUTH[@]}"}" "${URL}/v1/models"
echo

echo "== POST /v1/chat/completions"
post /v1/chat/completions '{"model": "'"$MODEL"'", "max_tokens": 24,
  "messages": [{"role": "user", "content": "What is the capital of France?"}]}'

echo "== POST /v1/chat/completions (streamed: one data: line per token)"
post /v1/chat/completions '{"model": "'"$MODEL"'", "max_tokens": 12, "stream": true,
  "messages": [{"role": "user", "content": "Count to five."}]}' -N

echo "== POST /v1/completions"
post /v1/completions '{"model": "'"$MODEL"'", "prompt": "Once upon a time", "max_tokens": 16}'

echo "== POST /v1/messages (Anthropic)"
post /v1/messages '{"model": "'"$MODEL"'", "max_tokens": 24,
  "messages": [{"role": "user", "content": "Say hello."}]}' -H "anthropic-version: 2023-06-01"

echo "== POST /v1/messages (Anthropic, streamed: event: and data: lines)"
post /v1/messages '{"model": "'"$MODEL"'", "max_tokens": 12, "stream": true,
  "messages": [{"role": "user", "content": "Say hello."}]}' -H "anthropic-version: 2023-06-01" -N

echo "== your own request id comes back in x-request-id (and in the server's access log)"
curl -sS --fail-with-body "${AUTH[@]+"${AUTH[@]}"}" -o /dev/null -D - \
  -H "x-request-id: curl-example-1" "${URL}/v1/models" | grep -i '^x-request-id'
