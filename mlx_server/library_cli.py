"""`mlx-server pull REPO` and `mlx-server ls`: the local model library from the command line.

`pull` downloads a Hugging Face repo's model files into the standard cache with a progress bar
(what is already there is kept, so an interrupted pull resumes); `ls` lists the cached models
with their size, age and whether they are complete enough to serve."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from . import hub
from .errors import MlxServerError


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return "just now"


def ls_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mlx-server ls", description="List the models in the local Hugging Face cache."
    )
    parser.parse_args(list(argv))
    models = hub.list_cached()
    if not models:
        print(f"no models in {hub.cache_dir()}")
        return 0
    rows = [("NAME", "SIZE", "MODIFIED", "STATE")]
    now = time.time()
    for model in models:
        state = "ready" if model.complete else "incomplete"
        rows.append(
            (model.repo_id, hub.human_size(model.size_bytes), _age(now - model.modified), state)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    return 0


def pull_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mlx-server pull",
        description="Download a model from the Hugging Face hub into the local cache.",
    )
    parser.add_argument("repo", help="a Hugging Face repo id, e.g. mlx-community/Qwen3-4B-4bit")
    parser.add_argument("--revision", default=None, help="a branch, tag or commit (default main)")
    args = parser.parse_args(list(argv))
    try:
        hub.check_repo_id(args.repo, param="repo")
        path = hub.pull(args.repo, revision=args.revision)  # huggingface_hub draws the bars
    except MlxServerError as exc:
        message = getattr(exc, "message", None) or str(exc)
        print(f"mlx-server pull: error: {message}", file=sys.stderr)
        return 1
    print(f"{args.repo}: {path}")
    return 0
