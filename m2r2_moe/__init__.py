"""m2r2_moe: run Mixture-of-Experts models on GPUs too small to hold their experts.

    model = m2r2_moe.offload(model, device="cuda", cache_experts=64)
    model.generate(**inputs)
    print(m2r2_moe.stats(model))
    m2r2_moe.remove_offload(model)
"""

from .api import get_offloader, is_offloaded, memory_plan, offload, remove_offload, reset_stats, save_profile, stats
from .budget import MemoryBudgetError
from .builtin import builtin_model_path, load_builtin
from .config import OffloadConfig, OffloadConfigError
from .errors import (
    AlreadyOffloadedError,
    CacheFullError,
    ConcurrentUseError,
    CopyError,
    CopyTimeoutError,
    DeviceMemoryError,
    HostMemoryError,
    M2R2Error,
    NotOffloadedError,
    OffloadedOperationError,
    SlotStateError,
    UnsupportedModelError,
)
from .checkpoint.loader import from_pretrained
from .stats import OffloadStats
from .warm import ProfileError

__version__ = "0.1.0"

__all__ = [
    "offload",
    "from_pretrained",
    "builtin_model_path",
    "load_builtin",
    "remove_offload",
    "stats",
    "reset_stats",
    "is_offloaded",
    "get_offloader",
    "save_profile",
    "memory_plan",
    "OffloadConfig",
    "OffloadConfigError",
    "OffloadStats",
    "M2R2Error",
    "UnsupportedModelError",
    "AlreadyOffloadedError",
    "NotOffloadedError",
    "OffloadedOperationError",
    "CacheFullError",
    "SlotStateError",
    "ConcurrentUseError",
    "CopyError",
    "CopyTimeoutError",
    "DeviceMemoryError",
    "HostMemoryError",
    "MemoryBudgetError",
    "ProfileError",
]
