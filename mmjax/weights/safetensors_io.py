"""Streaming safetensors IO: validated headers, tensor-by-tensor reads, shard-by-shard writes.

A safetensors file is ``u64 little-endian header length | JSON header | data``; the header maps each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data
start) plus an optional ``__metadata__`` string map. Every header is checked against the file size
before any tensor is read, so a truncated download fails with the file's name instead of a numpy
error half-way through loading.

The loader reads parts of tensors: ``ShardedReader.read_rows`` (leading rows, one ``readinto``)
and ``ShardedReader.view`` (a memory map, for other slices). ``ShardedReader.get`` reads a whole
tensor through ``safetensors.safe_open(..., framework="numpy")`` (``ml_dtypes.bfloat16`` for BF16),
with a raw-byte path (``read_raw`` / ``read_array``) for dtypes that path does not know; tests use
both as the reference and to compare tensors byte for byte. Writes stream: the
header is computed from the tensor specs, then each tensor is produced, cast and written in turn, so
at most one tensor (plus whatever the producer caches) is in host memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Callable, Mapping

import ml_dtypes
import numpy as np

from mmjax.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(UserError, ValueError):
    """A checkpoint directory or file cannot be read or does not match the model (one-line message)."""


def dtype_name(dtype) -> str:
    """numpy / jax / string dtype -> safetensors dtype name (``'BF16'``)."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return dtype
    aliases = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "fp32": "F32", "bf16": "BF16", "fp16": "F16"}
    if isinstance(dtype, str) and dtype.lower() in aliases:
        return aliases[dtype.lower()]
    try:
        return _NAMES[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise CheckpointError(f"unsupported tensor dtype {dtype!r} (supported: {', '.join(DTYPES)})") from None


def np_dtype(name: str) -> np.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise CheckpointError(f"unsupported safetensors dtype {name!r} (supported: {', '.join(DTYPES)})") from None


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    dtype: str                   # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int                   # absolute byte offset in the file
    end: int


@dataclasses.dataclass(frozen=True)
class FileHeader:
    path: str
    tensors: dict[str, TensorInfo]     # in data-offset order
    metadata: dict[str, str] | None


def read_header(path: str) -> FileHeader:
    """Parse and validate a safetensors header against the file size (no tensor data is read)."""
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{name}: truncated or corrupt safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"{name}: truncated or corrupt safetensors file (header length {n} "
                                      f"does not fit in {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{name}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{name}: corrupt safetensors file (header is not valid JSON)") from None
    metadata = header.pop("__metadata__", None)
    data_start, data_len = 8 + n, size - 8 - n
    tensors = {}
    covered = 0
    for key, spec in header.items():
        try:
            dt, shape, (b, e) = spec["dtype"], tuple(int(d) for d in spec["shape"]), spec["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{name}: corrupt safetensors header entry for tensor {key}") from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * np_dtype(dt).itemsize
        if e - b != nbytes or b < 0:
            raise CheckpointError(f"{name}: corrupt safetensors header: tensor {key} {dt}{list(shape)} needs "
                                  f"{nbytes} bytes, offsets give {e - b}")
        if e > data_len:
            raise CheckpointError(f"{name}: truncated safetensors file: tensor {key} ends at byte {e} of the data "
                                  f"section, the file has {data_len} data bytes (re-download the file)")
        covered = max(covered, e)
        tensors[key] = TensorInfo(dt, shape, data_start + b, data_start + e)
    if covered != data_len:
        raise CheckpointError(f"{name}: corrupt safetensors file: header describes {covered} data bytes, "
                              f"the file has {data_len}")
    tensors = dict(sorted(tensors.items(), key=lambda kv: kv[1].begin))
    return FileHeader(path, tensors, metadata)


def read_raw(path: str, info: TensorInfo) -> bytes:
    with open(path, "rb") as f:
        f.seek(info.begin)
        data = f.read(info.end - info.begin)
    if len(data) != info.end - info.begin:
        raise CheckpointError(f"{os.path.basename(path)}: truncated safetensors file")
    return data


def read_array(path: str, info: TensorInfo) -> np.ndarray:
    """One tensor from its raw bytes (little-endian on disk, as safetensors requires)."""
    dt = np_dtype(info.dtype).newbyteorder("<")
    return np.frombuffer(read_raw(path, info), dtype=dt).reshape(info.shape).astype(dt.newbyteorder("="), copy=False)


class ShardedReader:
    """Tensor-by-tensor access to a checkpoint's safetensors files (one file or index + shards).

    ``weight_map`` maps each tensor name to its file name; ``headers`` holds the validated header
    of every file; ``index_metadata`` is the index's ``metadata`` (None for a single file).
    """

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, INDEX_FILE)
        single = os.path.join(directory, SINGLE_FILE)
        self.index_metadata = None
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    index = json.load(f)
                weight_map = dict(index["weight_map"])
            except (ValueError, KeyError, TypeError):
                raise CheckpointError(f"{INDEX_FILE}: not a valid safetensors index (needs a 'weight_map')") from None
            self.index_metadata = index.get("metadata", {})
            self.sharded = True
        elif os.path.exists(single):
            weight_map = None
            self.sharded = False
        else:
            raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}")
        files = [SINGLE_FILE] if weight_map is None else list(dict.fromkeys(weight_map.values()))
        for fname in files:
            if not os.path.exists(os.path.join(directory, fname)):
                raise CheckpointError(f"missing shard {fname} (listed in {INDEX_FILE}) in {directory}")
        self.headers: dict[str, FileHeader] = {fname: read_header(os.path.join(directory, fname)) for fname in files}
        if weight_map is None:
            weight_map = {k: SINGLE_FILE for k in self.headers[SINGLE_FILE].tensors}
        else:
            for key, fname in weight_map.items():
                if key not in self.headers[fname].tensors:
                    raise CheckpointError(f"missing tensor {key} in {fname} (listed there by {INDEX_FILE})")
            for fname, hdr in self.headers.items():
                for key in hdr.tensors:
                    if weight_map.get(key) != fname:
                        raise CheckpointError(f"unexpected tensor {key} in {fname} (not mapped there by {INDEX_FILE})")
        self.weight_map: dict[str, str] = weight_map
        self.files = files
        self._handles: dict[str, object] = {}
        self._files: dict[str, object] = {}

    def info(self, key: str) -> TensorInfo:
        return self.headers[self.weight_map[key]].tensors[key]

    def get(self, key: str) -> np.ndarray:
        fname = self.weight_map[key]
        info = self.headers[fname].tensors[key]
        path = os.path.join(self.directory, fname)
        try:
            from safetensors import safe_open
            handle = self._handles.get(fname)
            if handle is None:
                self.close()   # keep at most one file open
                handle = self._handles[fname] = safe_open(path, framework="numpy")
            arr = handle.get_tensor(key)
            if arr.dtype == np_dtype(info.dtype) and tuple(arr.shape) == info.shape:
                return arr
        except (ImportError, TypeError, ValueError):   # dtype unknown to the numpy framework
            pass
        except Exception as e:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"{fname}: cannot read tensor {key} ({e})") from None
        return read_array(path, info)

    def view(self, key: str) -> np.ndarray:
        """The tensor as a read-only memory map of its bytes in the file (HF layout): nothing is read
        until it is indexed, and an index reads only the pages it touches, so a shard of a tensor
        costs the shard's bytes. The mapping goes when the last view of it does."""
        fname = self.weight_map[key]
        info = self.headers[fname].tensors[key]
        dt = np_dtype(info.dtype).newbyteorder("<")
        if info.end == info.begin:   # numpy cannot map zero bytes
            return np.zeros(info.shape, dt)
        try:
            return np.memmap(os.path.join(self.directory, fname), dtype=dt, mode="r", offset=info.begin,
                             shape=info.shape)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{fname}: cannot map tensor {key} ({e})") from None

    def read_rows(self, key: str, first: int, out: np.ndarray) -> np.ndarray:
        """Rows ``[first, first + len(out))`` of the tensor (its leading axis) read into ``out`` (a
        C-contiguous array of the tensor's item size) with one ``readinto``: no mapping, no page
        faults on the file, and ``out`` can be reused from piece to piece."""
        fname = self.weight_map[key]
        info = self.headers[fname].tensors[key]
        row = int(np.prod(info.shape[1:], dtype=np.int64)) * np_dtype(info.dtype).itemsize
        f = self._files.get(fname)
        if f is None:
            f = self._files[fname] = open(os.path.join(self.directory, fname), "rb")
        f.seek(info.begin + first * row)
        view = memoryview(out.view(np.uint8).reshape(-1))   # bytes: ml_dtypes have no buffer format
        if f.readinto(view) != len(view):
            raise CheckpointError(f"{fname}: truncated safetensors file (tensor {key})")
        return out

    def close(self):
        self._handles.clear()
        for f in self._files.values():
            f.close()
        self._files.clear()


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


def layout_header(specs: Mapping[str, tuple[str, tuple[int, ...]]],
                  metadata: Mapping[str, str] | None = None) -> tuple[bytes, list[tuple[str, int]]]:
    """Header bytes (padded to 8 bytes) and the write order ``[(key, nbytes)]``.

    Tensors are ordered as the reference serializer orders them (larger dtype first, then name)."""
    order = sorted(specs, key=lambda k: (-np_dtype(specs[k][0]).itemsize, k))
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    offset, plan = 0, []
    for key in order:
        dt, shape = specs[key]
        nbytes = int(np.prod(shape, dtype=np.int64)) * np_dtype(dt).itemsize
        header[key] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        plan.append((key, nbytes))
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, plan


def write_file(path: str, specs: Mapping[str, tuple[str, tuple[int, ...]]],
               produce: Callable[[str], np.ndarray], metadata: Mapping[str, str] | None = None) -> int:
    """Write one safetensors file, calling ``produce(key)`` for each tensor in turn.

    ``produce`` returns an array of the spec's shape; it is cast to the spec's dtype here. Writes to
    ``path + '.tmp'`` and renames, so an interrupted save never leaves a valid-looking partial file.
    Returns the number of data bytes written.
    """
    head, plan = layout_header(specs, metadata)
    tmp = path + ".tmp"
    total = 0
    with open(tmp, "wb") as f:
        f.write(head)
        for key, nbytes in plan:
            dt, shape = specs[key]
            arr = np.asarray(produce(key))
            if tuple(arr.shape) != tuple(shape):
                raise CheckpointError(f"tensor {key}: shape {tuple(arr.shape)} != expected {tuple(shape)} "
                                      f"while writing {os.path.basename(path)}")
            arr = np.ascontiguousarray(arr.astype(np_dtype(dt).newbyteorder("<"), copy=False))
            data = arr.tobytes()
            assert len(data) == nbytes, (key, len(data), nbytes)
            f.write(data)
            total += nbytes
            del arr, data
    os.replace(tmp, path)
    return total


def write_index(directory: str, weight_map: Mapping[str, str], metadata: Mapping[str, object]) -> None:
    index = {"metadata": dict(metadata), "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        f.write(json.dumps(index, indent=2, sort_keys=False) + "\n")
