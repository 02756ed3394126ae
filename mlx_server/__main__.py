"""``python -m mlx_server``: the same as the ``mlx-server`` command."""

from .cli import entry

entry()
