"""Which copy engine a runtime gets: CPU (a C++ worker thread, or its Python twin where the native module is
missing or M2R2_MOE_NO_EXT=1; optional emulated link), CUDA (torch), or the native CUDA one."""

from __future__ import annotations

import logging
import os

import torch

from . import cpu_native
from .cpu_engine import ThreadCopyEngine
from .cuda_engine import CudaCopyEngine

logger = logging.getLogger(__name__)


def make_copy_engine(device: torch.device, link_gbps: float | None, link_latency_us: float):
    if device.type == "cuda":
        # -- native engine (csrc/copy_engine.cu, via runtime/cuda_native.py): opt-in with
        #    M2R2_MOE_NATIVE_CUDA=1 until it has been validated on a GPU (benchmarks/gpu_check.sh);
        #    CudaCopyEngine is its torch twin and the default. --
        if os.environ.get("M2R2_MOE_NATIVE_CUDA") == "1":
            from . import cuda_native

            reason = cuda_native.available()
            if not reason:
                return cuda_native.NativeCudaCopyEngine(device)
            logger.warning("M2R2_MOE_NATIVE_CUDA=1 but the native CUDA copy engine cannot run: %s", reason)
        # -- end native engine --
        return CudaCopyEngine(device)
    if cpu_native.available():
        return cpu_native.NativeCopyEngine(link_gbps, link_latency_us)
    return ThreadCopyEngine(link_gbps, link_latency_us)
