"""The manifest of a saved artifact: what it holds, checked before anything else is read.

An artifact is a folder with two files::

    manifest.json        this description (UTF-8 JSON)
    model.safetensors    every tensor of the model's state, each distinct storage once

Manifest keys (format version 1; all present, no others):

==================  =============================================================================
format              ``"lowbit-quantized"``
format_version      ``1``
lowbit_version      the lowbit that wrote it
source              the model loader's source dict (``lowbit.models``), or null
plan                ``QuantPlan.to_dict()``, or null
extra               any JSON object the caller passed, or null
layers              module name -> ``lowbit.nn.convert.layer_record`` of each quantized module
shared_modules      other name -> layer name, for a quantized module registered under several names
tied_tensors        state key -> state key stored in the file, for tensors sharing one storage
files               file name -> ``{"bytes": int, "sha256": hex}`` for every file but the manifest
size                ``SizeReport.to_dict()`` of the saved model (counts, bytes, bits per weight)
==================  =============================================================================
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from lowbit.errors import CorruptFileError, InputError
from lowbit.nn.convert import check_layer_record

FORMAT = "lowbit-quantized"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
KEYS = ("format", "format_version", "lowbit_version", "source", "plan", "extra", "layers", "shared_modules",
        "tied_tensors", "files", "size")
# keys a manifest may leave out: float_storage = {"dtype": "float16" | "bfloat16", "tensors": [state keys]}, the
# float tensors written narrower than the model computes in (the source model's own dtype), widened by load
OPTIONAL_KEYS = ("float_storage",)
FLOAT_STORAGE_DTYPES = ("float16", "bfloat16")
_OPTIONAL_DICTS = ("source", "plan", "extra")  # a JSON object or null
_DICTS = ("layers", "shared_modules", "tied_tensors", "files", "size")
_HEX64 = re.compile(r"[0-9a-f]{64}")
# a manifest is a few hundred bytes per layer (and a model config); anything far larger is not one of ours,
# and reading it whole first would let a damaged file decide how much memory lowbit takes
MAX_MANIFEST_BYTES = 64 * 2**20


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The checked manifest of the artifact folder ``path`` (files are not hashed; see ``verify_files``).

    Raises:
        InputError: ``path`` does not exist or is not a folder, or the artifact needs a newer lowbit.
        CorruptFileError: no ``manifest.json`` (not a lowbit artifact), invalid JSON, wrong ``format``,
            missing or unknown keys, or values of the wrong type.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise InputError(f"{folder}: no such folder; pass the folder written by lowbit.save / lowbit quantize")
    if not folder.is_dir():
        hint = " (pass the folder that holds it)" if folder.name in (MANIFEST, WEIGHTS) else ""
        raise InputError(f"{folder}: is a file, not a lowbit artifact folder{hint}")
    mpath = folder / MANIFEST
    if not os.path.lexists(mpath):
        raise CorruptFileError(f"{folder}: not a lowbit artifact (no {MANIFEST}); was it written by lowbit.save?")
    check_plain_file(mpath)
    if mpath.stat().st_size > MAX_MANIFEST_BYTES:
        raise CorruptFileError(f"{mpath}: {mpath.stat().st_size} bytes, more than a manifest can be "
                               f"({MAX_MANIFEST_BYTES}); not a lowbit manifest")
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{mpath}: not valid JSON ({e}); the artifact is damaged, save it again") from None
    except RecursionError:
        raise CorruptFileError(f"{mpath}: JSON nested too deeply to be a lowbit manifest; the file is damaged") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise CorruptFileError(f"{mpath}: format is {got!r}, expected {FORMAT!r}; not a lowbit artifact")
    version = m.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CorruptFileError(f"{mpath}: format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise InputError(
            f"{mpath}: format_version {version} was written by lowbit {m.get('lowbit_version', '?')}; this "
            f"lowbit reads version {FORMAT_VERSION}; upgrade lowbit to load it"
        )
    _check_keys(m, mpath)
    return m


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Check that every file the manifest lists exists with the recorded size and SHA-256.

    Raises CorruptFileError naming the file and what differs.
    """
    for name, entry in manifest["files"].items():
        f = folder / name
        if not os.path.lexists(f):
            raise CorruptFileError(f"{f}: listed in {MANIFEST} but missing; the artifact is incomplete")
        check_plain_file(f)
        size = f.stat().st_size
        if size != entry["bytes"]:
            what = "truncated" if size < entry["bytes"] else "longer than recorded"
            raise CorruptFileError(f"{f}: {what}: {size} bytes, {MANIFEST} records {entry['bytes']}")
        digest = file_sha256(f)
        if digest != entry["sha256"]:
            raise CorruptFileError(
                f"{f}: SHA-256 {digest} differs from {entry['sha256']} recorded in {MANIFEST}; the file was "
                f"modified or damaged after saving"
            )


def check_plain_file(path: Path) -> None:
    """Raise CorruptFileError unless ``path`` is a regular file itself: not a symbolic link (which could
    point anywhere outside the folder), a device, a fifo or a folder. lowbit.save writes only regular files."""
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        raise CorruptFileError(f"{path}: is a symbolic link (to {os.readlink(path)!r}); an artifact holds the files "
                               f"themselves: copy the real file into the folder")
    if not stat.S_ISREG(st.st_mode):
        raise CorruptFileError(f"{path}: not a regular file; the artifact is damaged")


def file_entry(path: Path) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex}`` of a file, as listed under ``files``."""
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_artifact(folder: Path) -> bool:
    """True when ``folder`` holds a manifest that ``read_manifest`` accepts."""
    try:
        read_manifest(folder)
    except InputError:
        return False
    return True


def _check_keys(m: dict[str, Any], mpath: Path) -> None:
    missing = [k for k in KEYS if k not in m]
    unknown = sorted(set(m) - set(KEYS) - set(OPTIONAL_KEYS))
    if missing or unknown:
        raise CorruptFileError(
            f"{mpath}: format_version {m['format_version']} manifest has missing key(s) {missing} and unknown "
            f"key(s) {unknown}; expected exactly {', '.join(KEYS)} (and optionally {', '.join(OPTIONAL_KEYS)})"
        )
    if "float_storage" in m:
        fs = m["float_storage"]
        ok = (isinstance(fs, dict) and set(fs) == {"dtype", "tensors"} and fs["dtype"] in FLOAT_STORAGE_DTYPES
              and isinstance(fs["tensors"], list) and all(isinstance(t, str) for t in fs["tensors"]))
        if not ok:
            raise CorruptFileError(f"{mpath}: float_storage must be {{'dtype': one of {FLOAT_STORAGE_DTYPES}, "
                                   f"'tensors': [names]}}, got {fs!r}")
    for k in _OPTIONAL_DICTS:
        if m[k] is not None and not isinstance(m[k], dict):
            raise CorruptFileError(f"{mpath}: {k!r} must be a JSON object or null, got {type(m[k]).__name__}")
    for k in _DICTS:
        if not isinstance(m[k], dict):
            raise CorruptFileError(f"{mpath}: {k!r} must be a JSON object, got {type(m[k]).__name__}")
    for k in ("shared_modules", "tied_tensors"):
        if not all(isinstance(v, str) for v in m[k].values()):
            raise CorruptFileError(f"{mpath}: {k!r} must map names to names")
    for name, rec in m["layers"].items():
        try:
            check_layer_record(rec)
        except InputError as e:
            raise CorruptFileError(f"{mpath}: layer {name!r} has a bad record ({e})") from None
    stray = sorted(a for a, first in m["shared_modules"].items() if first not in m["layers"] or a in m["layers"])
    if stray:
        raise CorruptFileError(f"{mpath}: shared_modules {stray} do not point from a new name to a recorded layer")
    if WEIGHTS not in m["files"]:
        raise CorruptFileError(f"{mpath}: 'files' does not list {WEIGHTS}")
    for name, entry in m["files"].items():
        if name in ("", ".", "..", MANIFEST) or "/" in name or "\\" in name:
            raise CorruptFileError(f"{mpath}: 'files' lists {name!r}, which is not a plain file name of the folder")
        ok = (isinstance(entry, dict) and set(entry) == {"bytes", "sha256"} and isinstance(entry["bytes"], int)
              and not isinstance(entry["bytes"], bool) and entry["bytes"] >= 0
              and isinstance(entry["sha256"], str) and _HEX64.fullmatch(entry["sha256"]) is not None)
        if not ok:
            raise CorruptFileError(f"{mpath}: files[{name!r}] must be {{'bytes': int, 'sha256': 64 hex digits}}, "
                                   f"got {entry!r}")


def artifact_size(path: str | os.PathLike) -> int:
    """Bytes of all files in a saved artifact folder (file sizes, manifest included)."""
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder; pass a folder written by lowbit.save")
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
