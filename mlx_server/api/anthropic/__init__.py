"""Anthropic's Messages API: `protocol.py` (request shapes), `convert.py` (into the one internal
request), `render.py` (messages and their event streams), `routes.py`."""
