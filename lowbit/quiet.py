"""Silencing native libraries that print straight to the process's file descriptors, whatever their settings
(llama.cpp's loader on standard error, HiGHS's integer-program solver on standard output)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_fd(fd: int) -> Iterator[None]:
    """File descriptor ``fd`` (1: standard output, 2: standard error) goes to the null device inside the block.
    Python's own stream for it is flushed first, so what was written before still appears."""
    stream = {1: sys.stdout, 2: sys.stderr}.get(fd)
    if stream is not None:
        stream.flush()
    saved, null = os.dup(fd), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    try:
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(null)
