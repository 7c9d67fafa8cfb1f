"""File writing that leaves no junk: atomic single files, all-or-nothing sets of files, early write checks.

Every output goes through `atomic_path`: it is written to a hidden temp file beside its target, named
`.<name>.<pid>.<random>.hw2tmp`, then renamed over the target. An OSError while writing (a full disk, a
folder that cannot be written) becomes a one-line UserError naming the file, and the temp file is removed.
Inside an `all_or_nothing()` block the renames wait until the block ends, so a run that fails or is
interrupted (Ctrl-C, SIGTERM) adds no file and no folder. A run killed outright (`kill -9`) cannot clean up
after itself; its temp files keep their pattern, and `remove_stale_temps` (which the commands call on their
output folders at start) deletes them when the process that wrote them is gone.
"""
from __future__ import annotations

import atexit
import contextlib
import contextvars
import os
import re
import signal
import tempfile
from collections.abc import Iterable
from pathlib import Path

from common.errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)

TEMP_SUFFIX = ".hw2tmp"
# .<name>.<pid>.<random>.hw2tmp (this module's), and .<name>.<random>.tmp (written before the pid was added)
_TEMP_RE = re.compile(r"^\..+\.(\d+)\.[a-z0-9_]{8}\.hw2tmp$")
_OLD_TEMP_RE = re.compile(r"^\..+\.(png|csv|json|safetensors|ckpt|txt)\.[a-z0-9_]{8}\.tmp$")


def write_error(path: str | os.PathLike, e: OSError) -> UserError:
    """The one-line UserError for an OSError met while writing `path`."""
    return UserError(f"{path}: cannot write ({e.strerror or e})")


_OWN_TEMPS: set[str] = set()  # this process's temp files not yet renamed or removed


_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _mkstemp(folder: Path, name: str) -> Path:
    # Ctrl-C / SIGTERM wait until the new file is registered, so that the clean-up on the way out knows it
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=folder)
        os.close(fd)
        _OWN_TEMPS.add(os.path.abspath(tmp))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return Path(tmp)


@atexit.register
def _remove_own_temps() -> None:
    """On the way out (an interrupt that struck between creating a temp file and the block that removes it),
    delete this process's temp files that were neither renamed nor removed."""
    for tmp in list(_OWN_TEMPS):
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    _OWN_TEMPS.clear()


def _done(tmp: Path) -> None:
    _OWN_TEMPS.discard(os.path.abspath(tmp))


class _Stage:
    """The pending renames and the folders created inside one all_or_nothing() block."""

    def __init__(self):
        self.pending: list[tuple[Path, Path]] = []
        self.made_dirs: list[Path] = []

    def commit(self) -> None:
        # Ctrl-C / SIGTERM wait until every file has landed (a few renames), so the set is never cut in half
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            for k, (tmp, target) in enumerate(self.pending):
                try:
                    os.replace(tmp, target)
                    _done(tmp)
                except OSError as e:
                    self.pending = self.pending[k:]
                    self.abort(remove_dirs=False)
                    raise write_error(target, e) from None
            self.pending = []
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def abort(self, remove_dirs: bool = True) -> None:
        for tmp, _ in self.pending:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            _done(tmp)
        self.pending = []
        if remove_dirs:
            for d in reversed(self.made_dirs):  # deepest first; only the empty ones
                with contextlib.suppress(OSError):
                    d.rmdir()
            self.made_dirs = []


_STAGE: contextvars.ContextVar[_Stage | None] = contextvars.ContextVar("hw2_output_stage", default=None)


@contextlib.contextmanager
def all_or_nothing():
    """Every atomic_path write inside the block lands when the block ends, all together. When the block raises
    (an error, Ctrl-C, SIGTERM turned into an exception), no target is written or replaced (files there before
    stay as they were) and the folders made inside the block are removed. Nested blocks join the outer one."""
    if _STAGE.get() is not None:
        yield
        return
    stage = _Stage()
    token = _STAGE.set(stage)
    try:
        yield
    except BaseException:
        _STAGE.reset(token)
        stage.abort()
        raise
    _STAGE.reset(token)
    stage.commit()


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create a directory (and parents); a clear error when it cannot be made or written. Inside an
    all_or_nothing() block, the folders it makes are removed again if the block fails."""
    p = Path(path)
    missing = []
    q = p.absolute()
    while not q.exists() and q != q.parent:
        missing.append(q)
        q = q.parent
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{p}: cannot create output folder ({e.strerror or e})") from None
    stage = _STAGE.get()
    if stage is not None:
        stage.made_dirs.extend(reversed(missing))  # outermost first
    if not os.access(p, os.W_OK):
        raise UserError(f"{p}: output folder is not writable")
    return p


def folder_error(path: str | os.PathLike, not_found: str = "folder not found") -> UserError:
    """The UserError for a folder argument that is not a folder: '<path>: <not_found>' when nothing is there,
    '<path>: is a file, not a folder' when a file is."""
    if Path(path).exists():
        return UserError(f"{path}: is a file, not a folder")
    return UserError(f"{path}: {not_found}")


def check_writable(path: str | os.PathLike, _shown: str | os.PathLike | None = None) -> Path:
    """Fail early, creating nothing, when `path` (a folder to be) could not be created or written: a temp file
    is created and removed in it (or in its nearest existing parent), since permission bits alone do not tell
    (root passes os.access everywhere, /proc refuses new files, a read-only mount...)."""
    p = Path(path).absolute()
    shown = _shown if _shown is not None else p
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{shown}: cannot write here ({probe} is a file, not a folder)")
    try:
        tmp = _mkstemp(probe, "write-check")
        os.unlink(tmp)
        _done(tmp)
    except OSError as e:
        raise UserError(f"{shown}: cannot write here ({probe}: {e.strerror or e})") from None
    return Path(path)


def check_writable_file(path: str | os.PathLike) -> Path:
    """check_writable for an output file: its folder must be writable, and the path must not be a folder."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{p}: is a folder; give the path of the file to write")
    check_writable(p.parent if str(p.parent) else ".", _shown=p)
    return p


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # not one of ours (those are skipped): left by an earlier process that had our pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_stale_temps(*folders: str | os.PathLike) -> int:
    """Delete the temp files that killed runs (kill -9, a power cut) left in these folders: this module's
    pattern, written by a process that is gone (or by an older version of this module, whose names held no pid).
    Returns how many were removed."""
    removed = 0
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for e in entries:
            m = _TEMP_RE.match(e.name)
            stale = (m is not None and not _alive(int(m.group(1)))) or _OLD_TEMP_RE.match(e.name) is not None
            if stale and os.path.abspath(e.path) not in _OWN_TEMPS and e.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(e.path)
                    removed += 1
    return removed


def prune_outputs(out: str | os.PathLike, written: Iterable[str], folders: Iterable[str], ours) -> list[str]:
    """After a run wrote `written` (names relative to `out`), delete from `out`/each of `folders` ('' is `out`;
    list sub-folders before their parents) the files this command would write there that this run did not:
    a rerun into the same hand-in folder (another year's layout, fewer prompts) then holds exactly this run's
    files, not a mix the grader would also read. `ours` says which files those are: a regular expression on
    the name, or a function (folder, name) -> bool. A folder that this emptied is removed (never one that was
    empty already, or that this run wrote into). What was removed is said on stdout; files of other names are
    left alone and named there too (and returned)."""
    out, keep = Path(out), {os.path.normpath(n) for n in written}
    if isinstance(ours, str):
        pattern = re.compile(ours)
        ours = lambda folder, name: pattern.fullmatch(name) is not None  # noqa: E731
    foreign, removed = [], []
    for sub in folders:
        folder = out / sub
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            rel = os.path.normpath(os.path.join(sub, e.name))
            if rel in keep or _TEMP_RE.match(e.name) or not e.is_file(follow_symlinks=False):
                continue
            if ours(sub, e.name):
                os.unlink(e.path)
                removed.append(rel)
            else:
                foreign.append(rel)
        # sub-folders come first, so a parent sees its emptied children's files among `removed`
        inside = os.path.normpath(sub) + os.sep
        if sub and any(r.startswith(inside) for r in removed) and not any(n.startswith(inside) for n in keep):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
    if removed:
        print(f"note: removed {len(removed)} image(s) an earlier run left in {out} ({', '.join(removed[:3])}"
              f"{', ...' if len(removed) > 3 else ''})")
    if foreign:
        print(f"note: {out} also holds {len(foreign)} file(s) this command did not write ({', '.join(foreign[:3])}"
              f"{', ...' if len(foreign) > 3 else ''}); remove them before handing in")
    return foreign


def share_tree(folder: str | os.PathLike) -> None:
    """Give a folder written by a library the usual permissions (umask applied), like atomic_path's files:
    safetensors and mkdtemp make 0600 files and 0700 folders, which a grader's other account cannot read."""
    os.chmod(folder, 0o777 & ~_UMASK)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~_UMASK)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path in the target's folder; when the block succeeds rename it to `path` (at the end of
    the enclosing all_or_nothing() block, if any), else delete it. An OSError (a full disk, a folder that
    refuses files) becomes a one-line UserError naming `path`."""
    path = Path(path)
    ensure_dir(path.parent if str(path.parent) else ".")
    try:
        tmp = _mkstemp(path.parent, path.name)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
        stage = _STAGE.get()
        if stage is not None:
            stage.pending.append((tmp, path))
        else:
            os.replace(tmp, path)
            _done(tmp)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        _done(tmp)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json's object_pairs_hook: a key given twice is an error, where json.loads keeps the last one silently
    (an input.json concept, or a train.json image's labels, would be lost without a word)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def read_json(path: str | os.PathLike, what: str = "file"):
    """Parse a JSON file; UserError naming the file when it is missing, not valid JSON, or names a key twice
    in one object. A UTF-8 byte-order mark (Notepad, Excel) is allowed."""
    import json
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        # utf-8-sig: strict utf-8 would call a file with a byte-order mark malformed JSON
        return json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=_unique_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: malformed JSON ({e})") from None
    except _DuplicateKey as e:
        raise UserError(f"{path}: key {e.args[0]!r} appears twice in one object (only one would be read)") from None
