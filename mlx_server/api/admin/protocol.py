"""The admin routes' request shapes."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from ..protocol import Model


class ModelRequest(Model):
    """`/admin/models/load` and `/unload`: a served model's name, or (load) the repo id of a
    model pulled into the Hugging Face cache, which is then served under that id."""

    model: Annotated[str, Field(min_length=1, max_length=256)]


class PullRequest(Model):
    """`/admin/models/pull`: a Hugging Face model repo (`owner/name`) and optionally a revision
    (branch, tag or commit)."""

    repo: Annotated[str, Field(min_length=1, max_length=256)]
    revision: Annotated[str, Field(min_length=1, max_length=128)] | None = None
