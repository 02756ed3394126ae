"""The admin routes' request and response shapes."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from ..openai.protocol import ModelCard
from ..protocol import Model, Response


class ModelRequest(Model):
    """`/admin/models/load` and `/unload`: a served model's name, or (load) the repo id of a
    model pulled into the Hugging Face cache, which is then served under that id."""

    model: Annotated[str, Field(min_length=1, max_length=256)]


class PullRequest(Model):
    """`/admin/models/pull`: a Hugging Face model repo (`owner/name`) and optionally a revision
    (branch, tag or commit)."""

    repo: Annotated[str, Field(min_length=1, max_length=256)]
    revision: Annotated[str, Field(min_length=1, max_length=128)] | None = None


# -- responses -------------------------------------------------------------------------------


class CachedRepo(Response):
    repo: str
    size_bytes: int
    files: int
    modified: int
    complete: bool
    served: bool


class AdminModels(Response):
    object: Literal["list"]
    data: list[ModelCard]
    cache: list[CachedRepo]


class PullProgress(Response):
    repo: str
    downloaded: int
    total: int
    percent: float
    done: bool


class PullStart(Response):
    repo: str
    status: Literal["pulling"]


class PullDone(Response):
    repo: str
    status: Literal["success"]
    size_bytes: int | None = None
    files: int | None = None
    complete: bool | None = None
