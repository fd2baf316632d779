"""The values options take, parsed: compressed expert formats (`expert_format`) and amounts of memory
(`gpu_memory`, `host_memory`, byte budgets like "8GB"). Each parser names the grammar it expects when a value
does not fit it."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import OffloadConfigError

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
EXPERT_FORMATS = ("model", "int8", "int4")  # "model": the model's own dtype, lossless
# group sizes and symmetry chosen by measurement on the built-in models (BENCHMARKS.md, "Compressed experts")
DEFAULT_GROUP_SIZE = {"int8": 64, "int4": 64}
DEFAULT_SYMMETRIC = {"int8": False, "int4": False}
FORMAT_GRAMMAR = ("'model', 'int8' or 'int4', optionally followed by '-g<N>' (group size: a power of two from 16 to "
                  "1024) and '-sym' or '-asym', e.g. 'int4-g32-sym'")


@dataclass(frozen=True)
class ExpertFormat:
    """A compressed expert format: `bits`-bit integer codes, one scale (float16) per `group_size` consecutive
    weights of a tensor and, unless `symmetric`, one integer zero point (uint8) per group:
    w = (code - zero) * scale. Symmetric formats use the fixed zero point 2^(bits-1)."""

    bits: int
    group_size: int
    symmetric: bool

    @property
    def name(self) -> str:
        return f"int{self.bits}-g{self.group_size}-{'sym' if self.symmetric else 'asym'}"

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1


def parse_expert_format(spec) -> ExpertFormat | None:
    """`expert_format` as an `ExpertFormat` (None for "model"); `OffloadConfigError` naming the grammar."""
    if isinstance(spec, ExpertFormat):
        return spec
    if not isinstance(spec, str):
        raise OffloadConfigError(f"expert_format must be a string: {FORMAT_GRAMMAR}; got {type(spec).__name__} {spec!r}")
    parts = spec.strip().lower().split("-")
    if parts[0] not in EXPERT_FORMATS:
        raise OffloadConfigError(f"expert_format {spec!r} is not a format: {FORMAT_GRAMMAR}")
    if parts[0] == "model":
        if len(parts) > 1:
            raise OffloadConfigError(f"expert_format {spec!r}: 'model' (lossless) takes no options; {FORMAT_GRAMMAR}")
        return None
    group, symmetric = DEFAULT_GROUP_SIZE[parts[0]], DEFAULT_SYMMETRIC[parts[0]]
    for part in parts[1:]:
        if part in ("sym", "asym"):
            symmetric = part == "sym"
        elif part.startswith("g") and part[1:].isdigit() and _power_of_two(int(part[1:]), 16, 1024):
            group = int(part[1:])
        else:
            raise OffloadConfigError(f"expert_format {spec!r}: {part!r} is not an option; {FORMAT_GRAMMAR}")
    return ExpertFormat(int(parts[0][3:]), group, symmetric)


def _power_of_two(n: int, lo: int, hi: int) -> bool:
    return lo <= n <= hi and n & (n - 1) == 0


def parse_bytes(text: str) -> int:
    """'8GB' → 8e9, '512MiB' → 536870912 (decimal KB/MB/GB/TB, binary KiB/MiB/GiB/TiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b|b)?\s*", text.lower())
    if not m:
        raise OffloadConfigError(f"cannot read {text!r} as an amount of memory; write e.g. '8GB', '512MiB' or 'auto'")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def budget_bytes(name: str, value) -> int:
    """A memory budget option (`gpu_memory`, `host_memory`): bytes, or text like '4GiB', as bytes."""
    if isinstance(value, str):
        try:
            return parse_bytes(value)
        except OffloadConfigError:
            raise OffloadConfigError(f"{name}={value!r} is not an amount of memory; write e.g. '4GiB', '512MB' "
                                     "or a number of bytes") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise OffloadConfigError(f"{name} must be a number of bytes or text like '4GiB', got {type(value).__name__} "
                                 f"{value!r}")
    return value
