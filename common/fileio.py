"""Atomic file writing: write to a temporary file beside the target, then rename over it."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from common.errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create a directory (and parents); a clear error when it cannot be made or written."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{p}: cannot create output folder ({e.strerror or e})") from None
    if not os.access(p, os.W_OK):
        raise UserError(f"{p}: output folder is not writable")
    return p


def folder_error(path: str | os.PathLike, not_found: str = "folder not found") -> UserError:
    """The UserError for a folder argument that is not a folder: '<path>: <not_found>' when nothing is there,
    '<path>: is a file, not a folder' when a file is."""
    if Path(path).exists():
        return UserError(f"{path}: is a file, not a folder")
    return UserError(f"{path}: {not_found}")


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early, creating nothing, when `path` (a folder to be) could not be created or written."""
    p = Path(path).absolute()
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{p}: cannot write here ({probe} is a file, not a folder)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{p}: cannot write here ({probe} is not writable)")
    return Path(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path in the target's folder; on success rename it to `path`, else delete it."""
    path = Path(path)
    ensure_dir(path.parent if str(path.parent) else ".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def read_json(path: str | os.PathLike, what: str = "file"):
    """Parse a JSON file; UserError naming the file when it is missing or not valid JSON."""
    import json
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: malformed JSON ({e})") from None
