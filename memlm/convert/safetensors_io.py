"""A small reader/writer for the safetensors format, with bfloat16 (ml_dtypes) and one-line UserErrors.

The format (huggingface/safetensors README): 8 bytes little-endian u64 N, then N bytes of JSON header
  {"<name>": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ..., "__metadata__": {str: str}}
then the raw little-endian tensor bytes, offsets relative to the end of the header.
Why our own: `safetensors.numpy` has no bfloat16, and a malformed file must become a UserError naming it.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from memlm.errors import UserError

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def dtype_name(dtype) -> str:
    """numpy dtype -> safetensors dtype string (F32, BF16, ...)."""
    d = np.dtype(dtype)
    if d not in _NAMES:
        raise UserError(f"safetensors: dtype {d} is not supported")
    return _NAMES[d]


def write(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (name -> array) to `path`, in name order, with string metadata. Written to a temporary
    sibling and renamed: the tensors may be memory-mapped from `path` itself (read() maps files), which an
    in-place rewrite would truncate under them (SIGBUS), and a failed write leaves the old file."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        arr = np.ascontiguousarray(arr).reshape(arr.shape)  # (ascontiguousarray makes 0-d arrays 1-d)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        header[name] = {"dtype": dtype_name(arr.dtype), "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned (as the reference writer does)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for arr in arrays:
                f.write(arr.tobytes())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def read_header(path: str) -> tuple[dict, dict[str, str], int]:
    """({name: {dtype, shape, data_offsets}}, metadata, data start byte). Raises UserError if malformed."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise UserError(f"{path}: not a safetensors file (header length {n} exceeds the file)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (header is not a mapping)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError(f"{path}: __metadata__ is not a mapping of strings (safetensors format)")
    data_size = size - 8 - n
    for name, info in header.items():
        try:
            dt, shape, (b, e) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: tensor {name}: malformed header entry") from None
        if dt not in _DTYPES:
            raise UserError(f"{path}: tensor {name}: dtype {dt} is not supported")
        nbytes = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dt].itemsize
        if not (0 <= b <= e <= data_size) or e - b != nbytes:
            raise UserError(f"{path}: tensor {name}: data offsets {[b, e]} do not match shape {shape} {dt} "
                            f"(file truncated?)")
    return header, dict(metadata), 8 + n


def read(path: str, names: list[str] | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Load tensors (all, or `names`) as numpy arrays (memory-mapped, read-only) and the metadata."""
    header, metadata, start = read_header(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)  # plain arrays (memmap keeps 0-d as 1-d)
    out = {}
    for name in header if names is None else names:
        info = header[name]
        b, e = info["data_offsets"]
        out[name] = mm[start + b : start + e].view(_DTYPES[info["dtype"]]).reshape(tuple(info["shape"]))
    return out, metadata
