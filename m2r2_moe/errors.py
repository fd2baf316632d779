"""Exceptions raised by m2r2_moe. Each message names the problem and the fix."""


class M2R2Error(Exception):
    """Base class of every error this package raises on purpose."""


class UnsupportedModelError(M2R2Error, TypeError):
    """The model has no MoE blocks, or a layout no adapter understands."""


class AlreadyOffloadedError(M2R2Error, RuntimeError):
    """`offload` was called on a model that is already offloaded."""


class NotOffloadedError(M2R2Error, RuntimeError):
    """A function that needs an offloaded model got a plain one."""


class CacheFullError(M2R2Error, RuntimeError):
    """Every device slot is pinned by the current layer: nothing can be evicted."""


class SlotStateError(M2R2Error, RuntimeError):
    """A slot operation does not match the slot's state (for example releasing an expert not held)."""
