"""File-system plumbing shared by everything that writes: temporary names that say which process
owns them, removal of the temporaries a killed process left behind, exclusive locks on a folder,
worker processes that die with their parent, and file-system errors turned into one line.

A temporary file or folder is named ``.<final name>.tmp-<host>-<pid>-<token>``: a later run on the
same host removes it once that process is gone; one from another host (a shared cluster file
system) is removed when nothing in it changed for :data:`FOREIGN_TMP_MAX_AGE_S`.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

log = logging.getLogger("medgen")

HOST = socket.gethostname()
#: a temporary that another host owns is removed only after this long without change
FOREIGN_TMP_MAX_AGE_S = 24 * 3600.0
_OWNED = re.compile(r"\.tmp-(?P<host>.+)-(?P<pid>\d+)-(?P<token>[0-9a-f]+)(?:\.\w+)?$")


class FolderBusy(RuntimeError):
    """Another live process holds the lock on a folder; the message names it."""


class FileSystemError(OSError):
    """An OS error with a message a user can act on: the path and the cause, in one line."""

    def __str__(self) -> str:
        return os_error_line(self)


# ---------------------------------------------------------------------------------- temporaries
def temporary_path(final: str | os.PathLike[str], suffix: str = "") -> Path:
    """A sibling of ``final`` to write into before an atomic ``os.replace``, named after its owner."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{HOST}-{os.getpid()}-{secrets.token_hex(3)}{suffix}")


@contextmanager
def atomic_write(final: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Write a file or folder atomically: the block writes to the temporary path it is given
    (:func:`temporary_path`, a sibling of ``final``), which is renamed to ``final`` when the block
    ends. If the block fails, the temporary is removed, so no half-written file is ever seen under
    its final name, and an OS error becomes a :class:`FileSystemError` naming ``final`` (a full
    disk inside gzip or zipfile names no file of its own). ``suffix`` keeps the extension writers
    look at (``np.savez`` appends ``.npz`` to a name without it)."""
    final = Path(final)
    tmp = temporary_path(final, suffix)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException as exc:
        _remove_quietly(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, FileSystemError):
            raise (write_error(exc, final) or exc) from exc
        raise


def _remove_quietly(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                try:
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
                except FileNotFoundError:
                    pass
    return newest


def is_orphan(path: Path, max_age_s: float = FOREIGN_TMP_MAX_AGE_S) -> bool:
    """True for a temporary whose owner is gone: a dead process of this host, or (other hosts, or
    a name that names no owner) nothing changed in it for ``max_age_s``."""
    name = Path(path).name
    m = _OWNED.search(name)
    if m and m["host"] == HOST:
        return not pid_alive(int(m["pid"]))
    try:
        return time.time() - _newest_mtime(Path(path)) > max_age_s
    except FileNotFoundError:
        return False


def remove_orphans(candidates: Iterable[Path], max_age_s: float = FOREIGN_TMP_MAX_AGE_S) -> list[Path]:
    """Delete the ``candidates`` (temporary files or folders) whose owner is gone, each with a
    warning; returns what was removed."""
    removed = []
    for path in candidates:
        path = Path(path)
        if not is_orphan(path, max_age_s):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("could not remove %s, left by an interrupted run: %s", path, exc.strerror)
            continue
        log.warning("removed %s, left by an interrupted run", path)
        removed.append(path)
    return removed


# ---------------------------------------------------------------------------------- processes
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """In a worker process: get SIGKILL when the parent dies (Linux ``PR_SET_PDEATHSIG``), and
    exit at once if it is already gone. A worker blocked on a full result pipe would otherwise
    outlive a killed parent for good. Ctrl-C, SIGTERM and SIGUSR1 are ignored: a terminal sends
    Ctrl-C, and SLURM (``scancel --signal``, ``srun`` forwarding a signal) sends the others, to every
    process of the job, and the parent decides what they mean (save and stop, or abort)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the parent check below still applies
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


# ---------------------------------------------------------------------------------- locks
class FolderLock:
    """An exclusive, non-blocking lock on ``<folder>/<name>`` (``flock``; ``name`` may be in a
    subfolder) for as long as a run uses the folder. The kernel releases it when the process dies, so a killed run never leaves a stale
    lock. The file records who holds it, for the message a second process gets.

    Raises:
        FolderBusy: another live process holds it.
    """

    def __init__(self, folder: str | os.PathLike[str], what: str, name: str = ".medgen.lock"):
        self.folder = Path(folder)
        self.path = self.folder / name
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise FolderBusy(f"{self.what} {self.folder} is in use by {holder}; wait for it to finish "
                             "or use another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": HOST, "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "command": " ".join(sys.argv)}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"process {info['pid']} on {info['host']} (since {info['since']}: {info.get('command', '')})"
    except (ValueError, KeyError, OSError):
        return "another process"


# ---------------------------------------------------------------------------------- errors
_CAUSES = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.ENOENT)


def write_error(exc: BaseException, path: str | os.PathLike[str]) -> FileSystemError | None:
    """The OS cause of a failed write to ``path`` as a :class:`FileSystemError`, or None when the
    error is not the file system's. ``torch.save`` reports a full disk as ``RuntimeError: [enforce
    fail at inline_container.cc]``; the ``OSError`` behind it is in the exception's context."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return FileSystemError(e.errno, f"cannot write: {os.strerror(e.errno)}", str(path))
        e = e.__cause__ or e.__context__
    text = str(exc)
    for code in _CAUSES:
        if os.strerror(code) in text:
            return FileSystemError(code, f"cannot write: {os.strerror(code)}", str(path))
    try:
        if shutil.disk_usage(Path(path).parent).free == 0:
            return FileSystemError(errno.ENOSPC, f"cannot write: {os.strerror(errno.ENOSPC)}", str(path))
    except OSError:
        pass
    return None


def os_error_line(exc: OSError) -> str:
    """One line for an OS error: the path(s) and the cause, without the traceback."""
    cause = exc.strerror or str(exc)
    if exc.filename is None:
        return cause
    target = f"{exc.filename} -> {exc.filename2}" if exc.filename2 else str(exc.filename)
    hint = {errno.EACCES: " (choose a folder you can write to)",
            errno.EROFS: " (choose a folder on a writable file system)",
            errno.ENOSPC: " (free some space or choose another folder)",
            errno.EDQUOT: " (free some space or choose another folder)"}.get(exc.errno or 0, "")
    return f"{target}: {cause}{hint}"
