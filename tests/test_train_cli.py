"""`ldm-jax train` refusals that need no compiled step: each is one line naming the flag (exit 2) and leaves no run
directory behind; Ctrl-C held back by `progress.InterruptGuard`; warnings as one line; the progress bar on a
terminal that reports no size. (Refusals on --resume and out of memory need a checkpoint or the compiled step: see
test_train.py; a Ctrl-C during training: test_train_resume.py.)"""

import os
import signal

import pytest

from ldm_jax.cli.main import main
from tests.train_worker import COMMON, make_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("cli") / "squares")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ldm-jax train: error: "), err
    return err[0]


@pytest.mark.parametrize("flags, message", [
    (["--resolution", "0"], "--resolution must be >= 1, got 0"),
    (["--resolution", "-16"], "--resolution must be >= 1, got -16"),
    (["--stop-after", "0"], "--stop-after must be >= 1, got 0"),
    (["--stop-after", "-1"], "--stop-after must be >= 1"),
    (["--sample-every", "-1"], "--sample-every must be >= 0, got -1"),
    (["--num-workers", "-1"], "--num-workers must be >= 0, got -1"),
    (["--seed", "-1"], "--seed must be in [0, 4294967295]"),
    (["--lr", "-1"], "--lr must be > 0, got -1.0"),
    (["--lr", "nan"], "--lr must be > 0, got nan"),
    (["--caption-dropout", "2"], "--caption-dropout must be in [0, 1], got 2.0"),
    (["--adam-betas", "0.9", "1.5"], "--adam-betas must be in [0, 1), got 1.5"),
    (["--ema-decay", "1"], "--ema-decay must be in [0, 1)"),
    (["--clip", "-1"], "--clip must be >= 0"),
    (["--noise-offset", "2"], "--noise-offset must be in [0, 1], got 2.0"),
    (["--input-perturbation", "-0.1"], "--input-perturbation must be in [0, 1], got -0.1"),
    (["--input-perturbation", "nan"], "--input-perturbation must be in [0, 1], got nan"),
    (["--random-crop", "--precompute-latents"], "--random-crop and --precompute-latents do not go together"),
    (["--keep-tokens", "1"], "--keep-tokens N keeps the first N tags in place when --shuffle-caption"),
    (["--keep-tokens", "-1", "--shuffle-caption"], "--keep-tokens must be >= 0, got -1"),
    (["--shuffle-caption", "--precompute-latents"], "--shuffle-caption and --precompute-latents do not go together"),
    (["--aspect-buckets", "--class-data", "cls", "--class-prompt", "a dog"],
     "--aspect-buckets and --class-data do not go together yet"),
])
def test_bad_numbers_name_the_flag(data, tmp_path, capsys, flags, message):
    run = tmp_path / "run"
    assert main(["train", *COMMON, "--data", data, "--out", str(run), *flags]) == 2
    assert message in _error_line(capsys)
    assert not run.exists()


def test_random_crop_and_caption_shuffle_reach_the_loader(data, tmp_path, monkeypatch):
    from ldm_jax.train import loop

    seen = {}

    class Stop(Exception):
        pass

    def stop(dataset, **kw):  # the loader's arguments, then stop before any step
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(loop.D, "batches", stop)
    for flags, centre in (([], True), (["--random-crop", "--shuffle-caption", "--keep-tokens", "2"], False)):
        with pytest.raises(Stop):
            main(["train", *COMMON, "--data", data, "--out", str(tmp_path / f"run{centre}"), *flags])
        assert seen["center_crop"] is centre and seen["shuffle_caption"] is not centre
        assert seen["keep_tokens"] == (0 if centre else 2)


def test_resolution_not_a_multiple_is_refused_before_anything_is_written(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *COMMON, "--data", data, "--out", str(run), "--resolution", "10"]) == 2
    assert "--resolution must be a positive multiple of 4 for this model, got 10" in _error_line(capsys)
    assert not run.exists()


def test_out_is_a_file_or_the_data_folder(data, tmp_path, capsys):
    file = tmp_path / "tiny.safetensors"
    file.write_bytes(b"x")
    assert main(["train", *COMMON, "--data", data, "--out", str(file)]) == 2
    assert "is a file, not a run directory" in _error_line(capsys)
    for out in (data, os.path.join(data, "run")):
        assert main(["train", *COMMON, "--data", data, "--out", out]) == 2
        assert "--data folder" in _error_line(capsys)
    assert not os.path.exists(os.path.join(data, "run"))


def test_foreign_model_dir_is_refused_before_training(data, tmp_path, capsys):
    """RUN_DIR/model holding user files: refused at the start (the export at the end would refuse it), unless
    --export none; the run directory gets nothing new."""
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "notes.txt").write_text("mine")
    args = ["train", *[a for a in COMMON if a not in ("--export", "none")], "--data", data, "--out", str(run)]
    assert main([*args, "--export", "ema"]) == 2
    line = _error_line(capsys)
    assert "model exists and is not an ldm-jax converted directory" in line and "--export none" in line
    assert sorted(os.listdir(run)) == ["model"]
    assert main(["train", "--export-only", "--preset", "tiny", "--out", str(run)]) == 2
    assert "not an ldm-jax converted directory" in _error_line(capsys)


def test_batch_larger_than_the_data_names_the_flag(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *COMMON, "--data", data, "--out", str(run), "--batch-size", "9"]) == 2
    line = _error_line(capsys)
    assert "--batch-size 9 is more than the 8 images" in line and "drop_last" not in line
    assert not run.exists()


def test_export_only_refusals_create_nothing(tmp_path, capsys):
    run = tmp_path / "doesnotexist"
    assert main(["train", "--export-only", "--preset", "tiny", "--out", str(run)]) == 2
    assert "not a run directory" in _error_line(capsys)
    assert not run.exists()
    run.mkdir()
    assert main(["train", "--export-only", "--preset", "tiny", "--out", str(run)]) == 2
    assert "no checkpoint in" in _error_line(capsys)
    assert os.listdir(run) == []  # no empty checkpoints/ left behind
    assert main(["train", "--export-only", "--preset", "tiny", "--out", str(run), "--export", "none"]) == 2
    assert "--export ema or --export raw" in _error_line(capsys)


def test_help_describes_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "AdamW's moment decay rates" in out and "AdamW's epsilon" in out


def test_help_states_every_default():
    """Every option with a default value says so in its help ("(default: ...)"), as --checkpoint's bundled model."""
    import argparse

    from ldm_jax.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    unstated = [a.option_strings[0] for a in sub.choices["train"]._actions
                if a.help and a.default not in (None, False, [], argparse.SUPPRESS) and "default" not in a.help]
    assert unstated == []
    checkpoint = next(a for a in sub.choices["train"]._actions if "--checkpoint" in a.option_strings)
    assert "default: the bundled shapes model" in checkpoint.help


def test_without_checkpoint_or_preset_the_bundled_model_is_the_base(data, tmp_path, capsys):
    """As every ldm-jax command (README), no --checkpoint means the bundled shapes model (it used to be refused):
    its size step, 16, is the one checked here (the tiny preset's is 4)."""
    run = tmp_path / "run"
    assert main(["train", "--data", data, "--out", str(run), "--resolution", "24", "--export", "none"]) == 2
    assert "--resolution must be a positive multiple of 16 for this model, got 24" in _error_line(capsys)
    assert not run.exists()


def test_sample_steps_ddim_refuses_are_refused_before_training(data, tmp_path, capsys):
    """--sample-steps 3 does not fit CompVis' DDIM time steps: it used to fail at the first --sample-every step."""
    run = tmp_path / "run"
    args = ["train", *COMMON, "--data", data, "--out", str(run), "--sample-every", "5", "--sample-prompt", "a"]
    assert main([*args, "--sample-steps", "3"]) == 2
    assert "--sample-steps 3: 3 DDIM/PLMS steps do not fit" in _error_line(capsys)
    assert not run.exists()


def test_sample_prompt_without_sample_every_is_refused(data, tmp_path, capsys):
    """The prompts would be silently unused (no sample is drawn without --sample-every)."""
    run = tmp_path / "run"
    assert main(["train", *COMMON, "--data", data, "--out", str(run), "--sample-prompt", "a"]) == 2
    assert "--sample-prompt needs --sample-every N" in _error_line(capsys)
    assert not run.exists()


def test_progress_lines_estimate_from_the_steps_after_the_first(monkeypatch, capsys):
    """The first line's row is read as the second step is queued: it has no estimate (it used to promise ~0 s);
    later estimates use the rate of the steps after it."""
    from ldm_jax.train import progress

    clock = iter([0.0, 0.01, 10.01, 20.01])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(progress, "LINE_SECONDS", 0.0)
    bar = progress.progress_bar(total=12, initial=0, enabled=True)
    for _ in range(3):
        bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith("step 1/12 (8%), 0:00:00 elapsed"), lines
    assert lines[1].endswith("0:00:10 elapsed, 0:01:40 left") and lines[2].endswith("0:00:20 elapsed, 0:01:30 left")


def test_interrupt_guard_holds_ctrl_c_until_the_block_ends():
    from ldm_jax.train.progress import InterruptGuard

    before = signal.getsignal(signal.SIGINT)
    guard, reached = InterruptGuard(), []
    with pytest.raises(KeyboardInterrupt):
        with guard:
            with guard.critical():
                os.kill(os.getpid(), signal.SIGINT)
                reached.append("after the signal")  # the handler ran here and held it
            reached.append("after the block")  # not reached: raised as the block ended
    assert reached == ["after the signal"]
    with pytest.raises(KeyboardInterrupt):
        with guard:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # outside a critical block: raised at once
                reached.append("outside")
    assert len(reached) < 1000
    assert signal.getsignal(signal.SIGINT) is before


def test_warnings_are_one_line():
    import warnings

    from ldm_jax.cli.main import one_line_warnings
    from ldm_jax.train.data import SmallImageWarning

    msg = "data/cyan.png: 12x12 is smaller than resolution 16; upscaled"
    with one_line_warnings("ldm-jax train"):
        text = warnings.formatwarning(SmallImageWarning(msg), SmallImageWarning, "/x/data.py", 300, "warnings.warn(")
    assert text == f"ldm-jax train: warning: {msg}\n"
    assert "SmallImageWarning" in warnings.formatwarning(SmallImageWarning(msg), SmallImageWarning, "x.py", 1)


def test_progress_bar_shows_on_a_terminal_without_a_width(monkeypatch):
    """A pseudo-terminal that reports a 0 x 0 size (`script` without a terminal, some CI runners): tqdm printed an
    empty bar there; the bar now has a fixed size."""
    import pty
    import select
    import sys

    from ldm_jax.train.progress import progress_bar

    master, slave = pty.openpty()  # a new pty's window size is 0 x 0
    with os.fdopen(slave, "w") as tty:
        monkeypatch.setattr(sys, "stderr", tty)
        bar = progress_bar(total=5, initial=0, enabled=True)
        bar.update(2)
        bar.close()
        tty.flush()
        shown = b""
        while select.select([master], [], [], 0.5)[0]:  # a pty hands the writes over in pieces: read them all
            chunk = os.read(master, 65536)
            if not chunk:
                break
            shown += chunk
        shown = shown.decode()
        assert "train:" in shown and "2/5" in shown, repr(shown)
        bar = progress_bar(total=5, initial=0, enabled=False)
        bar.update(2)
        bar.close()
    os.close(master)


def test_progress_off_a_terminal_is_plain_lines(data, tmp_path, capsys, monkeypatch):
    """Off a terminal (capsys is not one) the progress is a line at the first and last step and every
    LINE_SECONDS (0 here: every step), not tqdm's carriage returns; --no-progress prints none."""
    from ldm_jax.train import progress

    monkeypatch.setattr(progress, "LINE_SECONDS", 0.0)
    args = ["train", *[a for a in COMMON if a != "--no-progress"], "--data", data, "--steps", "3"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("train: step")]
    assert [ln.split(",")[0] for ln in lines] == ["train: step 1/3 (33%)", "train: step 2/3 (66%)",
                                                   "train: step 3/3 (100%)"]
    assert "loss=" in lines[-1] and "left" in lines[-1]
    # the first row's time is its step's (it was the few ms until the second step was queued: ~1000s of img/s)
    import json

    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert rows[0]["seconds"] >= 0.5 * min(r["seconds"] for r in rows[1:]), rows
    assert main([*args, "--out", str(tmp_path / "quiet"), "--no-progress"]) == 0
    assert "train: step" not in capsys.readouterr().err


def test_resume_drops_metrics_rows_past_its_checkpoint(tmp_path):
    """A crashed run (kill -9) wrote rows after its last checkpoint; the resumed run writes those steps again."""
    import json

    from ldm_jax.train.progress import Metrics

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 0.5}) + "\n" for i in range(1, 6)))
    Metrics(str(tmp_path), enabled=True).keep_until(3)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and not (tmp_path / "metrics.jsonl.tmp").exists()
