"""The NVLink check of ``check_nvlink_connections`` (moelink.utils), torch-free so it can be tested anywhere."""

from typing import Any, List, Optional, Sequence, Tuple

# One rank's entry in the check: (host, device UUID as NVML spells it).
_Entry = Tuple[str, str]


def nvlink_problems(entries: Sequence[_Entry], host: str, nvml: Any) -> List[str]:
    """The pairs of ranks on ``host`` that sit on different GPUs without an NVLink path between them,
    as messages; ``nvml`` is the pynvml module (initialised)."""
    ranks = [r for r, (h, _) in enumerate(entries) if h == host]
    handles = {}
    problems = []
    for i, a in enumerate(ranks):
        for b in ranks[i + 1:]:
            ua, ub = entries[a][1], entries[b][1]
            if ua == ub:
                continue  # one GPU shared (MPS): no link to check
            for u in (ua, ub):
                if u not in handles:
                    handles[u] = nvml.nvmlDeviceGetHandleByUUID(u)
            status = nvml.nvmlDeviceGetP2PStatus(handles[ua], handles[ub], nvml.NVML_P2P_CAPS_INDEX_NVLINK)
            if status != nvml.NVML_P2P_STATUS_OK:
                problems.append(f"ranks {a} and {b} on {host} ({ua}, {ub}) have no NVLink path (NVML P2P status "
                                f"{status})")
    return problems


def local_problems(entries: Sequence[_Entry], host: str) -> Optional[List[str]]:
    """This host's problems, or None when NVML cannot answer here."""
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - NVML missing or unusable: say so below, do not guess
        return None
    try:
        return nvlink_problems(entries, host, pynvml)
    except Exception as e:  # noqa: BLE001 - a device NVML cannot find is reported, not raised alone
        return [f"NVML could not check the GPUs of {host}: {e}"]
    finally:
        pynvml.nvmlShutdown()
