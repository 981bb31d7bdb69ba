"""Native libraries' prints to the process's file descriptors are silenced inside quiet_fd, and only there."""

from __future__ import annotations

import os

import pytest

from lowbit.quiet import quiet_fd


@pytest.mark.parametrize("fd", [1, 2])
def test_quiet_fd_drops_what_the_descriptor_gets_inside_the_block_only(fd, capfd):
    os.write(fd, b"before\n")
    with quiet_fd(fd):
        os.write(fd, b"hidden\n")
    os.write(fd, b"after\n")
    with pytest.raises(RuntimeError):  # restored on an error too
        with quiet_fd(fd):
            raise RuntimeError
    os.write(fd, b"last\n")
    out, err = capfd.readouterr()
    assert (out if fd == 1 else err) == "before\nafter\nlast\n"
