"""A Hugging Face ``datasets`` folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, read as text.

Such a folder holds ``state.json`` (its Arrow shards, ``data-0000K-of-0000N.arrow``, in the Arrow streaming format)
or, for a ``DatasetDict``, ``dataset_dict.json`` naming one such folder per split. lowbit reads the shards with
``pyarrow`` alone (the ``datasets`` package is not needed to read them) and takes one column: strings are joined
by a blank line, like the records of a ``.jsonl`` file; lists of ``{"role", "content"}`` messages are
conversations, laid out later by the model's chat template.

A ``DatasetDict`` needs a split: the one given, else the first of ``prefer`` that it has (calibration prefers
``train``, evaluation ``test`` then ``validation``), else its only split. Errors name the folder and what is
wrong: no ``state.json``, a missing or unreadable shard, an unknown split or column, a null or non-text value
(with its row), no text at all.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

from lowbit.errors import InputError

log = logging.getLogger(__name__)

STATE = "state.json"
DICT = "dataset_dict.json"


def is_saved_dataset(path: str | Path) -> bool:
    """True for a folder that ``save_to_disk`` wrote (a ``Dataset`` or a ``DatasetDict``)."""
    p = Path(path).expanduser()
    return p.is_dir() and ((p / STATE).is_file() or (p / DICT).is_file())


def dataset_rows(path: str | Path, field: str, split: str | None = None,
                 prefer: tuple[str, ...] = ()) -> tuple[str, Iterator[tuple[str, Any]]]:
    """(a description of the folder and split, an iterator of ``("row N", value)`` for column ``field``)."""
    folder = Path(path).expanduser()
    if (folder / DICT).is_file():
        folder = _split_folder(folder, split, prefer)
    elif split is not None:
        raise InputError(f"{folder}: a single dataset (no {DICT}), so it has no split {split!r}; leave the split out")
    if not (folder / STATE).is_file():
        raise InputError(f"{folder}: no {STATE}; expected a folder written by datasets' save_to_disk")
    shards = _shards(folder)
    try:
        import pyarrow as pa
        import pyarrow.ipc as ipc
    except ImportError:
        raise InputError(f"{folder}: reading a datasets folder needs pyarrow (pip install pyarrow)") from None

    def rows() -> Iterator[tuple[str, Any]]:
        n = 0
        for shard in shards:
            try:
                with pa.memory_map(str(shard)) as f:
                    table = ipc.open_stream(f).read_all()
            except (pa.ArrowException, OSError) as e:
                raise InputError(f"{shard}: not a readable Arrow shard ({type(e).__name__}: {e})") from None
            if field not in table.column_names:
                raise InputError(f"{folder}: no column {field!r} (columns: {', '.join(table.column_names)}); name the "
                                 f"text column with --calib-field / --data-field")
            for value in table.column(field).to_pylist():
                yield f"row {n}", value
                n += 1

    return str(folder), rows()


def _split_folder(folder: Path, split: str | None, prefer: tuple[str, ...]) -> Path:
    try:
        splits = json.loads((folder / DICT).read_text(encoding="utf-8"))["splits"]
        if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
            raise TypeError("splits is not a list of names")
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{folder / DICT}: not a datasets split list ({type(e).__name__}: {e})") from None
    if split is None:
        split = next((s for s in prefer if s in splits), splits[0] if len(splits) == 1 else None)
        if split is None:
            raise InputError(f"{folder}: a dataset with splits {', '.join(splits)}; choose one with --calib-split / "
                             f"--data-split")
        log.info("%s: using split %r of %s", folder, split, ", ".join(splits))
    if split not in splits:
        raise InputError(f"{folder}: no split {split!r} (splits: {', '.join(splits)})")
    return folder / split


def _shards(folder: Path) -> list[Path]:
    try:
        state = json.loads((folder / STATE).read_text(encoding="utf-8"))
        names = [d["filename"] for d in state["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{folder / STATE}: not a datasets state file ({type(e).__name__}: {e})") from None
    if not names:
        raise InputError(f"{folder}: its {STATE} lists no data files")
    shards = [folder / n for n in names]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise InputError(f"{folder}: data file(s) {', '.join(missing)} listed in {STATE} are missing")
    return shards
