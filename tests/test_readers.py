"""Torch-free checkpoint readers/writer (convert/safetensors_io.py, ckpt_reader.py, readers.py).

torch and the safetensors package are used here only as reference writers/readers.
"""

from __future__ import annotations

import collections
import json
import mmap
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import types
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as np_load_file
from safetensors.torch import load_file as torch_load_file
from safetensors.torch import save_file as torch_save_file

from convert.ckpt_reader import read_ckpt
from convert.errors import CheckpointError
from convert.readers import read_state_dict
from convert.safetensors_io import read_safetensors, write_safetensors

REPO = Path(__file__).resolve().parents[1]


def bits(a) -> np.ndarray:
    """The raw bit pattern of a tensor or array (so NaNs, -0.0, bf16 and float8 compare exactly)."""
    if isinstance(a, torch.Tensor):
        a = a.detach().contiguous()
        if a.is_floating_point():
            a = a.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()])
        return a.numpy()
    a = np.ascontiguousarray(a)
    return a if a.dtype.kind in "biu" else a.view(f"i{a.dtype.itemsize}")


def assert_same(ours: np.ndarray, ref) -> None:
    ref_shape = tuple(ref.shape)
    assert ours.shape == ref_shape
    np.testing.assert_array_equal(bits(ours), bits(ref))


def is_mmap_view(a: np.ndarray) -> bool:
    while a is not None and not isinstance(a, mmap.mmap):
        a = a.obj if isinstance(a, memoryview) else getattr(a, "base", None)
    return a is not None


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), **env}, timeout=60)
    assert result.returncode == 0, result.stderr
    return result


def reference_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g)
    x[0, 0], x[0, 1], x[0, 2] = float("nan"), -0.0, float("inf")
    return {
        "f32": x, "f16": x.half(), "bf16": x.bfloat16(), "f64": x.double(),
        "i64": torch.arange(-6, 6).reshape(3, 4), "i32": torch.arange(4, dtype=torch.int32),
        "i16": torch.arange(4, dtype=torch.int16), "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
    }


# ------------------------------------------------------------------------------------------------ safetensors


def test_safetensors_roundtrip_and_reference_readers(tmp_path):
    ref = reference_tensors()
    arrays = {k: (v.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if v.dtype == torch.bfloat16 else v.numpy())
              for k, v in ref.items()}
    path = tmp_path / "w.safetensors"
    write_safetensors(path, arrays, {"format": "pt", "note": "ü"})
    ours, meta = read_safetensors(path)
    assert meta == {"format": "pt", "note": "ü"}
    assert list(ours) == sorted(arrays)
    for k in ref:
        assert_same(ours[k], ref[k])
        assert not ours[k].flags.writeable
    theirs_t = torch_load_file(path)
    for k in ref:
        assert theirs_t[k].dtype == ref[k].dtype
        np.testing.assert_array_equal(bits(theirs_t[k]), bits(ref[k]))
    no_bf16 = tmp_path / "nobf16.safetensors"
    write_safetensors(no_bf16, {k: v for k, v in arrays.items() if k != "bf16"})
    theirs_np = np_load_file(no_bf16)
    for k, v in theirs_np.items():
        assert_same(v, ref[k])
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert n % 8 == 0 and path.read_bytes()[8 + n - 1:8 + n] in (b" ", b"}")


def test_safetensors_reads_reference_files_as_mmap_views(tmp_path):
    ref = reference_tensors()
    ref.pop("empty")
    path = tmp_path / "ref.safetensors"
    torch_save_file(ref, path, metadata={"a": "b"})
    ours, meta = read_safetensors(path)
    assert meta == {"a": "b"} and set(ours) == set(ref)
    for k in ref:
        assert_same(ours[k], ref[k])
    assert is_mmap_view(ours["f16"]) and not ours["f16"].flags.owndata
    torch_save_file({"x": torch.ones(2)}, tmp_path / "nometa.safetensors")
    assert read_safetensors(tmp_path / "nometa.safetensors")[1] is None


def test_safetensors_writer_is_deterministic_and_normalises_layout(tmp_path):
    a = np.arange(6, dtype=">f4").reshape(2, 3)  # big-endian input
    b = np.arange(12, dtype=np.int64).reshape(3, 4).T  # non-contiguous input
    write_safetensors(tmp_path / "1.safetensors", {"b": b, "a": a})
    write_safetensors(tmp_path / "2.safetensors", {"a": a, "b": b})
    assert (tmp_path / "1.safetensors").read_bytes() == (tmp_path / "2.safetensors").read_bytes()
    ours, _ = read_safetensors(tmp_path / "1.safetensors")
    np.testing.assert_array_equal(ours["a"], a)
    np.testing.assert_array_equal(ours["b"], b)
    assert ours["a"].dtype == np.dtype("<f4")
    write_safetensors(tmp_path / "empty.safetensors", {})
    assert read_safetensors(tmp_path / "empty.safetensors") == ({}, None)


class _Exploding:
    """Looks like an array for the header, then fails while its data is written."""

    dtype, shape = np.dtype(np.float32), (2,)

    def __array__(self, dtype=None, copy=None):
        raise RuntimeError("boom")


def test_safetensors_writer_is_atomic(tmp_path):
    path = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError, match="boom"):
        write_safetensors(path, {"a": np.ones(3, np.float32), "b": _Exploding()})
    assert list(tmp_path.iterdir()) == []
    path.write_bytes(b"old")
    with pytest.raises(CheckpointError, match="'s'.*cannot be stored"):
        write_safetensors(path, {"s": np.array(["x"])})
    with pytest.raises(CheckpointError, match="metadata"):
        write_safetensors(path, {}, {"k": 1})
    assert path.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1


def _st_file(tmp_path, header, data=b"", *, raw_header=None, size_field=None, raw_file=None) -> Path:
    blob = raw_header if raw_header is not None else json.dumps(header).encode()
    n = len(blob) if size_field is None else size_field
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw_file if raw_file is not None else struct.pack("<Q", n) + blob + data)
    return path


F4 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
BAD_SAFETENSORS = {
    "tiny": (dict(raw_file=b"\x05\0\0\0\0"), "5 bytes, shorter than the 8-byte"),
    "header_past_eof": (dict(header={}, size_field=1000), "larger than the file"),
    "header_too_big": (dict(header={}, size_field=200_000_000), "exceeds the 100000000-byte limit"),
    "not_utf8": (dict(raw_header=b'{"\xff": 1}'), "not valid UTF-8"),
    "not_json": (dict(raw_header=b'{"a": '), "not valid JSON"),
    "not_object": (dict(raw_header=b"[1, 2]"), "does not start with '{'"),
    "nan": (dict(raw_header=b'{"a": NaN}'), "non-JSON constant NaN"),
    "duplicate": (dict(raw_header=b'{"w": {}, "w": {}}'), "duplicate key 'w'"),
    "entry_not_object": (dict(header={"w": [1]}), "'w': header entry is a JSON list"),
    "missing_dtype": (dict(header={"w": {"shape": [1], "data_offsets": [0, 4]}}, data=b"\0" * 4),
                      r"missing \['dtype'\]"),
    "extra_field": (dict(header={"w": {**F4, "x": 1}}, data=b"\0" * 4), r"unexpected \['x'\]"),
    "dtype_type": (dict(header={"w": {**F4, "dtype": 3}}, data=b"\0" * 4), "'w': dtype must be a string"),
    "unknown_dtype": (dict(header={"w": {**F4, "dtype": "F12"}}, data=b"\0" * 4), "unknown or unsupported dtype 'F12'"),
    "shape_type": (dict(header={"w": {**F4, "shape": "1"}}, data=b"\0" * 4), "'w': shape must be"),
    "shape_negative": (dict(header={"w": {**F4, "shape": [-1]}}, data=b"\0" * 4), "'w': shape must be"),
    "shape_bool": (dict(header={"w": {**F4, "shape": [True]}}, data=b"\0" * 4), "'w': shape must be"),
    "offsets_len": (dict(header={"w": {**F4, "data_offsets": [0]}}, data=b"\0" * 4), "'w': data_offsets must be"),
    "offsets_reversed": (dict(header={"w": {**F4, "data_offsets": [4, 0]}}, data=b"\0" * 4), "end before begin"),
    "outside": (dict(header={"w": {**F4, "data_offsets": [0, 8]}}, data=b"\0" * 4), "outside the data area"),
    "overlap": (dict(header={"a": F4, "b": {**F4, "data_offsets": [2, 6]}}, data=b"\0" * 6), "'b'.*overlap"),
    "gap": (dict(header={"a": F4, "b": {**F4, "data_offsets": [6, 10]}}, data=b"\0" * 10), "'b'.*gap after byte 4"),
    "trailing": (dict(header={"a": F4}, data=b"\0" * 6), "2 bytes after the last tensor"),
    "size_mismatch": (dict(header={"a": {**F4, "shape": [2]}}, data=b"\0" * 4),
                      r"'a': 4 bytes but dtype float32 x shape \[2\] needs 8"),
    "metadata_type": (dict(header={"__metadata__": {"k": 1}}), "__metadata__"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAFETENSORS))
def test_safetensors_rejects_malformed(tmp_path, case):
    kwargs, message = BAD_SAFETENSORS[case]
    path = _st_file(tmp_path, **{"header": None, **kwargs})
    with pytest.raises(CheckpointError, match=message) as err:
        read_safetensors(path)
    assert str(path) in str(err.value)


def test_safetensors_edge_cases_accepted(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="0 bytes"):
        read_safetensors(path)
    header = {"z": {"dtype": "BF16", "shape": [0, 3], "data_offsets": [0, 0]}, "a": {**F4, "dtype": "I32"}}
    path = _st_file(tmp_path, header, data=struct.pack("<i", -7))  # unaligned (odd) header length is fine
    out, meta = read_safetensors(path)
    assert meta is None and out["z"].shape == (0, 3) and out["z"].dtype == ml_dtypes.bfloat16
    assert out["a"].tolist() == [-7]


# ------------------------------------------------------------------------------------------------ torch .ckpt


def test_ckpt_dtypes_views_and_containers(tmp_path):
    ref = reference_tensors()
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    views = {"base": base, "t": base.t(), "rows": base[1:3], "col": base[:, 2], "step": base[::2, ::3],
             "expand": torch.ones(3, 1).expand(3, 4), "param": torch.nn.Parameter(torch.full((2,), 3.0))}
    obj = {"state_dict": collections.OrderedDict(**ref, **views), "global_step": 7, "nested": [(1, "x", b"\x00\xff")],
           "np": np.float64(1.25), "size": torch.Size([2, 3]), "dtype": torch.float16, "set": {1, 2},
           "f8": torch.tensor([1.5, -2.0]).to(torch.float8_e4m3fn), "u16": torch.tensor([1, 65535], dtype=torch.uint16)}
    path = tmp_path / "m.ckpt"
    torch.save(obj, path)
    out = read_ckpt(path)
    sd = out["state_dict"]
    assert isinstance(sd, collections.OrderedDict) and list(sd) == list(obj["state_dict"])
    for k, v in obj["state_dict"].items():
        assert_same(sd[k], v)
        assert sd[k].dtype == (ml_dtypes.bfloat16 if k == "bf16" else v.detach().numpy().dtype)
    assert out["global_step"] == 7 and out["nested"] == [(1, "x", b"\x00\xff")] and out["set"] == {1, 2}
    assert out["np"] == 1.25 and out["np"].dtype == np.float64 and out["size"] == (2, 3)
    assert repr(out["dtype"]) == "torch.float16"
    assert out["f8"].dtype == ml_dtypes.float8_e4m3fn and out["f8"].astype(np.float32).tolist() == [1.5, -2.0]
    assert out["u16"].tolist() == [1, 65535]
    # contiguous tensors are read-only views of one mmap; views of one storage share memory
    assert is_mmap_view(sd["f16"]) and not sd["f16"].flags.writeable
    assert np.shares_memory(sd["base"], sd["rows"])
    assert sd["t"].flags.c_contiguous and sd["expand"].flags.c_contiguous


def test_read_state_dict_unwraps_lightning_with_stubbed_callbacks(tmp_path, monkeypatch):
    # A fake pytorch_lightning, on disk for the reader's subprocess (logs any import) and in sys.modules for torch.save.
    pkg = tmp_path / "site" / "pytorch_lightning" / "callbacks"
    pkg.mkdir(parents=True)
    log = tmp_path / "imported.log"
    hook = "import os\nif os.environ.get('IMPORT_LOG'): open(os.environ['IMPORT_LOG'], 'a').write(__name__)\n"
    for f in (pkg.parent / "__init__.py", pkg / "__init__.py"):
        f.write_text(hook)
    (pkg / "model_checkpoint.py").write_text(hook + "class ModelCheckpoint:\n    pass\n")
    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": mod.__name__})
    mod.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    callback = ModelCheckpoint()
    callback.dirpath, callback.best_model_score = "/logs", torch.tensor(0.5)
    weights = {"model.w": torch.randn(2, 3), "model.b": torch.arange(3)}
    torch.save({"state_dict": weights, "global_step": 470000, "epoch": 5, "pytorch-lightning_version": "1.4.2",
                "callbacks": {ModelCheckpoint: {"best_model_path": "x.ckpt"}, "instance": callback},
                "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(2)}}}], "lr_schedulers": []},
               tmp_path / "lightning.ckpt")

    run_python(f"""
        import sys
        sys.path.insert(0, {str(tmp_path / "site")!r})
        from convert.readers import read_state_dict
        from convert.ckpt_reader import read_ckpt
        sd = read_state_dict({str(tmp_path / "lightning.ckpt")!r})
        assert list(sd) == ["model.w", "model.b"], list(sd)
        full = read_ckpt({str(tmp_path / "lightning.ckpt")!r})
        (cls, state), (_, inst) = full["callbacks"].items()
        assert cls.__qualname__ == "ModelCheckpoint" and state == {{"best_model_path": "x.ckpt"}}
        assert inst.state["dirpath"] == "/logs" and float(inst.state["best_model_score"]) == 0.5
        assert "pytorch_lightning" not in sys.modules and "torch" not in sys.modules
    """, IMPORT_LOG=str(log))
    assert not log.exists()
    assert_same(read_state_dict(tmp_path / "lightning.ckpt")["model.w"], weights["model.w"])


def test_read_state_dict_nested_and_bad_values(tmp_path):
    w = torch.ones(2)
    torch.save({"state_dict": {"state_dict": {"w": w}}, "epoch": 1}, tmp_path / "nested.pt")
    assert list(read_state_dict(tmp_path / "nested.pt")) == ["w"]
    torch.save({"state_dict": {"w": w, "note": "hello"}}, tmp_path / "str.ckpt")
    with pytest.raises(CheckpointError, match=r"state_dict\['note'\] is a str, expected a tensor"):
        read_state_dict(tmp_path / "str.ckpt")
    torch.save({"w": w, "n": 3}, tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match=r"top-level dict\['n'\] is a int"):
        read_state_dict(tmp_path / "plain.pth")
    torch.save([w], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list, expected a dict"):
        read_state_dict(tmp_path / "list.pt")


def test_read_state_dict_dispatch_and_file_errors(tmp_path):
    w = torch.arange(4, dtype=torch.float16)
    torch.save({"w": w}, tmp_path / "zip.safetensors")  # content wins over the extension
    torch_save_file({"w": w}, tmp_path / "st.ckpt")
    torch_save_file({"w": w}, tmp_path / "noext")
    for name in ("zip.safetensors", "st.ckpt", "noext"):
        assert_same(read_state_dict(tmp_path / name)["w"], w)
    with pytest.raises(CheckpointError, match="no such file"):
        read_state_dict(tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match="is a directory"):
        read_state_dict(tmp_path)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="file is empty"):
        read_state_dict(tmp_path / "empty.ckpt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x01" * 20)
    with pytest.raises(CheckpointError, match="header size .* exceeds"):
        read_state_dict(tmp_path / "junk.safetensors")
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")  # it was read as a safetensors header
    with pytest.raises(CheckpointError, match=r"prompts.txt: not a checkpoint file \(by its first bytes neither"):
        read_state_dict(tmp_path / "prompts.txt")
    (tmp_path / "junk.ckpt").write_bytes(b"\x01" * 20)
    with pytest.raises(CheckpointError, match="neither a zip archive nor a pickle"):
        read_state_dict(tmp_path / "junk.ckpt")


def _rezip(src: Path, dst: Path, *, drop=(), replace=None) -> None:
    """Copy a torch zip, dropping members whose name ends with one of ``drop`` or replacing data.pkl."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if info.filename.endswith(tuple(drop)) and drop:
                continue
            data = replace if replace is not None and info.filename.endswith("/data.pkl") else zin.read(info)
            zout.writestr(info.filename, data)


def test_ckpt_rejects_damaged_files(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"w": torch.randn(64, 64)}, good)
    raw = good.read_bytes()
    cases = {
        "truncated": (raw[: len(raw) // 2], "corrupt or truncated zip"),
        "cut_tail": (raw[:-10], "corrupt or truncated zip"),
        "not_zip": (b"hello world, not a checkpoint", "neither a zip archive nor a pickle"),
        "bare_pickle": (pickle.dumps({"w": [1.0]}, protocol=2), "bare pickle, not a torch zip"),
    }
    central, local = raw.index(b"PK\x01\x02"), raw.index(b"PK\x03\x04")
    version = bytearray(raw)
    version[central + 6] = 0xFF  # "version needed to extract" 25.5: zipfile raises NotImplementedError
    bad_name = bytearray(raw)
    bad_name[local + 30], bad_name[local + 7] = 0xB1, bad_name[local + 7] | 0x08  # a UTF-8 flagged name that is not UTF-8
    cases.update(version=(bytes(version), r"corrupt zip archive \(NotImplementedError"),
                 name=(bytes(bad_name), r"corrupt zip archive \(UnicodeDecodeError"))
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=message):
            read_ckpt(tmp_path / name)
    _rezip(good, tmp_path / "nopkl.ckpt", drop=["/data.pkl"])
    with pytest.raises(CheckpointError, match="no '<prefix>/data.pkl'"):
        read_ckpt(tmp_path / "nopkl.ckpt")
    _rezip(good, tmp_path / "nostorage.ckpt", drop=["/data/0"])
    with pytest.raises(CheckpointError, match="storage record 'good/data/0' is missing"):
        read_ckpt(tmp_path / "nostorage.ckpt")
    with zipfile.ZipFile(good) as z:
        short = z.read("good/data.pkl").replace(b"M\x00\x10", b"M\x00\x20")  # numel 4096 -> 8192
    _rezip(good, tmp_path / "short.ckpt", replace=short)
    with pytest.raises(CheckpointError, match="storage '0' has 16384 bytes"):
        read_ckpt(tmp_path / "short.ckpt")
    torch.save({"a": torch.ones(3)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy torch serialization"):
        read_ckpt(tmp_path / "legacy.pt")


class _Hostile:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def _torch_style_zip(path: Path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


@pytest.mark.parametrize("attack", ["os.system", "builtins.exec", "nested"])
def test_ckpt_never_executes_the_pickle(tmp_path, attack):
    marker = tmp_path / "pwned"
    if attack == "os.system":
        evil, refused = _Hostile(os.system, f"touch {marker}"), "posix.system"
    elif attack == "builtins.exec":
        evil, refused = _Hostile(exec, f"open({str(marker)!r}, 'w').close()"), "builtins.exec"
    else:  # hidden inside an otherwise normal state dict
        evil = {"state_dict": {"w": [1.0], "x": _Hostile(eval, f"open({str(marker)!r}, 'w')")}}
        refused = "builtins.eval"
    payload = pickle.dumps(evil, protocol=2)
    _torch_style_zip(tmp_path / "evil.ckpt", payload)
    (tmp_path / "evil.pkl").write_bytes(payload)
    for name in ("evil.ckpt", "evil.pkl"):
        with pytest.raises(CheckpointError, match=f"refuses to load global '{refused}'"):
            read_ckpt(tmp_path / name)
        with pytest.raises(CheckpointError, match="refuses to load global"):
            read_state_dict(tmp_path / name)
    assert not marker.exists()


def test_ckpt_allowed_objects_cannot_be_modified_by_the_pickle(tmp_path):
    # GLOBAL _codecs.encode, then BUILD it with slot state {"fn": exec}: must fail, and the reader must keep working.
    payload = b"\x80\x02c_codecs\nencode\nN}X\x02\x00\x00\x00fnK\x01s\x86b."
    _torch_style_zip(tmp_path / "build.ckpt", payload)
    with pytest.raises(CheckpointError, match="refuses to modify <allowed _codecs.encode>"):
        read_ckpt(tmp_path / "build.ckpt")
    torch.save({"b": b"bytes"}, tmp_path / "ok.ckpt")
    assert read_ckpt(tmp_path / "ok.ckpt") == {"b": b"bytes"}


def test_readers_work_without_torch(tmp_path):
    torch.save({"state_dict": {"w": torch.arange(6.0).reshape(2, 3).t(), "h": torch.ones(2).bfloat16()}},
               tmp_path / "m.ckpt")
    torch_save_file({"w": torch.arange(3, dtype=torch.int64)}, tmp_path / "m.safetensors")
    run_python(f"""
        import sys
        sys.modules["torch"] = None  # any "import torch" now raises ImportError
        from convert.readers import read_state_dict
        from convert.safetensors_io import read_safetensors, write_safetensors
        sd = read_state_dict({str(tmp_path / "m.ckpt")!r})
        assert sd["w"].tolist() == [[0, 3], [1, 4], [2, 5]] and sd["h"].astype("f4").tolist() == [1, 1]
        assert read_safetensors({str(tmp_path / "m.safetensors")!r})[0]["w"].tolist() == [0, 1, 2]
        write_safetensors({str(tmp_path / "out.safetensors")!r}, sd)
        assert sys.modules["torch"] is None
    """)
    out = torch_load_file(tmp_path / "out.safetensors")
    assert out["w"].tolist() == [[0, 3], [1, 4], [2, 5]] and out["h"].dtype == torch.bfloat16
