"""Runs the nvshmem_smoke binary (tests/gpu/nvshmem_smoke.cpp) as 2- and 4-PE jobs on this host.

The binary forks its own PEs and kills them after 60 s, so this test only picks the environment
and reads the verdict. Several PEs share one GPU here and there is no NIC, hence no remote
transport, no NVLS (multicast needs distinct GPUs) and no NCCL (it refuses several PEs per GPU).
"""

import os
import subprocess

import pytest

import binaries

BINARY_NAME = "nvshmem_smoke"


def _job_env() -> dict[str, str]:
    env = dict(os.environ)
    env["NVSHMEM_REMOTE_TRANSPORT"] = "none"
    env["NVSHMEM_DISABLE_NVLS"] = "1"
    env.setdefault("NVSHMEM_DISABLE_NCCL", "1")
    # Every PE reserves this much of the one GPU; the default 1 GiB per PE is more than a smoke needs.
    env.setdefault("NVSHMEM_SYMMETRIC_SIZE", "256m")
    # All PEs are on this host, so the unique-id bootstrap can stay on loopback even where the
    # container has no other interface.
    env.setdefault("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME", "lo")
    # Several PEs on one GPU under MPS without a per-client thread percentage put NVSHMEM in a mode
    # that does not promise progress for waits across PEs; the self-test's one block per PE is
    # co-resident anyway, so NVSHMEM is told not to worry.
    env.setdefault("NVSHMEM_IGNORE_CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "1")
    return env


@pytest.mark.parametrize("num_pes", [2, 4])
def test_nvshmem_smoke(num_pes: int) -> None:
    binary = binaries.find_binary(BINARY_NAME)
    if binary is None:
        pytest.skip(f"{BINARY_NAME} not built under {binaries.build_dir()} (needs NVSHMEM at configure time)")
    if not binaries.has_gpu():
        pytest.skip("no CUDA GPU visible")

    result = subprocess.run([str(binary), str(num_pes)], env=_job_env(), capture_output=True, text=True,
                            timeout=120)
    report = f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert result.returncode == 0, report
    assert f"nvshmem_smoke {num_pes} PEs: PASS" in result.stdout, report
    # Every PE ran the device half too. Whether NVSHMEM maps peers that share a GPU under MPS (then the
    # store path runs as well as the put path) is NVSHMEM's choice; the log says which ran.
    assert result.stdout.count("device self-test ok") == num_pes, report
