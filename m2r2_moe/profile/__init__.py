"""Expert-traffic profiling: a recorder of hits/prefetch hits/late prefetches/misses and stalls per token
and layer, offline Belady/LRU simulation, the profile command and its reports."""

from .belady import belady_loads, lru_loads
from .recorder import Recorder

__all__ = ["Recorder", "belady_loads", "lru_loads"]
