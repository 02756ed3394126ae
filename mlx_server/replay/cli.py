"""`python -m mlx_server.replay TRACE --url URL`: re-send a recorded trace and report.

Progress (one line per finished request) goes to stderr, the summary to stdout. Exit status:
0 when the replay ran (whatever the server answered), 1 when `--compare` found a greedy request
whose output differs from the recording, 2 for a usage error (bad flags, unreadable trace, no
request in it), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import trio

from .http import BaseURL
from .run import Options, Result, replay, summarize
from .trace import read_trace

PROG = "python -m mlx_server.replay"
DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_MISMATCH = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {value!r}")
    return number


def _count(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value!r}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Re-send the requests of a trace recorded with `mlx-server --record-trace FILE`, "
            "keeping their inter-arrival times, and report latency, throughput and errors. "
            "With --compare, greedy requests (temperature 0) must give the recorded output."
        ),
        allow_abbrev=False,
    )
    parser.add_argument("trace", metavar="TRACE", help="trace file (JSON lines)")
    parser.add_argument(
        "--url",
        default=os.environ.get("MLX_SERVER_URL") or DEFAULT_URL,
        help=f"the server's base URL [env: MLX_SERVER_URL; default: {DEFAULT_URL}]",
    )
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument(
        "--speed",
        type=_positive,
        default=1.0,
        metavar="X",
        help="scale time: 2 sends twice as fast as recorded, 0.5 half as fast [default: 1]",
    )
    pace.add_argument(
        "--max-rate",
        action="store_true",
        help="send every request at once, ignoring the recorded times (cap with --concurrency)",
    )
    parser.add_argument(
        "--concurrency",
        type=_count,
        default=None,
        metavar="N",
        help="at most N requests in flight; later ones wait their turn [default: no cap]",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="check that greedy requests (temperature 0) give the recorded output; exit 1 if "
        "any differs",
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help="send every generation request with stream: true (time to first token and "
        "inter-token latency for all of them)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("MLX_SERVER_API_KEY") or None,
        metavar="KEY",
        help="key to send where the recorded request sent one (recorded keys are redacted) "
        "[env: MLX_SERVER_API_KEY]",
    )
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=600.0,
        metavar="SECONDS",
        help="give up on a request after this long [default: 600]",
    )
    parser.add_argument("--quiet", action="store_true", help="no per-request progress lines")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def progress_line(result: Result, done: int, total: int) -> str:
    e = result.entry
    width = len(str(total))
    status = str(result.status) if result.status is not None else "ERR"
    parts = [f"[{done:>{width}}/{total}]", status, f"{e.method} {e.endpoint}"]
    if e.generation and result.ok:
        if result.ttft is not None:
            parts.append(f"ttft {_ms(result.ttft)}")
        parts.append(f"{result.tokens} tok")
    parts.append(f"{result.ended - result.sent:.2f} s")
    parts.append(f"(line {e.line})")
    if result.error:
        parts.append(f"error: {result.error}")
    if result.mismatch:
        parts.append("MISMATCH")
    return "  ".join(parts)


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def format_summary(summary: dict[str, Any], *, trace: str, skipped: int) -> str:
    lines = [
        f"replayed {summary['requests']} requests from {trace} in {summary['wall_s']:.2f} s"
        + (f" ({skipped} malformed line{'s' * (skipped != 1)} skipped)" if skipped else "")
    ]
    statuses = "  ".join(f"{k}: {v}" for k, v in sorted(summary["statuses"].items()))
    lines.append(f"  status        {statuses}")
    errors = summary["errors"]
    lines.append(
        "  errors        "
        + ("  ".join(f"{k}: {v}" for k, v in sorted(errors.items())) if errors else "none")
    )
    t, i = summary["ttft_ms"], summary["itl_ms"]
    if t["n"]:
        lines.append(
            f"  TTFT          p50 {_fmt_ms(t['p50'])}  p95 {_fmt_ms(t['p95'])}  ({t['n']} streamed)"
        )
    else:
        lines.append("  TTFT          - (no streamed generation; try --stream)")
    if i["n"]:
        lines.append(f"  inter-token   p50 {_fmt_ms(i['p50'])}  p95 {_fmt_ms(i['p95'])}")
    tps = summary["tokens_per_s"]
    lines.append(
        f"  throughput    {summary['completion_tokens']} completion tokens, "
        f"{tps if tps is not None else '-'} tokens/s"
    )
    if summary["max_send_lag_ms"] is not None:
        lines.append(f"  send lag      max {_fmt_ms(summary['max_send_lag_ms'])} behind schedule")
    if "compared" in summary and summary.get("compare"):
        bad = summary["mismatches"]
        lines.append(
            f"  compare       {summary['compared']} greedy requests: "
            f"{summary['compared'] - len(bad)} match, {len(bad)} differ"
        )
        for m in bad:
            rid = f", request {m['request_id']}" if m["request_id"] else ""
            lines.append(f"    MISMATCH line {m['line']}{rid} ({m['endpoint']}): {m['why']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        base = BaseURL.parse(args.url)
    except ValueError as exc:
        parser.exit(EXIT_USAGE, f"{PROG}: error: --url: {exc}\n")
    try:
        entries, malformed = read_trace(args.trace)
    except OSError as exc:
        parser.exit(EXIT_USAGE, f"{PROG}: error: cannot read {args.trace}: {exc.strerror}\n")
    for bad in malformed:
        print(f"{args.trace}:{bad.line}: malformed line skipped: {bad.reason}", file=sys.stderr)
    if not entries:
        parser.exit(EXIT_USAGE, f"{PROG}: error: no requests to replay in {args.trace}\n")
    options = Options(
        speed=args.speed,
        max_rate=args.max_rate,
        concurrency=args.concurrency,
        stream=args.stream,
        api_key=args.api_key,
        timeout=args.timeout,
    )
    if args.compare and not any(e.comparable for e in entries):
        print(
            f"{PROG}: note: no greedy request (temperature 0) with a recorded output to compare",
            file=sys.stderr,
        )

    def report(result: Result, done: int, total: int) -> None:
        if not args.quiet:
            print(progress_line(result, done, total), file=sys.stderr, flush=True)

    if not args.quiet:
        print(f"replaying {len(entries)} requests against {base}", file=sys.stderr, flush=True)
    try:
        results, wall = trio.run(
            lambda: replay(base, entries, options, compare_outputs=args.compare, on_result=report)
        )
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    summary = summarize(results, wall, compared=args.compare)
    summary["compare"] = args.compare
    summary["malformed_lines"] = [{"line": b.line, "reason": b.reason} for b in malformed]
    if args.json:
        print(json.dumps(summary, indent=2), file=out)
    else:
        print(format_summary(summary, trace=args.trace, skipped=len(malformed)), file=out)
    return EXIT_MISMATCH if summary["mismatches"] else 0
