"""Bad input to `ldm-jax convert` / `export` / `ldm_jax.load`: each case is one line on stderr, a non-zero exit,
no traceback, and nothing at OUT_DIR (no temporary directory left either)."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import ldm_jax
from convert.errors import CheckpointError
from tests.test_convert import (REPO, assert_failed, cli, convert, save_ckpt, save_safetensors,
                                tiny_state_dict)

UNET_KEY = "model.diffusion_model.out.2.bias"
VAE_KEY = "first_stage_model.decoder.conv_out.bias"


class _Payload:
    """Unpickling this would call open(marker, "w") and create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def hostile_ckpt(path, marker):
    """A torch-zip-shaped .ckpt whose data.pkl would create `marker` when unpickled by an unrestricted loader."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle.dumps({"state_dict": _Payload(str(marker))}, protocol=2))
        z.writestr("archive/version", "3\n")
    return path


def raw_safetensors(path, header, data: bytes = b"", size: int | None = None):
    """A .safetensors file with a hand-written header (dict or raw text) and data area."""
    blob = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if size is None else size) + blob + data)
    return path


def _entry(begin, end, shape=(2,), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


def _truncated(path, fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def _empty(path):
    path.write_bytes(b"")
    return path


def _modified(**changes):
    sd = tiny_state_dict()
    for k, v in changes.items():
        if v is None:
            del sd[k]
        else:
            sd[k] = v
    return sd


def _with_value(key, index, value):
    a = np.array(tiny_state_dict()[key])
    a.flat[index] = value
    return {key: a}


def _with_header_config(d, text):
    from convert.safetensors_io import write_safetensors
    from ldm_jax.loading import CONFIG_METADATA_KEY

    write_safetensors(d / "m.safetensors", tiny_state_dict(), {CONFIG_METADATA_KEY: text})
    return d / "m.safetensors"


def _zip_version_byte(path):
    raw = bytearray(path.read_bytes())
    raw[raw.index(b"PK\x01\x02") + 6] = 0xFF  # "version needed to extract" 25.5
    path.write_bytes(bytes(raw))
    return path


# name -> (make(tmp_path) -> src path, extra args, expected text in the error line)
CASES = {
    "truncated ckpt": (lambda d: _truncated(save_ckpt(d / "m.ckpt", tiny_state_dict())), ["--preset", "tiny"],
                       "m.ckpt"),
    "truncated safetensors": (lambda d: _truncated(save_safetensors(d / "m.safetensors", tiny_state_dict())), [],
                              "truncated"),
    "header larger than file": (lambda d: raw_safetensors(d / "m.safetensors", "{}", size=4096), [],
                                "larger than the file"),
    "header over 100 MB": (lambda d: raw_safetensors(d / "m.safetensors", "{}", size=200_000_000), [],
                           "exceeds the 100000000-byte limit"),
    "header not JSON": (lambda d: raw_safetensors(d / "m.safetensors", "{not json}"), [], "not valid JSON"),
    "overlapping offsets": (lambda d: raw_safetensors(d / "m.safetensors", {"a": _entry(0, 8), "b": _entry(4, 12)},
                                                      bytes(12)), [], "overlap"),
    "gapped offsets": (lambda d: raw_safetensors(d / "m.safetensors", {"a": _entry(0, 8), "b": _entry(12, 20)},
                                                 bytes(20)), [], "gap"),
    "out-of-range offsets": (lambda d: raw_safetensors(d / "m.safetensors", {"a": _entry(0, 8)}, bytes(4)), [],
                             "outside the data area"),
    "dtype x shape != bytes": (lambda d: raw_safetensors(d / "m.safetensors", {"a": _entry(0, 8, shape=(3,))},
                                                         bytes(8)), [], "needs 12"),
    "duplicate keys": (lambda d: raw_safetensors(
        d / "m.safetensors", '{"a": %s, "a": %s}' % (json.dumps(_entry(0, 8)), json.dumps(_entry(0, 8))),
        bytes(8)), [], "duplicate key 'a'"),
    "missing key": (lambda d: save_safetensors(d / "m.safetensors", _modified(**{UNET_KEY: None})), [],
                    f"missing tensor {UNET_KEY}"),
    "wrong shape": (lambda d: save_safetensors(d / "m.safetensors", _modified(**{VAE_KEY: np.zeros(4, np.float32)})),
                    [], f"{VAE_KEY}: shape (4,)"),
    "NaN weight": (lambda d: save_safetensors(d / "m.safetensors", _modified(**_with_value(UNET_KEY, 1, np.nan))),
                   [], f"{UNET_KEY}: contains NaN or Inf"),
    "Inf weight": (lambda d: save_safetensors(d / "m.safetensors", _modified(**_with_value(VAE_KEY, 0, np.inf))),
                   [], "--allow-nonfinite"),
    "non-tensor object": (lambda d: save_ckpt(d / "m.ckpt", _modified(**{UNET_KEY: "not a tensor"})),
                          ["--preset", "tiny"], f"state_dict['{UNET_KEY}'] is a str, expected a tensor"),
    "empty .safetensors": (lambda d: _empty(d / "m.safetensors"), [], "file is empty"),
    "empty .ckpt": (lambda d: _empty(d / "m.ckpt"), [], "file is empty"),
    "unexpected tensor": (lambda d: save_safetensors(d / "m.safetensors", _modified(
        **{"model.diffusion_model.extra.weight": np.ones(3, np.float32)})), [],
        "unexpected tensor(s), e.g. model.diffusion_model.extra.weight"),
    "SD 2.x (OpenCLIP)": (lambda d: save_safetensors(d / "m.safetensors", _modified(
        **{"cond_stage_model.model.token_embedding.weight": np.ones((4, 8), np.float32)})), [],
        "SD 2.x checkpoints are not supported yet"),
    "SD 2.x (1024-wide context)": (lambda d: save_safetensors(d / "m.safetensors", _modified(
        **{"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
           np.ones((32, 1024), np.float32)})), [], "SD 2.x checkpoints are not supported yet"),
    "SDXL": (lambda d: save_safetensors(d / "m.safetensors", _modified(
        **{"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": np.ones(8, np.float32)})), [],
        "SDXL checkpoints are not supported yet"),
    "config in header not JSON": (lambda d: _with_header_config(d, "not json"), [], "(ldm_jax.config) is damaged"),
    "config in header wrong type": (lambda d: _with_header_config(d, '{"unet": 5, "vae": {}, "text": {}}'), [],
                                    "model config.unet: expected a JSON object"),
    "corrupt zip (version)": (lambda d: _zip_version_byte(save_ckpt(d / "m.ckpt", tiny_state_dict())),
                              ["--preset", "tiny"], "corrupt zip archive (NotImplementedError"),
    "no such file": (lambda d: d / "missing.ckpt", [], "no such file"),
    "a directory as SRC": (lambda d: d, [], "is a directory"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_error_and_writes_nothing(tmp_path, case):
    make, args, expected = CASES[case]
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src = make(src_dir)
    out = tmp_path / "out"
    rc, stdout, err = cli("convert", src, out, *args)
    assert rc == 2 and stdout == ""
    assert_failed(rc, err, out, expected)


def test_hostile_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    src = hostile_ckpt(tmp_path / "evil.ckpt", marker)
    rc, _, err = cli("convert", src, tmp_path / "out")
    assert_failed(rc, err, tmp_path / "out", "refuses to load global", "open'")
    with pytest.raises(CheckpointError):
        ldm_jax.load(src)
    assert not marker.exists()


def test_allow_flags_accept_what_they_name(tmp_path):
    src = save_safetensors(tmp_path / "nan.safetensors", _modified(**_with_value(UNET_KEY, 1, np.nan)))
    convert(src, tmp_path / "nan", "--allow-nonfinite")
    assert np.isnan(np.asarray(ldm_jax.load(tmp_path / "nan").params["unet"]["out_2"]["bias"])[1])
    extra = "model.diffusion_model.extra.weight"
    src = save_safetensors(tmp_path / "x.safetensors", _modified(**{extra: np.ones(3, np.float32)}))
    log = convert(src, tmp_path / "x", "--allow-unexpected")
    assert "unexpected 1: " + extra in log
    assert json.loads((tmp_path / "x" / "metadata.json").read_text())["report"]["unexpected"] == [extra]


def test_not_a_converted_directory(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text("{}")
    rc, _, err = cli("export", tmp_path / "d", tmp_path / "o.safetensors")
    assert_failed(rc, err, None, "not an ldm-jax converted checkpoint directory")
    assert not (tmp_path / "o.safetensors").exists()
    with pytest.raises(CheckpointError, match="not an ldm-jax converted checkpoint directory"):
        ldm_jax.load(tmp_path / "d")
    rc, _, err = cli("convert", save_safetensors(tmp_path / "m.safetensors", tiny_state_dict()), tmp_path / "f",
                     "--config", tmp_path / "d" / "config.json")
    assert_failed(rc, err, tmp_path / "f", "not a ModelConfig JSON file")
    for text, needle in (('{"unet": 5, "vae": {}, "text": {}}', "model config.unet: expected a JSON object"),
                         ('{"unet": {"channels": "32"}, "vae": {}, "text": {}}', "unet.channels: expected int"),
                         ('{"unet": {"chanels": 32}, "vae": {}, "text": {}}', "unknown field(s) chanels")):
        (tmp_path / "d" / "config.json").write_text(text)
        rc, _, err = cli("convert", tmp_path / "m.safetensors", tmp_path / "f", "--config",
                         tmp_path / "d" / "config.json")
        assert_failed(rc, err, tmp_path / "f", needle)
    assert sorted(os.listdir(tmp_path)) == ["d", "m.safetensors"]


def test_real_process_errors_are_one_line(tmp_path):
    marker = tmp_path / "pwned"
    src = hostile_ckpt(tmp_path / "evil.ckpt", marker)
    for argv in (["convert", src, tmp_path / "out"], ["export", tmp_path, tmp_path / "o.safetensors"]):
        r = subprocess.run([sys.executable, "-m", "ldm_jax", *map(str, argv)], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith(f"ldm-jax {argv[0]}: error: ")
    assert sorted(os.listdir(tmp_path)) == ["evil.ckpt"]
