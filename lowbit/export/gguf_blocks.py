"""lowbit's codes and scales laid out as GGML blocks (the bytes llama.cpp reads), one row of a weight at a time.

Each function takes a :class:`~lowbit.formats.QuantizedTensor` of the matching lowbit spec (see
``lowbit.export.gguf.GGML_TYPES``) and returns uint8 ``(rows, blocks * block bytes)``. The layouts are ggml's
(``ggml-common.h``, and the dequantizers of ``ggml-quants.c`` read them back):

====  ============================================  ======================================================
type  lowbit spec                                   block (bytes): value
====  ============================================  ======================================================
Q8_0  int8-g32                                      d, 32 int8 c (34): c * d
Q4_0  int4-g32                                      d, 16 bytes (18): (q - 8) * d
Q4_1  int4-g32-asym                                 d, m, 16 bytes (20): q * d + m   (m = -z * s, fp16)
Q5_0  int5-g32                                      d, qh u32, 16 bytes (22): (q - 16) * d
Q5_1  int5-g32-asym                                 d, m, qh, 16 bytes (24): q * d + m  (m = -z * s, fp16)
Q2_K  int2-g16-asym-sk4  (256 per block)            16 scale|min nibbles, 64 qs, d, dmin (84)
Q3_K  int3-g16-sk6                                  32 hmask, 64 qs, 12 6-bit scales (+32), d (110)
Q4_K  int4-g32-asym-sk6                             d, dmin, 12 bytes of 6-bit scales and mins, 128 qs (144)
Q5_K  int5-g32-asym-sk6                             d, dmin, 12 bytes, 32 qh, 128 qs (176)
Q6_K  int6-g16-sk8                                  128 ql, 64 qh, 16 int8 scales, d (210)
====  ============================================  ======================================================

k-quant values are ``(d * sc) * q - dmin * m``, which lowbit computes in the same float32 order, so they are
the weights lowbit's model computes with, bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from lowbit.formats import QuantizedTensor
from lowbit.spec import SUPER_BLOCK


def _fp16(x: torch.Tensor) -> np.ndarray:
    """float values -> their fp16 bytes, ``(..., 2)`` uint8."""
    return x.numpy().astype(np.float16)[..., None].view(np.uint8)


def _codes(q: QuantizedTensor, block: int) -> np.ndarray:
    """codes ``(rows, cols)`` -> ``(rows, cols / block, block)`` uint8."""
    rows, cols = q.codes.shape
    return q.codes.numpy().reshape(rows, cols // block, block)


def _nibbles(c: np.ndarray) -> np.ndarray:
    """32 codes per block -> 16 bytes: byte j holds code j (low) and code j + 16 (high)."""
    return (c[..., :16] & 0xF) | ((c[..., 16:] & 0xF) << 4)


def _high_bits(c: np.ndarray) -> np.ndarray:
    """Bit 4 of 32 codes per block -> the block's ``qh``: a little-endian uint32, bit j from code j."""
    bits = ((c >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return bits.sum(-1, dtype=np.uint32)[..., None].view(np.uint8)


def legacy(kind: str, q: QuantizedTensor) -> np.ndarray:
    """Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (blocks of 32 with one fp16 scale, and an fp16 offset for _1)."""
    c = _codes(q, 32)
    rows, nb, _ = c.shape
    d = _fp16(q.scale.reshape(rows, nb))
    if kind == "Q8_0":
        parts = [d, (c.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
    else:
        parts = [d, _nibbles(c)]
        if kind in ("Q5_0", "Q5_1"):
            parts.insert(1, _high_bits(c))
        if kind in ("Q4_1", "Q5_1"):  # offset -z * s rounded to fp16 (the one value not kept exactly)
            parts.insert(1, _fp16(-(q.zero_point.float() * q.scale).reshape(rows, nb)))
    return np.ascontiguousarray(np.concatenate(parts, axis=-1).reshape(rows, -1))


def _super(q: QuantizedTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None]:
    """(codes ``(rows, ns, 256)``, tile scale integers ``(rows, ns, tiles)``, minimum integers or None, fp16 bytes
    of d ``(rows, ns, 2)``, of dmin or None) of a k-quant tensor."""
    tiles = q.spec.tiles_per_super
    rows = q.scale.shape[0]
    sc = q.scale_codes.to(torch.int64).numpy()
    ns = q.super_scale.shape[1]
    m = None if q.zero_point is None else q.zero_point.numpy().astype(np.int64).reshape(rows, ns, tiles)
    dmin = None if q.super_min is None else _fp16(q.super_min)
    return _codes(q, SUPER_BLOCK), sc.reshape(rows, ns, tiles), m, _fp16(q.super_scale), dmin


def _scales_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales and 8 six-bit minimums -> Q4_K / Q5_K's 12 bytes (``get_scale_min_k4``'s inverse)."""
    lo, hi = slice(0, 4), slice(4, 8)
    return np.concatenate([sc[..., lo] | ((sc[..., hi] >> 4) << 6), m[..., lo] | ((m[..., hi] >> 4) << 6),
                           (sc[..., hi] & 0xF) | ((m[..., hi] & 0xF) << 4)], axis=-1).astype(np.uint8)


def _chunks(c: np.ndarray, n: int) -> np.ndarray:
    """``(rows, ns, 256)`` codes -> ``(rows, ns, 256 / n, n)``."""
    return c.reshape(*c.shape[:2], -1, n)


def q4_k(q: QuantizedTensor) -> np.ndarray:
    c, sc, m, d, dmin = _super(q)
    ch = _chunks(c, 64)  # byte l of chunk k: code 64k + l (low nibble), 64k + 32 + l (high)
    qs = (ch[..., :32] | (ch[..., 32:] << 4)).reshape(*c.shape[:2], 128)
    return _join([d, dmin, _scales_k4(sc, m), qs])


def q5_k(q: QuantizedTensor) -> np.ndarray:
    c, sc, m, d, dmin = _super(q)
    ch = _chunks(c, 64)
    qs = ((ch[..., :32] & 0xF) | ((ch[..., 32:] & 0xF) << 4)).reshape(*c.shape[:2], 128)
    # qh byte l: bit 2k from code 64k + l, bit 2k + 1 from code 64k + 32 + l (k = chunk 0..3)
    hi = np.stack([(ch[..., :32] >> 4) & 1, (ch[..., 32:] >> 4) & 1], axis=-2)  # (rows, ns, 4, 2, 32)
    shifts = np.arange(8, dtype=np.uint8).reshape(4, 2, 1)
    qh = (hi.astype(np.uint8) << shifts).sum(axis=(-3, -2), dtype=np.uint8)
    return _join([d, dmin, _scales_k4(sc, m), qh, qs])


def q6_k(q: QuantizedTensor) -> np.ndarray:
    c, sc, _, d, _ = _super(q)
    ch = _chunks(c, 128)  # per half of 128: parts 0..3 of 32 codes
    p = ch.reshape(*ch.shape[:3], 4, 32)
    ql = np.concatenate([(p[..., 0, :] & 0xF) | ((p[..., 2, :] & 0xF) << 4),
                         (p[..., 1, :] & 0xF) | ((p[..., 3, :] & 0xF) << 4)], axis=-1)  # (rows, ns, 2, 64)
    qh = ((p[..., 0, :] >> 4) | ((p[..., 1, :] >> 4) << 2) | ((p[..., 2, :] >> 4) << 4)
          | ((p[..., 3, :] >> 4) << 6))  # (rows, ns, 2, 32)
    scales = sc.astype(np.int8).view(np.uint8)
    return _join([ql.reshape(*c.shape[:2], 128), qh.reshape(*c.shape[:2], 64), scales, d])


def _two_bit_planes(c: np.ndarray) -> np.ndarray:
    """Low 2 bits of 256 codes -> 64 bytes: per half of 128, byte ``b`` of 32 holds, at bits ``2j``, the code of
    sub-block ``2j + b // 16`` (16 codes each) at position ``b % 16``."""
    h = c.reshape(*c.shape[:2], 2, 4, 2, 16) & 3  # (rows, ns, half, j, b // 16, b % 16)
    shifts = (2 * np.arange(4, dtype=np.uint8)).reshape(4, 1, 1)
    return (h << shifts).sum(axis=-3, dtype=np.uint8).reshape(*c.shape[:2], 64)


def q2_k(q: QuantizedTensor) -> np.ndarray:
    c, sc, m, d, dmin = _super(q)
    scales = (sc | (m << 4)).astype(np.uint8)
    return _join([scales, _two_bit_planes(c), d, dmin])


def q3_k(q: QuantizedTensor) -> np.ndarray:
    c, sc, _, d, _ = _super(q)
    # hmask byte b (of 32): bit 4 * half + j from code (half, sub-block 2j + b // 16, b % 16)'s bit 2
    h = ((c.reshape(*c.shape[:2], 2, 4, 32) >> 2) & 1).astype(np.uint8)  # (rows, ns, half, j, b)
    shifts = (4 * np.arange(2, dtype=np.uint8).reshape(2, 1, 1) + np.arange(4, dtype=np.uint8).reshape(1, 4, 1))
    hmask = (h << shifts).sum(axis=(-3, -2), dtype=np.uint8)
    L = (sc + 32).astype(np.uint8)  # 16 six-bit scales, stored with an offset of 32
    low = (L[..., :8] & 0xF) | ((L[..., 8:] & 0xF) << 4)
    top = L >> 4
    high = top[..., 0:4] | (top[..., 4:8] << 2) | (top[..., 8:12] << 4) | (top[..., 12:16] << 6)
    return _join([hmask, _two_bit_planes(c), low, high, d])


def _join(parts: list[np.ndarray]) -> np.ndarray:
    """Per-super-block parts ``(rows, ns, n_i)`` -> uint8 ``(rows, ns * sum(n_i))``."""
    rows = parts[0].shape[0]
    return np.ascontiguousarray(np.concatenate([p.astype(np.uint8) for p in parts], axis=-1).reshape(rows, -1))


K_QUANTS = {"Q2_K": q2_k, "Q3_K": q3_k, "Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k}


def blocks(kind: str, q: QuantizedTensor) -> np.ndarray:
    """``q`` as GGML blocks of type ``kind``: uint8 ``(rows, row bytes)``."""
    return K_QUANTS[kind](q) if kind in K_QUANTS else legacy(kind, q)
