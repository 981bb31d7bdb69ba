"""The undo store of ``quantize()``: the float modules it replaced, so that a failure can put them all back.

Block by block, the float weights of a finished block are needed only for that undo, and holding them
would keep a second copy of the model in memory until the end (peak = float model + quantized model +
activations). :meth:`UndoStore.offload` therefore writes them to a temporary safetensors file and empties
them in place; :meth:`UndoStore.restore` reads them back. Tensors the model still uses (a tied embedding)
stay in memory. When the temporary directory (``TMPDIR``) cannot be written, the weights stay in memory,
with a warning.

The files live in a ``lowbit-undo-*`` folder of the temporary directory, deleted by :meth:`UndoStore.close`.
A process killed with SIGKILL cannot delete it (726 MB for Gemma-3-270M), so the folder holds an ``owner``
file naming its process and host; before creating its own folder, a store deletes (and logs) every
``lowbit-undo-*`` folder of this user whose owner process on this host is gone. Folders without an
``owner`` file, of another user or another host are left alone. (A dead owner's process id reused by a
live process keeps its folder until that process ends too: the safe side.)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

import torch
from torch import nn

from lowbit.atomic import process_alive

log = logging.getLogger(__name__)

PREFIX = "lowbit-undo-"
OWNER = "owner"  # {"pid": ..., "host": ...} of the process that created the folder

# (file key, module, attribute, is a parameter, dtype, device) of one offloaded tensor
_Slot = tuple[str, nn.Module, str, bool, torch.dtype, torch.device]


class UndoStore:
    """The float modules replaced in ``model``, by name; see the module docstring."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules: dict[str, nn.Module] = {}
        self.files: list[tuple[Path, list[_Slot]]] = []
        self._dir: Path | None = None
        self._disabled = False

    def keep(self, name: str, module: nn.Module) -> None:
        """Remember ``module``, about to be replaced at ``name`` (the first one given for a name wins)."""
        self.modules.setdefault(name, module)

    def offload(self, names: list[str], tag: str) -> None:
        """Move the float tensors of the kept modules ``names`` to the file ``TAG.safetensors``."""
        if self._disabled or not names:
            return
        from safetensors.torch import save_file

        live = {t.data_ptr() for t in (*self.model.parameters(), *self.model.buffers())}
        tensors, slots = {}, []
        for name in names:
            module = self.modules[name]
            for kind, table in (("p", module._parameters), ("b", module._buffers)):
                for key, t in table.items():
                    if t is None or t.numel() == 0 or t.data_ptr() in live:
                        continue
                    tensors[f"{name}.{key}"] = t.detach().cpu().contiguous()
                    slots.append((f"{name}.{key}", module, key, kind == "p", t.dtype, t.device))
        if not tensors:
            return
        try:
            if self._dir is None:
                self._dir = _new_folder()
            path = self._dir / f"{tag}.safetensors"
            save_file(tensors, str(path))
        except OSError as e:
            log.warning("cannot write the float weights to a temporary file (%s); they stay in memory until "
                        "quantize() returns", e)
            self._disabled = True
            return
        for _, module, key, is_param, dtype, device in slots:
            empty = torch.empty(0, dtype=dtype, device=device)
            if is_param:
                module._parameters[key].data = empty
            else:
                module._buffers[key] = empty
        self.files.append((path, slots))

    def restore(self) -> None:
        """Read every offloaded tensor back and put every kept module back in its place."""
        from safetensors import safe_open

        for path, slots in self.files:
            with safe_open(str(path), framework="pt") as f:
                for k, module, key, is_param, dtype, device in slots:
                    t = f.get_tensor(k).to(device=device, dtype=dtype)
                    if is_param:
                        module._parameters[key].data = t
                    else:
                        module._buffers[key] = t
        for name, module in reversed(list(self.modules.items())):
            self.model.set_submodule(name, module)

    def close(self) -> None:
        """Delete the temporary folder (after ``restore``, or when the float weights are no longer wanted)."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __len__(self) -> int:
        return len(self.modules)


def _new_folder() -> Path:
    """A fresh ``lowbit-undo-*`` folder owned by this process, after sweeping dead owners' folders."""
    remove_stale_folders()
    folder = Path(tempfile.mkdtemp(prefix=PREFIX))
    (folder / OWNER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    return folder


def remove_stale_folders(where: str | os.PathLike | None = None) -> list[Path]:
    """Delete the ``lowbit-undo-*`` folders in ``where`` (default: the temporary directory) left by dead
    processes of this user on this host; log each with its size and return them. POSIX only."""
    if os.name != "posix":  # no way to ask whether a process runs without signalling it
        return []
    root = Path(where if where is not None else tempfile.gettempdir())
    removed = []
    try:
        candidates = sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and p.is_dir())
    except OSError:
        return []
    for folder in candidates:
        pid = _dead_owner(folder)
        if pid is None:
            continue
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            log.info("removed %s (%.1f MB), the undo files of process %d, which ended without deleting them",
                     folder, size / 2**20, pid)
            removed.append(folder)
    return removed


def _dead_owner(folder: Path) -> int | None:
    """The process id recorded in ``folder`` if that process is gone (and the folder is ours), else None."""
    try:
        if folder.is_symlink() or folder.stat().st_uid != os.getuid():
            return None
        owner = json.loads((folder / OWNER).read_text())
        pid, host = int(owner["pid"]), owner["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no (readable) owner file: not ours to judge
    if host != socket.gethostname() or pid <= 0 or process_alive(pid):
        return None
    return pid
