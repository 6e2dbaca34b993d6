"""The LogFMT reference (tests/reference/logfmt_reference.py), which the GPU suite checks the
combine kernel against: its documented bound holds, including at the format's edges, and a group
marks itself LogFMT or bf16 in one bit that both layouts agree on."""
import numpy as np
import pytest

from reference import logfmt_reference as lf


def _bf16(x):
    """float32 values rounded to bf16 (to nearest even), as float32."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def _check(row):
    got = lf.roundtrip(row)
    assert got.dtype == np.float32 and got.shape == row.shape
    err = np.abs(got.astype(np.float64) - row.astype(np.float64))
    assert (err <= lf.bound(row)).all(), float(np.max(err / np.maximum(lf.bound(row), 1e-300)))
    return got


@pytest.mark.parametrize("seed", range(40))
def test_the_bound_holds_on_random_rows(seed):
    rng = np.random.default_rng(seed)
    hidden = 128 * int(rng.integers(1, 64))
    spread = rng.uniform(0, 12)  # octaves between a row's values, across and inside groups
    row = rng.standard_normal(hidden) * 10.0 ** rng.uniform(-20, 20) * np.exp2(rng.uniform(-spread, spread, hidden))
    row[rng.random(hidden) < 0.1] = 0
    _check(_bf16(row))


@pytest.mark.parametrize("name, group", [
    ("zeros", np.zeros(128)),
    ("one value", np.eye(1, 128, 5)[0] * -3.5),
    ("equal", np.full(128, 0.75)),
    ("equal, tiny, negative", np.full(128, -1e-20)),
    ("near the bf16 maximum", np.linspace(-3.3e38, 3.3e38, 128)),
    ("subnormal", np.full(128, 1e-39)),
    ("120 octaves", np.exp2(np.linspace(-60, 60, 128))),
])
def test_the_bound_holds_at_the_edges(name, group):
    _check(_bf16(group))


def test_values_far_below_the_group_maximum_flush_to_zero():
    group = _bf16(np.concatenate([[1.0], np.full(127, 2.0 ** -(lf.FLUSH_OCTAVES + 1))]))
    got = _check(group)
    assert got[0] != 0 and (got[1:] == 0).all()


def test_a_non_finite_group_falls_back_to_bf16():
    group = _bf16(np.linspace(-1, 1, 128))
    group[7], group[9], group[0] = np.inf, -np.inf, np.nan
    region = lf.encode_group(group)
    assert not region[0] & 1
    got = lf.decode_group(region)
    assert np.isnan(got[0]) and got[7] == np.inf and got[9] == -np.inf
    same = np.arange(1, 128)
    assert np.array_equal(got[same], group[same])


def test_a_nan_whose_only_mantissa_bit_is_the_marker_stays_a_nan():
    group = np.zeros(128, dtype=np.float32)
    group[0] = np.array([0x7F810000], dtype=np.uint32).view(np.float32)[0]  # bf16 0x7F81
    assert np.isnan(lf.decode_group(lf.encode_group(group))[0])


def test_a_logfmt_group_sends_168_of_its_256_bytes():
    rng = np.random.default_rng(3)
    region = lf.encode_group(_bf16(rng.standard_normal(128)))
    assert len(region) == lf.GROUP_BYTES == 256 and region[0] & 1
    assert not any(region[lf.LOGFMT_BYTES:])


def test_the_bound_is_the_documented_figure():
    assert 0.0081 < lf.REL_BOUND < 0.0083
