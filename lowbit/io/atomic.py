"""Atomic creation of an output folder: write everything aside, then rename it into place.

``atomic_folder(dest)`` yields an empty temporary folder that is a sibling of ``dest`` (same parent, so the
final rename never crosses a file system). When the ``with`` body finishes, every file in it is fsynced,
then the folder is renamed to ``dest``; an existing ``dest`` is first renamed aside and deleted only once
the new folder is in place. If anything raises, the temporary folder is removed and ``dest`` is left as it
was, so a reader sees either the old folder or the complete new one, never a half-written one.

The one window without ``dest`` lies between the two renames of a replacement (microseconds). A crash
exactly there leaves the old folder as ``.NAME.lowbit-old-*`` and the new one as ``.NAME.lowbit-tmp-*``
next to ``dest``, both complete; nothing is lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

TMP_TAG = ".lowbit-tmp-"
OLD_TAG = ".lowbit-old-"


@contextlib.contextmanager
def atomic_folder(dest: Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``dest``; on success it becomes ``dest`` (see module docstring).

    ``dest``'s parent must exist. Whether an existing ``dest`` may be replaced is the caller's decision,
    taken before calling (``save`` checks it); here an existing ``dest`` is always replaced.
    """
    dest = Path(dest)
    tmp = _fresh_sibling(dest, TMP_TAG)
    try:
        yield tmp
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
        _swap_in(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(dest.parent)


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's contents (for a folder: its entries) to disk."""
    if os.name == "nt" and os.path.isdir(path):  # Windows cannot open a folder for fsync; NTFS journals renames
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fresh_sibling(dest: Path, tag: str) -> Path:
    """Create and return an empty folder ``.NAME<tag><random>`` next to ``dest`` (mode from the umask)."""
    for _ in range(100):
        p = dest.parent / f".{dest.name}{tag}{secrets.token_hex(4)}"
        try:
            os.mkdir(p)
            return p
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary folder next to {dest}")


def _swap_in(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` to ``dest``, moving an existing ``dest`` aside first and deleting it afterwards."""
    if not os.path.lexists(dest):
        _rename(tmp, dest)
        return
    old = dest.parent / f".{dest.name}{OLD_TAG}{secrets.token_hex(4)}"
    _rename(dest, old)
    try:
        _rename(tmp, dest)
    except BaseException:
        try:
            _rename(old, dest)  # put the previous folder back before reporting the failure
        except OSError:
            log.error("could not move %s back to %s; the previous folder is intact there", old, dest)
            raise
        raise
    try:
        shutil.rmtree(old)
    except OSError as e:  # the new folder is in place; a leftover copy of the old one is only clutter
        log.warning("replaced %s but could not delete the previous copy %s: %s", dest, old, e)


def _rename(src: Path, dst: Path) -> None:
    """``os.rename`` (a separate function so tests can make one rename fail)."""
    os.rename(src, dst)
