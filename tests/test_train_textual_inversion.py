"""Textual inversion (`ldm-jax train --textual-inversion WORD --init-word WORD0`, `train/textual_inversion.py`).

(a) One step: the gradient of the word's rows is the joint step's (`--train-text-encoder`, proven against torch in
    tests/test_train_text_encoder.py) gradient of those rows of the token embedding, at the same weights; the loss
    is the same. <= 1e-4 relative.
(b) The CLI: the run writes an A1111 embedding that `ldm_jax.load(embeddings=)` reads back to the trained (EMA)
    rows; resume keeps the word; bad words are refused in one line.
"""

import numpy as np
import pytest

from ldm_jax.cli.main import build_parser, main
from tests.parity import rel_err
from tests.train_worker import COMMON, make_dataset, step_gradients

WORD, N = "zorpish", 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ti") / "squares")


def _config(data, *extra):
    from ldm_jax.cli.cmd_train import train_config

    return train_config(build_parser().parse_args(["train", *COMMON, *extra, "--data", data, "--out", "x"]))


def test_one_step_gives_the_joint_steps_gradient_of_the_new_rows(data):
    from ldm_jax import parallel
    from ldm_jax.train import data as D
    from ldm_jax.train import textual_inversion as TI
    from ldm_jax.train.base import load_base
    from ldm_jax.train.step import components, frozen_inputs, shard_batch, trainable

    ti = _config(data, "--textual-inversion", WORD, "--init-word", "square", "--num-vectors", str(N))
    joint = _config(data, "--train-text-encoder")
    sd = TI.add_word(load_base(None, "tiny", 0), WORD, "square", N)
    cfg, mesh = sd.config, parallel.data_mesh()
    rows0 = TI.initial_rows(sd.params, cfg, N)
    table = np.asarray(sd.params["text_encoder"]["embeddings"]["token_embedding"]["embedding"])
    square = sd.tokenize(["square"])[0][1]
    assert np.array_equal(np.asarray(rows0["text_encoder"]), table[[square] * N]) and table.shape[0] == 49408 + N
    with D.batches(D.scan_dataset(data), batch_size=8, resolution=16, seed=0, num_workers=0) as it:
        rows = next(it)
    captions = [c.replace("square", WORD) if i % 2 else c for i, c in enumerate(rows["captions"])]
    ids = sd.tokenize(captions)
    assert (ids >= 49408).sum() == 4 * N  # the word's N ids in half the captions
    batch = shard_batch({"images": rows["images"][None], "ids": ids[None]}, mesh)

    def grads(step_cfg, params, frozen):
        return step_gradients(cfg, ti.optim, step_cfg, params, batch, frozen, mesh)

    g_ti, loss_ti = grads(ti.step, rows0, frozen_inputs(sd.params, sd.tokenize([""]), mesh, unet=True))
    g_joint, loss_joint = grads(joint.step, trainable(sd.params, joint.step),
                                frozen_inputs({"vae": sd.params["vae"]}, sd.tokenize([""]), mesh))
    want = components(g_joint, joint.step)["text_encoder"]["embeddings"]["token_embedding"]["embedding"][-N:]
    print(f"textual inversion step: loss {loss_ti:.6f} vs {loss_joint:.6f}, rows' gradient rel err "
          f"{rel_err(g_ti['text_encoder'], want):.2e}")
    assert rel_err(loss_ti, loss_joint) <= 1e-5
    assert np.abs(want).max() > 1e-6 and rel_err(g_ti["text_encoder"], want) <= 1e-4


def test_cli_writes_an_embedding_that_loads_back(data, tmp_path, capsys):
    import ldm_jax
    from convert.safetensors_io import read_safetensors
    from ldm_jax.train import textual_inversion as TI

    run = tmp_path / "run"
    args = ["train", *[a for a in COMMON if a not in ("--export", "none")], "--data", data, "--out", str(run),
            "--textual-inversion", WORD, "--init-word", "square", "--num-vectors", str(N), "--instance-prompt",
            f"a {WORD} shape", "--steps", "2", "--sample-every", "2", "--sample-prompt", f"a {WORD}",
            "--sample-steps", "2"]
    with pytest.warns(UserWarning, match="upscaled"):
        assert main(args) == 0
    assert "embedding" in capsys.readouterr().out and (run / "samples" / "step0000002-00.png").is_file()
    tensors, meta = read_safetensors(run / TI.FILE)
    assert set(tensors) == {"emb_params"} and tensors["emb_params"].shape == (N, 64) and meta["ldm_jax_word"] == WORD
    sd = ldm_jax.load(None, embeddings=[(str(run / TI.FILE), WORD)])
    table = np.asarray(sd.params["text_encoder"]["embeddings"]["token_embedding"]["embedding"])
    assert np.array_equal(table[-N:], tensors["emb_params"])
    assert main([*args[:-8], "--steps", "3", "--resume", "--textual-inversion", "other"]) == 2
    assert "resume it with the same --textual-inversion" in capsys.readouterr().err


@pytest.mark.parametrize("extra, says", [
    (["--textual-inversion", WORD, "--init-word", "a square"], "is 2 CLIP tokens"),
    (["--textual-inversion", "square", "--init-word", "cat"], "--textual-inversion 'square'"),
    (["--textual-inversion", WORD, "--init-word", "cat"], f"no caption uses the word '{WORD}'"),
    (["--textual-inversion", WORD], "--textual-inversion WORD and --init-word WORD0 go together"),
    (["--num-vectors", "2"], "--num-vectors is for --textual-inversion"),
    (["--textual-inversion", WORD, "--init-word", "cat", "--lora-rank", "4"], "not with --lora-rank"),
])
def test_refused_in_one_line(data, tmp_path, capsys, extra, says):
    assert main(["train", *COMMON, "--data", data, "--out", str(tmp_path / "run"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert not (tmp_path / "run").exists()
