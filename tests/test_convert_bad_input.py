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
from convert.orbax_io import is_converted_dir
from tests.test_convert import (REPO, assert_failed, cli, convert, leftovers, save_ckpt, save_safetensors,
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
        "two text encoders"),
    "SD 2.x (1024-wide context)": (lambda d: save_safetensors(d / "m.safetensors", _modified(
        **{"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
           np.ones((32, 1024), np.float32)})), [], "incomplete SD 2.x checkpoint"),
    "SDXL": (lambda d: save_safetensors(d / "m.safetensors", _modified(
        **{"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": np.ones(8, np.float32)})), [],
        "this file holds text encoders of two layouts"),
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


# ------------------------------------------------------------------------------ converted directories, export, verify


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny converted directory (do not modify: copy it) and its source file."""
    d = tmp_path_factory.mktemp("converted")
    src = save_safetensors(d / "m.safetensors", tiny_state_dict())
    convert(src, d / "cv")
    return d / "cv", src


def _largest_data_file(d):
    files = [p for p in (d / "params").rglob("*") if p.is_file() and "ocdbt.process_0" in p.parts]
    return max(files, key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["truncated data file", "deleted data file", "deleted _METADATA"])
def test_damaged_converted_directory_is_one_line(tmp_path, converted, damage):
    import shutil

    d = tmp_path / "d"
    shutil.copytree(converted[0], d)
    if damage == "deleted _METADATA":
        (d / "params" / "_METADATA").unlink()
    elif damage == "deleted data file":
        _largest_data_file(d).unlink()
    else:
        _truncated(_largest_data_file(d))
    rc, stdout, err = cli("export", d, tmp_path / "o.safetensors")
    assert_failed(rc, err, None, f"{d}: damaged converted directory", "params/")
    assert rc == 2 and stdout == "" and not (tmp_path / "o.safetensors").exists()
    assert "TensorStore({" not in err
    with pytest.raises(CheckpointError, match="damaged converted directory"):
        ldm_jax.load(d)
    if damage == "truncated data file":  # caught by the recorded sizes before orbax reads: nothing else printed
        code = ("import gc, ldm_jax\ntry:\n    ldm_jax.load(%r)\nexcept Exception as e:\n    print(type(e).__name__)\n"
                "gc.collect()\n" % str(d))
        r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.stdout == "CheckpointError\n" and r.stderr == "", r.stderr[:2000]


def test_damage_in_a_directory_without_recorded_sizes_is_still_a_checkpoint_error(tmp_path, converted):
    """Directories written before `params_files` was recorded: orbax's own failure, turned into one error."""
    import shutil

    d = tmp_path / "d"
    shutil.copytree(converted[0], d)
    meta = json.loads((d / "metadata.json").read_text())
    del meta["params_files"]
    (d / "metadata.json").write_text(json.dumps(meta))
    _truncated(_largest_data_file(d))
    with pytest.raises(CheckpointError, match="damaged converted directory: cannot restore its orbax parameters"):
        ldm_jax.load(d)


def test_export_refuses_what_it_cannot_write_faithfully(tmp_path, converted):
    cv, _ = converted
    before = sorted(p.relative_to(cv) for p in cv.rglob("*"))
    for out, needle in ((tmp_path / "x.ckpt", "the output must be a .safetensors file"),
                        (cv / "params" / "_METADATA", "is inside the converted directory"),
                        (cv / "x.safetensors", "is inside the converted directory"),
                        ("", "output file path is empty")):
        rc, stdout, err = cli("export", cv, out)
        assert rc == 2 and stdout == ""
        assert_failed(rc, err, None, needle)
    assert not (tmp_path / "x.ckpt").exists()
    assert sorted(p.relative_to(cv) for p in cv.rglob("*")) == before and ldm_jax.load(cv).config.name == "tiny"


def test_fp16_overflow_is_refused_by_export_and_convert(tmp_path):
    import warnings

    src = save_safetensors(tmp_path / "big.safetensors", _modified(**_with_value(UNET_KEY, 1, 1e6)))
    convert(src, tmp_path / "cv")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, stdout, err = cli("export", tmp_path / "cv", tmp_path / "o.safetensors", "--dtype", "fp16")
        assert rc == 2 and stdout == ""
        assert_failed(rc, err, None, f"{UNET_KEY}: max |value| 1e+06 does not fit float16")
        assert not (tmp_path / "o.safetensors").exists()
        rc, stdout, err = cli("convert", src, tmp_path / "c16", "--dtype", "fp16")
        assert rc == 2 and stdout == ""
        assert_failed(rc, err, tmp_path / "c16", f"{UNET_KEY}: max |value| 1e+06 does not fit float16")
        assert "NaN" not in err
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
    assert cli("export", tmp_path / "cv", tmp_path / "o.safetensors", "--dtype", "bf16")[0] == 0


def test_random_checkpoint_refuses_a_negative_seed(tmp_path):
    rc, stdout, err = cli("random-checkpoint", tmp_path / "x.safetensors", "--seed", "-1")
    assert rc == 2 and stdout == ""
    assert_failed(rc, err, None, "--seed must be a non-negative integer, got -1")
    assert os.listdir(tmp_path) == []


def test_verify_refuses_latent_sizes_the_unet_cannot_take(tmp_path):
    src = save_safetensors(tmp_path / "m.safetensors", tiny_state_dict())
    ckpt = save_ckpt(tmp_path / "m.ckpt", tiny_state_dict())
    for argv in ((src, "--latent-size", "3x5"), (src, "--latent-size", "1x1"),
                 (ckpt, "--preset", "tiny", "--latent-size", "4x5")):
        rc, stdout, err = cli("verify", *argv)
        assert rc == 2 and stdout == ""
        assert_failed(rc, err, None, "both sides must be multiples of 2 for this model's U-Net (tiny)")


def test_verify_takes_preset_and_config_for_files_without_a_stored_config(tmp_path, monkeypatch):
    from convert import verify as verify_module
    from tests.test_convert import TINY

    seen = []
    monkeypatch.setattr(verify_module, "verify", lambda sd, **kw: seen.append(sd.config) or [])
    ckpt = save_ckpt(tmp_path / "m.ckpt", tiny_state_dict())
    (tmp_path / "tiny.json").write_text(TINY.to_json())
    for args in (("--preset", "tiny"), ("--config", tmp_path / "tiny.json")):
        rc, stdout, err = cli("verify", ckpt, *args, "--components", "unet")
        assert rc == 0, err
        assert "loaded " + str(ckpt) + ": tiny" in stdout
    assert seen == [TINY, TINY]
    convert(ckpt, tmp_path / "cv", "--preset", "tiny")
    rc, _, err = cli("verify", tmp_path / "cv", "--preset", "tiny")
    assert_failed(rc, err, None, "a converted directory stores its architecture")


def test_ema_hint_names_the_python_keyword_too(tmp_path):
    src = save_safetensors(tmp_path / "m.safetensors", tiny_state_dict())
    with pytest.raises(CheckpointError, match=r"EMA weights were asked for \(--ema / ema=True\)"):
        ldm_jax.load(src, ema=True)


# ------------------------------------------------------------------------------ convert OUT_DIR safety


def test_overwrite_only_replaces_a_converted_directory(tmp_path, converted):
    _, src = converted
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    rc, stdout, err = cli("convert", src, victim, "--overwrite")
    assert rc == 2 and stdout == ""
    assert_failed(rc, err, None, "not an ldm-jax converted directory; refusing to replace it")
    assert (victim / "thesis.tex").read_text() == "years of work" and leftovers(victim) == []

    real = tmp_path / "real"
    convert(src, real)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    for args in ((), ("--overwrite",)):
        rc, _, err = cli("convert", src, link, *args)
        assert_failed(rc, err, None, "is a symbolic link")
    assert link.is_symlink() and is_converted_dir(real) and leftovers(link) == [] and leftovers(real) == []
    assert sorted(os.listdir(tmp_path)) == ["link", "real", "victim"]


def test_empty_paths_are_named(tmp_path, converted):
    _, src = converted
    for argv, needle in ((("convert", src, ""), "output directory path is empty"),
                         (("convert", "", tmp_path / "o"), "source file path is empty"),
                         (("export", "", tmp_path / "o.safetensors"), "the source path is empty")):
        rc, stdout, err = cli(*argv)
        assert rc == 2 and stdout == ""
        assert_failed(rc, err, None, needle)
    assert os.listdir(tmp_path) == []
