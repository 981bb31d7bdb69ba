"""Process memory: current resident set size and the peak over a stretch of work (Linux ``/proc``).

``PeakRSS`` resets the kernel's high-water mark (``VmHWM``, by writing ``5`` to ``/proc/self/clear_refs``)
on entry and reads it on exit, so the peak is exact and costs nothing while the work runs. Where that file
cannot be written, a background thread samples ``VmRSS`` every 5 ms instead (the peak may then be missed
by a short spike); ``PeakRSS.exact`` says which was used.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from typing import Any

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Current resident set size of this process in bytes (0 where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


def anon_rss_bytes() -> int:
    """Resident anonymous memory of this process in bytes (``RssAnon``: heap and tensors, not the pages of
    shared libraries or mapped files); 0 where ``/proc`` is missing."""
    try:
        return _status_kb("RssAnon")
    except OSError:
        return 0


def release_free_memory() -> None:
    """Hand memory that is free inside the C allocator back to the system (glibc ``malloc_trim``; a no-op
    elsewhere). Long loops that allocate and free many mid-sized tensors otherwise keep growing in RSS,
    because glibc serves blocks below its (adaptive, up to 32 MB) mmap threshold from a heap it rarely shrinks.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


class PeakRSS:
    """``with PeakRSS() as p: work()`` then ``p.peak`` (bytes) and ``p.start`` (RSS on entry)."""

    def __init__(self) -> None:
        self.start = self.peak = 0
        self.exact = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = rss_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.exact = True
        except OSError:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.exact:
            try:
                self.peak = max(self.peak, _status_kb("VmHWM"))
            except OSError:
                self.exact = False
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())
