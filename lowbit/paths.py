"""Paths lowbit reads or writes, checked in one place before any work: UTF-8, what they are, writable.

Every path lowbit records (a model source in a manifest) or hands to safetensors and the tokenizers must be
valid UTF-8: a str holding surrogate escapes of undecodable bytes (what ``os.fsdecode`` makes of them) could
be written but never read back. Output paths are also checked for being writable *for real* (a folder is
created and removed: ``os.access`` answers yes to root on a read-only mount), for name lengths including
the temporary suffix of atomic writes, and for not lying inside what is being read.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from lowbit.errors import InputError

# where lowbit keeps files it builds once (an assembled model file, compiled kernels)
CACHE_ENV = "LOWBIT_CACHE"

# what an atomic write (lowbit.atomic) adds to a name: "." before it, ".lowbit-tmp-PID-RANDOM" after it
TMP_SUFFIX_BYTES = 1 + len(".lowbit-tmp-") + len(str(2**22)) + 1 + 8


def check_utf8(path: str | os.PathLike, what: str = "path") -> str:
    """``path`` as text, refused (InputError showing its bytes) when it is not valid UTF-8."""
    text = os.fsdecode(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = os.fsencode(text[e.start:e.end])
        raise InputError(f"{what} {os.fsencode(text)!r} is not valid UTF-8 (byte(s) {bad.hex(' ')}); lowbit, "
                         f"safetensors and the tokenizers handle UTF-8 paths only: rename it") from None
    return text


def cache_dir() -> Path:
    """Where lowbit keeps files it builds once: ``$LOWBIT_CACHE``, or ``~/.cache/lowbit``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lowbit").expanduser()


def output_path(path: str | os.PathLike) -> Path:
    """``path`` made absolute, refused when empty, not UTF-8, the file system's root or too long a name."""
    try:
        text = os.fsdecode(path)
    except TypeError:
        raise InputError(f"an output path must be a str or os.PathLike, got {type(path).__name__}") from None
    if not text:
        raise InputError("the output path is empty; give a path to write to")
    dest = Path(os.path.abspath(Path(text).expanduser()))
    check_utf8(dest, "output path")
    if dest.parent == dest:
        raise InputError(f"{dest} is the root of the file system; give a path for a new folder or file")
    _check_name_lengths(dest)
    return dest


def _check_name_lengths(dest: Path) -> None:
    """Each new path component must fit the file system's name limit, and ``dest``'s name with the temporary
    suffix the atomic write adds (else the write fails after all the work)."""
    anc = nearest_existing(dest.parent)
    try:
        limit = os.pathconf(anc, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    for part in dest.relative_to(anc).parts:
        need = len(os.fsencode(part)) + (TMP_SUFFIX_BYTES if part == dest.name else 0)
        if need > limit:
            raise InputError(f"{dest}: the name {part[:40]!r}... is {len(os.fsencode(part))} bytes; this file "
                             f"system allows {limit} per name, and lowbit first writes under a name "
                             f"{TMP_SUFFIX_BYTES} bytes longer: choose a shorter name")


def check_outside(dest: Path, src: Path) -> None:
    """Refuse writing to ``src`` (an input) or inside it: the output would replace or change what is read."""
    if not os.path.lexists(src):
        return
    real_dest, real_src = Path(os.path.realpath(dest)), Path(os.path.realpath(src))
    if real_dest == real_src or real_src in real_dest.parents:
        where = "is" if real_dest == real_src else "lies inside"
        raise InputError(f"{dest} {where} the input {src}; writing there would change what is being read: "
                         f"choose an output path outside it")


def check_writable(dest: Path) -> None:
    """The nearest existing folder above ``dest`` must be a folder in which lowbit can create one.

    Tried for real (a temporary folder made and removed): ``os.access`` answers yes to root on a read-only
    mount, and the write would then fail only after all the work.
    """
    anc = nearest_existing(dest.parent)
    if not anc.is_dir():
        raise InputError(f"{anc} is {kind(anc)}, so {dest} cannot be created under it; choose another path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lowbit-probe-", dir=anc))
    except OSError as e:
        raise InputError(f"cannot write to {dest}: creating a folder in {anc} failed ({e.strerror or e}); "
                         f"choose a folder you can write to") from None


def nearest_existing(p: Path) -> Path:
    while not os.path.lexists(p) and p.parent != p:
        p = p.parent
    return p


def kind(p: Path) -> str:
    """What ``p`` is, for messages: 'a file', 'a folder', 'a character device', 'a fifo', ..."""
    try:
        mode = os.stat(p).st_mode
    except OSError:
        return "not reachable"
    for test, name in ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a fifo (named pipe)"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"
