"""Output directories: the rules every command that writes follows, in one place.

- Atomic: everything is written into a temporary directory beside the target, renamed over it at the end. A process
  killed at any moment (even SIGKILL) leaves either the previous target untouched or the complete new one; the only
  possible leftover is a hidden ``.<name>.tmp-<pid>-*`` directory beside it, removed by a later run once that pid is
  dead.
- Inputs are never touched: an output equal to, inside or containing an input is refused (`check_output_dir`), with
  or without ``overwrite``; a non-empty output needs ``overwrite``.
- One run per output: an advisory lock (``flock`` on ``.<name>.lock`` beside it, holding the owner's pid) is held
  for the whole run (`output_lock`); a second run fails at once naming the output and the other pid.
- The published directory gets the permissions of the umask, like any ``mkdir`` (``mkdtemp`` makes it 0700).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import OutputBusyError, OutputDirError

try:  # advisory locks are POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

_TMP_MARK = ".tmp-"
_LOCKS_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}
_LOCK_SUFFIX = ".lock"


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_not_overlapping(output_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse an output equal to, inside or containing any of ``inputs`` (symlinks resolved)."""
    out = Path(output_dir).resolve()
    for given in inputs:
        src = Path(given).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise OutputDirError(
                f"{output_dir}: the output must not be, contain or be inside the input {given}; choose another output"
            )


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """The output checks every command makes before reading its inputs: not overlapping an input, a directory path
    (not a file, not a dangling symlink), empty unless ``overwrite``."""
    output_dir = Path(output_dir)
    check_not_overlapping(output_dir, inputs)
    if output_dir.is_symlink() and not output_dir.exists():
        raise OutputDirError(f"{output_dir}: is a symbolic link to {os.readlink(output_dir)}, which does not exist")
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"{output_dir}: expected a directory path for the output, found a file")
    if output_dir.exists() and not _is_empty_dir(output_dir) and not overwrite:
        raise OutputDirError(f"{output_dir}: output directory is not empty; pass --overwrite (overwrite=True) to replace it")
    return output_dir


# ---------------------------------------------------------------------------------------------------------------------
# Lock


@dataclass
class _Held:
    fd: int  # -1 where the file system has no flock
    path: Path
    created: list[Path] = field(default_factory=list)  # parent directories this run created (removed if left empty)


_held: dict[str, _Held] = {}  # output directories whose lock this process holds (the lock is re-entrant in-process)


def lock_path(output_dir: Path) -> Path:
    return output_dir.parent / f".{output_dir.name}{_LOCK_SUFFIX}"


def _make_parents(directory: Path) -> list[Path]:
    missing = []
    while not directory.exists() and not directory.is_symlink() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return missing


def _acquire(path: Path, output_dir: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputBusyError(
                f"{output_dir}: another run (pid {other}) is writing this output directory; wait for it to finish "
                f"or choose another output"
            ) from None
        except OSError as err:
            os.close(fd)
            if err.errno in _LOCKS_UNSUPPORTED:  # e.g. some network file systems: run unlocked, as before locks
                with contextlib.suppress(OSError):
                    os.unlink(path)
                return -1
            raise
        except BaseException:
            os.close(fd)
            raise
        # The previous holder unlinks the file before unlocking: if it did so after we opened it, retry.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        held = os.fstat(fd)
        if current is not None and (current.st_ino, current.st_dev) == (held.st_ino, held.st_dev):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())  # at offset 0: the descriptor was just opened
            return fd
        os.close(fd)


@contextlib.contextmanager
def output_lock(output_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold the advisory lock of ``output_dir`` (creating its missing parents, removed again if still empty at the
    end); re-entrant within a process. Raises `OutputBusyError` at once if another process holds it."""
    output_dir = Path(os.path.abspath(output_dir))
    key = str(output_dir)
    if key in _held:  # the command holds it and the library's atomic write takes it again
        yield output_dir
        return
    created = _make_parents(output_dir.parent)
    path = lock_path(output_dir)
    try:
        fd = _acquire(path, output_dir) if fcntl is not None else -1
    except BaseException:
        _remove_empty(created)
        raise
    _held[key] = _Held(fd, path, created=created)
    try:
        yield output_dir
    finally:
        held = _held.pop(key)
        if held.fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(held.path)
            os.close(held.fd)
        _remove_empty(held.created)


def _remove_empty(directories: list[Path]) -> None:
    for directory in directories:  # deepest first
        with contextlib.suppress(OSError):
            directory.rmdir()


# ---------------------------------------------------------------------------------------------------------------------
# Temporaries


def _tmp_prefix(output_dir: Path) -> str:
    return f".{output_dir.name}{_TMP_MARK}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # exists, owned by another user
    return True


def remove_stale_temporaries(output_dir: Path) -> None:
    """Remove temporaries left beside ``output_dir`` by runs that died (their pid, in the name, is gone)."""
    parent = output_dir.parent
    if not parent.is_dir():
        return
    pattern = re.compile(re.escape(_tmp_prefix(output_dir)) + r"(\d+)-")
    for entry in parent.iterdir():
        match = pattern.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # no /proc: read it the only portable way (not thread-safe, hence the fallback only)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output_dir(
    output_dir: str | os.PathLike, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces ``output_dir``, on error it is removed. The output
    is checked (`check_output_dir`) and locked (`output_lock`) for the duration.

    Example::

        with atomic_output_dir(out, overwrite=args.overwrite, inputs=[src]) as tmp:
            save_file(tensors, tmp / "model.safetensors")
    """
    with output_lock(output_dir) as output_dir:
        check_output_dir(output_dir, overwrite, inputs)
        remove_stale_temporaries(output_dir)
        prefix = f"{_tmp_prefix(output_dir)}{os.getpid()}-"
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=output_dir.parent))
        try:
            yield tmp
            for root, _, files in os.walk(tmp):
                for name in files:
                    with open(os.path.join(root, name), "rb+") as f:
                        os.fsync(f.fileno())
            os.chmod(tmp, 0o777 & ~_umask())
            if output_dir.exists():
                # Move the old directory aside first so that at every instant one complete version exists.
                old = Path(tempfile.mkdtemp(prefix=f"{prefix}old-", dir=output_dir.parent))
                os.rename(output_dir, old / "previous")
                os.rename(tmp, output_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, output_dir)
            _fsync_dir(output_dir.parent)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if err.filename is None and err.errno is not None:  # a failed write names no file: name the output
                raise OSError(err.errno, err.strerror or str(err), str(output_dir)) from None
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextlib.contextmanager
def claimed_output(
    output_dir: str | os.PathLike, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()
) -> Iterator[Path]:
    """What a command does first: check the output against the rules (before creating anything, so that an output
    inside an input never touches it), then hold its lock for the whole run (checked again under the lock)."""
    check_output_dir(output_dir, overwrite, inputs)
    with output_lock(output_dir) as locked:
        check_output_dir(output_dir, overwrite, inputs)
        yield locked
