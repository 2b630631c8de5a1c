"""Strict reader and atomic writer for ``.safetensors`` files, without torch and without the safetensors package.

Format (https://github.com/huggingface/safetensors, "Format" section of the README)::

    [8 bytes]  N, unsigned little-endian 64-bit integer: size of the header
    [N bytes]  UTF-8 JSON object, starting with '{' and possibly right-padded with spaces (0x20):
                 {"__metadata__": {str: str, ...},                       (optional)
                  "<tensor name>": {"dtype": "F16", "shape": [d0, ...], "data_offsets": [begin, end]}, ...}
    [rest]     the data area: raw little-endian, C-order tensor bytes; offsets are relative to its start

The reader validates what the reference Rust implementation validates (and a little more): the header length
must fit in the file and be <= 100 MB, the JSON must be an object without duplicate keys, every entry must have
exactly dtype/shape/data_offsets with the right types, and the entries, sorted by begin offset, must tile the
data area exactly (no overlap, no gap, nothing left over) with ``end - begin == itemsize * prod(shape)``.

Memory: the file is memory-mapped once (read-only) and every returned array is an ``np.frombuffer`` view into
that map, so reading copies nothing; pages are read from disk when an array is first touched. The map stays
alive as long as any returned array does. Arrays are read-only.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import secrets
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from convert.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1000 * 1000  # same limit as the reference implementation
_ENTRY_FIELDS = frozenset({"dtype", "shape", "data_offsets"})

# safetensors dtype name <-> numpy dtype. Sub-byte types (F4, F6_*) are not supported.
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "F8_E5M2FNUZ": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
# Keyed by the native-order dtype; a big-endian input is byte-swapped before the lookup.
_NAMES: dict[np.dtype, str] = {dt: name for name, dt in _DTYPES.items()}


# --------------------------------------------------------------------------------------------------- reading


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str] | None]:
    """Read a .safetensors file: ({name: read-only memory-mapped array}, the ``__metadata__`` dict or None).

    Tensors are returned in header order. Every malformation raises :class:`CheckpointError` naming the file.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise CheckpointError(f"{path}: not a safetensors file: {size} bytes, shorter than the 8-byte "
                                      "header size")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: safetensors header size {n} bytes exceeds the "
                                      f"{MAX_HEADER_BYTES}-byte limit")
            if 8 + n > size:
                raise CheckpointError(f"{path}: safetensors header size {n} is larger than the file ({size} "
                                      "bytes): truncated or not a safetensors file")
            raw_header = f.read(n)
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e

    entries, metadata = _parse_header(path, raw_header)
    data_start, data_len = 8 + n, size - 8 - n
    _check_layout(path, entries, data_len)
    tensors = {}
    for name, (dtype, shape, (begin, end)) in entries.items():
        count = (end - begin) // dtype.itemsize
        tensors[name] = np.frombuffer(mm, dtype=dtype, count=count, offset=data_start + begin).reshape(shape)
    return tensors, metadata


_Entry = tuple[np.dtype, tuple[int, ...], tuple[int, int]]  # dtype, shape, (begin, end) in the data area


def _parse_header(path: str, raw: bytes) -> tuple[dict[str, _Entry], dict[str, str] | None]:
    """Decode and type-check the JSON header; returns ({name: (dtype, shape, (begin, end))}, metadata)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: safetensors header is not valid UTF-8 ({e.reason} at byte {8 + e.start})"
                              ) from e
    if not text.startswith("{"):
        raise CheckpointError(f"{path}: safetensors header does not start with '{{': not a safetensors file")

    def no_duplicates(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise CheckpointError(f"{path}: safetensors header has duplicate key {key!r}")
            seen.add(key)
        return dict(pairs)

    def no_constants(name):
        raise CheckpointError(f"{path}: safetensors header contains the non-JSON constant {name}")

    try:
        header = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is a JSON {type(header).__name__}, expected an object")

    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise CheckpointError(f"{path}: safetensors '__metadata__' must be an object mapping strings to strings")

    entries = {}
    for name, info in header.items():
        where = f"{path}: tensor {name!r}:"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where} header entry is a JSON {type(info).__name__}, expected an object")
        if set(info) != _ENTRY_FIELDS:
            missing, extra = sorted(_ENTRY_FIELDS - set(info)), sorted(set(info) - _ENTRY_FIELDS)
            raise CheckpointError(f"{where} header entry must have exactly dtype, shape, data_offsets "
                                  f"(missing {missing}, unexpected {extra})")
        dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype_name, str):
            raise CheckpointError(f"{where} dtype must be a string, got {dtype_name!r}")
        if dtype_name not in _DTYPES:
            raise CheckpointError(f"{where} unknown or unsupported dtype {dtype_name!r} "
                                  f"(supported: {', '.join(_DTYPES)})")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise CheckpointError(f"{where} shape must be a list of non-negative integers, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
            raise CheckpointError(f"{where} data_offsets must be [begin, end] non-negative integers, "
                                  f"got {offsets!r}")
        entries[name] = (_DTYPES[dtype_name], tuple(shape), (offsets[0], offsets[1]))
    return entries, metadata


def _is_uint(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_layout(path: str, entries: dict, data_len: int) -> None:
    """Entries sorted by begin offset must tile [0, data_len) exactly; byte sizes must match dtype x shape."""
    position = 0
    for name, (dtype, shape, (begin, end)) in sorted(entries.items(), key=lambda item: item[1][2]):
        where = f"{path}: tensor {name!r}:"
        if end < begin:
            raise CheckpointError(f"{where} data_offsets [{begin}, {end}] end before begin")
        if end > data_len:
            raise CheckpointError(f"{where} data_offsets [{begin}, {end}] outside the data area ({data_len} "
                                  "bytes): truncated file?")
        if begin < position:
            raise CheckpointError(f"{where} data_offsets [{begin}, {end}] overlap the previous tensor "
                                  f"(ends at {position})")
        if begin > position:
            raise CheckpointError(f"{where} data_offsets [{begin}, {end}] leave a gap after byte {position} "
                                  "of the data area")
        expected = dtype.itemsize * math.prod(shape)
        if end - begin != expected:
            raise CheckpointError(f"{where} {end - begin} bytes but dtype {dtype.name} x shape {list(shape)} "
                                  f"needs {expected}")
        position = end
    if position != data_len:
        raise CheckpointError(f"{path}: {data_len - position} bytes after the last tensor are not covered by "
                              "the header")


# --------------------------------------------------------------------------------------------------- writing


def check_output_path(path: str | os.PathLike) -> None:
    """Refuse, before any work, an output path `write_safetensors` could not replace: a directory, a name in a
    folder that does not exist (or is a file), a folder without write permission. Raises CheckpointError."""
    path = os.fspath(path)
    if not path:
        raise CheckpointError("the output file path is empty")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, expected a .safetensors file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CheckpointError(f"{path}: the folder {folder} does not exist" if not os.path.lexists(folder)
                              else f"{path}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CheckpointError(f"{path}: cannot write in {folder}: permission denied")


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` (numpy arrays or anything ``np.asarray`` accepts) to ``path`` atomically.

    Keys are written in sorted order; the header is padded with spaces to a multiple of 8 bytes so that the data
    area is 8-byte aligned; data is little-endian C order. Tensors are converted and written one at a time
    (never all at once). The file appears at ``path`` only when complete (temporary file in the same directory,
    fsync, ``os.replace``); on any error nothing is left behind. Raises :class:`CheckpointError`.
    """
    path = os.fspath(path)
    if metadata is not None and not (
        isinstance(metadata, Mapping)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise CheckpointError(f"{path}: safetensors metadata must map strings to strings")
    names = sorted(tensors)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in names:
        if not isinstance(name, str) or name == "__metadata__":
            raise CheckpointError(f"{path}: invalid tensor name {name!r}")
        dtype, shape = _describe(path, name, tensors[name])
        nbytes = dtype.itemsize * math.prod(shape)
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    if len(blob) > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: safetensors header would be {len(blob)} bytes, over the "
                              f"{MAX_HEADER_BYTES}-byte limit")

    directory, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode honours the umask, unlike mkstemp
    except OSError as e:
        raise CheckpointError(f"{path}: cannot create a temporary file in {directory}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name in names:
                begin, end = header[name]["data_offsets"]
                f.write(_little_endian_bytes(path, name, tensors[name], end - begin))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise CheckpointError(f"{path}: cannot write: {e.strerror or e}") from e
        raise
    _fsync_directory(directory)


def _describe(path: str, name: str, value) -> tuple[np.dtype, tuple[int, ...]]:
    """(native-order dtype, shape) of a tensor to write, without converting or transferring its data yet."""
    if not (hasattr(value, "dtype") and hasattr(value, "shape")):  # lists, scalars: convert (they are small)
        value = np.asarray(value)
    dtype = np.dtype(value.dtype)
    if dtype.byteorder == ">":
        dtype = dtype.newbyteorder("=")
    if dtype not in _NAMES:
        raise CheckpointError(f"{path}: tensor {name!r}: dtype {value.dtype} cannot be stored in safetensors")
    return dtype, tuple(int(d) for d in value.shape)


def _little_endian_bytes(path: str, name: str, value, nbytes: int) -> np.ndarray:
    """A flat uint8 view of the tensor's little-endian C-order bytes (copies only if needed)."""
    arr = np.asarray(value)
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and not np.little_endian):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    if flat.nbytes != nbytes:  # the value changed between planning the header and writing it
        raise CheckpointError(f"{path}: tensor {name!r}: {flat.nbytes} bytes, the header says {nbytes}")
    return flat


def _fsync_directory(directory: str) -> None:
    """Make the rename durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
