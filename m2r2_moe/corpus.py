"""The text every machine has: the Python standard library's sources, split by file.

The built-in model is trained on the `train` split; adapters are trained on it too; predictor and
profiler figures are measured on the `heldout` split (files whose path hash starts with 0, ~1/16).
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import torch

EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def stdlib_files() -> tuple[Path, list[str]]:
    """(stdlib root, sorted relative paths of the *.py files used as corpus)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rels = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        parts = rel.parts
        if any(p in EXCLUDED_DIRS or p.startswith("config-") for p in parts[:-1]):
            continue
        if parts[-1].startswith("_sysconfigdata"):  # build-machine specific
            continue
        rels.append(rel.as_posix())
    return root, sorted(rels)


def is_heldout(rel: str) -> bool:
    return hashlib.sha256(rel.encode()).hexdigest()[0] == "0"


def split_files(split: str) -> list[Path]:
    """Absolute paths of the `train` or `heldout` split."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    root, rels = stdlib_files()
    return [root / rel for rel in rels if is_heldout(rel) == (split == "heldout")]


def resolve_text(spec: list[str]) -> list[Path]:
    """Files named on a command line; `builtin:train` / `builtin:heldout` name a corpus split."""
    files: list[Path] = []
    for item in spec:
        if item.startswith("builtin:"):
            files.extend(split_files(item.split(":", 1)[1]))
            continue
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"text file {item} does not exist")
    if not files:
        raise ValueError(f"no text files in {spec}")
    return files


def token_stream(tokenizer, files: list[Path], max_tokens: int | None = None) -> torch.Tensor:
    """One 1-D stream of token ids: each file's tokens followed by EOS, cut at `max_tokens`."""
    eos = tokenizer.eos_token_id
    out: list[int] = []
    for path in files:
        out.extend(tokenizer(path.read_text(errors="replace"), add_special_tokens=False).input_ids)
        if eos is not None:
            out.append(eos)
        if max_tokens is not None and len(out) >= max_tokens:
            break
    return torch.tensor(out[:max_tokens] if max_tokens else out, dtype=torch.long)
