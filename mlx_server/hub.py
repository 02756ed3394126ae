"""The local model library: Hugging Face repo ids checked, the cache listed, repos pulled with
progress.

Models live in the standard Hugging Face cache (`HF_HUB_CACHE`, `HF_HOME`), where `mlx-server
--model ORG/NAME` and `mlx_lm` find them offline. Repo ids are checked before anything touches
the disk or the network: `owner/name` from a small alphabet, so no id can name a path outside
the cache (`..`, absolute paths, backslashes, URL-ish strings are refused). Downloads go only
into the cache, only for the files a model needs (`MODEL_FILE_PATTERNS`). No mlx, no trio.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeGuard

import attrs

from .errors import InvalidRequest, ModelLoadError

MODEL_FILE_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"^{_PART}/{_PART}$")
# A branch, tag or commit; `refs/pr/N` has slashes. Never `..`, a leading or doubled slash.
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*$")


class BadRepoId(InvalidRequest):
    """A string that is not a Hugging Face model repo id."""


def is_repo_id(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and bool(_REPO_ID.match(value)) and ".." not in value


def check_repo_id(value: object, *, param: str = "model") -> str:
    """`value` if it is an `owner/name` repo id; `BadRepoId` (a 400) otherwise."""
    if not is_repo_id(value):
        raise BadRepoId(
            f"{value!r} is not a Hugging Face repo id: expected 'owner/name' made of letters, "
            "digits, '.', '_' and '-'",
            param=param,
        )
    return value


def check_revision(value: object, *, param: str = "revision") -> str:
    """`value` if it is a plausible branch, tag or commit name (the cache writes it as a file
    under `refs/`, so nothing that could climb out of it); a 400 otherwise."""
    if (
        not isinstance(value, str)
        or len(value) > 128
        or not _REVISION.match(value)
        or ".." in value
    ):
        raise InvalidRequest(
            f"{value!r} is not a revision: expected a branch, tag or commit made of letters, "
            "digits, '.', '_', '-' and single '/' separators",
            param=param,
        )
    return value


@attrs.frozen(kw_only=True)
class CachedModel:
    """A model repo in the local cache."""

    repo_id: str
    path: Path  # the snapshot folder a server loads
    size_bytes: int
    modified: float  # Unix time of the newest file
    files: int
    complete: bool  # has config.json and weights: loadable as it is


@attrs.frozen(kw_only=True)
class PullProgress:
    """How far a pull has got: bytes done of the total known so far (the total grows as the
    download learns file sizes); `done` once on completion."""

    repo_id: str
    downloaded: int
    total: int
    done: bool = False


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def list_cached(root: Path | None = None) -> list[CachedModel]:
    """The model repos in the cache (newest first); an empty or missing cache is an empty list."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(root if root is not None else cache_dir())
    except CacheNotFound:
        return []
    out: list[CachedModel] = []
    for repo in info.repos:
        if repo.repo_type != "model" or not repo.revisions:
            continue
        revision = max(repo.revisions, key=lambda r: r.last_modified)
        names = {f.file_name for f in revision.files}
        weights = any(n.endswith((".safetensors", ".gguf")) for n in names)
        out.append(
            CachedModel(
                repo_id=repo.repo_id,
                path=Path(revision.snapshot_path),
                size_bytes=revision.size_on_disk,
                modified=revision.last_modified,
                files=len(names),
                complete="config.json" in names and weights,
            )
        )
    out.sort(key=lambda m: m.modified, reverse=True)
    return out


def find_cached(repo_id: str, root: Path | None = None) -> CachedModel | None:
    check_repo_id(repo_id)
    return next((m for m in list_cached(root) if m.repo_id == repo_id), None)


def _progress_class(repo_id: str, report: Callable[[PullProgress], None]) -> type[Any]:
    """A tqdm class for huggingface_hub that reports byte progress to `report`, at most every
    0.2 s. `snapshot_download` feeds each chunk to two byte bars: "Reconstructing" (bytes
    written, whose `total` it grows as files start) and "Downloading bytes" (network bytes: the
    same bytes again over plain HTTP); only the first counts. Bars counting files are ignored.
    Totals are read when reporting, since huggingface_hub sets `total` after creating a bar."""
    from tqdm.auto import tqdm

    lock = threading.Lock()
    bars: list[Any] = []
    last = [0.0]

    class Reporting(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            desc = str(kwargs.get("desc") or "")
            self._counted = kwargs.get("unit") == "B" and not desc.startswith("Downloading bytes")
            self._bytes_done = 0
            super().__init__(*args, **kwargs)
            if self._counted:
                with lock:
                    bars.append(self)

        def update(self, n: float | None = 1) -> bool | None:
            if self._counted and n:
                with lock:
                    self._bytes_done += int(n)
                    now = time.monotonic()
                    if now - last[0] < 0.2:
                        return None
                    last[0] = now
                    done = sum(b._bytes_done for b in bars)
                    total = sum(int(b.total or 0) for b in bars)
                report(PullProgress(repo_id=repo_id, downloaded=done, total=max(total, done)))
            return None

    return Reporting


def pull(
    repo_id: str,
    *,
    revision: str | None = None,
    root: Path | None = None,
    progress: Callable[[PullProgress], None] | None = None,
    endpoint: str | None = None,
) -> Path:
    """Download `repo_id`'s model files into the cache (what is already there is kept) and
    return the snapshot folder. Blocking: run it off the event loop. Errors are
    `ModelLoadError`s with one readable line. `endpoint` overrides `HF_ENDPOINT` (a mirror, or
    a fake hub in tests)."""
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    check_repo_id(repo_id)
    if revision is not None:
        check_revision(revision)
    kwargs: dict[str, Any] = {"allow_patterns": MODEL_FILE_PATTERNS, "revision": revision}
    if root is not None:
        kwargs["cache_dir"] = root
    if endpoint is not None:
        kwargs["endpoint"] = endpoint
    if progress is not None:
        kwargs["tqdm_class"] = _progress_class(repo_id, progress)
    try:
        path = Path(huggingface_hub.snapshot_download(repo_id, **kwargs))
    except hf_errors.GatedRepoError as exc:
        raise ModelLoadError(f"Hugging Face repo {repo_id} is gated: log in first") from exc
    except hf_errors.RepositoryNotFoundError as exc:
        raise ModelLoadError(f"Hugging Face repo not found: {repo_id}") from exc
    except hf_errors.RevisionNotFoundError as exc:
        raise ModelLoadError(f"Hugging Face repo {repo_id}: revision not found") from exc
    except hf_errors.LocalEntryNotFoundError as exc:
        raise ModelLoadError(
            f"cannot download {repo_id}: the hub is unreachable and the model is not cached"
        ) from exc
    except Exception as exc:  # network failures come in many types
        raise ModelLoadError(f"cannot download {repo_id}: {exc}") from exc
    if progress is not None:
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        progress(PullProgress(repo_id=repo_id, downloaded=size, total=size, done=True))
    return path


def local_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot of `repo_id` (with the files a model needs), without any network
    request; None when the cache does not have it."""
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    try:
        return Path(
            huggingface_hub.snapshot_download(
                repo_id, allow_patterns=MODEL_FILE_PATTERNS, local_files_only=True
            )
        )
    except (hf_errors.LocalEntryNotFoundError, OSError):
        return None


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # pragma: no cover
