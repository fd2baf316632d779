"""Which expert store from_pretrained fills, and how: the RAM store (the checkpoint's bytes into the packed
rows), the disk store (nothing to fill), the compressed store (quantized while streaming the checkpoint, or
read from the compressed store saved next to the checkpoint, so that the quantization is done once).

Quantizing streams expert by expert: an expert's byte ranges are read into one staging row in the model's
dtype and quantized into its compressed row, so host memory holds the compressed store and one expert more,
never the model-dtype experts. `save_compressed=True` then writes the rows to
`<checkpoint>/m2r2_moe-experts-<format>-<dtype>.safetensors` (one uint8 tensor `layer.<l>` `[E, row bytes]`
per MoE layer; written through a temporary file and renamed), and a later `from_pretrained` with the same
format reads the rows from it instead of quantizing. The file records a fingerprint of what it was made from
(every checkpoint file's name, size and modification time, the dtype, the format and each layer's row
layout): a file that does not match is ignored, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import M2R2Error
from ..config import OffloadConfig, OffloadConfigError
from ..runtime.compressed import CompressedExpertStore
from ..runtime.disk_store import DiskExpertStore
from .reader import Checkpoint, Reader, read_header
from .weight_map import WeightMap, read_piece

logger = logging.getLogger(__name__)

KIND = "m2r2_moe compressed experts"
VERSION = "1"


def check_format_options(cfg: OffloadConfig, expert_store: str, save_compressed: bool, path) -> None:
    """Refuse, before anything is read, what a compressed format cannot do."""
    if cfg.resolved_format() is None:
        if save_compressed:
            raise OffloadConfigError("save_compressed=True saves a compressed store, but expert_format is 'model' "
                                     "(nothing is compressed); pass expert_format='int8' or 'int4'.")
        return
    if expert_store == "disk":
        raise OffloadConfigError(f"expert_format={cfg.expert_format!r} compresses the experts in host RAM; "
                                 "expert_store='disk' reads the checkpoint's own bytes. Use one or the other.")
    if save_compressed and isinstance(path, (str, os.PathLike)) and Path(path).is_dir() and not os.access(path, os.W_OK):
        raise OffloadConfigError(f"save_compressed=True writes the compressed store into {str(path)!r}, which is not "
                                 "writable; drop save_compressed or make the folder writable.")


def expert_store_and_fill(expert_store: str, cfg: OffloadConfig, packings, layers, wmap: WeightMap, reader: Reader,
                          ckpt: Checkpoint, save_compressed: bool, progress: bool):
    """(the store to attach, None for the runtime's own RAM store; `fill(store)` for `Offloader.install`)."""
    num_experts = [int(layer.experts.num_experts) for layer in layers]
    fmt, pin = cfg.resolved_format(), cfg.resolved_pin_memory()
    if expert_store == "disk":
        return DiskExpertStore(packings, num_experts, wmap.expert_pieces(), pin), lambda store: None
    if fmt is None:
        return None, lambda store: fill_ram(store, wmap, reader, progress)
    originals = DiskExpertStore(packings, num_experts, wmap.expert_pieces(), False)  # the way back: the checkpoint
    store = CompressedExpertStore(packings, num_experts, fmt, pin, originals=originals)
    return store, lambda store: fill_compressed(store, wmap, reader, ckpt, save_compressed, progress)


def fill_ram(store, wmap: WeightMap, reader: Reader, progress: bool) -> None:
    """Stream the expert bytes into the packed store rows, file by file in offset order."""
    total = sum(p.numel * p.entry.dtype.itemsize for p in wmap.pieces)
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc="experts -> host store", disable=not progress) as bar:
            for piece in wmap.pieces:
                read_piece(reader, piece, store.expert(piece.layer, piece.expert))
                bar.update(piece.numel * piece.entry.dtype.itemsize)
    except BaseException:
        _free(store)
        raise


def _free(store) -> None:
    if isinstance(getattr(store, "buffers", None), list):
        store.buffers.clear()  # free the (pinned) rows now, not when the traceback is dropped


def compressed_path(folder: str | os.PathLike, fmt_name: str, dtype: torch.dtype) -> Path:
    """Where the compressed store of a checkpoint folder is saved for a format and dtype."""
    return Path(folder) / f"m2r2_moe-experts-{fmt_name}-{str(dtype).removeprefix('torch.')}.safetensors"


def fingerprint(ckpt: Checkpoint, store: CompressedExpertStore) -> str:
    """What the compressed rows were made from: the checkpoint's files (name, size, mtime), dtype, layouts."""
    h = hashlib.sha256()
    for file in ckpt.files:
        st = file.stat()
        h.update(f"{file.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    for layout in store.layouts:
        h.update(repr((layout.packing, layout.format, layout.nbytes)).encode())
    return h.hexdigest()


def fill_compressed(store: CompressedExpertStore, wmap: WeightMap, reader: Reader, ckpt: Checkpoint,
                    save: bool, progress: bool) -> None:
    """Fill the compressed store: from its saved file when it matches, else by quantizing the checkpoint
    (and then writing the file when `save`)."""
    dtype = store.packings[0].dtype
    path = compressed_path(ckpt.path, store.format.name, dtype)
    mark = fingerprint(ckpt, store)
    if path.is_file() and _load(store, path, mark, reader):
        logger.info("compressed experts read from %s", path)
        return
    try:
        _quantize(store, wmap, reader, progress)
    except BaseException:
        _free(store)
        raise
    if save:
        write(store, path, mark)
        logger.info("compressed experts saved to %s", path)


def _quantize(store: CompressedExpertStore, wmap: WeightMap, reader: Reader, progress: bool) -> None:
    """Read each expert into a staging row (the model's dtype) and quantize it into its compressed row; the
    experts in the order their bytes sit in the files."""
    by_expert = wmap.expert_pieces()
    order = sorted(by_expert, key=lambda k: min((str(p.entry.file), p.offset) for p in by_expert[k]))
    staging: dict[int, torch.Tensor] = {}
    total = sum(p.numel * p.entry.dtype.itemsize for p in wmap.pieces)
    with tqdm(total=total, unit="B", unit_scale=True, desc="experts -> compressed store", disable=not progress) as bar:
        for layer, expert in order:
            packing = store.packings[layer]
            row = staging.get(packing.numel)
            if row is None:
                row = staging[packing.numel] = torch.zeros(packing.numel, dtype=packing.dtype)  # [numel]
            for piece in by_expert[(layer, expert)]:
                read_piece(reader, piece, row)
                bar.update(piece.numel * piece.entry.dtype.itemsize)
            store.fill_expert(layer, expert, row)


def write(store: CompressedExpertStore, path: Path, mark: str) -> None:
    """Write the rows as a safetensors file (streamed layer by layer: no second copy in memory), atomically."""
    header, offset = {}, 0
    for layer, rows in enumerate(store.buffers):
        nbytes = rows.numel()
        header[f"layer.{layer}"] = {"dtype": "U8", "shape": list(rows.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"kind": KIND, "version": VERSION, "expert_format": store.format.name,
                              "dtype": str(store.packings[0].dtype), "fingerprint": mark}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for rows in store.buffers:
                f.write(memoryview(rows.contiguous().numpy()).cast("B"))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _load(store: CompressedExpertStore, path: Path, mark: str, reader: Reader) -> bool:
    """Read the rows from a saved file; False (nothing read) when it was made from something else."""
    try:
        meta = _metadata(path)
        entries = {e.name: e for e in read_header(path)}
    except (OSError, ValueError, M2R2Error) as e:
        logger.warning("%s cannot be read (%s); quantizing the checkpoint instead", path, e)
        return False
    expected = {f"layer.{l}": tuple(rows.shape) for l, rows in enumerate(store.buffers)}
    if (meta.get("kind") != KIND or meta.get("version") != VERSION or meta.get("fingerprint") != mark
            or {n: e.shape for n, e in entries.items()} != expected):
        logger.warning("%s was made from other weights, another dtype or another version of the format; "
                       "quantizing the checkpoint instead (save_compressed=True replaces it)", path)
        return False
    for name, entry in entries.items():
        reader.read_into(path, entry.offset, store.buffers[int(name.split(".")[1])].view(-1))
    return True


def _metadata(path: Path) -> dict:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length)).get("__metadata__", {})
