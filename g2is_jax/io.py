"""Writing outputs: one atomic-write helper, output-path checks, OS errors as user errors.

Every output file of the package is written through `atomic_open` (or its wrappers): the bytes
go to a temporary file in the same directory, which is flushed and fsynced, renamed over the
target (atomic on POSIX), and the directory is fsynced where the platform allows it. A reader
sees the old file or the new one, never a torn one, and a failure (full disk, read-only file
system) leaves no temporary file behind.

`check_output_file` / `check_output_dir` run before any work starts, so a bad ``--out`` fails in
a second rather than after an hour of compute; `os_error` turns an `OSError` into a one-line
`G2ISError` that names the path and the fix. `write_file_set` writes the files of one output
folder as a set (e.g. a selection and its subset): the commit file is renamed into place last and
removed first, so it exists only next to the members written with it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from g2is_jax.errors import G2ISError

__all__ = ["atomic_open", "atomic_write", "atomic_write_json", "check_output_dir",
           "check_output_file", "fsync_dir", "os_error", "write_file_set"]

# A value in `write_file_set`: bytes, text, a function that writes into a binary file, or None
# (the member is removed).
Content = bytes | str | Callable[[IO[bytes]], Any] | None


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or unlink in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows, or no permission to read the directory: best effort
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def os_error(path: str | os.PathLike[str], exc: OSError, action: str = "write") -> G2ISError:
    """A one-line user error for an OSError met while `action`-ing `path`, naming the fix."""
    where = str(path)
    code = exc.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        text = (f"no space left on the device holding {where}: free some space or write to "
                "another location")
    elif code == errno.EROFS:
        text = f"{where} is on a read-only file system: write to a writable location"
    elif code in (errno.EACCES, errno.EPERM):
        text = f"permission denied to {action} {where}: choose a location you can write to"
    elif code == errno.EISDIR:
        text = f"{where} is a directory, not a file: give a file path"
    elif code == errno.ENOTDIR:
        text = f"a parent of {where} is a file, not a directory: choose another path"
    elif code == errno.ENAMETOOLONG:
        text = f"the path {where} is too long: choose a shorter one"
    else:
        text = f"cannot {action} {where}: {exc.strerror or exc}"
    return G2ISError(text)


def _first_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_ancestor(path: Path, name: str) -> None:
    """The nearest existing ancestor of `path` must be a writable directory."""
    anc = _first_existing(path.parent)
    if not anc.is_dir():
        raise G2ISError(f"{name} {path}: {anc} is a file, not a directory; choose another path")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise _unwritable(anc, name, path)


def _unwritable(where: Path, name: str, path: Path) -> G2ISError:
    try:  # tell a read-only file system from a permission problem
        st = os.statvfs(where)
        read_only = bool(st.f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        read_only = False
    why = "is on a read-only file system" if read_only else "is not writable"
    return G2ISError(f"{name} {path}: {where} {why}; choose a writable location")


def check_output_file(path: str | os.PathLike[str], name: str = "out") -> Path:
    """`path` as an absolute path, after checking it can be written as a file (creates nothing).

    Refused: an existing directory, a parent that is a file, an unwritable or read-only parent.
    `name` is how the caller's message names the parameter (a CLI passes its flag).
    """
    p = Path(path).expanduser().absolute()
    if p.is_dir():
        raise G2ISError(f"{name} {p} is a directory; give a file path")
    if p.exists() and not os.access(p, os.W_OK):
        raise _unwritable(p, name, p)
    _check_ancestor(p, name)
    return p


def check_output_dir(path: str | os.PathLike[str], name: str = "out") -> Path:
    """`path` as an absolute path, after checking it is or can become a writable directory."""
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise G2ISError(f"{name} {p} is a file, not a directory; give a directory path")
    if p.is_dir():
        if not os.access(p, os.W_OK | os.X_OK):
            raise _unwritable(p, name, p)
        return p
    _check_ancestor(p, name)
    return p


def make_dir(path: str | os.PathLike[str]) -> Path:
    """`mkdir -p`, with OS errors as one-line user errors."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(p, exc, "create the directory") from None
    return p


def _missing_dirs(path: Path) -> list[Path]:
    """The directories `make_dir(path)` would create, deepest first."""
    out = []
    p = path.absolute()
    while not p.exists() and p != p.parent:
        out.append(p)
        p = p.parent
    return out


def _remove_empty(dirs: list[Path]) -> None:
    """After a failed write: remove the directories it created, if still empty."""
    for d in dirs:
        with contextlib.suppress(OSError):
            d.rmdir()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb", *,
                encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file next to `path` for writing; on success it replaces `path`.

    ``mode`` is "wb" or "w" (text, UTF-8 unless `encoding`). The parent directory is created.
    On any exception the temporary file is removed and `path` is left as it was; OS errors
    become a `G2ISError` naming `path`.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    target = Path(path)
    created = _missing_dirs(target.parent)
    make_dir(target.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        _remove_empty(created)
        raise os_error(target, exc) from None
    try:
        f = os.fdopen(fd, mode, encoding=(encoding or "utf-8") if mode == "w" else None)
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        _remove_empty(created)
        if isinstance(exc, OSError):
            raise os_error(target, exc) from None
        raise
    fsync_dir(target.parent)


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write bytes (or UTF-8 text) to `path` atomically; returns the path."""
    with atomic_open(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike[str], doc: Any, *, indent: int | None = 1) -> Path:
    """`doc` as JSON (a final newline) to `path`, atomically."""
    return atomic_write(path, json.dumps(doc, indent=indent, ensure_ascii=False) + "\n")


def write_file_set(directory: str | os.PathLike[str], files: Mapping[str, Content], *,
                   commit: str) -> Path:
    """Write the files of one output folder as a set; returns the directory.

    `files` maps each member's name to its content (None: the member must not exist, so a stale
    one is removed). Every member is first written to a temporary file (a full disk fails here,
    with nothing changed); then the commit file is removed, the other members are renamed into
    place (or removed), and the commit file is renamed last. So the commit file exists only
    together with the members written with it, even if the process dies halfway.
    """
    if commit not in files or files[commit] is None:
        raise ValueError(f"the commit file {commit!r} must be one of the files written")
    created = _missing_dirs(Path(directory))
    d = make_dir(directory)
    temps: dict[str, str] = {}
    done = False
    try:
        for name, content in files.items():
            if content is None:
                continue
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=d)
            except OSError as exc:
                raise os_error(d / name, exc) from None
            temps[name] = tmp
            try:
                with os.fdopen(fd, "wb") as f:
                    if callable(content):
                        content(f)
                    else:
                        f.write(content.encode("utf-8") if isinstance(content, str) else content)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:
                raise os_error(d / name, exc) from None
        try:
            (d / commit).unlink(missing_ok=True)
            fsync_dir(d)
            for name, content in files.items():
                if name == commit:
                    continue
                if content is None:
                    (d / name).unlink(missing_ok=True)
                else:
                    os.replace(temps[name], d / name)
                    del temps[name]
            fsync_dir(d)
            os.replace(temps[commit], d / commit)
            del temps[commit]
        except OSError as exc:
            raise os_error(d, exc) from None
        done = True
    finally:
        for tmp in temps.values():
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if not done:
            _remove_empty(created)
    fsync_dir(d)
    return d
