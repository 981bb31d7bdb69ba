"""Atomic creation of an output folder or file: write everything aside, then rename it into place.

``atomic_folder(dest)`` yields an empty temporary folder that is a sibling of ``dest`` (same parent, so the
final rename never crosses a file system). When the ``with`` body finishes, every file in it is given the
mode a plain ``open()`` gives under the current umask and fsynced, then the folder is renamed to ``dest``;
an existing ``dest`` is first renamed aside and deleted only once the new folder is in place. If anything
raises, the temporary folder (and any parent folder created for ``dest``) is removed and ``dest`` is left as
it was, so a reader sees either the old folder or the complete new one, never a half-written one.
``atomic_file(dest)`` does the same for one file (exports): it yields a temporary path to write.

An ``OSError`` while writing (a read-only file system, a full disk) becomes an :class:`InputError` naming
``dest`` and the system's reason: the output location is part of the user's input.

Temporary names carry the writer's process id: ``.NAME.lowbit-tmp-PID-RANDOM`` (and ``.NAME.lowbit-old-PID-RANDOM``
for a folder being replaced). A save killed midway leaves them behind; the next write to the same ``dest``
removes those whose writer no longer runs and logs what it removed. The one window without ``dest`` lies
between the two renames of a replacement (microseconds); a crash exactly there leaves the old folder as
``.NAME.lowbit-old-*``, which is then kept (it is the only copy) and reported, not removed.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Iterator

from lowbit.errors import InputError

log = logging.getLogger(__name__)

TMP_TAG = ".lowbit-tmp-"
OLD_TAG = ".lowbit-old-"
_OWNED = re.compile(r"(\d+)-[0-9a-f]{8}")  # what follows a tag: the writer's PID, a random part


@contextlib.contextmanager
def atomic_folder(dest: Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``dest``; on success it becomes ``dest`` (see module docstring).

    Missing parents of ``dest`` are created (and removed again on failure). Whether an existing ``dest``
    may be replaced is the caller's decision, taken before calling (``save`` checks it); here an existing
    ``dest`` is always replaced.
    Raises:
        InputError: an ``OSError`` while creating, writing or renaming (names ``dest`` and the reason).
    """
    dest = Path(dest)
    with _written(dest) as created:
        tmp = _fresh_sibling(dest, TMP_TAG)
        created.append(tmp)
        yield tmp
        mode = plain_file_mode()
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, mode)  # some writers (safetensors) create their files 0600 whatever the umask
            fsync_path(f)
        fsync_path(tmp)
        _swap_in(tmp, dest)
        created.remove(tmp)
    fsync_path(dest.parent)


@contextlib.contextmanager
def atomic_file(dest: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``dest`` (not created) to write one file; on success it replaces
    ``dest`` with the mode a plain ``open()`` gives. On failure it is removed and ``dest`` is untouched.

    Raises:
        InputError: an ``OSError`` while writing or renaming (names ``dest`` and the reason).
    """
    dest = Path(dest)
    with _written(dest) as created:
        tmp = dest.parent / f".{dest.name}{TMP_TAG}{_token()}"
        created.append(tmp)
        yield tmp
        os.chmod(tmp, plain_file_mode())
        fsync_path(tmp)
        os.replace(tmp, dest)
        created.remove(tmp)
    fsync_path(dest.parent)


@contextlib.contextmanager
def _written(dest: Path) -> Iterator[list[Path]]:
    """Create ``dest``'s missing parents and clear dead writers' leftovers; yield the list of paths made so
    far (callers add their temporary path). On failure remove them, newest first, and turn an OSError into
    an InputError."""
    created: list[Path] = []
    try:
        remove_stale(dest)
        created += _make_parents(dest.parent)
        yield created
    except BaseException as e:
        for p in reversed(created):
            _remove(p)
        if isinstance(e, OSError):
            raise write_error(dest, e) from e
        raise


def write_error(dest: Path, e: OSError) -> InputError:
    """The InputError for an OSError met while writing ``dest``: the path, the system's reason, the fix."""
    reason = e.strerror or str(e) or type(e).__name__
    return InputError(f"could not write {dest}: {reason}; nothing was written there. Choose a folder you can "
                      f"write to, with enough free space")


def plain_file_mode() -> int:
    """The permission bits a plain ``open(path, "w")`` gives a new file: ``0o666`` less the umask."""
    return 0o666 & ~_umask()


def _umask() -> int:
    # Linux reports the umask in /proc without changing it; elsewhere set it and put it straight back
    # (os.umask is the only portable way to read it)
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            return int(next(ln for ln in f if ln.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's contents (for a folder: its entries) to disk."""
    if os.name == "nt" and os.path.isdir(path):  # Windows cannot open a folder for fsync; NTFS journals renames
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- leftovers of killed writers ---------------------------------------------------------------------------


def remove_stale(dest: Path) -> list[Path]:
    """Remove the temporary siblings of ``dest`` whose writer process no longer runs; return them.

    A set-aside old folder is kept when ``dest`` is missing: the writer died between its two renames, so
    that folder is the only copy of the previous artifact (a warning says where it is).
    """
    removed = []
    for p, pid, tag in _leftovers(dest):
        if process_alive(pid):
            continue
        if tag == OLD_TAG and not os.path.lexists(dest):
            log.warning("%s is the previous %s, set aside by a save (process %d) that was killed before "
                        "finishing; lowbit keeps it: rename it back or delete it", p, dest.name, pid)
            continue
        _remove(p)
        removed.append(p)
        log.warning("removed %s, left by an interrupted lowbit save (process %d no longer runs)", p, pid)
    return removed


def _leftovers(dest: Path) -> Iterator[tuple[Path, int, str]]:
    """(path, writer PID, tag) of every temporary sibling of ``dest`` whose name records a PID."""
    for tag in (TMP_TAG, OLD_TAG):
        prefix = f".{dest.name}{tag}"
        for name in glob.glob(glob.escape(prefix) + "*", root_dir=dest.parent):
            m = _OWNED.fullmatch(name[len(prefix):])
            if m:
                yield dest.parent / name, int(m.group(1)), tag


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (or may run: when in doubt, a leftover is kept)."""
    if pid == os.getpid() or os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to another user, or cannot be asked
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


# ---- helpers -----------------------------------------------------------------------------------------------


def _token() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents (mode from the umask); return those created, outermost first."""
    missing = []
    while not os.path.lexists(folder) and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    created = []
    try:
        for p in reversed(missing):
            os.mkdir(p)
            created.append(p)
    except BaseException:
        for p in reversed(created):
            _remove(p)
        raise
    return created


def _fresh_sibling(dest: Path, tag: str) -> Path:
    """Create and return an empty folder ``.NAME<tag><pid>-<random>`` next to ``dest`` (mode from the umask)."""
    for _ in range(100):
        p = dest.parent / f".{dest.name}{tag}{_token()}"
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
    old = dest.parent / f".{dest.name}{OLD_TAG}{_token()}"
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
