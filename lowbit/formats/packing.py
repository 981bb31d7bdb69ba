"""Bit packing of element codes: ``bits``-wide codes <-> a dense little-endian byte stream.

Code ``i`` occupies bits ``[i * bits, (i + 1) * bits)`` of the stream, least significant bit first; the
last byte is zero-padded. Any width 1-8 round-trips exactly; 2, 4 and 8 bits take a byte-aligned fast path
(4-bit: element ``2k`` in the low nibble of byte ``k``).
"""

from __future__ import annotations

import math

import torch

from lowbit.errors import CorruptFileError, InputError


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes needed for ``numel`` codes of ``bits`` bits."""
    return math.ceil(numel * bits / 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (any shape, each < 2**bits) -> 1-D uint8 of ``packed_nbytes(codes.numel(), bits)``."""
    if not 1 <= bits <= 8:
        raise InputError(f"can pack 1..8-bit codes, got bits={bits}")
    flat = codes.reshape(-1)
    # check before the cast to uint8, which would silently wrap a wider code (300 -> 44, -1 -> 255)
    if flat.numel() and (int(flat.max()) >= 2**bits or int(flat.min()) < 0):
        bad = int(flat.max()) if int(flat.max()) >= 2**bits else int(flat.min())
        raise InputError(f"code {bad} does not fit in {bits} bits")
    flat = flat.to(torch.uint8)
    if bits == 8:
        return flat.clone()
    if 8 % bits == 0:  # 1, 2, 4: whole codes per byte
        per = 8 // bits
        pad = (-flat.numel()) % per
        f = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, per).to(torch.int32)
        shifts = torch.arange(per, dtype=torch.int32) * bits
        return (f << shifts).sum(dim=1).to(torch.uint8)
    # 3, 5, 6, 7 bits: expand to a bit stream and regroup by 8
    bitpos = torch.arange(bits, dtype=torch.uint8)
    stream = ((flat[:, None] >> bitpos) & 1).reshape(-1)  # (numel * bits,)
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8)).reshape(-1, 8).to(torch.int32)
    return (stream << torch.arange(8, dtype=torch.int32)).sum(dim=1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: 1-D uint8 stream -> 1-D uint8 codes of length ``numel``."""
    if not 1 <= bits <= 8:
        raise InputError(f"can unpack 1..8-bit codes, got bits={bits}")
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_nbytes(numel, bits):
        raise CorruptFileError(
            f"packed codes have shape {tuple(packed.shape)} and dtype {packed.dtype}; expected "
            f"{packed_nbytes(numel, bits)} uint8 bytes for {numel} {bits}-bit codes"
        )
    if bits == 8:
        return packed.clone()
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.uint8) * bits
        return ((packed[:, None] >> shifts) & mask).reshape(-1)[:numel].contiguous()
    stream = (packed[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1  # (nbytes, 8)
    stream = stream.reshape(-1)[: numel * bits].reshape(numel, bits).to(torch.int32)
    return (stream << torch.arange(bits, dtype=torch.int32)).sum(dim=1).to(torch.uint8)
