"""Atomic directory output: write everything into a temporary directory beside the target, then rename.

A process killed at any moment (even SIGKILL) leaves either the previous target untouched or the complete new one;
the only possible leftover is a hidden ``.<name>.tmp-*`` directory beside it, which the next run removes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import OptimumNeuronPeftError

_TMP_MARK = ".tmp-"


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a non-empty output directory unless ``overwrite``; refuse a path that is a file."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise OptimumNeuronPeftError(f"{output_dir}: expected a directory path for the output, found a file")
    if output_dir.exists() and not _is_empty_dir(output_dir) and not overwrite:
        raise OptimumNeuronPeftError(
            f"{output_dir}: output directory is not empty; pass --overwrite (overwrite=True) to replace it"
        )
    return output_dir


def remove_stale_temporaries(output_dir: Path) -> None:
    """Remove temporaries left beside ``output_dir`` by a run that was killed."""
    parent = output_dir.parent
    if not parent.is_dir():
        return
    prefix = f".{output_dir.name}{_TMP_MARK}"
    for entry in parent.iterdir():
        if entry.name.startswith(prefix) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces ``output_dir``, on error it is removed.

    Example::

        with atomic_output_dir(out, overwrite=args.overwrite) as tmp:
            save_file(tensors, tmp / "model.safetensors")
    """
    output_dir = check_output_dir(output_dir, overwrite).absolute()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}{_TMP_MARK}", dir=output_dir.parent))
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb+") as f:
                    os.fsync(f.fileno())
        if output_dir.exists():
            # Move the old directory aside first so that at every instant one complete version exists.
            old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}{_TMP_MARK}old-", dir=output_dir.parent))
            os.rename(output_dir, old / "previous")
            os.rename(tmp, output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, output_dir)
        _fsync_dir(output_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
