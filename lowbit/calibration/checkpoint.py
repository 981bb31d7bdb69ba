"""Resumable block-sequential calibration: the quantized modules of each finished block, kept on disk.

A checkpoint is a folder::

    index.json              {"format", "version", "key", "blocks": [{"name", "file", "bytes", "sha256"}, ...]}
    block-00000.safetensors the quantized modules of block 0: their state under names relative to the block,
                            and their ``layer_record``s as JSON in the one metadata key ``layers``
    ...

The ``key`` is a SHA-256 over everything the result depends on (``lowbit.calibration.fingerprint``):
lowbit's and torch's versions, the plan, the calibration data and the model's float state; the index keeps
those digests too, so a warning can say which differ. A folder whose key differs was made by another run
and is emptied (with that warning); a folder holding files lowbit does not write is refused, and never
emptied. Each block file and then the index are written atomically (temporary name, fsync, rename), so a
kill leaves at worst a file the index does not list, which is deleted on the next open.

Nothing stored is trusted: on open every listed file's size and SHA-256 is checked, and again (on the
bytes actually read) when a block is restored, together with its layer records (known module kinds,
every module the plan quantizes in that block and no other, shapes fitting the float modules, a state that
loads strictly). Blocks are reused as a prefix: from the first block that fails a check (warned about),
every later block is discarded and computed again, since its inputs came from the blocks before it.

The command line keeps the checkpoint of ``--out DIR`` next to it (:func:`resume_folder`) and deletes it
once the artifact is saved (:func:`resume_scope`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.atomic import atomic_file
from lowbit.errors import InputError
from lowbit.nn.base import QuantModule
from lowbit.nn.convert import float_weight, from_layer_record, is_quantizable, layer_record
from lowbit.nn.state import for_safetensors

log = logging.getLogger(__name__)

FORMAT, VERSION = "lowbit-block-checkpoint", 1
INDEX = "index.json"
_OURS = re.compile(r"\.?(index\.json|block-\d{5}\.safetensors)(\.lowbit-tmp-\d+-[0-9a-f]{8})?")


def resume_folder(out: str | os.PathLike) -> Path:
    """The command line's checkpoint folder for the artifact ``out``: its sibling ``.NAME.lowbit-resume``."""
    dest = Path(os.path.abspath(Path(out).expanduser()))
    return dest.parent / f".{dest.name}.lowbit-resume"


class BlockCheckpoint:
    """The finished blocks of one calibration run, in ``folder``; see the module docstring.

    Args:
        folder: created when the first block is saved.
        parts: the run's fingerprint (``lowbit.calibration.fingerprint.run_key``); their SHA-256 is the key.
        layout: per block in order, ``(block name, full names of the modules the plan quantizes in it)``.
    Raises:
        InputError: ``folder`` is a file, or a folder holding files lowbit does not write.
    """

    def __init__(self, folder: str | os.PathLike, parts: dict[str, Any], layout: list[tuple[str, list[str]]]) -> None:
        self.folder, self.parts, self.layout = Path(folder), parts, layout
        self.key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        self.entries: list[dict[str, Any]] = []  # the index's blocks, a verified prefix
        index = self._read_index()
        if index is not None and index.get("key") != self.key:
            old = index.get("parts") if isinstance(index.get("parts"), dict) else {}
            what = [k for k in parts if old.get(k) != parts[k]] or ["its key"]
            log.warning("discarding the checkpoint in %s: it was made by another run (%s differ)",
                        self.folder, ", ".join(what))
            index = None
        if index is not None:
            self.entries = self._verified_prefix(index.get("blocks"))
        self._remove_unlisted()
        if self.entries:
            log.info("resuming from %d finished block(s) in %s", len(self.entries), self.folder)

    def restore(self, i: int, block: nn.Module) -> dict[str, QuantModule] | None:
        """The verified quantized modules of block ``i`` by full name, or None to compute the block."""
        if i >= len(self.entries):
            return None
        entry = self.entries[i]
        try:
            data = _read_verified(self.folder / entry["file"], entry)
            modules = self._modules(i, data, block)
        except InputError as e:
            log.warning("discarding block %d and later ones of the checkpoint in %s: %s", i, self.folder, e)
            self._truncate(i)
            return None
        return modules

    def save(self, i: int, block: nn.Module) -> None:
        """Write block ``i``'s quantized modules (swapped into ``block``) as one file, then list it."""
        import safetensors.torch

        if i != len(self.entries):
            raise ValueError(f"block {i} saved after {len(self.entries)} block(s): blocks are saved in order")
        name, full = self.layout[i]
        rel = {n: n[len(name) + 1:] for n in full}  # full name -> name inside the block
        tensors, records = {}, {}
        for n, r in rel.items():
            qm = block.get_submodule(r)
            records[r] = layer_record(qm)
            tensors.update({f"{r}.{k}": t for k, t in qm.state_dict().items()})
        # one metadata key: safetensors writes them from a hash map, in no fixed order
        data = safetensors.torch.save(for_safetensors(tensors), metadata={"layers": json.dumps(records)})
        self.folder.mkdir(parents=True, exist_ok=True)
        file = f"block-{i:05d}.safetensors"
        _write(self.folder / file, data)
        self.entries.append({"name": name, "file": file, "bytes": len(data),
                             "sha256": hashlib.sha256(data).hexdigest()})
        index = {"format": FORMAT, "version": VERSION, "key": self.key, "parts": self.parts,
                 "blocks": self.entries}
        _write(self.folder / INDEX, (json.dumps(index, indent=1) + "\n").encode())

    # ---- helpers ---------------------------------------------------------------------------------------

    def _read_index(self) -> dict[str, Any] | None:
        if not self.folder.exists() and not self.folder.is_symlink():
            return None
        if self.folder.is_symlink() or not self.folder.is_dir():
            raise InputError(f"checkpoint folder {self.folder} is not a folder; pass a new or empty folder path")
        foreign = _foreign(self.folder)
        if foreign:
            raise InputError(f"checkpoint folder {self.folder} holds files lowbit did not write "
                             f"({', '.join(foreign[:5])}); pass a new or empty folder, or move them away")
        try:
            index = json.loads((self.folder / INDEX).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            if (self.folder / INDEX).exists():
                log.warning("discarding the checkpoint in %s: unreadable %s (%s)", self.folder, INDEX, e)
            return None
        if not isinstance(index, dict) or (index.get("format"), index.get("version")) != (FORMAT, VERSION):
            log.warning("discarding the checkpoint in %s: %s is not a version-%d lowbit index", self.folder,
                        INDEX, VERSION)
            return None
        return index

    def _verified_prefix(self, blocks: Any) -> list[dict[str, Any]]:
        """The listed blocks up to the first one that is missing, out of place, changed or truncated."""
        good: list[dict[str, Any]] = []
        for i, entry in enumerate(blocks if isinstance(blocks, list) else []):
            try:
                if not isinstance(entry, dict) or i >= len(self.layout) or entry.get("name") != self.layout[i][0] \
                        or entry.get("file") != f"block-{i:05d}.safetensors":
                    raise InputError(f"entry {i} of {INDEX} does not list block {i} of this model")
                _read_verified(self.folder / entry["file"], entry)
            except InputError as e:
                log.warning("discarding block %d and later ones of the checkpoint in %s: %s", i, self.folder, e)
                break
            good.append({k: entry[k] for k in ("name", "file", "bytes", "sha256")})
        return good

    def _modules(self, i: int, data: bytes, block: nn.Module) -> dict[str, QuantModule]:
        """Block ``i``'s quantized modules rebuilt from a verified file's bytes, checked against ``block``."""
        import safetensors
        import safetensors.torch

        name, full = self.layout[i]
        file = self.folder / self.entries[i]["file"]
        try:
            state = safetensors.torch.load(data)
            records = json.loads(_metadata(data).get("layers", "null"))
        except (safetensors.SafetensorError, ValueError, TypeError) as e:
            raise InputError(f"{file} is not a readable block file ({e})") from None
        want = sorted(n[len(name) + 1:] for n in full)
        if not isinstance(records, dict) or sorted(records) != want:
            got = sorted(records) if isinstance(records, dict) else records
            raise InputError(f"{file} holds modules {got} but the plan quantizes {want} in {name}")
        out = {f"{name}.{r}": _module(r, rec, state, block.get_submodule(r)) for r, rec in records.items()}
        claimed = sum(len(qm.state_dict()) for qm in out.values())
        if claimed != len(state):
            raise InputError(f"{file} holds {len(state)} tensors, its modules {claimed}")
        return out

    def _truncate(self, i: int) -> None:
        """Forget blocks ``i`` and later, and delete their files."""
        for entry in self.entries[i:]:
            (self.folder / entry["file"]).unlink(missing_ok=True)
        del self.entries[i:]

    def _remove_unlisted(self) -> None:
        """Delete our files the index does not list (another run's, or a killed write's temporary ones)."""
        if not self.folder.is_dir():
            return
        listed = {INDEX, *(e["file"] for e in self.entries)} if self.entries else set()
        for p in self.folder.iterdir():
            if p.name not in listed:
                p.unlink()


def _module(rel: str, rec: Any, state: dict[str, torch.Tensor], target: nn.Module) -> QuantModule:
    """The quantized module ``rec`` describes, loaded with its tensors from ``state``, fitting ``target``."""
    try:
        qm = from_layer_record(rec)
    except (InputError, KeyError, TypeError, ValueError) as e:
        raise InputError(f"module {rel!r} has a bad layer record ({e})") from None
    shape = tuple(float_weight(target).shape) if is_quantizable(target) else None
    if shape != qm.weight_shape:
        raise InputError(f"module {rel!r}: stored {type(qm).__name__} {qm.weight_shape} does not fit the "
                         f"model's {type(target).__name__} (weight {shape})")
    own = {k[len(rel) + 1:]: t for k, t in state.items() if k.startswith(rel + ".")}
    try:
        qm.load_state_dict(own, strict=True, assign=True)  # assign: keep the stored dtypes exactly
    except RuntimeError as e:
        raise InputError(f"module {rel!r}: the stored state does not fit ({e})") from None
    return qm.train(target.training)


def remove_checkpoint(folder: str | os.PathLike) -> bool:
    """Delete the checkpoint ``folder`` if it holds only lowbit's files (else warn); True if it was deleted."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return False
    foreign = _foreign(folder)
    if foreign:
        log.warning("not deleting %s: it holds files lowbit did not write (%s)", folder, ", ".join(foreign[:5]))
        return False
    shutil.rmtree(folder)
    return True


@contextlib.contextmanager
def resume_scope(folder: Path, fresh: bool = False) -> Iterator[Path]:
    """The life of the checkpoint ``folder`` of one run that ends in a saved artifact; yields ``folder``.

    ``fresh``: an existing checkpoint is deleted first (``--no-resume``). When the body returns (the artifact
    is saved) the folder is deleted. When it raises an InputError, the folder is deleted too if this run
    created it: bad input leaves nothing behind. On anything else (Ctrl-C, out of memory) it is kept, with
    a warning saying where; a kill runs no code at all, so it is kept then as well.
    """
    if fresh and remove_checkpoint(folder):
        log.info("deleted the checkpoint %s: starting over", folder)
    created = not os.path.lexists(folder)
    try:
        yield folder
    except InputError:
        if created:
            remove_checkpoint(folder)
        elif folder.is_dir():
            log.info("the checkpoint of an earlier run is kept in %s", folder)
        raise
    except BaseException:
        if folder.is_dir():
            log.warning("the finished blocks are kept in %s: the same command resumes from them "
                        "(--no-resume starts over)", folder)
        raise
    remove_checkpoint(folder)


def _foreign(folder: Path) -> list[str]:
    """The names in ``folder`` that are not files lowbit writes in a checkpoint."""
    return sorted(p.name for p in folder.iterdir()
                  if not (_OURS.fullmatch(p.name) and p.is_file() and not p.is_symlink()))


def _read_verified(path: Path, entry: dict[str, Any]) -> bytes:
    """The bytes of ``path`` if their size and SHA-256 are the ones ``entry`` lists."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {path} ({e.strerror or e})") from None
    if len(data) != entry.get("bytes"):
        raise InputError(f"{path} has {len(data)} bytes, the index lists {entry.get('bytes')}")
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise InputError(f"{path}'s SHA-256 differs from the one in the index (changed or damaged)")
    return data


def _metadata(data: bytes) -> dict[str, Any]:
    """A safetensors file's ``__metadata__``: the JSON header follows its own length (8 bytes, little end)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def _write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary name, fsync, rename)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
