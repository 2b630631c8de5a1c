"""Where a command will write, checked before its long work (sampling, training): one line naming the flag, rather
than an error after minutes of compute."""

from __future__ import annotations

import os

from ldm_jax.errors import UserError


def check_can_write_dir(path: str, label: str) -> None:
    """UserError naming `label` (e.g. "--out runs/a") unless the directory `path` exists and is writable, or can
    be created: its nearest existing ancestor is a writable directory. Nothing is created here. A `path` that
    exists and is not a directory is for the caller to refuse, in its own words."""
    existing = os.path.abspath(path)
    missing = []
    while not os.path.lexists(existing):
        existing, name = os.path.split(existing)
        missing.append(name)
    try:
        longest = os.pathconf(existing if os.path.isdir(existing) else os.path.dirname(existing), "PC_NAME_MAX")
    except (OSError, ValueError):
        longest = 255
    too_long = [m for m in missing if len(os.fsencode(m)) > longest]
    if too_long:
        raise UserError(f"{label}: the name {too_long[0][:40]}... is longer than the file system allows "
                        f"({longest} bytes)")
    if not os.path.isdir(existing):
        what = "a broken symbolic link" if os.path.islink(existing) else "not a directory"
        raise UserError(f"{label}: cannot create it, {existing} is {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{label}: cannot write to {existing} (permission denied or read-only)")
