"""`python -m mlx_server.testing.scripted_server --script FILE [mlx-server flags]`: the real
server (the same CLI code) with the loaded model's network replaced by
`testing.scripted.ScriptedModel`, which emits the scripts in FILE. The prompt cache is off."""

from __future__ import annotations

import argparse
import sys

from ..engine import model as model_loading
from .scripted import load_scripts, wrap_loaded


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--script", required=True)
    known, rest = parser.parse_known_args(sys.argv[1:])
    scripts = load_scripts(known.script)
    original = model_loading.load

    def load(*args: object, **kwargs: object) -> model_loading.LoadedModel:
        return wrap_loaded(original(*args, **kwargs), scripts)  # type: ignore[arg-type]

    model_loading.load = load  # type: ignore[assignment]
    sys.argv = [sys.argv[0], *rest, "--prompt-cache-bytes", "0"]
    from ..cli import entry

    entry()


if __name__ == "__main__":
    main()
