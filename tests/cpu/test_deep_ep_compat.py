"""moelink.install_as_deep_ep(): deep_ep V1's module layout registered in-process (moelink.compat).
Runs without torch; the torch-only checks skip."""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings

import pytest

try:
    import moelink
except ImportError as e:  # pragma: no cover - depends on the build
    pytest.skip(f"moelink is not importable: {e}", allow_module_level=True)

HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.fixture
def no_deep_ep():
    """Each test starts without any deep_ep module and leaves none behind."""
    saved = {name: module for name, module in sys.modules.items() if name == "deep_ep" or name.startswith("deep_ep.")}
    for name in saved:
        del sys.modules[name]
    yield
    for name in [n for n in sys.modules if n == "deep_ep" or n.startswith("deep_ep.")]:
        del sys.modules[name]
    sys.modules.update(saved)


def test_layout_of_deep_ep_v1(no_deep_ep):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no real DeepEP here: nothing to warn about
        top = moelink.install_as_deep_ep()
    import deep_ep
    import deep_ep.buffer
    import deep_ep.utils
    from deep_ep import Buffer, Config, EventOverlap
    from deep_ep.utils import EventHandle, check_nvlink_connections  # noqa: F401

    assert deep_ep is top
    assert (Buffer, Config, EventOverlap) == (moelink.Buffer, moelink.Config, moelink.EventOverlap)
    assert deep_ep.utils.EventOverlap is moelink.EventOverlap
    assert deep_ep.buffer.Buffer is moelink.Buffer
    assert deep_ep.__version__ == moelink.__version__
    config = deep_ep.Config(24, 6, 256)
    assert config.get_nvl_buffer_size_hint(7168 * 2, 8) > 0


def test_idempotent(no_deep_ep):
    assert moelink.install_as_deep_ep() is moelink.install_as_deep_ep()


def test_utils_names_are_moelinks(no_deep_ep):
    moelink.install_as_deep_ep()
    import deep_ep.utils

    assert deep_ep.utils.EventHandle is moelink.EventHandle
    assert deep_ep.utils.check_nvlink_connections is moelink.check_nvlink_connections


def test_unknown_names_are_attribute_errors(no_deep_ep):
    deep_ep = moelink.install_as_deep_ep()
    with pytest.raises(AttributeError, match="no_such_name"):
        deep_ep.no_such_name  # noqa: B018


@pytest.mark.skipif(HAS_TORCH, reason="checks the torch-free behaviour")
def test_topk_idx_t_needs_torch(no_deep_ep):
    deep_ep = moelink.install_as_deep_ep()
    with pytest.raises(ImportError, match="topk_idx_t needs PyTorch"):
        deep_ep.topk_idx_t  # noqa: B018


def test_topk_idx_t_with_torch(no_deep_ep):
    torch = pytest.importorskip("torch")
    assert moelink.install_as_deep_ep().topk_idx_t is torch.int64


def test_refuses_when_a_real_deep_ep_is_imported(no_deep_ep):
    real = types.ModuleType("deep_ep")
    real.__file__ = "/site-packages/deep_ep/__init__.py"
    sys.modules["deep_ep"] = real
    with pytest.raises(RuntimeError, match=r"already imported \(/site-packages/deep_ep/__init__.py\)"):
        moelink.install_as_deep_ep()
    assert sys.modules["deep_ep"] is real
    assert "deep_ep.utils" not in sys.modules


def test_warns_when_a_real_deep_ep_is_installed(no_deep_ep, tmp_path, monkeypatch):
    (tmp_path / "deep_ep").mkdir()
    (tmp_path / "deep_ep" / "__init__.py").write_text("# a DeepEP that is not moelink's\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(RuntimeWarning, match="deep_ep is installed at"):
        moelink.install_as_deep_ep()
    import deep_ep

    assert getattr(deep_ep, "__moelink_shim__", False)
