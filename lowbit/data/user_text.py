"""A user's own text for calibration (``lowbit quantize --calib-data``) and evaluation (``lowbit eval --data``).

Three kinds of input:

* ``.jsonl`` (JSON Lines): one JSON object per line, its text under ``field`` (default ``"text"``); blank lines
  are skipped; the records are joined by a blank line. A ``field`` holding a conversation (a list of
  ``{"role": ..., "content": ...}`` messages, as chat datasets store them) makes the file a set of
  :class:`Conversations`, which the model's own chat template turns into text once its tokenizer is loaded
  (:meth:`Conversations.render`), so an instruction-tuned model is calibrated on text laid out as it was trained;
* a folder written by the ``datasets`` package's ``save_to_disk`` (``lowbit.data.saved_dataset``): its ``field``
  column, strings or conversations as in a ``.jsonl`` file, from one split of a ``DatasetDict``;
* any other file: UTF-8 plain text, used as it is.

Errors name the file and, where it applies, the line or byte: a missing path or a folder, a file that is not
UTF-8, an empty file (or one of whitespace only), a JSON line that is not an object or has no string
``field``, and a file larger than :data:`MAX_BYTES` (use a part of it). Too little text for one calibration
window or one evaluation window is refused by the consumer, with the token counts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit.data.saved_dataset import dataset_rows, is_saved_dataset
from lowbit.errors import InputError

MAX_BYTES = 512 * 2**20  # a calibration or evaluation set needs far less; a bigger file is likely the wrong one


@dataclass(frozen=True)
class Conversations:
    """Chat records of a ``.jsonl`` file: each a list of ``{"role", "content"}`` messages."""

    source: str
    chats: tuple[tuple[dict, ...], ...]

    def render(self, tokenizer: Any) -> str:
        """The conversations laid out by ``tokenizer``'s chat template, joined by a blank line. InputError when
        the tokenizer has none or refuses a conversation (naming which)."""
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise InputError(f"{self.source}: holds conversations (lists of role/content messages), and this model's "
                             f"tokenizer has no chat template to lay them out; give plain text instead")
        parts = []
        for i, chat in enumerate(self.chats, 1):
            try:
                parts.append(tokenizer.apply_chat_template(list(chat), tokenize=False))
            except Exception as e:  # noqa: BLE001 - a template can raise anything (jinja errors, missing roles)
                raise InputError(f"{self.source}, conversation {i}: the chat template refused it "
                                 f"({type(e).__name__}: {e})") from None
        return "\n\n".join(parts)


def read_text(path: str | os.PathLike, field: str = "text", split: str | None = None,
              prefer_splits: tuple[str, ...] = ()) -> str | Conversations:
    """The text of ``path``, or its :class:`Conversations` (see the module docstring); InputError naming what is
    wrong and where. ``split`` / ``prefer_splits``: which split of a saved ``DatasetDict`` (see
    :func:`lowbit.data.saved_dataset.dataset_rows`)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{p}: no such file; expected a UTF-8 text file, a .jsonl file of {{\"{field}\": ...}} "
                         f"records or a folder saved by datasets' save_to_disk")
    if is_saved_dataset(p):
        return _saved_dataset(p, field, split, prefer_splits)
    if not p.is_file():
        raise InputError(f"{p}: not a regular file, nor a folder saved by datasets' save_to_disk (no state.json or "
                         f"dataset_dict.json); expected a UTF-8 text file, a .jsonl file or such a folder")
    if split is not None:
        raise InputError(f"{p}: a split ({split!r}) is only meaningful for a datasets folder")
    size = p.stat().st_size
    if size > MAX_BYTES:
        raise InputError(f"{p}: {size / 2**20:.0f} MiB, more than the {MAX_BYTES // 2**20} MiB lowbit reads as text "
                         f"data; pass a part of it")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{p}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); convert it to "
                         f"UTF-8") from None
    if p.suffix.lower() == ".jsonl":
        text = _json_lines(p, text, field)
        if isinstance(text, Conversations):
            return text
    if not text.strip():
        raise InputError(f"{p}: holds no text" + (f" (no non-empty {field!r} field)" if p.suffix == ".jsonl" else ""))
    return text


def _saved_dataset(p: Path, field: str, split: str | None, prefer: tuple[str, ...]) -> str | Conversations:
    source, rows = dataset_rows(p, field, split, prefer)
    size = sum(f.stat().st_size for f in Path(source).glob("*.arrow"))
    if size > MAX_BYTES:
        raise InputError(f"{source}: {size / 2**20:.0f} MiB of data, more than the {MAX_BYTES // 2**20} MiB lowbit "
                         f"reads as text data; save a part of it (Dataset.select) and pass that")
    out = _records(source, rows, field, "column")
    if not out or (isinstance(out, str) and not out.strip()):
        raise InputError(f"{source}: holds no text in column {field!r}")
    return out


def _json_lines(p: Path, text: str, field: str) -> str | Conversations:
    def values():
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{p}, line {i}: not JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise InputError(f"{p}, line {i}: a JSON {type(record).__name__}, not an object with a {field!r} "
                                 f"field")
            if not isinstance(record.get(field), (str, list)):
                keys = ", ".join(sorted(record)[:8])
                raise InputError(f"{p}, line {i}: no string field {field!r} (keys: {keys or 'none'}); name the text "
                                 f"field with --calib-field / --data-field")
            yield f"line {i}", record[field]

    return _records(str(p), values(), field, "field")


def _records(source: str, values, field: str, what: str) -> str | Conversations:
    """Text records (joined by a blank line) or conversations, from ``(where, value)`` pairs; one kind only."""
    parts, chats = [], []
    for where, value in values:
        if isinstance(value, list):
            chats.append(_messages(source, where, field, value))
        elif isinstance(value, str):
            parts.append(value)
        else:
            shown = "null" if value is None else repr(value)[:40]
            raise InputError(f"{source}, {where}: {what} {field!r} holds {shown}, not text or a list of role/content "
                             f"messages")
        if parts and chats:
            raise InputError(f"{source}, {where}: mixes text and conversations in {field!r}; give one kind per file")
    if chats:
        return Conversations(source, tuple(chats))
    return "\n\n".join(parts)


def _messages(source: str, where: str, field: str, value: list) -> tuple[dict, ...]:
    """A conversation: a non-empty list of messages, each with string ``role`` and ``content``."""
    if not value:
        raise InputError(f"{source}, {where}: {field!r} is an empty conversation")
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InputError(f"{source}, {where}: message {j} of {field!r} is not a {{\"role\": str, \"content\": "
                             f"str}} object")
    return tuple({"role": m["role"], "content": m["content"]} for m in value)
