"""Multi-host sampling refuses hosts given different requests (`ldm_jax.cli.same_request`): the model files are
compared by what they hold (size; a converted directory's metadata less its source path), not by their paths.
The end-to-end refusal with two processes is tests/test_parallel.py::test_cli_hosts_save_their_share_..."""

import json
import types

import pytest

from ldm_jax import parallel
from ldm_jax.cli import same_request


def _args(**kw):
    base = {k: None for k in same_request.REQUEST_ARGS}
    base.update(mode="txt2img", prompt="a shape", n=2, seed=0, steps=10, sampler="ddim", scale=7.5, eta=0.0,
                checkpoint=None, vae=None, lora=None, from_file=None)
    base.update(kw)
    return types.SimpleNamespace(**base)


@pytest.fixture
def seen(monkeypatch):
    """The settings each call would compare between hosts, as the digest `check_same_everywhere` takes."""
    calls = []
    monkeypatch.setattr(parallel, "check_same_everywhere",
                        lambda settings, hint: calls.append(json.dumps(settings, sort_keys=True, default=repr)))
    return lambda args: (same_request.check_same_request(args, [args.prompt] * args.n), calls[-1])[1]


def _file(path, size):
    path.write_bytes(b"x" * size)
    return str(path)


def test_files_compared_by_size_not_path(tmp_path, seen):
    (tmp_path / "b").mkdir()
    a, b = _file(tmp_path / "a.safetensors", 10), _file(tmp_path / "b" / "a.safetensors", 10)
    other = _file(tmp_path / "c.safetensors", 11)
    assert seen(_args(checkpoint=a)) == seen(_args(checkpoint=b))
    assert seen(_args(checkpoint=a)) != seen(_args(checkpoint=other))
    assert seen(_args(checkpoint=a, vae=a)) != seen(_args(checkpoint=a, vae=other))
    assert seen(_args(checkpoint=a)) != seen(_args(checkpoint=a, vae=a))


def test_lora_files_and_scales_compared(tmp_path, seen):
    a, other = _file(tmp_path / "a.safetensors", 10), _file(tmp_path / "c.safetensors", 11)
    assert seen(_args(lora=[(a, 0.5)])) == seen(_args(lora=[(a, 0.5)]))
    assert seen(_args(lora=[(a, 0.5)])) != seen(_args(lora=[(a, 0.8)]))
    assert seen(_args(lora=[(a, 0.5)])) != seen(_args(lora=[(other, 0.5)]))
    assert seen(_args(lora=[(a, 0.5), (other, 1.0)])) != seen(_args(lora=[(other, 1.0), (a, 0.5)]))
    assert seen(_args(lora=[(a, 0.5)])) != seen(_args())


def test_converted_directories_compared_by_metadata_less_source(tmp_path, seen):
    def converted(name, **meta):
        d = tmp_path / name
        d.mkdir()
        (d / "metadata.json").write_text(json.dumps({"format": "ldm-jax", "dtype": "float32", **meta}))
        return str(d)

    here = converted("here", source="/mnt/a/sd.ckpt", source_sha256="ab")
    there = converted("there", source="/data/sd.ckpt", source_sha256="ab")
    other = converted("other", source="/mnt/a/sd.ckpt", source_sha256="cd")
    assert seen(_args(checkpoint=here)) == seen(_args(checkpoint=there))
    assert seen(_args(checkpoint=here)) != seen(_args(checkpoint=other))


def test_missing_or_unreadable_paths_do_not_raise(tmp_path):
    assert same_request.file_identity(None) is None
    assert same_request.file_identity(str(tmp_path / "nope")) is None
    assert same_request.file_identity(str(tmp_path)) == "directory"  # no metadata.json
    (tmp_path / "metadata.json").write_text("[1, 2]")  # not an object
    assert same_request.file_identity(str(tmp_path)) == "directory"
