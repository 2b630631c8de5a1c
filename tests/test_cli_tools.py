"""`ldm-jax verify`, `export` and `random-checkpoint` as a user meets them: bad input is one line before any work,
and verify notices loaded weights that differ from the file."""

import numpy as np
import pytest

from ldm_jax.cli.main import main


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tools") / "tiny.safetensors"
    assert main(["random-checkpoint", str(path), "--preset", "tiny"]) == 0
    return path


def _one_line_error(capsys, command: str) -> str:
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ldm-jax {command}: error: "), out.err
    return lines[0]


def test_verify_names_the_tensor_where_loaded_weights_differ_from_the_file(tiny_file, monkeypatch, capsys):
    """A loader that changed one weight must fail verify (the torch side reads the file, not the loaded params)."""
    import ldm_jax

    real_load = ldm_jax.load
    key = "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.bias"

    def perturbed_load(*args, **kwargs):
        from convert.keys import key_table

        sd = real_load(*args, **kwargs)
        params = sd.params
        (path,) = [e.flax_path for e in key_table("text_encoder", params["text_encoder"]) if e.key == key]
        parent = params["text_encoder"]
        for name in path[:-1]:
            parent = parent[name]
        parent[path[-1]] = np.asarray(parent[path[-1]]) + 0.5
        return sd.replace(params=params)

    monkeypatch.setattr(ldm_jax, "load", perturbed_load)
    assert main(["verify", str(tiny_file), "--components", "text_encoder"]) == 1
    out = capsys.readouterr().out
    assert "weights vs file" in out and f"FAIL  (max at {key})" in out, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("parity FAILED: text_encoder") and key in last, last


def test_verify_unchanged_file_passes_with_a_weights_row(tiny_file, capsys):
    assert main(["verify", str(tiny_file), "--components", "vae", "--latent-size", "8x8"]) == 0
    out = capsys.readouterr().out
    assert "weights vs file" in out and "tensors equal" in out and out.strip().endswith("parity OK"), out


@pytest.mark.parametrize("value", ["nan", "-1", "0", "inf"])
def test_verify_tolerance_must_be_positive_and_finite(tiny_file, value, capsys):
    assert main(["verify", str(tiny_file), f"--tolerance={value}"]) == 2
    assert "--tolerance must be a positive finite number" in _one_line_error(capsys, "verify")


def test_random_checkpoint_refuses_a_bad_output_before_making_weights(tmp_path, monkeypatch, capsys):
    from ldm_jax.cli import cmd_random

    monkeypatch.setattr(cmd_random, "random_params", lambda *a: pytest.fail("weights made before the path check"))
    (tmp_path / "dir.safetensors").mkdir()
    for out, message in ((tmp_path / "dir.safetensors", "is a directory"),
                         (tmp_path / "missing" / "a.safetensors", "does not exist")):
        assert main(["random-checkpoint", str(out), "--preset", "tiny"]) == 2
        assert message in _one_line_error(capsys, "random-checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.safetensors"]


def test_export_refuses_bad_paths_before_reading_weights(tiny_file, tmp_path, monkeypatch, capsys):
    import convert.orbax_io

    conv = tmp_path / "conv"
    assert main(["convert", str(tiny_file), str(conv)]) == 0
    capsys.readouterr()
    monkeypatch.setattr(convert.orbax_io, "read_converted", lambda *a, **k: pytest.fail("weights read first"))
    cases = [(conv, tmp_path / "missing" / "a.safetensors", "does not exist"),
             (tmp_path / "nope", tmp_path / "a.safetensors", "nope: no such directory"),
             (tiny_file, tiny_file, "is the source file"),
             (conv, tmp_path, "is a directory")]
    for src, out, message in cases:
        assert main(["export", str(src), str(out)]) == 2
        assert message in _one_line_error(capsys, "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv"]


def test_export_interrupted_while_reading_waits_for_the_reader_and_writes_nothing(tiny_file, tmp_path, monkeypatch,
                                                                                capsys):
    """Ctrl-C during the orbax restore: the restore finishes on its thread (its asyncio workers printed tracebacks
    when the process left under them), then exit 130 with no output file."""
    import _thread
    import time

    import convert.orbax_io

    conv = tmp_path / "conv"
    assert main(["convert", str(tiny_file), str(conv)]) == 0
    real, finished = convert.orbax_io._restore, []

    def interrupted_read(*args, **kwargs):
        time.sleep(0.1)
        _thread.interrupt_main()  # Ctrl-C arrives while the weights are being read
        time.sleep(0.2)
        out = real(*args, **kwargs)
        finished.append(True)
        return out

    monkeypatch.setattr(convert.orbax_io, "_restore", interrupted_read)
    assert main(["export", str(conv), str(tmp_path / "out.safetensors")]) == 130
    assert finished and sorted(p.name for p in tmp_path.iterdir()) == ["conv"]
    assert capsys.readouterr().err.strip().splitlines()[-1] == "ldm-jax export: interrupted"
