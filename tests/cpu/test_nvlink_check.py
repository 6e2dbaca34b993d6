"""check_nvlink_connections' decision (moelink._nvlink) against a fake NVML: which pairs it checks and
what it reports. The collective around it needs GPUs (tests/gpu/test_frameworks.py)."""

import types

import pytest

from moelink import _nvlink

OK, NOT_SUPPORTED = 0, 2


def fake_nvml(links):
    """An NVML whose GPUs named in ``links`` (pairs of UUIDs) have NVLink between them; it records queries."""
    asked = []

    def handle(uuid):
        if uuid.startswith("GPU-missing"):
            raise RuntimeError(f"NVML_ERROR_NOT_FOUND {uuid}")
        return uuid

    def p2p(a, b, index):
        assert index == nvml.NVML_P2P_CAPS_INDEX_NVLINK
        asked.append((a, b))
        return OK if (a, b) in links or (b, a) in links else NOT_SUPPORTED

    nvml = types.SimpleNamespace(NVML_P2P_CAPS_INDEX_NVLINK=4, NVML_P2P_STATUS_OK=OK,
                                 nvmlDeviceGetHandleByUUID=handle, nvmlDeviceGetP2PStatus=p2p, asked=asked)
    return nvml


def test_all_linked():
    entries = [("a", "GPU-0"), ("a", "GPU-1"), ("a", "GPU-2")]
    nvml = fake_nvml({("GPU-0", "GPU-1"), ("GPU-0", "GPU-2"), ("GPU-1", "GPU-2")})
    assert _nvlink.nvlink_problems(entries, "a", nvml) == []
    assert len(nvml.asked) == 3


def test_names_the_unlinked_pair():
    entries = [("a", "GPU-0"), ("a", "GPU-1"), ("a", "GPU-2")]
    problems = _nvlink.nvlink_problems(entries, "a", fake_nvml({("GPU-0", "GPU-1")}))
    assert len(problems) == 2
    assert "ranks 0 and 2" in problems[0] and "ranks 1 and 2" in problems[1]
    assert "no NVLink path" in problems[0]


def test_shared_gpu_and_other_hosts_are_not_checked():
    # Ranks 0 and 1 share a GPU (MPS); ranks 2 and 3 are on another host.
    entries = [("a", "GPU-0"), ("a", "GPU-0"), ("b", "GPU-5"), ("b", "GPU-6")]
    nvml = fake_nvml(set())
    assert _nvlink.nvlink_problems(entries, "a", nvml) == []
    assert nvml.asked == []
    assert _nvlink.nvlink_problems(entries, "b", fake_nvml(set())) != []


def test_unknown_device_raises_for_the_caller_to_report():
    with pytest.raises(RuntimeError, match="NOT_FOUND"):
        _nvlink.nvlink_problems([("a", "GPU-0"), ("a", "GPU-missing")], "a", fake_nvml(set()))
