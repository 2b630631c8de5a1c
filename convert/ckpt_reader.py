"""Torch-free reader for ``torch.save`` checkpoints (.ckpt / .pt / .pth / .bin) that never runs code from the file.

Format: the zip serialization of torch >= 1.6 (``torch/serialization.py`` ``_save``/``_load``, written by
``PyTorchStreamWriter`` in ``caffe2/serialize/inline_container.cc``)::

    <prefix>/data.pkl       pickle (protocol 2) of the saved object; each storage is a persistent id
                            ('storage', storage_type, key, location, numel)
    <prefix>/data/<key>     the raw bytes of storage <key>, stored uncompressed (ZIP_STORED), 64-byte aligned
    <prefix>/byteorder      'little' or 'big' (absent before torch 1.10: little)
    <prefix>/version, .format_version, .storage_alignment, .data/serialization_id    (not needed)

A tensor is pickled as a call ``torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride,
requires_grad, backward_hooks[, metadata])`` over a typed storage (``torch.FloatStorage`` ...), or, for dtypes
without a legacy storage class (float8, uint16, ...), ``_rebuild_tensor_v3(untyped_storage, storage_offset,
size, stride, requires_grad, backward_hooks, dtype[, metadata])`` with ``torch.<dtype>`` as the dtype.

Safety: data.pkl is read by a restricted ``pickle.Unpickler`` whose ``find_class`` resolves only the names in
``_PLAIN_TYPES`` (builtin containers and numbers, OrderedDict), ``_FUNCTIONS`` (torch-free replacements for the
Parameter rebuilders, ``_codecs.encode`` and numpy scalars), our own tensor rebuilders, and immutable markers for
storage types and torch dtypes; it turns a short list of known classes (``_STUBBED``: Lightning callbacks and
hparams, and ``torch.nn.ParameterDict``, the holder of rinongal-era textual-inversion embeddings) into inert stubs
that keep what they are given as data and run nothing; every other global is refused with a
:class:`CheckpointError` before anything is called. Nothing is imported from the file, and what the pickle
receives cannot be modified by its BUILD opcodes.

Memory: storages of uncompressed members are ``np.frombuffer`` views of one read-only ``mmap`` of the file, so
contiguous tensors (the normal case: every tensor of a state dict) are views and copy nothing; a
non-contiguous view (e.g. a saved ``.t()``) is materialised as a new C-contiguous array. Compressed members (not
written by torch) and big-endian files are read into memory. The zip CRCs of mapped members are not checked.

Legacy (torch < 1.6, ``_use_new_zipfile_serialization=False``) files are refused with instructions.
"""

from __future__ import annotations

import collections
import io
import math
import mmap
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

from convert.errors import CheckpointError

# torch.<name> dtype globals (pickled by _rebuild_tensor_v3 and by code that saves dtypes) -> numpy dtype.
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64), "double": np.dtype(np.float64),
    "float32": np.dtype(np.float32), "float": np.dtype(np.float32),
    "float16": np.dtype(np.float16), "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64), "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32), "int": np.dtype(np.int32),
    "int16": np.dtype(np.int16), "short": np.dtype(np.int16),
    "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16), "uint32": np.dtype(np.uint32), "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn), "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz), "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "float8_e8m0fnu": np.dtype(ml_dtypes.float8_e8m0fnu),
}

# Legacy typed storage classes -> element dtype. UntypedStorage holds bytes (numel counts bytes).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "torch.DoubleStorage": _TORCH_DTYPES["float64"], "torch.FloatStorage": _TORCH_DTYPES["float32"],
    "torch.HalfStorage": _TORCH_DTYPES["float16"], "torch.BFloat16Storage": _TORCH_DTYPES["bfloat16"],
    "torch.LongStorage": _TORCH_DTYPES["int64"], "torch.IntStorage": _TORCH_DTYPES["int32"],
    "torch.ShortStorage": _TORCH_DTYPES["int16"], "torch.CharStorage": _TORCH_DTYPES["int8"],
    "torch.ByteStorage": _TORCH_DTYPES["uint8"], "torch.BoolStorage": _TORCH_DTYPES["bool"],
    "torch.storage.UntypedStorage": np.dtype(np.uint8), "torch.UntypedStorage": np.dtype(np.uint8),
}

# Classes known to appear in training checkpoints beside the weights. They become inert stubs: instances accept
# any constructor arguments and state and run nothing; the real module is never imported.
_STUBBED = frozenset(
    f"{package}.{name}"
    for package in ("pytorch_lightning", "lightning.pytorch")
    for name in (
        "callbacks.model_checkpoint.ModelCheckpoint",  # in sd-v1-4.ckpt (as a dict key of "callbacks")
        "callbacks.early_stopping.EarlyStopping",
        "callbacks.lr_monitor.LearningRateMonitor",
        "utilities.parsing.AttributeDict",  # hparams
    )
) | {
    # rinongal/textual_inversion embeddings.pt: {"string_to_token": {...}, "string_to_param": nn.ParameterDict}.
    # The stub only lets the reader reach those two key names (convert.file_kinds then names the file); being no
    # tensor, it is refused like any other non-tensor value if it ever turns up inside a state dict.
    "torch.nn.modules.container.ParameterDict",
}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a torch < 1.6 (non-zip) file
_ZIP_MAGIC = b"PK\x03\x04"


class _Frozen:
    """Base of the objects handed to the pickle: immutable, so a BUILD opcode cannot alter them."""

    __slots__ = ()

    def __init__(self, **fields):
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise CheckpointError(f"refuses to modify {self!r}")

    def __setstate__(self, state):
        raise CheckpointError(f"refuses to modify {self!r}")


class _StorageType(_Frozen):
    """What ``torch.FloatStorage`` & co. resolve to: a marker carrying the element dtype (not callable)."""

    __slots__ = ("name", "dtype")

    def __repr__(self):
        return f"<storage type {self.name}>"


class _TorchDtype(_Frozen):
    """What ``torch.float16`` & co. resolve to (an immutable marker; numpy's own dtypes are shared singletons)."""

    __slots__ = ("name", "dtype")

    def __repr__(self):
        return f"torch.{self.name}"


class _Storage(_Frozen):
    """One storage record: its raw bytes (uint8 array) and, for typed storages, the element dtype."""

    __slots__ = ("key", "raw", "dtype")

    def __repr__(self):
        return f"<storage {self.key!r}: {self.raw.nbytes} bytes>"


class _Call(_Frozen):
    """An allowlisted function as seen by the pickle (immutable, unlike a Python function object)."""

    __slots__ = ("name", "fn")

    def __call__(self, *args):
        return self.fn(*args)

    def __repr__(self):
        return f"<allowed {self.name}>"


class _InertStub:
    """Stand-in for a known training-state class: keeps whatever it is given as data, executes nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<inert stub for {type(self).__module__}.{type(self).__qualname__}>"


def _encode_latin1(text, encoding="latin1"):
    """``_codecs.encode`` as used by protocol-2 pickles of ``bytes``; only latin-1 is accepted."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointError(f"refuses _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _numpy_dtype(spec, align=False, copy=True):
    """``numpy.dtype(spec, align, copy)``: always a private copy, since the pickle then BUILDs (mutates) it."""
    dtype = np.dtype(spec, bool(align), True) if isinstance(spec, str) else None
    if dtype is None or dtype is np.dtype(spec) or dtype.hasobject:
        raise CheckpointError(f"refuses numpy.dtype({spec!r})")
    return dtype


def _numpy_scalar(dtype, data=None):
    """``numpy.core.multiarray.scalar(dtype, bytes)``: a numpy scalar of a plain (non-object) dtype."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise CheckpointError("refuses a numpy scalar that is not plain data")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _first_arg(data, *_):  # torch._utils._rebuild_parameter(_with_state): a Parameter is just its tensor here
    return data


# Immutable builtin types for plain containers and numbers (a BUILD on a type raises TypeError).
_PLAIN_TYPES = {f"builtins.{t.__name__}": t for t in (dict, list, tuple, set, frozenset, bytearray, bytes, str, int,
                                                      float, complex, bool, slice)}
_PLAIN_TYPES.update({"collections.OrderedDict": collections.OrderedDict, "torch.Size": tuple})
_FUNCTIONS = {
    "torch._utils._rebuild_parameter": _first_arg,
    "torch._utils._rebuild_parameter_with_state": _first_arg,
    "_codecs.encode": _encode_latin1,
    "numpy.dtype": _numpy_dtype,
    "numpy.core.multiarray.scalar": _numpy_scalar,
    "numpy._core.multiarray.scalar": _numpy_scalar,
}
_SAFE_DTYPES = frozenset(_TORCH_DTYPES.values())


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allowlisted globals and reads storages through ``load_storage``."""

    def __init__(self, file, path: str, load_storage=None, big_endian: bool = False):
        super().__init__(file)
        self._path, self._load_storage, self._big_endian = path, load_storage, big_endian
        self._storages: dict[str, np.ndarray] = {}  # raw bytes by key: tensors sharing a storage share them
        self._stubs: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        module = {"__builtin__": "builtins"}.get(module, module)  # protocol-2 spelling of builtins
        full = f"{module}.{name}"
        if full in _PLAIN_TYPES:
            return _PLAIN_TYPES[full]
        if full in _FUNCTIONS:
            return _Call(name=full, fn=_FUNCTIONS[full])
        if full in ("torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2"):
            return _Call(name=full, fn=self._rebuild_tensor_v2)
        if full == "torch._utils._rebuild_tensor_v3":
            return _Call(name=full, fn=self._rebuild_tensor_v3)
        if full in _STORAGE_DTYPES:
            return _StorageType(name=full, dtype=_STORAGE_DTYPES[full])
        if module == "torch" and name in _TORCH_DTYPES:
            return _TorchDtype(name=name, dtype=_TORCH_DTYPES[name])
        if full in _STUBBED:
            if full not in self._stubs:
                self._stubs[full] = type(name, (_InertStub,), {"__module__": module, "__qualname__": name})
            return self._stubs[full]
        raise CheckpointError(
            f"{self._path}: refuses to load global '{full}': only tensors, plain containers and known "
            "training-state classes are allowed (the file may be unsafe or needs code we do not run)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0):
            raise CheckpointError(f"{self._path}: unsupported persistent id {pid!r} in the pickle")
        _, storage_type, key, _location, numel = pid
        if self._load_storage is None:
            raise CheckpointError(f"{self._path}: pickle refers to storage {key!r} but is not in a torch zip archive")
        if key not in self._storages:
            raw = self._load_storage(key)
            if raw.nbytes < numel * storage_type.dtype.itemsize:
                raise CheckpointError(f"{self._path}: storage {key!r} has {raw.nbytes} bytes, its record needs "
                                      f"{numel} x {storage_type.dtype.itemsize}: truncated file?")
            self._storages[key] = raw
        typed = storage_type.name not in ("torch.storage.UntypedStorage", "torch.UntypedStorage")
        return _Storage(key=key, raw=self._storages[key], dtype=storage_type.dtype if typed else None)

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, *_ignored):
        if not isinstance(storage, _Storage) or storage.dtype is None:
            raise CheckpointError(f"{self._path}: tensor rebuild without a typed storage")
        return self._as_array(storage, storage.dtype, storage_offset, size, stride)

    def _rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad, hooks, dtype, *_ignored):
        if not isinstance(storage, _Storage) or not isinstance(dtype, _TorchDtype):
            raise CheckpointError(f"{self._path}: tensor rebuild without a storage and a torch dtype")
        return self._as_array(storage, dtype.dtype, storage_offset, size, stride)

    def _as_array(self, storage: _Storage, dtype: np.dtype, offset, size, stride) -> np.ndarray:
        """The tensor ``storage[offset + sum(i_k * stride_k)]`` of shape ``size`` as a numpy array."""
        where = f"{self._path}: tensor on storage {storage.key!r}"
        if not (_is_uint(offset) and isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
                and all(_is_uint(v) for v in size + stride)):
            raise CheckpointError(f"{where}: bad offset/size/stride {offset!r}, {size!r}, {stride!r}")
        if dtype not in _SAFE_DTYPES:
            raise CheckpointError(f"{where}: unsupported dtype {dtype!r}")
        if storage.raw.nbytes % dtype.itemsize:
            raise CheckpointError(f"{where}: {storage.raw.nbytes} bytes is not a whole number of {dtype} elements")
        if math.prod(size) == 0:
            return np.zeros(size, dtype)
        raw = storage.raw
        if self._big_endian and dtype.itemsize > 1:
            raw = raw.view(f"u{dtype.itemsize}").byteswap().view(np.uint8)  # copy, in native order
        flat = raw.view(dtype)
        end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
        if end > flat.size:
            raise CheckpointError(f"{where}: view needs {end} elements, the storage has {flat.size}")
        contiguous = [math.prod(size[k + 1:]) for k in range(len(size))]
        if all(s == c for n, s, c in zip(size, stride, contiguous) if n != 1):
            return flat[offset:offset + math.prod(size)].reshape(size)  # a view, no copy
        view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size, strides=[s * dtype.itemsize for s in stride],
                                               writeable=False)
        return np.ascontiguousarray(view)


def _is_uint(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_ckpt(path: str | os.PathLike) -> dict:
    """Unpickle a ``torch.save`` zip checkpoint with every tensor as a numpy array; runs nothing from the file.

    Returns the top-level dict as saved (e.g. a Lightning dict with "state_dict"). Tensors are read-only
    memory-mapped views where possible. Raises :class:`CheckpointError` for anything malformed or unsafe.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise CheckpointError(f"{path}: file is empty")
            if f.read(4) != _ZIP_MAGIC:
                f.seek(0)
                _refuse_non_zip(path, f)
            f.seek(0)
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            obj = _read_zip(path, f, mm)
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
    except (ValueError, OverflowError, EOFError, NotImplementedError, RuntimeError, struct.error) as e:
        # zipfile on a damaged archive: an unsupported "version needed", a name that is not UTF-8, an offset
        # past what mmap can index, ... (UnicodeDecodeError is a ValueError)
        raise CheckpointError(f"{path}: corrupt zip archive ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: checkpoint holds a {type(obj).__name__}, expected a dict")
    return obj


def _refuse_non_zip(path: str, f) -> None:
    """Explain why a non-zip file is not read; a pickle is inspected only with the restricted unpickler."""
    if f.read(1) != b"\x80":
        raise CheckpointError(f"{path}: not a torch checkpoint (neither a zip archive nor a pickle)")
    f.seek(0)
    first = _unpickle(path, _RestrictedUnpickler(f, path))
    if first == _LEGACY_MAGIC:
        raise CheckpointError(
            f"{path}: legacy torch serialization (torch < 1.6, non-zip) is not supported; re-save it in a trusted "
            "environment with torch >= 1.6: torch.save(torch.load(path, weights_only=True), new_path)"
        )
    raise CheckpointError(f"{path}: a bare pickle, not a torch zip checkpoint (torch.save of torch >= 1.6)")


def _unpickle(path: str, unpickler: _RestrictedUnpickler):
    try:
        return unpickler.load()
    except CheckpointError:
        raise
    except Exception as e:  # truncated data, wrong argument types, recursion, ...
        raise CheckpointError(f"{path}: malformed checkpoint pickle: {type(e).__name__}: {e}") from e


def _read_zip(path: str, f, mm: mmap.mmap):
    try:
        archive = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated zip archive ({e})") from e
    with archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            found = "no" if not pickles else f"{len(pickles)}"
            raise CheckpointError(f"{path}: zip archive has {found} '<prefix>/data.pkl' records: "
                                  "not a torch checkpoint")
        prefix = pickles[0][: -len("/data.pkl")]
        byteorder = _read_member(path, archive, f"{prefix}/byteorder") if f"{prefix}/byteorder" in names else b"little"
        if byteorder not in (b"little", b"big"):
            raise CheckpointError(f"{path}: unknown byteorder record {byteorder[:20]!r}")

        def load_storage(key: str) -> np.ndarray:
            return _member_bytes(path, archive, mm, f"{prefix}/data/{key}")

        data_pkl = _read_member(path, archive, pickles[0])
        unpickler = _RestrictedUnpickler(io.BytesIO(data_pkl), path, load_storage, big_endian=byteorder == b"big")
        return _unpickle(path, unpickler)


def _read_member(path: str, archive: zipfile.ZipFile, name: str) -> bytes:
    try:
        return archive.read(name)
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read zip member {name!r}: {e}") from e


def _member_bytes(path: str, archive: zipfile.ZipFile, mm: mmap.mmap, name: str) -> np.ndarray:
    """A storage's bytes: a view of the mmap for stored (uncompressed) members, else a read copy."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise CheckpointError(f"{path}: storage record {name!r} is missing from the zip archive") from None
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        return np.frombuffer(_read_member(path, archive, name), dtype=np.uint8)
    header = mm[info.header_offset: info.header_offset + 30]
    if len(header) < 30 or header[:4] != _ZIP_MAGIC:
        raise CheckpointError(f"{path}: bad local zip header for {name!r}: corrupt file")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > len(mm):
        raise CheckpointError(f"{path}: storage record {name!r} extends past the end of the file: truncated file?")
    return np.frombuffer(mm, dtype=np.uint8, count=info.file_size, offset=start)
