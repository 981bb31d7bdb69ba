"""What this CPU can compute exactly: the instruction-set facts a kernel's ``why_not`` depends on.

oneDNN's int8 convolution multiplies uint8 activations by int8 weights. With VNNI (``vpdpbusd``: AVX512-VNNI,
AVX-VNNI, or AMX-INT8 for the tile kernels) four such products go straight into an int32 sum: exact. Without
it oneDNN falls back to ``vpmaddubsw``, which adds two neighbouring products into a *saturating int16*
(255 * 127 * 2 = 64770 > 32767), so full-range codes give wrong sums (the reason PyTorch's fbgemm quantizes
activations to 7 bits, ``reduce_range``, on such CPUs). Measured on an AVX2-only EPYC: errors up to 68002 in
the int32 accumulator, exact once activations stay in 0..128 or weights in -64..64.

Tests monkeypatch :func:`has_vnni` (or :func:`cpu_flags`) to check both sides of the dispatch on any machine.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

# the CPU flags (Linux /proc/cpuinfo names) under which oneDNN sums u8 x s8 products in int32
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})

NO_VNNI = ("this CPU has no VNNI (avx512_vnni / avx_vnni / amx_int8): oneDNN's int8 convolution sums "
           "uint8 x int8 products pairwise in saturating 16-bit integers there, so it is not exact with 8-bit "
           "activations; using the reference path (activations of 7 bits or fewer, e.g. int7-tensor, run it "
           "exactly)")


def has_vnni() -> bool:
    """True if this CPU has an int8 dot product into int32 (VNNI or AMX-INT8), so oneDNN's int8 kernels are exact.

    Reads the CPU flags (Linux); elsewhere asks torch (``torch.cpu._is_vnni_supported``: AVX512-VNNI only,
    so an AVX-VNNI-only CPU off Linux is treated as having none: slower, never wrong). Non-x86 CPUs: False.
    """
    flags = cpu_flags()
    if flags is not None:
        return bool(flags & VNNI_FLAGS)
    probe = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(probe()) if callable(probe) else False


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str] | None:
    """The first CPU's flags from ``/proc/cpuinfo`` (x86 Linux), or None where there is no such line."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return None
