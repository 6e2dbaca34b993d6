"""moelink's LogFMT, the lossy combine format of low_latency_combine(use_logfmt=True), as numpy.

The format (src/modes/low_latency/logfmt.cuh encodes and decodes it the same way). A combine row of
H bf16 values is sent as H / 128 groups, each in its own 256-byte region (the bf16 group's size,
so the slot layout does not change):

- LogFMT group (168 bytes sent of 256): a value is 10 bits, a sign and a 9-bit magnitude code. Code
  0 is zero; code c in 1..511 is 2 ** (lmin + (c - 1) * step). lmax = log2 of the group's largest
  magnitude; lmin = log2 of its smallest non-zero magnitude, but at most FLUSH_OCTAVES below lmax
  (smaller magnitudes become zero); step = (lmax - lmin) / 510. Magnitudes are rounded in the log
  domain, so a value comes back within a factor 2 ** (step / 2) of itself.
  Bytes [0, 4): lmin as float32 with its lowest bit set (the bit that marks a LogFMT group);
  [4, 8): step as float32; [8, 136): the low 8 bits of the 128 codes; [136, 168): their high 2 bits,
  eight values to a 16-bit word (value 8w + i at bits 2i, 2i + 1 of word w).
- bf16 group (the fallback, for groups holding a NaN or an infinity): the 128 bf16 values as they
  are, except that the lowest mantissa bit of value 0 is cleared (the same bit reads 0: bf16 group;
  a NaN there becomes the quiet NaN of its sign, so it stays a NaN).

The bound (per value v of a finite group, amax its group's largest magnitude):
    |decode(encode(v)) - v| <= REL_BOUND * |v| + 2 ** -FLUSH_OCTAVES * amax
and fallback groups are bf16-exact but for value 0's last mantissa bit: one bf16 step of that value
(a relative error of at most 2 ** -7 for a normal value, which the bound covers; a subnormal value 0
of a group that also holds a NaN or an infinity may lose its last bit outright). Every rank must
pass the same use_logfmt, and a hook's receive the same as its send: each expert's combine signal
says the format of its rows, and a receiver that expects the other one poisons the tokens that
needed them and reports it (a local error). REL_BOUND is 2 ** (FLUSH_OCTAVES / 1020) - 1 with a margin for the
float32 log2 / exp2 of the kernel.
"""

from __future__ import annotations

import numpy as np

GROUP = 128
GROUP_BYTES = 256  # the bf16 group's size: each group keeps its own region of the slot
LOGFMT_BYTES = 168
FLUSH_OCTAVES = 12
LEVELS = 511  # non-zero magnitude codes
REL_BOUND = 2.0 ** (FLUSH_OCTAVES / (2 * (LEVELS - 1))) - 1 + 1e-4


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """uint16 bf16 bits of float32 values that are bf16 already."""
    return (np.ascontiguousarray(values, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def encode_group(values: np.ndarray) -> bytes:
    """The 256-byte region of one group of 128 bf16 values (given as float32); bytes a LogFMT group
    does not send are zero."""
    v = np.asarray(values, dtype=np.float32)
    assert v.shape == (GROUP,)
    out = np.zeros(GROUP_BYTES, dtype=np.uint8)
    if not np.isfinite(v).all():
        bits = _bf16_bits(v)
        if np.isnan(v[0]):  # clearing the bit could make a NaN an infinity: the quiet NaN, signed
            bits[0] = (bits[0] & np.uint16(0x8000)) | np.uint16(0x7FC0)
        bits[0] &= np.uint16(0xFFFE)
        out[:] = bits.view(np.uint8)
        return out.tobytes()
    a = np.abs(v)
    amax = np.float32(a.max())
    codes = np.zeros(GROUP, dtype=np.uint16)
    lmin_stored, step = np.float32(0.0), np.float32(0.0)
    if amax > 0:
        lmax = np.log2(amax)
        floor = np.float32(lmax - np.float32(FLUSH_OCTAVES))
        nonzero = a[a > 0]
        lmin = np.maximum(np.log2(nonzero.min()), floor).astype(np.float32)
        lmin_stored = (np.array([lmin], dtype=np.float32).view(np.uint32) | np.uint32(1)).view(np.float32)[0]
        step = np.float32((lmax - lmin_stored) / np.float32(LEVELS - 1))
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.log2(a)
            q = np.rint((logs - lmin_stored) / step) if step > 0 else np.zeros(GROUP, dtype=np.float32)
        keep = (a > 0) & (logs >= floor)
        q = np.clip(np.nan_to_num(q, nan=0.0, neginf=0.0), 0, LEVELS - 1)
        codes = np.where(keep, q.astype(np.uint16) + 1, 0).astype(np.uint16)
        codes |= np.where(keep & (v < 0), np.uint16(1 << 9), np.uint16(0)).astype(np.uint16)
    header = np.array([lmin_stored, step], dtype=np.float32)
    header_bits = header.view(np.uint32)
    header_bits[0] |= np.uint32(1)
    out[0:8] = header_bits.view(np.uint8)
    out[8:136] = (codes & 0xFF).astype(np.uint8)
    high = np.zeros(GROUP // 8, dtype=np.uint16)
    for i in range(8):
        high |= ((codes[i::8] >> 8) & 0x3).astype(np.uint16) << (2 * i)
    # value 8w + i -> word w, bits 2i: codes[i::8] is values i, 8 + i, ... -> word index w.
    out[136:168] = high.view(np.uint8)
    return out.tobytes()


def decode_group(region: bytes) -> np.ndarray:
    """float32 [128] from a group's region."""
    raw = np.frombuffer(region, dtype=np.uint8)
    assert raw.size == GROUP_BYTES
    if not raw[0] & 1:
        return _from_bf16_bits(raw.view(np.uint16).copy())
    lmin, step = raw[0:8].view(np.float32)
    low = raw[8:136].astype(np.uint16)
    high_words = raw[136:168].view(np.uint16)
    high = np.zeros(GROUP, dtype=np.uint16)
    for i in range(8):
        high[i::8] = (high_words >> (2 * i)) & 0x3
    codes = low | (high << 8)
    magnitude_code = (codes & 0x1FF).astype(np.int32)
    sign = np.where(codes & (1 << 9), np.float32(-1), np.float32(1))
    values = np.where(magnitude_code > 0,
                      np.exp2(lmin + (magnitude_code - 1).astype(np.float32) * step).astype(np.float32), 0)
    return (sign * values).astype(np.float32)


def roundtrip(row: np.ndarray) -> np.ndarray:
    """A row of H bf16 values (as float32) as the receiver decodes it."""
    row = np.asarray(row, dtype=np.float32)
    assert row.size % GROUP == 0
    return np.concatenate([decode_group(encode_group(row[g:g + GROUP])) for g in range(0, row.size, GROUP)])


def bound(row: np.ndarray) -> np.ndarray:
    """The largest |roundtrip(row) - row| the format allows, per value."""
    row = np.asarray(row, dtype=np.float32)
    amax = np.repeat(np.abs(row.reshape(-1, GROUP)).max(axis=1), GROUP)
    return REL_BOUND * np.abs(row) + 2.0 ** -FLUSH_OCTAVES * amax
