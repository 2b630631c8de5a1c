"""`ldm-jax` entry point: dispatch to sub-commands; user errors become one line and a non-zero exit.

Each sub-command module defines `add_parser(subparsers, name, help)` (which sets `func=...`) and the
function it points to, `(args) -> int`.
Modules are imported lazily by name so that `ldm-jax --help` stays fast and optional extras (torch) are
only needed by the commands that use them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import warnings

from ldm_jax.cli.interrupts import redeliver_dropped_interrupts

# (command, module, one-line help)
COMMANDS = [
    ("convert", "cmd_convert", "convert a CompVis .ckpt/.safetensors into an ldm-jax (orbax) directory"),
    ("export", "cmd_export", "write a converted directory or a CompVis checkpoint file as one CompVis .safetensors "
                             "(fp16, VAE/LoRA baked in)"),
    ("verify", "cmd_verify", "check a checkpoint's Flax outputs against the torch reference"),
    ("random-checkpoint", "cmd_random", "write a random-weight CompVis checkpoint of a preset (demos, benchmarks)"),
    ("txt2img", "cmd_sample", "generate images from text prompts"),
    ("img2img", "cmd_sample", "transform an init image guided by a prompt"),
    ("inpaint", "cmd_sample", "repaint the masked region of an image"),
    ("train", "cmd_train", "fine-tune / train the latent U-Net on a folder of captioned images"),
    ("bench", "cmd_bench", "benchmark U-Net, VAE and end-to-end sampling (optionally against torch)"),
]


def _available():
    for name, module, help_ in COMMANDS:
        try:
            yield name, importlib.import_module(f"ldm_jax.cli.{module}"), help_
        except ModuleNotFoundError as e:
            if e.name != f"ldm_jax.cli.{module}":
                raise


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage is in --help), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ldm-jax", description="Stable Diffusion in JAX/Flax: convert, verify, sample, train, benchmark.")
    from ldm_jax import __version__

    parser.add_argument("--version", action="version", version=f"ldm-jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module, help_ in _available():
        module.add_parser(sub, name, help_)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from convert.errors import CheckpointError
    from ldm_jax.errors import UserError

    return (UserError, CheckpointError, OSError)  # OSError: missing files, permissions, disk full


@contextlib.contextmanager
def one_line_warnings(command: str):
    """Warnings (an upscaled training image, an unwritable cache, a long prompt) as one line each on stderr,
    `ldm-jax COMMAND: warning: ...`, instead of Python's two lines with a library's source path."""
    original = warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None):
        text = (str(message).strip().splitlines() or [""])[0]
        return f"{command}: warning: {text}\n"

    warnings.formatwarning = formatwarning
    try:
        yield
    finally:
        warnings.formatwarning = original


def _multi_process() -> bool:
    return "jax" in sys.modules and sys.modules["jax"].distributed.is_initialized()


_TEXT_ARGS = ("prompt", "negative_prompt", "sample_prompt")  # read by the tokenizer: must be valid UTF-8


def _check_text(args) -> None:
    from ldm_jax.errors import UserError

    for name in _TEXT_ARGS:
        value = getattr(args, name, None)
        for text in value if isinstance(value, list) else [value]:
            try:
                (text or "").encode("utf-8")
            except UnicodeEncodeError:  # bytes the locale could not decode arrive as surrogates
                raise UserError(f"--{name.replace('_', '-')} is not valid UTF-8 text: {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    command = "ldm-jax"
    try:
        args = build_parser().parse_args(argv)
        command = f"ldm-jax {args.command}"
        _check_text(args)
        with one_line_warnings(command), redeliver_dropped_interrupts():
            return int(args.func(args) or 0)
    except _user_errors() as e:
        msg = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.filename}: {e.strerror}"
        print(f"{command}: error: {msg}", file=sys.stderr)
        if argv is None and _multi_process():  # JAX's shutdown at exit waits for every peer: one may be gone
            sys.stdout.flush()
            sys.stderr.flush()
            from ldm_jax.parallel import leave_in_order

            leave_in_order()  # process 0 last: its exit ends the coordination service
            os._exit(2)
        return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        if "ldm_jax.program_cache" in sys.modules:  # programs loaded but not run did not crash: keep their entries
            sys.modules["ldm_jax.program_cache"].release_all()
        if argv is None:  # the program itself (not a caller in Python): leave without the interpreter's teardown,
            # which crashed (SIGSEGV) after a Ctrl-C that landed while XLA was compiling; every `finally` that
            # removes a temporary output has run by now
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return 130


if __name__ == "__main__":
    sys.exit(main())
