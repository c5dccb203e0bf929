"""The one rule for names read from inputs that become parts of paths, and the check that an output path stays
inside its output directory.

Adapter names (our manifest, optimum-neuron ``adapter_<name>`` directories), shard file names of index files,
relative paths of our manifest: every such name passes `check_safe_name` before it is joined to a path, so that
``..``, ``a/b``, an absolute path, a NUL byte or a hidden name can never make a command read or write elsewhere.
`check_inside` is the second line of defence, at the point where an output path is built. Torch-free.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from ..errors import CheckpointError

# Letters, digits, '_', '-', '.', not starting with '.' (so neither '.', '..' nor a hidden name), at most 255 bytes.
SAFE_NAME = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,254}")
SAFE_NAME_RULE = "letters, digits, '_', '-' and '.', not starting with '.', at most 255 characters"


class UnsafeNameError(CheckpointError):
    """A name read from an input would escape the directory it is joined to."""


def is_safe_name(name: object) -> bool:
    return isinstance(name, str) and SAFE_NAME.fullmatch(name) is not None


def check_safe_name(name: object, *, what: str, where: str | os.PathLike) -> str:
    """``name`` if it follows `SAFE_NAME_RULE`, else `UnsafeNameError` naming the file it was read from."""
    if not is_safe_name(name):
        raise UnsafeNameError(f"{where}: {what} {name!r} is not a safe file name (expected {SAFE_NAME_RULE})")
    return name  # type: ignore[return-value]


def check_safe_relative_path(path: object, *, what: str, where: str | os.PathLike) -> str:
    """A '/'-separated relative path whose every component is a safe name (manifest entries)."""
    if not isinstance(path, str) or not path:
        raise UnsafeNameError(f"{where}: {what} {path!r} is not a relative path (expected a non-empty string)")
    for part in PurePosixPath(path).parts if not path.startswith("/") else ["/"]:
        if not is_safe_name(part):
            raise UnsafeNameError(
                f"{where}: {what} {path!r} is not a safe relative path (each component: {SAFE_NAME_RULE})"
            )
    return path


def check_inside(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path`` if it resolves (symlinks followed) inside ``root``, else `UnsafeNameError`."""
    root_resolved = Path(root).resolve()
    resolved = Path(path).resolve()
    if resolved != root_resolved and root_resolved not in resolved.parents:
        raise UnsafeNameError(f"{path}: output path resolves to {resolved}, outside the output directory {root}")
    return Path(path)
