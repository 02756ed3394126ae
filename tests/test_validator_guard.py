"""The path guard (mlx_server.testing.pathguard, installed by tests/conftest.py) and the rule
that documents the code refers to live in the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mlx_server.testing.pathguard import PathGuard, default_roots

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_policy(tmp_path: Path) -> None:
    repo = tmp_path / "checkout" / "repo"
    guard = PathGuard(repo, [str(tmp_path), "/dev"])
    assert guard.allowed(str(repo / "tests" / "x.py"))
    assert guard.allowed(str(tmp_path / "elsewhere" / "model.gguf"))
    assert guard.allowed("/dev/null")
    # Beside the checkout is refused even though a broad root (tmp_path) holds it.
    assert not guard.allowed(str(tmp_path / "checkout" / "beside" / "specs" / "openai.yaml"))
    assert not guard.allowed(str(repo / ".." / "beside"))
    assert not guard.allowed("/opt/elsewhere/file")
    assert "/" not in PathGuard(repo, ["/"]).roots  # "/" would allow everything


def test_a_symlink_out_of_the_repo_is_judged_by_its_target(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (tmp_path / "beside").mkdir()
    (tmp_path / "beside" / "spec.yaml").write_text("x")
    (repo / "spec.yaml").symlink_to(tmp_path / "beside" / "spec.yaml")
    assert not PathGuard(repo, []).allowed(str(repo / "spec.yaml"))


def test_hook_records_opens_outside_while_active(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    beside = tmp_path / "beside.txt"
    beside.write_text("x")
    guard = PathGuard(repo, [])
    guard.install()  # stays installed for the process; inert once inactive
    guard.active = True
    try:
        (repo / "inside.txt").write_text("ok")
        assert beside.read_text() == "x"
    finally:
        guard.active = False
    beside.read_text()  # inactive: not recorded
    [access] = guard.take()
    assert access.event == "open" and access.path == str(beside)
    assert any("test_validator_guard.py" in frame for frame in access.where)
    assert guard.take() == []


def test_the_session_guard_sees_a_read_beside_the_checkout(path_guard: PathGuard) -> None:
    """The guard conftest installed is live: reading beside the checkout is recorded (taken
    back here, so that this test does not fail for it)."""
    guard = path_guard
    sibling = REPO_ROOT.parent / "no-such-file-beside-the-checkout"
    with pytest.raises(OSError):
        sibling.read_text()
    accesses = guard.take()
    assert [a.path for a in accesses] == [str(sibling)]


def test_default_roots_hold_the_interpreter_and_tmp() -> None:
    import json
    import tempfile

    roots = default_roots(REPO_ROOT)
    guard = PathGuard(REPO_ROOT, roots)
    assert guard.allowed(json.__file__)  # the standard library
    assert guard.allowed(pytest.__file__)  # site-packages
    assert guard.allowed(tempfile.gettempdir())


# Documents named in the code: "see docs/X.md", "(NOTES.md)". URLs are someone else's.
DOC_MENTION = re.compile(r"(?<![\w/.:-])((?:[\w.-]+/)*[\w.-]+\.md)\b")


def test_documents_the_code_refers_to_are_in_the_repository() -> None:
    missing: list[str] = []
    for source in sorted((REPO_ROOT / "mlx_server").rglob("*.py")):
        text = source.read_text()
        for match in DOC_MENTION.finditer(text):
            start = text.rfind("\n", 0, match.start()) + 1
            line = text[start : text.find("\n", match.end())]
            if "://" in line:
                continue
            if not (REPO_ROOT / match.group(1)).is_file():
                missing.append(f"{source.relative_to(REPO_ROOT)}: {match.group(1)}")
    assert not missing, missing
