"""Run `ldm-jax ARGV` in-process for tests: `cli(*argv)` -> (exit code, stdout, stderr)."""

import contextlib
import io

from ldm_jax.cli.main import main


def cli(*argv) -> tuple[int, str, str]:
    """Arguments are str()-ed (paths, numbers); argparse's one-line usage error (SystemExit) gives its code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()
