"""Drive a real coding-agent CLI (Codex CLI, Claude Code) through one tool round trip against a
scripted model served by the real server, and report what happened as JSON.

    unshare -n -- python -m mlx_server.testing.agent_clients --client codex --bin PATH --work DIR

Run it inside a network namespace of its own (`unshare -n`, as the client-compatibility tests
do): only the loopback interface exists there, so neither the CLI nor anything it starts can
reach another host. The harness brings `lo` up, starts the scripted server, points the CLI at it
with the CLI's own configuration (Codex: a `model_providers` entry with `wire_api =
"responses"`; Claude Code: `ANTHROPIC_BASE_URL`, its own default model mapped by
`--model-aliases 'claude-*'`), and asks it to run a marker command. The scripted model calls the
shell tool with `echo $((6*7))roundtrip | tee marker.txt`; only when a tool result holding
`42roundtrip` (which only the shell can compute) comes back does it answer with the final
sentence. The report says whether the marker file exists (the command really ran), the CLI's
exit status and output, and the server's access log lines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from .scripted import Script, build_scripted_model, write_scripts
from .server import free_port

FINAL = "The marker command printed 42roundtrip."
COMMAND = "echo $((6*7))roundtrip | tee marker.txt"
RESULT_SEEN = r"<tool_response>[\s\S]*42roundtrip"


def scripts() -> list[Script]:
    codex = {"name": "exec_command", "arguments": {"cmd": COMMAND}}
    claude = {"name": "Bash", "arguments": {"command": COMMAND, "description": "Run the marker"}}
    return [
        Script(when=RESULT_SEEN, text=FINAL),
        Script(when="CLAUDE-MARKER", text=f"<tool_call>\n{json.dumps(claude)}\n</tool_call>"),
        Script(when="CODEX-MARKER", text=f"<tool_call>\n{json.dumps(codex)}\n</tool_call>"),
        Script(text="I am a scripted test model."),
    ]


def _loopback_up() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def _start_server(root: Path, port: int) -> subprocess.Popen[bytes]:
    model = build_scripted_model(root / "model", "qwen3")
    config_path = model / "config.json"
    config = json.loads(config_path.read_text())
    config["max_position_embeddings"] = 65536  # the agents' system prompts are long
    config_path.write_text(json.dumps(config))
    script = write_scripts(root / "scripts.json", scripts())
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_SERVER_")}
    log = (root / "server.log").open("wb")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_server.testing.scripted_server",
            "--script",
            str(script),
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--model-aliases",
            "claude-*",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )


def _wait_ready(port: int, proc: subprocess.Popen[bytes], limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become ready")


def _client_command(client: str, binary: str, port: int, home: Path) -> tuple[list[str], dict]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "TERM": "dumb",
    }
    if client == "codex":
        codex_home = home / ".codex"
        codex_home.mkdir(parents=True)
        (codex_home / "config.toml").write_text(
            'model = "default"\nmodel_provider = "mlx"\ncheck_for_update_on_startup = false\n\n'
            "[model_providers.mlx]\n"
            'name = "mlx-server"\n'
            f'base_url = "http://127.0.0.1:{port}/v1"\n'
            'wire_api = "responses"\n'
        )
        env["CODEX_HOME"] = str(codex_home)
        prompt = "CODEX-MARKER: run the marker command and tell me what it printed."
        cmd = [
            binary,
            "exec",
            "--skip-git-repo-check",
            "--dangerously-bypass-approvals-and-sandbox",
            prompt,
        ]
        return cmd, env
    env.update(
        ANTHROPIC_BASE_URL=f"http://127.0.0.1:{port}",
        ANTHROPIC_API_KEY="sk-local-test",
        DISABLE_TELEMETRY="1",
        DISABLE_AUTOUPDATER="1",
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
    )
    prompt = "CLAUDE-MARKER: run the marker command and tell me what it printed."
    return [binary, "-p", prompt, "--allowedTools", "Bash"], env


def run(client: str, binary: str, work: Path, timeout: float) -> dict[str, Any]:
    _loopback_up()
    root = Path(tempfile.mkdtemp(prefix=f"agent-{client}-"))
    port = free_port()
    server = _start_server(root, port)
    try:
        _wait_ready(port, server)
        home = root / "home"
        home.mkdir()
        cmd, env = _client_command(client, binary, port, home)
        done = subprocess.run(
            cmd,
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        marker = work / "marker.txt"
        return {
            "client": client,
            "version": subprocess.run(
                [binary, "--version"], capture_output=True, text=True, env=env, check=False
            ).stdout.strip(),
            "returncode": done.returncode,
            "stdout": done.stdout,
            "stderr": done.stderr[-4000:],
            "marker": marker.read_text() if marker.is_file() else None,
            "final_seen": FINAL in done.stdout,
            "access": [
                line
                for line in (root / "server.log").read_text(errors="replace").splitlines()
                if "mlx_server.access" in line
            ],
        }
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Drive a coding-agent CLI against a scripted model."
    )
    parser.add_argument("--client", choices=("codex", "claude"), required=True)
    parser.add_argument("--bin", required=True)
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    print(json.dumps(run(args.client, args.bin, args.work, args.timeout)))


if __name__ == "__main__":
    main()
