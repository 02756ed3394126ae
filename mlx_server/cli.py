"""The ``mlx-server`` command: parse settings, set up logging, run the server."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from .config import PROG, Settings, load_settings
from .errors import ConfigError, MlxServerError

LOG_FORMAT = "%(asctime)s %(levelname)-8s %(name)s: %(message)s"
LOG_DATEFMT = "%Y-%m-%d %H:%M:%S"

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT, datefmt=LOG_DATEFMT)


def _report(exc: BaseException) -> int:
    """Print one ``mlx-server: error: ...`` line for ``exc``; return the exit status."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_ERROR


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def main(argv: Sequence[str] | None = None) -> int | None:
    """Entry point of ``mlx-server`` and ``python -m mlx_server``.

    Bad flags or environment variables exit with status 2 (from argparse). A
    :class:`~mlx_server.errors.MlxServerError` escaping the runtime (a model that
    will not load, say) prints one line and returns 1 (2 for a ``ConfigError``);
    Ctrl-C returns 130 without a traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["convert"]:
        from .convert import main as convert_main

        return convert_main(args[1:])
    if args[:1] in (["pull"], ["ls"]):
        from .library_cli import ls_main, pull_main

        return (pull_main if args[0] == "pull" else ls_main)(args[1:])
    settings = load_settings(args)
    configure_logging(settings)
    # Before anything imports mlx: an optimized BLAS must be loaded first to be used.
    from .engine.cpu import preload_blas

    preload_blas()
    try:
        from . import runtime  # lazily: it pulls in mlx and the model machinery

        return runtime.run(settings)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except MlxServerError as exc:
        return _report(exc)
    except BaseExceptionGroup as group:
        # trio may deliver failures wrapped in a group; unwrap the ones we know.
        _, rest = group.split(KeyboardInterrupt)
        if rest is None:
            return EXIT_INTERRUPTED
        known, unknown = rest.split(MlxServerError)
        if unknown is None and known is not None:
            return _report(_first_leaf(known))
        raise


def entry() -> None:
    """The process entry point (console script and ``python -m``): run `main`, then end the
    process without interpreter finalisation. MLX and OpenBLAS keep native worker threads,
    and tearing the interpreter down around them can abort (SIGABRT) a server that had already
    shut down cleanly; the exit status must be `main`'s."""
    try:
        result = main()
    except SystemExit as exc:
        result = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    code = 0 if result is None else int(result)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
