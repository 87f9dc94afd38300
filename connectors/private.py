"""Files and folders that hold PHI: folders 0700, files 0600, whatever the process umask.

A folder this module creates (and each missing parent it creates on the way) is made 0700; a folder
that already exists is left as it is (it may be the operator's own, such as the working directory). A
file is created 0600, and a file we write again is set back to 0600.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Final, cast

__all__ = ["FILE_MODE", "FOLDER_MODE", "make_private_dir", "open_private", "private_file"]

FOLDER_MODE: Final = 0o700
FILE_MODE: Final = 0o600


def make_private_dir(path: Path) -> Path:
    """``path`` and its missing parents, each created 0700 (existing folders are not changed)."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=FOLDER_MODE)
        except FileExistsError:
            if not folder.is_dir():
                raise
            continue  # another process made it meanwhile: its mode is its own
        os.chmod(folder, FOLDER_MODE)  # mkdir's mode is masked by the umask
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a folder")
    return path


def private_file(path: Path) -> None:
    """Create ``path`` empty and 0600 when missing; an existing file is set to 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def open_private(path: Path, mode: str = "wb", buffering: int = -1) -> BinaryIO:
    """``path`` opened for binary writing (``"wb"`` truncates, ``"ab"`` appends), created 0600."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "ab" else os.O_TRUNC)
    if mode not in ("wb", "ab"):
        raise ValueError(f"open_private writes bytes only, not {mode!r}")
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        return cast(BinaryIO, os.fdopen(fd, mode, buffering=buffering))
    except BaseException:
        os.close(fd)
        raise
