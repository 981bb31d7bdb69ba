"""Bit packing: exact round trip for every width and awkward lengths, byte layout, size, errors."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.errors import CorruptFileError, InputError
from lowbit.formats import pack, packed_nbytes, unpack

LENGTHS = [0, 1, 7, 9, 1000, 4097]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", LENGTHS)
def test_round_trip_every_width_and_length(bits, n, gen):
    codes = torch.randint(0, 2**bits, (n,), generator=gen).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_nbytes(n, bits) == math.ceil(n * bits / 8)
    assert torch.equal(unpack(packed, bits, n), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_extreme_codes_and_shapes(bits):
    # all-ones codes use every bit; a 2-D input packs in row-major order
    codes = torch.full((3, 5), 2**bits - 1, dtype=torch.uint8)
    codes[1, 2] = 0
    packed = pack(codes, bits)
    assert torch.equal(unpack(packed, bits, 15).reshape(3, 5), codes)


def test_byte_layout_is_little_endian_lsb_first():
    # 4-bit: element 2k in the low nibble of byte k
    assert pack(torch.tensor([1, 2, 3, 4], dtype=torch.uint8), 4).tolist() == [0x21, 0x43]
    # 1-bit: element i is bit i
    assert pack(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=torch.uint8), 1).tolist() == [0b1101, 1]
    # 3-bit: 5 = 101, 3 = 011, 7 = 111 -> stream 1,0,1, 1,1,0, 1,1 | 1 -> bytes 0b11011101, 0b1
    assert pack(torch.tensor([5, 3, 7], dtype=torch.uint8), 3).tolist() == [0b11011101, 1]
    # 2-bit: four codes per byte, the first in the lowest two bits
    assert pack(torch.tensor([3, 0, 1, 2], dtype=torch.uint8), 2).tolist() == [0b10010011]


def test_padding_bits_are_zero():
    packed = pack(torch.full((3,), 7, dtype=torch.uint8), 3)  # 9 bits -> 2 bytes, 7 padding bits
    assert packed.tolist() == [0xFF, 0x01]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 7])
def test_codes_too_large_raise(bits):
    codes = torch.tensor([0, 2**bits], dtype=torch.uint8)
    with pytest.raises(InputError, match=f"{2**bits}.*{bits} bits"):
        pack(codes, bits)


def test_wide_codes_are_not_silently_wrapped():
    with pytest.raises(InputError, match="300"):
        pack(torch.tensor([1, 300]), 8)
    with pytest.raises(InputError, match="-1"):
        pack(torch.tensor([-1, 2]), 8)
    assert pack(torch.tensor([1, 255]), 8).tolist() == [1, 255]  # in-range int64 codes are fine


@pytest.mark.parametrize("bits", [0, 9])
def test_bad_width(bits):
    with pytest.raises(InputError, match="1..8"):
        pack(torch.zeros(4, dtype=torch.uint8), bits)
    with pytest.raises(InputError, match="1..8"):
        unpack(torch.zeros(4, dtype=torch.uint8), bits, 4)


@pytest.mark.parametrize("bits", range(1, 9))
def test_wrong_packed_length_is_corrupt(bits):
    packed = pack(torch.ones(10, dtype=torch.uint8), bits)
    with pytest.raises(CorruptFileError, match=f"{packed_nbytes(10, bits)} uint8 bytes"):
        unpack(packed[:-1], bits, 10)
    with pytest.raises(CorruptFileError):
        unpack(torch.cat([packed, packed[:1]]), bits, 10)


def test_wrong_packed_dtype_or_rank_is_corrupt():
    packed = pack(torch.ones(16, dtype=torch.uint8), 4)
    with pytest.raises(CorruptFileError, match="dtype"):
        unpack(packed.to(torch.int32), 4, 16)
    with pytest.raises(CorruptFileError, match="shape"):
        unpack(packed.reshape(2, 4), 4, 16)


def test_unpack_does_not_alias_its_input():
    packed = pack(torch.arange(8, dtype=torch.uint8), 8)
    out = unpack(packed, 8, 8)
    out[0] = 99
    assert packed[0] == 0
