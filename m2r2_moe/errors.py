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


class CheckpointError(M2R2Error, ValueError):
    """A checkpoint folder cannot be loaded: base of the errors below (`from_pretrained`)."""


class NotACheckpointError(CheckpointError, FileNotFoundError):
    """The path is not a transformers checkpoint folder with safetensors weights."""


class MissingShardError(CheckpointError, FileNotFoundError):
    """The checkpoint's index names a shard file that is not there."""


class CorruptCheckpointError(CheckpointError):
    """A safetensors file is truncated or its header cannot be parsed."""


class WeightsMismatchError(CheckpointError):
    """The checkpoint's tensors do not match the model its config describes (shape, missing tensors)."""


class HostMemoryError(M2R2Error, MemoryError):
    """The host store (or the model's CPU part) would not fit in the host memory available."""


class DeviceMemoryError(M2R2Error, MemoryError):
    """The device budget cannot hold the non-expert weights and at least top-k expert slots."""


class ConcurrentUseError(M2R2Error, RuntimeError):
    """An offloaded model was called from a second thread while a forward of it was running."""


class CopyError(M2R2Error, RuntimeError):
    """A host→device expert copy failed, and so did its retry."""


class CopyTimeoutError(CopyError, TimeoutError):
    """An expert copy did not land within `OffloadConfig.copy_timeout_s`."""


class OffloadedOperationError(M2R2Error, RuntimeError):
    """An offloaded model cannot do this in place (backward through its experts, a dtype or device change,
    a copy, loading expert weights); the message names what to do instead. Nothing was changed."""


class OffloadConfigError(ValueError):
    """An `OffloadConfig` field has a value the runtime cannot use."""
