"""m2r2_moe._ext, the only door to native code: flags, reasons, opt-out, and CI's REQUIRE_EXT check."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

import m2r2_moe
from m2r2_moe import _ext
from m2r2_moe.runtime.cache import SlotManager, make_slot_manager

PACKAGE_DIR = pathlib.Path(m2r2_moe.__file__).resolve().parent


def child_env(**env: str) -> dict[str, str]:
    """The environment of a fresh interpreter that imports this same copy of m2r2_moe."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("M2R2_MOE_")}
    full_env.update(env)
    full_env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_DIR.parent), os.environ.get("PYTHONPATH", "")])
    return full_env


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=child_env(**env), capture_output=True, text=True,
                          timeout=120)


def test_required_ext_is_present():
    """CI sets M2R2_MOE_REQUIRE_EXT=1: a missing or broken C++ build must fail the suite, not fall back."""
    if _ext.require_ext():
        assert _ext.HAS_EXT, f"M2R2_MOE_REQUIRE_EXT=1 but the C++ core is not loaded: {_ext.EXT_ERROR}"
        assert _ext.HAS_PLANNER, f"M2R2_MOE_REQUIRE_EXT=1 but the C++ planner is not loaded: {_ext.PLANNER_ERROR}"


def test_flags_and_reasons_are_consistent():
    assert isinstance(_ext.HAS_EXT, bool) and isinstance(_ext.HAS_CUDA_EXT, bool)
    assert (_ext.EXT_ERROR is None) == _ext.HAS_EXT
    assert (_ext.PLANNER_ERROR is None) == _ext.HAS_PLANNER
    assert (_ext.CUDA_EXT_ERROR is None) == _ext.HAS_CUDA_EXT
    summary = _ext.summary()
    assert summary["HAS_EXT"] == _ext.HAS_EXT and summary["HAS_CUDA_EXT"] == _ext.HAS_CUDA_EXT
    if _ext.HAS_EXT:
        assert _ext.native.ABI_VERSION == _ext.ABI_VERSION
    if _ext.HAS_PLANNER:
        assert _ext.planner.ABI_VERSION == _ext.ABI_VERSION
    if _ext.HAS_CUDA_EXT:
        assert isinstance(_ext.cuda_probe(), str)  # '' only where a GPU is usable


def test_factory_follows_flags():
    expected = _ext.native.SlotManager if _ext.HAS_EXT else SlotManager
    assert isinstance(make_slot_manager(4), expected)
    assert isinstance(make_slot_manager(4, native=False), SlotManager)


def test_opt_out_env_var():
    code = (
        "import m2r2_moe._ext as e; from m2r2_moe.runtime.cache import make_slot_manager, SlotManager\n"
        "assert not e.HAS_EXT and not e.HAS_CUDA_EXT and not e.HAS_PLANNER, e.summary()\n"
        "assert 'M2R2_MOE_NO_EXT' in e.EXT_ERROR and 'M2R2_MOE_NO_EXT' in e.CUDA_EXT_ERROR\n"
        "assert type(make_slot_manager(2)) is SlotManager\n"
        "try:\n    make_slot_manager(2, native=True)\nexcept RuntimeError as err:\n    print('refused:', err)\n"
    )
    done = run_python(code, M2R2_MOE_NO_EXT="1")
    assert done.returncode == 0, done.stderr
    assert "refused: the C++ slot manager is not available: disabled by M2R2_MOE_NO_EXT=1" in done.stdout


def test_require_ext_fails_the_suite_when_the_core_is_missing():
    """The check above, run with the core switched off, must fail (the same as a broken build in CI)."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::test_required_ext_is_present"],
        env=child_env(M2R2_MOE_NO_EXT="1", M2R2_MOE_REQUIRE_EXT="1"), capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "M2R2_MOE_REQUIRE_EXT=1 but the C++ core is not loaded" in done.stdout


def test_only_ext_loads_native_code():
    pattern = re.compile(r"\b_native(_cuda)?\b.*import|import\s+.*\b_native(_cuda)?\b|import_module\(.*_native")
    offenders = [
        str(path.relative_to(PACKAGE_DIR))
        for path in PACKAGE_DIR.rglob("*.py")
        if path.name != "_ext.py" and pattern.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == [], f"native modules must be loaded through m2r2_moe._ext only: {offenders}"


@pytest.mark.skipif(not _ext.HAS_EXT, reason=f"C++ core not loaded: {_ext.EXT_ERROR}")
def test_native_errors_are_the_package_errors():
    sm = _ext.native.SlotManager(1)
    sm.acquire(1)
    with pytest.raises(m2r2_moe.CacheFullError):
        sm.acquire(2)
    with pytest.raises(m2r2_moe.SlotStateError):
        sm.release(3)
