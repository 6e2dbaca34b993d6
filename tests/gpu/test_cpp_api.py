"""The C++ core without PyTorch: examples/cpp_intranode.cpp forks its ranks, bootstraps through
files and checks layout, dispatch and combine against its own host reference."""
import os
import subprocess

import pytest

import binaries

BINARY_NAME = "cpp_intranode"


@pytest.mark.parametrize("num_ranks", [1, 2, 4])
def test_cpp_intranode(num_ranks: int) -> None:
    if not binaries.has_gpu():
        pytest.skip("no GPU")
    binary = binaries.find_binary(BINARY_NAME)
    if binary is None:
        pytest.fail(f"{BINARY_NAME} was not built under {binaries.build_dir()} (MOELINK_BUILD_TESTS=ON builds it)")
    # A rank that fails must not leave its peers waiting out the default 100 s timeout.
    env = dict(os.environ, MOELINK_TIMEOUT_S="20")
    result = subprocess.run([str(binary), str(num_ranks), "300", "2056"], capture_output=True, text=True, timeout=150,
                            env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and f"cpp_intranode {num_ranks} ranks: PASS" in output, output
