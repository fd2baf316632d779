"""A safetensors checkpoint folder read from its headers only, and byte-range reads into given buffers.

`Checkpoint.open(path)` validates the folder before anything is allocated: the config is there, every
shard the index names exists, every header parses and every tensor's byte range lies inside its file
(a truncated download fails here, not halfway through a load). Tensors are then read with `pread`
straight into their destination (a row of the host store, a fresh tensor): no mmap, so nothing of the
checkpoint is counted in the process's RSS, and no intermediate copy when the dtypes agree.

safetensors layout: 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data;
offsets are relative to the end of the header.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CorruptCheckpointError, MissingShardError, NotACheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the checkpoint: where its bytes are."""

    name: str
    file: Path
    offset: int  # absolute byte offset in `file`
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class Checkpoint:
    """The tensors of a transformers checkpoint folder (single `model.safetensors` or sharded + index)."""

    def __init__(self, path: Path, files: list[Path], tensors: dict[str, TensorEntry]):
        self.path = path
        self.files = files
        self.tensors = tensors

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (what the weights weigh, without headers)."""
        return sum(t.nbytes for t in self.tensors.values())

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Checkpoint":
        path = Path(path)
        files, index = _shard_files(path)
        tensors: dict[str, TensorEntry] = {}
        for file in files:
            for entry in read_header(file):
                tensors[entry.name] = entry
        for name, shard in index.items():
            entry = tensors.get(name)
            if entry is None or entry.file.name != shard:
                raise CorruptCheckpointError(
                    f"{path / INDEX_NAME} says tensor {name!r} is in {shard}, but that file has no such tensor: the "
                    "index and the shards come from different saves. Download the checkpoint again."
                )
        return cls(path, files, tensors)


def _shard_files(path: Path) -> tuple[list[Path], dict[str, str]]:
    """The safetensors files of the folder and the index's name → shard map ({} without index)."""
    if not path.is_dir():
        raise NotACheckpointError(
            f"{str(path)!r} is not a checkpoint folder ({'a file' if path.exists() else 'no such path'}); pass the "
            "folder that holds config.json and the model's *.safetensors files."
        )
    if not (path / "config.json").is_file():
        raise NotACheckpointError(f"{path} has no config.json: not a transformers checkpoint folder.")
    index_file = path / INDEX_NAME
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptCheckpointError(f"{index_file} is not a valid safetensors index: {e}") from e
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise MissingShardError(
                f"{path} is incomplete: {len(missing)} of the {len(names)} shards named in {INDEX_NAME} are missing "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}). Download the checkpoint again."
            )
        return [path / n for n in names], weight_map
    if (path / SINGLE_NAME).is_file():
        return [path / SINGLE_NAME], {}
    others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.safetensors"))
    hint = (f" It has {others[:3]}: only safetensors checkpoints with {SINGLE_NAME} or {INDEX_NAME} are read; "
            "re-save with model.save_pretrained(folder).") if others else ""
    raise NotACheckpointError(f"{path} has no {SINGLE_NAME} and no {INDEX_NAME}: no weights to load.{hint}")


def read_header(file: Path) -> list[TensorEntry]:
    """The tensors of one safetensors file, checked against the file's size."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError(f"{file} is truncated ({size} bytes): not a safetensors file.")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CorruptCheckpointError(
                f"{file} is truncated or not a safetensors file: its header claims {header_len} bytes, the file has "
                f"{size}."
            )
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:
            raise CorruptCheckpointError(f"{file}: the safetensors header is not valid JSON ({e}).") from e
    data_start = 8 + header_len
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptCheckpointError(f"{file}: tensor {name!r} has an unreadable header entry {info!r}.") from e
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise CorruptCheckpointError(f"{file}: tensor {name!r} {list(shape)} {info['dtype']} has a byte range "
                                         f"of {end - begin} bytes, expected {numel * dtype.itemsize}.")
        if data_start + end > size:
            raise CorruptCheckpointError(
                f"{file} is truncated: tensor {name!r} ends at byte {data_start + end}, the file has {size} bytes. "
                "Download the checkpoint again."
            )
        entries.append(TensorEntry(name, file, data_start + begin, end - begin, dtype, shape))
    return entries


class Reader:
    """Open file descriptors of a checkpoint's files; `pread`s are thread-safe (no shared file position)."""

    def __init__(self):
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()  # opening only; reads need none

    def fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            with self._lock:
                fd = self._fds.get(file)
                if fd is None:
                    fd = self._fds[file] = os.open(file, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        return fd

    def read_into(self, file: Path, offset: int, dst: torch.Tensor) -> None:
        """Fill the contiguous CPU tensor `dst` with its `nbytes` from `file` at `offset`."""
        view = memoryview(dst.view(-1).view(torch.uint8).numpy())
        fd, done, total = self.fd(file), 0, len(view)
        while done < total:
            n = _pread_into(fd, view[done:], offset + done)
            if n <= 0:
                raise CorruptCheckpointError(f"{file}: unexpected end of file at byte {offset + done} (truncated "
                                             "while loading?).")
            done += n

    def read(self, entry: TensorEntry) -> torch.Tensor:
        """The tensor `entry`, freshly allocated on CPU in its stored dtype."""
        out = torch.empty(entry.shape, dtype=entry.dtype)
        if entry.nbytes:
            self.read_into(entry.file, entry.offset, out)
        return out

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self):
        self.close()


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset) if hasattr(os, "pread") else _seek_read(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)


def _seek_read(fd: int, n: int, offset: int) -> bytes:  # Windows: no pread (callers hold no shared position)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.read(fd, n)
