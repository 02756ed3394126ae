"""`python -m mlx_server.replay`: re-send a recorded request trace (see `cli`)."""

from .cli import main

raise SystemExit(main())
