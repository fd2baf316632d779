"""The only module that loads native code. Callers read the flags; they never `try: import` themselves.

- `HAS_EXT`: the C++ core (`m2r2_moe._native`: slot manager) is loaded; else `EXT_ERROR` says why.
- `HAS_PLANNER`: the C++ prefetch planner (`m2r2_moe._native_plan`: also the M2R2 heads, the CPU copy engine and the
  `predictive` policy's victim search) is loaded; else `PLANNER_ERROR` says why.
- `HAS_CUDA_EXT`: the CUDA copy engine (`m2r2_moe._native_cuda`) is loaded; else `CUDA_EXT_ERROR` says
  why. Loaded does not mean usable: `cuda_probe()` asks the CUDA runtime for a device.
- `M2R2_MOE_NO_EXT=1` skips both (the pure-Python / torch twins are used).
- `M2R2_MOE_REQUIRE_EXT=1` (set by CI) makes the test suite fail when the C++ core is missing
  (tests/test_ext.py), so a broken build cannot pass by falling back to the twins.

Both modules are built by `pip install .` (CMakeLists.txt). When the package itself is imported from a
source checkout (`python -m pytest` in the repository puts the checkout first on sys.path) the
compiled modules are not next to its sources; they are then taken from the installed copy of the same
version, if there is one.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

from .errors import CacheFullError, SlotStateError

logger = logging.getLogger(__name__)

ABI_VERSION = 10  # must equal the ABI_VERSION the compiled modules report
NO_EXT_ENV = "M2R2_MOE_NO_EXT"
REQUIRE_EXT_ENV = "M2R2_MOE_REQUIRE_EXT"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _installed_copy(name: str) -> Path | None:
    """The compiled module `m2r2_moe.<name>` in the installed distribution of this same version."""
    try:
        dist = importlib.metadata.distribution("m2r2_moe")
    except importlib.metadata.PackageNotFoundError:
        return None
    version = getattr(sys.modules[__package__], "__version__", None)  # None while m2r2_moe/__init__ runs
    if version is not None and dist.version != version:
        return None
    for file in dist.files or ():
        parts = Path(str(file)).parts
        if len(parts) == 2 and parts[0] == "m2r2_moe" and parts[1].split(".")[0] == name:
            if parts[1].endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
                path = Path(str(dist.locate_file(file)))
                here = Path(__file__).resolve().parent
                if path.is_file() and path.resolve().parent != here:
                    return path
    return None


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    """(module, None) or (None, why not)."""
    full = f"{__package__}.{name}"
    try:
        module = importlib.import_module(full)
    except ImportError as first:
        path = _installed_copy(name)
        if path is None:
            return None, f"{full} is not built ({first}); reinstall with `pip install .` (needs a C++17 compiler)"
        try:
            spec = importlib.util.spec_from_file_location(full, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules[full] = module
        except ImportError as second:
            return None, f"{full} failed to load from {path}: {second}"
        logger.debug("loaded %s from the installed copy at %s", full, path)
    if getattr(module, "ABI_VERSION", None) != ABI_VERSION:
        return None, (f"{full} at {module.__file__} is from another version (ABI {getattr(module, 'ABI_VERSION', None)}, "
                      f"expected {ABI_VERSION}); reinstall with `pip install .`")
    return module, None


native: ModuleType | None = None
planner: ModuleType | None = None
cuda: ModuleType | None = None
if _env_flag(NO_EXT_ENV):
    EXT_ERROR: str | None = f"disabled by {NO_EXT_ENV}=1"
    PLANNER_ERROR: str | None = f"disabled by {NO_EXT_ENV}=1"
    CUDA_EXT_ERROR: str | None = f"disabled by {NO_EXT_ENV}=1"
else:
    native, EXT_ERROR = _load("_native")
    planner, PLANNER_ERROR = _load("_native_plan")
    cuda, CUDA_EXT_ERROR = _load("_native_cuda")
    if CUDA_EXT_ERROR is not None and "is not built" in CUDA_EXT_ERROR:
        CUDA_EXT_ERROR = "m2r2_moe._native_cuda is not built (it needs nvcc and the CUDA toolkit at install time)"

HAS_EXT = native is not None
HAS_PLANNER = planner is not None
HAS_CUDA_EXT = cuda is not None
if HAS_EXT:
    native._set_error_types(CacheFullError, SlotStateError)
else:
    logger.debug("C++ core not loaded: %s", EXT_ERROR)


def require_ext() -> bool:
    """Whether `M2R2_MOE_REQUIRE_EXT=1` asks for the C++ core (CI)."""
    return _env_flag(REQUIRE_EXT_ENV)


def cuda_probe() -> str:
    """'' when the CUDA copy engine is loaded and the CUDA runtime sees a device, else why not."""
    if cuda is None:
        return CUDA_EXT_ERROR or "not loaded"
    return cuda.probe()


def summary() -> dict[str, object]:
    """The flags and reasons, for `m2r2-moe` diagnostics and bug reports."""
    return {
        "HAS_EXT": HAS_EXT,
        "EXT_ERROR": EXT_ERROR,
        "HAS_PLANNER": HAS_PLANNER,
        "PLANNER_ERROR": PLANNER_ERROR,
        "ext_path": getattr(native, "__file__", None),
        "HAS_CUDA_EXT": HAS_CUDA_EXT,
        "CUDA_EXT_ERROR": CUDA_EXT_ERROR,
        "cuda_ext_path": getattr(cuda, "__file__", None),
    }
