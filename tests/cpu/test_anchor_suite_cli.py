"""tests/gpu/anchor_suite.py's command line where nothing can run: it needs no GPU to say what is
missing, and a missing suite is exit status 3 (unavailable), never a pass."""
import subprocess
import sys


def _run(repo_root, *args):
    return subprocess.run([sys.executable, str(repo_root / "tests" / "gpu" / "anchor_suite.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_help_needs_nothing(repo_root):
    result = _run(repo_root, "--help")
    assert result.returncode == 0, result.stderr
    assert "--suite" in result.stdout and "--ranks" in result.stdout


def test_a_missing_suite_is_unavailable_and_named(repo_root, tmp_path):
    (tmp_path / "utils.py").write_text("")
    result = _run(repo_root, "--suite", str(tmp_path))
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert "test_intranode.py" in result.stderr and "utils.py" not in result.stderr.split("lacks", 1)[1]


def test_an_unknown_impl_is_refused_before_anything_runs(repo_root, tmp_path):
    result = _run(repo_root, "--impl", "moelink,nccl", "--suite", str(tmp_path))
    assert result.returncode == 2 and "--impl" in result.stderr, (result.stdout, result.stderr)
