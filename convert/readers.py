"""Read a checkpoint file into a flat ``{name: np.ndarray}`` state dict, whatever its container format.

Dispatch is on content first, then on the extension:

* a zip archive (``PK\\x03\\x04``) is a ``torch.save`` checkpoint -> :func:`convert.ckpt_reader.read_ckpt`;
* a file whose byte 8 is ``{`` (an 8-byte header size followed by a JSON object) -> safetensors;
* otherwise the extension picks the reader that explains what is wrong: ``.ckpt``/``.pt``/``.pth``/``.bin``
  (or a file starting with a pickle opcode) -> the ckpt reader, anything else -> the safetensors reader.

Unwrapping policy for torch checkpoints (Lightning, CompVis): while the dict has a ``"state_dict"`` entry that is
a dict, that entry *is* the model and its siblings (``global_step``, ``epoch``, ``callbacks``,
``optimizer_states``, ``lr_schedulers``, ``hparams``, ``pytorch-lightning_version``, ...) are training state and
are dropped; this repeats for nested ``{"state_dict": {"state_dict": ...}}``. A dict without ``"state_dict"``
is itself the state dict. Inside the state dict every value must be an array: anything else (a string, a number,
a nested dict) is a :class:`CheckpointError` naming the key, never silently dropped.
"""

from __future__ import annotations

import hashlib
import mmap
import os

import numpy as np

from convert.ckpt_reader import read_ckpt
from convert.errors import CheckpointError
from convert.file_kinds import describe_container, describe_directory
from convert.safetensors_io import read_safetensors

CKPT_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_EXTENSIONS = (".safetensors",)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The flat ``{name: array}`` state dict of a .ckpt/.pt/.pth/.bin or .safetensors file (arrays may be
    read-only memory-mapped views). Raises :class:`CheckpointError` with a one-line reason on any problem."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: " + (describe_directory(path)
                                             or "is a directory, expected a .ckpt or .safetensors file"))
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
    if not head:
        raise CheckpointError(f"{path}: file is empty")

    extension = os.path.splitext(path)[1].lower()
    if head.startswith(b"PK\x03\x04"):
        use_ckpt = True
    elif head[8:9] == b"{":
        use_ckpt = False
    else:
        use_ckpt = extension in CKPT_EXTENSIONS or (extension not in SAFETENSORS_EXTENSIONS and head[:1] == b"\x80")
        if not use_ckpt and extension not in SAFETENSORS_EXTENSIONS:  # a text file, an image, ...: say so plainly
            raise CheckpointError(f"{path}: not a checkpoint file (by its first bytes neither a safetensors file nor a "
                                  "torch zip archive or pickle)")
    if not use_ckpt:
        tensors, _metadata = read_safetensors(path)
        return tensors
    return _state_dict_of(path, read_ckpt(path))


def labelled(label: str, path: str, message: str) -> str:
    """`LABEL PATH: message`, whether or not `message` already starts with the path (the readers' own errors do)."""
    message = message[len(path) + 2:] if message.startswith(f"{path}: ") else message
    return f"{label} {path}: {message}"


def read_labelled(path: str | os.PathLike, label: str, expected: str) -> dict[str, np.ndarray]:
    """`read_state_dict` of a file given beside a checkpoint (a VAE, a LoRA): every error is one line starting
    `LABEL PATH:` (label e.g. "VAE file"); `expected` names the kind of file wanted, for a directory."""
    path = os.fspath(path)
    if not path:
        raise CheckpointError(f"the {label} path is empty")
    if not os.path.exists(path):
        raise CheckpointError(labelled(label, path, "no such file"))
    if os.path.isdir(path):
        raise CheckpointError(labelled(label, path, f"is a directory, expected {expected}"))
    if not os.access(path, os.R_OK):
        raise CheckpointError(labelled(label, path, "cannot read: permission denied"))
    try:
        return read_state_dict(path)
    except CheckpointError as e:
        raise CheckpointError(labelled(label, path, str(e))) from None


def _state_dict_of(path: str, obj: dict) -> dict[str, np.ndarray]:
    """Unwrap (nested) Lightning ``state_dict`` levels, then check that every value is an array."""
    known = describe_container(obj)  # an A1111 embedding or hypernetwork, before its non-tensor values are refused
    if known is not None:
        raise CheckpointError(f"{path}: {known}")
    depth = 0
    while isinstance(obj.get("state_dict"), dict):
        obj, depth = obj["state_dict"], depth + 1
    where = "state_dict" + ".state_dict" * (depth - 1) if depth else "top-level dict"
    state = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: {where} has a non-string key {key!r}")
        if not isinstance(value, np.ndarray):
            raise CheckpointError(f"{path}: {where}[{key!r}] is a {type(value).__name__}, expected a tensor")
        state[key] = value
    return state


def _mmap_of(array):
    """The mmap an array is a view of (following .base / memoryview.obj), or None."""
    obj = array
    while obj is not None and not isinstance(obj, mmap.mmap):
        obj = obj.obj if isinstance(obj, memoryview) else getattr(obj, "base", None)
    return obj


def release_pages(array) -> None:
    """Drop the pages of a read-only file-mapped array from this process's resident set (MADV_DONTNEED).

    The data stay in the page cache and are re-read on the next access, so this only lowers the peak RSS of a
    pass that reads every tensor once. No-op for arrays that are not mmap views or where madvise is missing.
    """
    mm = _mmap_of(array) if isinstance(array, np.ndarray) else None
    if mm is None or not hasattr(mmap, "MADV_DONTNEED") or array.nbytes == 0 or len(mm) == 0:
        return
    start = array.ctypes.data - np.frombuffer(mm, np.uint8, count=1).ctypes.data
    begin = start - start % mmap.PAGESIZE
    end = min(len(mm), start + array.nbytes)
    try:
        mm.madvise(mmap.MADV_DONTNEED, begin, end - begin)
    except (OSError, ValueError):
        pass


def sha256_file(path: str, progress: bool = False, chunk: int = 16 << 20) -> str:
    """Streamed sha256 of a file (constant memory; read() goes through the page cache, not our RSS)."""
    from tqdm.auto import tqdm

    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb") as f, tqdm(total=os.path.getsize(path), desc="sha256", unit="B", unit_scale=True,
                                     disable=not progress, leave=False) as bar:
        while n := f.readinto(buf):
            h.update(view[:n])
            bar.update(n)
    return h.hexdigest()
